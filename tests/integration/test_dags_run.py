"""Real Airflow runs (dag.test) of the ingest and backfill DAGs on the embedded data, with the
warehouse reached through the Airflow connection `sofare_warehouse` (SQLite and PostgreSQL)."""

from __future__ import annotations

import gzip
import shutil
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from sofare import runtime
from sofare.config import load_config
from sofare.data import ingest, report, warehouse
from sofare.data.features import feature_spec


@pytest.fixture
def via_connection(monkeypatch, tmp_path, airflow_db, request):
    """Config whose warehouse is only known through AIRFLOW_CONN_SOFARE_WAREHOUSE."""
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.delenv("SOFARE_WAREHOUSE__URL", raising=False)
    monkeypatch.setenv("SOFARE_INGEST__RETRY_DELAY_SECONDS", "0.2")  # keep an unexpected retry short
    monkeypatch.setenv("SOFARE_INGEST__MAX_RETRY_DELAY_SECONDS", "1")
    url = (
        request.getfixturevalue("pg_url").replace("postgresql+psycopg2://", "postgresql://")
        if getattr(request, "param", "sqlite") == "postgres"
        else f"sqlite:///{tmp_path / 'wh.db'}"
    )
    monkeypatch.setenv("AIRFLOW_CONN_SOFARE_WAREHOUSE", url)
    cfg = load_config()
    assert warehouse.warehouse_url(cfg).split("://")[0] in ("sqlite", "postgresql+psycopg2")
    return cfg


def _ingest_day(cfg, day: str, logfile) -> None:
    # a daily run's data interval ends at its logical date (the timetable infers [date - 1 day, date))
    end = datetime.fromisoformat(day).replace(tzinfo=UTC) + pd.Timedelta(days=1)
    runtime.run_dag(cfg, "sofare_ingest", logical_date=end, logfile=logfile)


@pytest.mark.parametrize(
    "via_connection", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_ingest_dag_runs_are_self_contained_in_any_order(via_connection, tmp_path):
    """Each run loads its day and what that day's features read (no depends_on_past): out of order, every
    feature row is complete and every target known but the last (its next candle is not loaded)."""
    cfg = via_connection
    log = tmp_path / "dag.log"
    for day in ("2024-03-10", "2024-03-08", "2024-03-09"):
        _ingest_day(cfg, day, log)
    engine = warehouse.get_engine(cfg)
    status = report.warehouse_status(cfg, engine)
    first = ingest.feature_inputs(
        cfg, "candles", datetime(2024, 3, 8, tzinfo=UTC), datetime(2024, 3, 9, tzinfo=UTC), "1h"
    )[0]
    candles = status["candles"][0]
    assert (candles["first"], candles["last"]) == (first.isoformat(), "2024-03-10T23:00:00+00:00")
    assert candles["rows"] == 72 + (datetime(2024, 3, 8, tzinfo=UTC) - first) // timedelta(hours=1)
    assert candles["gaps"] == []
    with engine.connect() as conn:
        assert max(warehouse.read_safe_haven(conn)["date"]).isoformat() == "2024-03-08", (
            "Friday's bars last: the weekend has none, and no run loads a day after its own"
        )
    feats = status["features"][0]
    assert (feats["rows"], feats["first"], feats["last"]) == (
        72,
        "2024-03-08T00:00:00+00:00",
        "2024-03-10T23:00:00+00:00",
    )
    assert (feats["complete_rows"], feats["rows_with_target"]) == (72, 71)
    sums = report.table_checksums(engine, feature_spec(cfg).columns)
    _ingest_day(cfg, "2024-03-09", log)  # a rerun of a middle day changes nothing
    assert report.table_checksums(engine, feature_spec(cfg).columns) == sums


def test_ingest_dag_fails_fast_on_malformed_data_and_writes_nothing(via_connection, tmp_path, monkeypatch, capsys):
    sample = tmp_path / "sample"
    shutil.copytree(via_connection.sample_dir, sample)
    path = sample / "binance" / "BTCUSDT_1h.csv.gz"
    frame = pd.read_csv(path)
    frame.loc[frame["timestamp"] == "2024-03-08 05:00:00+00:00", "low"] = 10**9  # low above high
    with gzip.open(path, "wt") as out:
        frame.to_csv(out, index=False)
    monkeypatch.setenv("SOFARE_PATHS__SAMPLE_DATA", str(sample))
    cfg = load_config()
    end = datetime(2024, 3, 9, tzinfo=UTC)
    with pytest.raises(runtime.DagRunFailed, match=r"failed tasks: \['load_candles'\]"):
        runtime.run_dag(cfg, "sofare_ingest", logical_date=end)  # task logs to this test's output
    output = capsys.readouterr()
    assert "break 'high must be >= low'" in output.out + output.err
    assert "up_for_retry" not in output.out + output.err, "malformed data is permanent: no retry"
    status = report.warehouse_status(cfg, warehouse.get_engine(cfg))
    assert status["candles"] == [], "the failed interval wrote no candle"


def test_backfill_dag_maps_chunks_and_is_repeatable(via_connection, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFARE_INGEST__CHUNK_DAYS", "10")
    cfg = load_config()
    conf = {"sources": ["sample"], "start": "2023-03-10", "end": "2023-04-09"}
    run = runtime.run_dag(cfg, "sofare_backfill", conf=conf, logfile=tmp_path / "dag.log")
    from airflow.utils.session import create_session

    with create_session() as session:
        mapped = [ti for ti in run.get_task_instances(session=session) if ti.task_id == "load_chunk"]
    from sofare import tasks

    plan = tasks.plan_backfill(load_config(), ["sample"], conf["start"], conf["end"])
    assert len(mapped) == len(plan) and sum(p["modality"] == "candles" for p in plan) == 4  # 31 days / 10
    engine = warehouse.get_engine(cfg)
    status = report.warehouse_status(cfg, engine)
    assert (status["candles"][0]["first"], status["candles"][0]["rows"]) == (
        "2023-03-10T00:00:00+00:00",
        31 * 24 - 1,
    ), status["candles"]
    assert [g["first_missing"] for g in status["candles"][0]["gaps"]] == ["2023-03-24T13:00:00+00:00"]
    assert status["features"][0]["rows_with_target"] == 31 * 24 - 3
    sums = report.table_checksums(engine, feature_spec(cfg).columns)
    runtime.run_dag(cfg, "sofare_backfill", conf=conf, logfile=tmp_path / "dag.log")
    assert report.table_checksums(engine, feature_spec(cfg).columns) == sums


def test_backfill_dag_rejects_bad_params(via_connection, tmp_path):
    with pytest.raises(Exception, match="start|date|end"):
        runtime.run_dag(
            via_connection,
            "sofare_backfill",
            conf={"sources": ["sample"], "start": "2023-04-09", "end": "2023-03-10"},
            logfile=tmp_path / "dag.log",
        )


def test_airflow_backfill_create_plans_one_run_per_day(airflow_db):
    """The time-scheduled ingest DAG is backfillable with Airflow's own CLI (and so the UI) with its defaults:
    reprocess behaviour "none" (what the UI's dialog sends unless changed), forwards or backwards."""
    import os
    import subprocess
    import sys

    env = os.environ.copy()
    subprocess.run([sys.executable, "-m", "airflow", "dags", "reserialize"], env=env, capture_output=True, check=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "airflow",
            "backfill",
            "create",
            "--dag-id",
            "sofare_ingest",
            "--from-date",
            "2024-03-01",
            "--to-date",
            "2024-03-04",
            "--dry-run",
            "--run-backwards",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    planned = [line for line in done.stdout.splitlines() if line.startswith("| 2024-03-0")]
    assert sorted(line.split()[1] for line in planned) == ["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"]
