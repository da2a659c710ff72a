"""
### sofare_deploy — canary rollout behind the front door, analysed step by step

Runs **whenever `sofare_promote` builds a bento** (`sofare_bento`, whose extra carries the version), or
manually with the **version** Param (empty: the event's version, else the `challenger`).

- `start` — starts the version as the **canary** (its own `bentoml serve`) and gives it the first
  step's share of clients through the nginx front door (sticky by `X-Client-Id`). When nothing serves
  yet, the version becomes the stable (and the champion) instead and there is nothing to analyse.
- `analyse` — at each step of **steps** (default `deploy.steps`, 10 → 50 → 100 %): waits
  **interval_seconds**, then compares canary with stable from each server's `/metrics`: 5xx share and
  p95 latency (thresholds `deploy.*`). Each measurement is success, failure or inconclusive; too few
  requests is inconclusive (measured again at the same weight, then an abort), never a success.
- `finish` — success at 100 %: the canary becomes the stable, `champion` moves to its version, nothing
  dropped. Otherwise: abort, roll back to the stable (verified through the front door), alert.

Every step is a row in `deployment_events`; promotion and rollback also in `audit_log`. The on-call way
back is `sofare_rollback`.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from sofare.config import load_config
from sofare.orchestration import BENTO, CHAMPION, UNSCHEDULED_START, default_args, run

CFG = load_config()
ACTOR = "airflow:sofare_deploy"


@dag(
    dag_id="sofare_deploy",
    schedule=BENTO,
    start_date=UNSCHEDULED_START,
    catchup=False,
    max_active_runs=1,
    default_args={**default_args(CFG), "retries": 0},
    tags=["sofare", "deploy", "canary"],
    doc_md=__doc__,
    params={
        "version": Param(
            None,
            type=["null", "string"],
            title="Model version",
            description="Registered sofare-m3 version with a bento; empty: the triggering event's "
            "version, else the challenger",
        ),
        "steps": Param(
            CFG.deploy.steps,
            type="array",
            items={"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            minItems=1,
            title="Canary weights",
            description="Share of clients on the canary at each step, rising, ending at 1",
        ),
        "interval_seconds": Param(
            CFG.deploy.interval_seconds,
            type="number",
            minimum=0,
            maximum=86400,
            title="Seconds per step",
            description="Traffic observed before a step is judged",
        ),
    },
)
def sofare_deploy():
    @task
    def start(params=None, triggering_asset_events=None) -> dict:
        from sofare import tasks

        extras = [event.extra for events in (triggering_asset_events or {}).values() for event in events]
        return run(tasks.start_rollout, params["version"], params["steps"], extras, ACTOR)

    @task
    def analyse(plan: dict, params=None) -> dict:
        from sofare import tasks

        return run(tasks.analyse_rollout, plan, params["interval_seconds"], ACTOR)

    @task(outlets=[CHAMPION])
    def finish(outcome: dict) -> dict:
        from sofare import tasks

        return run(tasks.finish_rollout, outcome, ACTOR)

    finish(analyse(start()))


sofare_deploy()
