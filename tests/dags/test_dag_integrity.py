"""DAG integrity: every DAG file imports cleanly, fast and light, and follows the conventions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY = ("torch", "lightning", "bentoml", "mlflow", "evidently", "great_expectations", "talib", "sklearn")
EXPECTED_DAGS = {
    "sofare_ingest",
    "sofare_backfill",
    "sofare_validate",
    "sofare_train",
    "sofare_promote",
    "sofare_deploy",
    "sofare_rollback",
    "sofare_monitor",
}

NO_RETRIES = {"sofare_deploy", "sofare_rollback"}  # a retried rollout or rollback would act twice: one try, one alert


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dag_files_exist_one_dag_each():
    assert {p.stem for p in DAG_FILES} >= EXPECTED_DAGS


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert EXPECTED_DAGS <= set(dagbag.dag_ids)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_conventions(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags and "sofare" in dag.tags
    assert dag.doc_md and len(dag.doc_md.strip()) > 200, "doc_md should explain the DAG to its users"
    assert dag.fileloc.endswith(f"{dag_id}.py"), "one DAG per file, named after the dag_id"
    for task in dag.tasks:
        assert task.owner == "sofare", f"{task.task_id} owner"
        if dag_id not in NO_RETRIES:
            assert task.retries >= 2, f"{task.task_id} retries"
        assert task.retry_exponential_backoff, f"{task.task_id} has no exponential back-off"


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_every_param_is_explained_in_its_form(dagbag, dag_id):
    missing = [name for name, param in dagbag.dags[dag_id].params.items() if not (param.description or "").strip()]
    assert missing == [], f"{dag_id}: Params without a description: {missing}"


def test_manual_dags_have_typed_params(dagbag):
    dag = dagbag.dags["sofare_backfill"]
    assert dag.schedule is None
    schema = {name: param.schema for name, param in dag.params.items()}
    assert schema["sources"]["type"] == "array"
    # Airflow's form renders an array as a multi-select only with top-level `examples` (else a free-text box)
    assert (
        set(schema["sources"]["examples"])
        == set(schema["sources"]["items"]["enum"])
        == {"sample", "binance", "yfinance", "fred"}
    )
    assert set(schema["sources"]["values_display"]) == set(schema["sources"]["examples"])
    assert schema["start"]["format"] == "date" and schema["end"]["format"] == "date"
    assert "enum" in schema["interval"]


def test_ingest_dag_has_real_data_intervals(dagbag):
    """Backfills need data intervals: each daily run covers exactly one day."""
    import pendulum
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import DataInterval

    for dag_id in ("sofare_ingest", "sofare_validate"):
        timetable = coerce_to_core_timetable(dagbag.dags[dag_id].timetable)
        interval = timetable.infer_manual_data_interval(run_after=pendulum.datetime(2024, 1, 5, tz="UTC"))
        assert interval == DataInterval(
            pendulum.datetime(2024, 1, 4, tz="UTC"), pendulum.datetime(2024, 1, 5, tz="UTC")
        )


def test_ingest_backfills_with_the_ui_defaults(dagbag):
    """The UI's Backfill dialog posts reprocess_behavior "none" unless changed (POST /api/v2/backfills and its
    dry run): Airflow answers 422 for a DAG with a depends_on_past task, and refuses running it backwards.
    sofare_ingest's runs are self-contained (tests/integration/test_ingest_order.py), so it needs neither."""
    import pendulum
    from airflow.api_fastapi.core_api.datamodels.backfills import BackfillPostBody
    from airflow.models.backfill import ReprocessBehavior, _validate_backfill_params
    from airflow.serialization.serialized_objects import DagSerialization

    dag = dagbag.dags["sofare_ingest"]
    assert [t.task_id for t in dag.tasks if t.depends_on_past] == []
    assert dag.max_active_runs == 4
    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))  # what the API server validates
    default = BackfillPostBody.model_fields["reprocess_behavior"].default
    assert default == ReprocessBehavior.NONE
    for reverse in (False, True):
        for behaviour in (default, None, ReprocessBehavior.COMPLETED):
            _validate_backfill_params(
                served,
                reverse,
                pendulum.datetime(2024, 3, 1, tz="UTC"),
                pendulum.datetime(2024, 3, 4, tz="UTC"),
                behaviour,
            )


def test_validation_runs_on_the_features_asset(dagbag):
    from sofare.orchestration import FEATURES

    dag = dagbag.dags["sofare_validate"]
    assert dag.timetable.asset_condition == FEATURES
    producers = [
        t
        for d in ("sofare_ingest", "sofare_backfill")
        for t in dagbag.dags[d].tasks
        if any(getattr(o, "name", None) == FEATURES.name for o in t.outlets)
    ]
    assert {t.task_id for t in producers} == {"build_features", "features_chunk"}


def test_training_runs_weekly_and_on_validated_features_with_typed_params(dagbag):
    from sofare.orchestration import MODEL_CANDIDATE, RETRAIN_REQUEST, VALIDATED_FEATURES

    dag = dagbag.dags["sofare_train"]
    assert dag.timetable.asset_condition == VALIDATED_FEATURES | RETRAIN_REQUEST  # or when monitoring asks
    from airflow.serialization.encoders import coerce_to_core_timetable

    assert coerce_to_core_timetable(dag.timetable.timetable).summary == "0 0 * * 0"  # @weekly
    schema = {name: param.schema for name, param in dag.params.items()}
    assert {schema[k]["type"] for k in ("n_trials", "timeout", "max_epochs")} == {"integer"}
    assert schema["start"]["format"] == "date"
    assert [o.name for o in dag.get_task("finalize").outlets] == [MODEL_CANDIDATE.name]
    producers = [
        t.task_id
        for t in dagbag.dags["sofare_validate"].tasks
        if any(getattr(o, "name", None) == VALIDATED_FEATURES.name for o in t.outlets)
    ]
    assert producers == ["publish"], "one event per validate run, after every suite (not one per suite)"
    publish = dagbag.dags["sofare_validate"].get_task("publish")
    assert publish.trigger_rule == "all_success" and "validate" in publish.upstream_task_ids


PROBE = """
import json, sys, time, runpy
import airflow.sdk  # Airflow is loaded by the parser before it reads any DAG file
before = set(sys.modules)
start = time.perf_counter()
runpy.run_path(sys.argv[1])
elapsed = time.perf_counter() - start
heavy = sorted({m.split('.')[0] for m in set(sys.modules) - before} & set(sys.argv[2].split(',')))
print(json.dumps({"seconds": elapsed, "heavy": heavy}))
"""


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_fast_without_heavy_modules(path):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), ",".join(HEAVY)], capture_output=True, text=True, check=True
    )
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["heavy"] == [], f"{path.name} imports {probe['heavy']} at parse time"
    assert probe["seconds"] < 1.0, f"{path.name} took {probe['seconds']:.2f}s to import"


def test_every_task_alerts_through_the_one_notifier(dagbag):
    """Task failures, drift and rollbacks alert the same way: every task's on_failure_callback is the
    SofareNotifier (sofare_validate's verdict excepted: it only re-states a failure that alerted already)."""
    from sofare.orchestration import SofareNotifier

    for dag_id in sorted(EXPECTED_DAGS):
        for t in dagbag.dags[dag_id].tasks:
            callbacks = t.on_failure_callback if isinstance(t.on_failure_callback, list) else [t.on_failure_callback]
            if (dag_id, t.task_id) == ("sofare_validate", "verdict"):
                assert callbacks in ([None], [])
                continue
            assert any(isinstance(c, SofareNotifier) for c in callbacks), f"{dag_id}.{t.task_id}: {callbacks}"


def test_monitor_runs_hourly_and_on_new_candles_and_routes_every_action(dagbag):
    from sofare.orchestration import CANDLES, MONITORING, RETRAIN_REQUEST

    dag = dagbag.dags["sofare_monitor"]
    assert dag.timetable.asset_condition == CANDLES
    from airflow.serialization.encoders import coerce_to_core_timetable

    assert coerce_to_core_timetable(dag.timetable.timetable).summary == "0 * * * *"  # @hourly
    assert [o.name for o in dag.get_task("assess").outlets] == [MONITORING.name]
    assert [o.name for o in dag.get_task("request_retrain").outlets] == [RETRAIN_REQUEST.name]
    assert dag.get_task("trigger_rollback").trigger_dag_id == "sofare_rollback"
    assert set(dag.get_task("route").downstream_task_ids) == {"alert", "request_retrain", "trigger_rollback", "done"}
    assert {dag.params.get_param(k).schema["format"] for k in ("at", "start")} == {"date-time"}


def test_unscheduled_dags_accept_form_runs_whatever_the_ingest_start_date(dagbag):
    """Airflow creates no task instance for a run whose logical date precedes the task's start_date, and a run from
    the trigger form has one (now). DAGs no clock schedules must not inherit ingest.start_date: a future value
    would make the on-call rollback form start runs that succeed with no task (found by the browser tier)."""
    from sofare.orchestration import UNSCHEDULED_START

    for dag_id in ("sofare_backfill", "sofare_rollback", "sofare_promote", "sofare_deploy"):
        dag = dagbag.dags[dag_id]
        assert dag.start_date == UNSCHEDULED_START, dag_id
        assert all(t.start_date == UNSCHEDULED_START for t in dag.tasks), dag_id
    assert UNSCHEDULED_START.year <= 2023
