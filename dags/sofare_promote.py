"""
### sofare_promote — evaluate-then-promote, build the BentoML bundle, containerize

Runs **whenever `sofare_train` registers a version** (`sofare_model_candidate`, whose extra carries
the version), or manually with the **version** Param (empty: the newest registered version).

- `gate` — the promotion gate (`promotion.*` in the config): sane outputs; primary metric beats
  every baseline on the candidate's test window; not worse than the current `champion` re-scored on
  the same test rows; size and latency budgets. Verdict and reasons go to MLflow version tags and
  the `audit_log` table; a pass sets alias `challenger`. A rejection ends the run here (the
  downstream tasks are skipped, the run stays green: rejecting is the gate working) unless the
  **override_reason** Param is set: then the version is promoted as `overridden`, with the reason.
- `build` — imports the version from the MLflow registry into the bento store (var/bentoml) and
  runs `bentoml build` of `bentos/sofare`; the bento tag is recorded on the model version.
- `containerize` — `bentoml containerize` when a container engine answers; otherwise the build
  context with its Dockerfile is kept under var/containers/ and the task says why no image was built.

Emits `sofare_bento` (extra: version and bento tag) for the deployment stage.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from sofare.config import load_config
from sofare.orchestration import BENTO, MODEL_CANDIDATE, UNSCHEDULED_START, default_args, run

CFG = load_config()


@dag(
    dag_id="sofare_promote",
    schedule=MODEL_CANDIDATE,
    start_date=UNSCHEDULED_START,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    tags=["sofare", "promotion", "bentoml"],
    doc_md=__doc__,
    params={
        "version": Param(
            None,
            type=["null", "string"],
            title="Model version",
            description="Registered sofare-m3 version; empty: the one the triggering event carries, else the newest",
        ),
        "override_reason": Param(
            None,
            type=["null", "string"],
            title="Override reason (on-call)",
            description="Promote even if the gate rejects the version; recorded with the failed checks",
        ),
    },
)
def sofare_promote():
    @task.short_circuit
    def gate(params=None, triggering_asset_events=None) -> dict | bool:
        from sofare import tasks

        extras = [event.extra for events in (triggering_asset_events or {}).values() for event in events]
        verdict = run(
            tasks.promote, params.get("version"), "airflow:sofare_promote", params.get("override_reason"), extras
        )
        return verdict if verdict["promoted"] else False

    @task
    def build(verdict: dict) -> dict:
        from sofare import tasks

        return run(tasks.build_bento, verdict["version"], "airflow:sofare_promote")

    @task(outlets=[BENTO])
    def containerize(built: dict, outlet_events=None) -> dict:
        from sofare import tasks

        result = run(tasks.containerize, built["version"], built["bento"], "airflow:sofare_promote")
        outlet_events[BENTO].extra = {"version": built["version"], "bento": built["bento"], "image": result["image"]}
        return result

    containerize(build(gate()))


sofare_promote()
