"""
### sofare_monitor — what production shows, and what to do about it

Runs **hourly** and **whenever new candles land** (`sofare_candles`), or manually / as a backfill for
an hour with Params. One `monitoring_runs` row per run (the SOFARE monitor page charts them):

- `assess` — fills prediction outcomes from ingested candles (pending until the candle at
  `as_of + horizon` exists and has closed by the monitored hour; never guessed), live accuracy /
  ROC-AUC / Brier by model version and variant over the rolling windows with bootstrap CIs beside
  persistence and always-up on the same hours, Evidently drift of the served inputs against the
  version's reference sample plus prediction and target drift (HTML report in `var/reports/drift`;
  every `monitoring.drift_every_hours`, and on every manual run),
  each variant's error rate and p95 since the previous run; then severity → action from the rules in
  `monitoring.*` (minimum samples, cool-down). The reason is recorded either way.
- `route` — picks the action's branch: `alert`, `request_retrain` (an asset event on
  `sofare_retrain_request` that schedules `sofare_train`, the reason in its extra) or
  `trigger_rollback` (runs `sofare_rollback` with the reason and details), or `done`.

Every action alerts through the same notifier that every DAG uses for failed tasks.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from sofare.config import load_config
from sofare.orchestration import CANDLES, MONITORING, RETRAIN_REQUEST, SofareNotifier, default_args, run

CFG = load_config()
ACTOR = "airflow:sofare_monitor"


@dag(
    dag_id="sofare_monitor",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(CFG.monitoring.schedule, timezone="UTC"), assets=CANDLES
    ),
    start_date=pendulum.parse(CFG.ingest.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    tags=["sofare", "monitoring", "evidently"],
    doc_md=__doc__,
    params={
        "at": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Hour to monitor (UTC)",
            description="Empty: the run's logical time (the current hour for an asset-triggered run)",
        ),
        "start": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Fill outcomes from (UTC)",
            description="Empty: the longest monitoring window before the hour; earlier to backfill outcomes",
        ),
    },
)
def sofare_monitor():
    @task(outlets=[MONITORING], multiple_outputs=True)
    def assess(params=None, logical_date=None, dag_run=None) -> dict:
        from sofare import tasks

        manual = getattr(dag_run, "run_type", None) == "manual"  # a person asked: drift too, whatever the hour
        return run(tasks.monitor, params["at"] or logical_date, params["start"], ACTOR, drift=True if manual else None)

    @task.branch
    def route(action: str) -> list[str]:
        follow = {
            "alert": ["alert"],
            "retrain": ["alert", "request_retrain"],
            "rollback": ["alert", "trigger_rollback"],
        }
        return follow.get(action, ["done"])

    @task
    def alert(alert: dict, **context) -> None:
        SofareNotifier(alert["message"], alert["severity"], "sofare_monitor").notify(context)

    @task(outlets=[RETRAIN_REQUEST])
    def request_retrain(extra: dict, outlet_events=None) -> dict:
        outlet_events[RETRAIN_REQUEST].extra = extra
        return extra

    result = assess()
    branch = route(result["action"])
    rollback = TriggerDagRunOperator(
        task_id="trigger_rollback", trigger_dag_id="sofare_rollback", conf=result["rollback"], wait_for_completion=False
    )
    branch >> [alert(result["alert"]), request_retrain(result["retrain"]), rollback, EmptyOperator(task_id="done")]


sofare_monitor()
