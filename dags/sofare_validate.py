"""
### sofare_validate — Great Expectations on every interval before any model sees it

Runs **daily** (its data interval: one UTC day, backfillable) **and whenever `sofare_features`
is updated** (the interval the ingest or backfill task wrote, carried by the asset event), or
manually with **start/end** Params. For each of the four tables it runs the suite in `expectations/`
(GX Core, File Data Context in `var/gx`, thresholds from `validation.*` in the config):

- `validate[candles|safe_haven_bars|macro_observations|features]` — reads the interval from the
  warehouse, validates, writes a `validation_runs` row and marks each day passed or failed in
  `validated_days`. On failure the task fails (no retries: the same data fails again) with every
  failed expectation and how many rows break it, and an alert fires.
- `data_docs` — rebuilds the Data Docs site (`var/data_docs/index.html`, linked from the SOFARE menu),
  also after a failure, so the failed results can be read there.
- `publish` — when every suite passed: emits `sofare_validated_features` once for the run (its extra
  holds the validated windows), so `sofare_train` starts after all four suites, not after the first.
- `verdict` — runs only when a validation failed, and fails the DAG run (Data Docs alone would
  otherwise make a failed validation look like a successful run).

Training reads only days that passed every suite.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable, Param, dag, task

from sofare.config import load_config
from sofare.orchestration import FEATURES, VALIDATED_FEATURES, default_args, fail_fast, run
from sofare.validation import SUITES

CFG = load_config()


@dag(
    dag_id="sofare_validate",
    schedule=AssetOrTimeSchedule(
        timetable=CronDataIntervalTimetable(CFG.ingest.schedule, timezone="UTC"), assets=FEATURES
    ),
    start_date=pendulum.parse(CFG.ingest.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    default_args=default_args(CFG),
    tags=["sofare", "validation", "great-expectations"],
    doc_md=__doc__,
    params={
        "start": Param(
            None,
            type=["null", "string"],
            format="date",
            title="First day (UTC, inclusive)",
            description="Manual runs: validate this range instead of the data interval",
        ),
        "end": Param(
            None,
            type=["null", "string"],
            format="date",
            title="Last day (UTC, inclusive)",
            description="YYYY-MM-DD; empty: the run's data interval (or the features asset's interval)",
        ),
    },
)
def sofare_validate():
    @task
    def windows(params=None, data_interval_start=None, data_interval_end=None, triggering_asset_events=None) -> list:
        from sofare import tasks

        extras = [event.extra for events in (triggering_asset_events or {}).values() for event in events]
        return fail_fast(tasks.validation_windows, params, data_interval_start, data_interval_end, extras)

    @task(map_index_template="{{ task.op_kwargs['suite'] }}")
    def validate(suite: str, windows: list) -> dict:
        from sofare import tasks

        return run(tasks.validate, suite, windows)

    @task(outlets=[VALIDATED_FEATURES])  # all_success: one event when every suite passed, not one per suite
    def publish(results: list, windows: list, outlet_events=None) -> dict:
        outlet_events[VALIDATED_FEATURES].extra = {"windows": windows}
        return {"suites": [r["suite"] for r in results], "windows": windows}

    @task(trigger_rule="all_done")
    def data_docs() -> str:
        from sofare import tasks

        return run(tasks.data_docs)

    @task(trigger_rule="one_failed", on_failure_callback=None)  # the failed validate task has alerted already
    def verdict() -> None:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("validation failed: see the failed validate task(s) and the Data Docs")

    spans = windows()
    checks = validate.partial(windows=spans).expand(suite=list(SUITES))
    docs = data_docs()
    checks >> docs
    publish(checks, spans)
    [checks, docs] >> verdict()


sofare_validate()
