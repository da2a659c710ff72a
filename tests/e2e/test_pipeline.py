"""End to end on the production runtime (CeleryExecutor, Redis, PostgreSQL), through Airflow's REST API only:
a week backfilled → validated (asset-triggered) → a tiny training (asset-triggered, tuning mapped over the Celery
workers) → the promotion gate (asset-triggered; the on-call override when it rejects) → the canary rollout
(asset-triggered by the bento) → the on-call rollback. Asserted on the warehouse, MLflow and the front door."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.e2e.conftest import WEEK, Stack

pytestmark = pytest.mark.slow


def registry(stack: Stack):
    """The stack's MLflow registry. Both URIs explicitly: an earlier test in this process may have set MLflow's
    process-wide registry URI, which a client given only a tracking URI would use."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{stack.env['SOFARE_PATHS__VAR']}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _engine(stack: Stack) -> sa.Engine:
    return sa.create_engine(
        stack.env["AIRFLOW_CONN_SOFARE_WAREHOUSE"].replace("postgresql://", "postgresql+psycopg2://")
    )


def test_week_backfilled_validated_and_used_for_training(stack, pipeline):
    with _engine(stack).connect() as conn:
        week = conn.execute(
            sa.text("SELECT count(*), count(target_up) FROM features WHERE open_time >= :a AND open_time < :b"),
            {"a": f"{WEEK[0]}T00:00:00Z", "b": "2024-03-08T00:00:00Z"},
        ).one()
        days = conn.execute(
            sa.text("SELECT count(DISTINCT day) FROM validated_days WHERE status = 'passed' AND day BETWEEN :a AND :b"),
            {"a": WEEK[0], "b": WEEK[1]},
        ).scalar()
    assert week[0] == 7 * 24 and week[1] == 7 * 24 - 1, "the week's hours, each with a target but the last"
    assert days == 7, "every day of the week passed validation (the asset-triggered sofare_validate run)"
    tuning = [state for task, states in pipeline["train_tasks"].items() for state in states if task.startswith("tune")]
    assert len(tuning) == 2 and set(tuning) == {"success"}, pipeline["train_tasks"]
    assert len(stack.runs("sofare_validate")) == 1, "one validate run for the backfill's one features chunk"
    assert len(stack.runs("sofare_train")) == 1, "one training for the validate run (not one per suite event)"
    worker_logs = "".join(stack.log(f"worker-{n}").read_text(errors="replace") for n in (1, 2))
    assert worker_logs.count("sofare_train") >= len(tuning), "the tuning tasks ran on the Celery workers"


def test_new_version_registered_gated_and_rolled_out_as_canary(stack, pipeline):
    client = registry(stack)
    version = client.get_model_version("sofare-m3", pipeline["version"])
    assert version.tags.get("promotion_verdict") in ("passed", "overridden"), version.tags
    assert pipeline["gate"]["gate"] == ["success"], "the gate ran on the candidate event"
    assert pipeline["after_deploy"]["version"] == pipeline["version"], "the rollout ended with the new version"
    assert pipeline["after_deploy"]["variant"] == "stable" and pipeline["after_deploy"]["served_by"] == "stable"
    canary = {k: v for k, v in pipeline["traffic"].items() if k[1] == "canary"}
    assert canary and all(status == 200 for status, _ in canary), (
        f"live answers during the rollout: {pipeline['traffic']}"
    )
    assert not [k for k in pipeline["traffic"] if k[0] not in (200,)], f"no request failed: {pipeline['traffic']}"
    with _engine(stack).connect() as conn:
        actions = [
            row.action
            for row in conn.execute(
                sa.text("SELECT action FROM deployment_events WHERE canary_version = :v ORDER BY at"),
                {"v": pipeline["version"]},
            )
        ]
    assert actions[0] == "canary" and "promote" in actions, actions


def test_rollback_dag_restores_the_previous_champion(stack, pipeline):
    before, after = pipeline["before"], pipeline["after_rollback"]
    assert after["version"] == before["version"] != pipeline["version"], "the front door serves the old version again"
    client = registry(stack)
    assert str(client.get_model_version_by_alias("sofare-m3", "champion").version) == before["version"]
    with _engine(stack).connect() as conn:
        rollback = conn.execute(
            sa.text(
                "SELECT stable_version, decision, actor FROM deployment_events WHERE action = 'rollback' ORDER BY at DESC"
            )
        ).first()
        audit = conn.execute(
            sa.text("SELECT count(*) FROM audit_log WHERE action = 'rollback' AND actor = 'airflow:sofare_rollback'")
        ).scalar()
    assert rollback.stable_version == before["version"] and rollback.actor == "airflow:sofare_rollback", rollback
    assert audit == 1
