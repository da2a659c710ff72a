"""sofare_ingest runs are self-contained: any order (or at once) gives the same rows, on SQLite and PostgreSQL.

The runs here call the DAG's own task functions (what each task of dags/sofare_ingest.py runs), in the order
of its edges within a run, without the scheduler: the DAG itself runs in test_dags_run.py."""

from __future__ import annotations

import sqlite3
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from sofare.config import load_config
from sofare.data import ingest, report, warehouse
from sofare.data.features import feature_spec

ROOT = Path(__file__).resolve().parents[2]
DAYS = [datetime(2024, 3, d, tzinfo=UTC) for d in (8, 9, 10)]  # Friday to Sunday: the weekend has no daily bars


@pytest.fixture(scope="module")
def ingest_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "sofare_ingest.py"))
    assert bag.import_errors == {}
    return bag.dags["sofare_ingest"]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def two_urls(request, tmp_path) -> list[str]:
    """Two empty warehouses of one kind (SQLite, then the real PostgreSQL server)."""
    if request.param == "sqlite":
        return [f"sqlite:///{tmp_path / f'{name}.db'}" for name in ("first", "second")]
    server = request.getfixturevalue("postgres")
    return [server.create_database(f"t_{uuid.uuid4().hex[:12]}") for _ in range(2)]


def run_day(dag, day: datetime) -> dict[str, dict]:
    """One sofare_ingest run for [day, day + 1): its load tasks, then build_features, as the DAG calls them."""
    interval = {"data_interval_start": day, "data_interval_end": day + timedelta(days=1)}
    results = {
        task_id: dag.get_task(task_id).python_callable(**interval)
        for task_id in ("load_candles", "load_safe_haven", "load_macro")
    }
    events = defaultdict(SimpleNamespace)  # the task sets outlet_events[FEATURES].extra
    results["build_features"] = dag.get_task("build_features").python_callable(**interval, outlet_events=events)
    return results


def features_after(monkeypatch, tmp_path, url: str, dag, days: list[datetime]) -> pd.DataFrame:
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", url)
    cfg = load_config()
    for day in days:
        results = run_day(dag, day)
        assert results["load_candles"]["rows"] == 24 and results["build_features"]["rows"] == 24
    with warehouse.get_engine(cfg).connect() as conn:
        return warehouse.read_features(conn, warehouse.features_table(feature_spec(cfg).columns), "BTCUSDT", "1h")


def test_runs_in_reverse_order_give_the_rows_of_runs_in_order(ingest_dag, two_urls, monkeypatch, tmp_path):
    forward = features_after(monkeypatch, tmp_path, two_urls[0], ingest_dag, DAYS)
    backward = features_after(monkeypatch, tmp_path, two_urls[1], ingest_dag, DAYS[::-1])
    pd.testing.assert_frame_equal(backward, forward, check_exact=True)  # every value, targets included
    spec = feature_spec(load_config())
    assert len(forward) == 72 and forward["open_time"].iloc[0] == DAYS[0]
    assert forward[list(spec.columns)].notna().all().all(), "every run had its warm-up and context"
    assert forward["target_return"].isna().tolist() == [False] * 71 + [True]  # the last waits for 03-11's candle


def test_features_event_makes_validation_cover_the_day_whose_targets_changed(
    ingest_dag, two_urls, monkeypatch, tmp_path
):
    """Day 2's run sets the target of day 1's last hour, which clears day 1's validation: the features event must
    send sofare_validate back to day 1 (else the validated span, and the default training window, breaks there)."""
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", two_urls[0])
    events = []
    for day in DAYS[:2]:
        interval = {"data_interval_start": day, "data_interval_end": day + timedelta(days=1)}
        for task_id in ("load_candles", "load_safe_haven", "load_macro"):
            ingest_dag.get_task(task_id).python_callable(**interval)
        outlet = defaultdict(SimpleNamespace)
        ingest_dag.get_task("build_features").python_callable(**interval, outlet_events=outlet)
        events.append(next(iter(outlet.values())).extra)
    assert events[0] == {"start": DAYS[0].isoformat(), "end": DAYS[1].isoformat()}, "nothing before day 1"
    assert events[1] == {"start": DAYS[0].isoformat(), "end": DAYS[2].isoformat()}, "day 1 again, then day 2"


# --- targets: known is never replaced by NULL ---------------------------------------------------------------


def _feature_rows(cfg, n: int, target: float | None, value: float) -> pd.DataFrame:
    spec = feature_spec(cfg)
    frame = pd.DataFrame(
        {
            "symbol": "BTCUSDT",
            "interval": "1h",
            "open_time": pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC"),
            "feature_set_version": spec.version,
        }
    )
    for name in spec.columns:
        frame[name] = value
    frame["target_return"] = target
    frame["target_up"] = None if target is None else int(target > 0)
    return frame


@pytest.mark.parametrize("n", [3, 150], ids=["executemany", "bulk"])  # PostgreSQL: COPY from 100 rows
def test_an_upsert_keeps_known_targets_where_the_new_row_has_none(db_cfg, engine, n):
    table = warehouse.features_table(feature_spec(db_cfg).columns)
    column = feature_spec(db_cfg).columns[0]

    def write(frame: pd.DataFrame) -> pd.DataFrame:
        with warehouse.transaction(engine) as conn:
            warehouse.upsert(conn, table, frame)
        with engine.connect() as conn:
            return warehouse.read_features(conn, table, "BTCUSDT", "1h")

    write(_feature_rows(db_cfg, n, 0.01, 1.0))
    stored = write(_feature_rows(db_cfg, n, None, 2.0))  # a run that could not see the next candle yet
    assert (stored["target_return"] == 0.01).all() and (stored["target_up"] == 1).all()
    assert (stored[column] == 2.0).all(), "the features themselves are replaced"
    stored = write(_feature_rows(db_cfg, n, -0.02, 3.0))  # a known target replaces a known one
    assert (stored["target_return"] == -0.02).all() and (stored["target_up"] == 0).all()
    refresh = stored[["open_time"]].assign(target_return=float("nan"), target_up=float("nan"))
    with warehouse.transaction(engine) as conn:
        warehouse.update_targets(conn, table, "BTCUSDT", "1h", refresh)
    with engine.connect() as conn:
        assert (warehouse.read_features(conn, table, "BTCUSDT", "1h")["target_return"] == -0.02).all()


# --- concurrent neighbours: the features lock ---------------------------------------------------------------


def _held_elsewhere(engine, name: str) -> bool:
    """Whether another connection would have to wait for the lock `name` (asked without waiting)."""
    if engine.dialect.name == "postgresql":
        other = sa.create_engine(engine.url, poolclass=NullPool)
        with other.connect() as conn:
            key = warehouse.lock_key(name)
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one()
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        other.dispose()
        return not got
    conn = sqlite3.connect(engine.url.database, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def test_features_hold_their_lock_from_reading_the_candles_to_the_commit(db_cfg, engine, monkeypatch):
    """Of two neighbours building features at once, one then reads the other's candles or refreshes the other's
    rows: the last row's target cannot be left NULL by a refresh that ran before the row existed."""
    day = ingest.day_range("2024-03-08", "2024-03-08")
    for modality in ingest.MODALITIES:
        ingest.load_interval(db_cfg, engine, "sample", modality, *day, context=True)
    name = ingest.features_lock("BTCUSDT", "1h")
    compute, seen = ingest._block_rows, []  # the feature computation, between the reads and the writes

    def probe(*args, **kwargs):
        seen.append(_held_elsewhere(engine, name))
        return compute(*args, **kwargs)

    monkeypatch.setattr(ingest, "_block_rows", probe)
    assert not _held_elsewhere(engine, name)
    assert ingest.materialize_features(db_cfg, engine, *day) == 24
    assert seen == [True] and not _held_elsewhere(engine, name)


def test_a_run_reports_its_interval_and_its_context_apart(db_cfg, engine):
    """The day after the embedded history: its context exists, its interval does not, and it says so."""
    start, end = ingest.day_range("2025-07-01", "2025-07-01")
    lo = ingest.feature_inputs(db_cfg, "candles", start, end, "1h")[0]
    bars = (start - lo) // timedelta(hours=1)  # no gap in the sample's last weeks
    assert bars >= 2 * db_cfg.features.warmup_bars, "the warm-up of the feature block holding start, twice over"
    result = ingest.load_interval(db_cfg, engine, "sample", "candles", start, end, context=True)
    assert result.rows == 0 and result.note.startswith("no rows: sample has no candles for this interval")
    assert (result.context.start, result.context.end) == (lo, end)
    assert result.context.rows == result.context.written == bars
    summary = result.to_dict()
    assert (summary["rows"], summary["context"]["rows"], summary["note"]) == (0, bars, result.note)
    assert str(result).endswith(
        f"; fetched with its context [{lo:%Y-%m-%d %H:%M} .. 2025-07-02 00:00): {bars} rows around "
        f"the interval, {bars} of them new"
    )
    assert ingest.materialize_features(db_cfg, engine, start, end) == 0


def test_context_rows_fill_holes_and_leave_stored_rows_and_their_marks(db_cfg, engine):
    day = ingest.day_range("2024-03-08", "2024-03-08")
    bars = (day[0] - ingest.feature_inputs(db_cfg, "candles", *day, "1h")[0]) // timedelta(hours=1)
    first = ingest.load_interval(db_cfg, engine, "sample", "candles", *day, context=True)
    assert first.rows == 24 and first.context.rows == first.context.written == bars
    c, v = warehouse.candles, warehouse.validated_days
    kept, hole = datetime(2024, 3, 1, 5, tzinfo=UTC), datetime(2024, 3, 2, tzinfo=UTC)
    with warehouse.transaction(engine) as conn:
        conn.execute(sa.update(c).where(c.c.open_time == kept).values(close=c.c.close + 1))
        conn.execute(sa.delete(c).where(c.c.open_time == hole))
        conn.execute(
            sa.insert(v),
            [
                {"suite": "candles", "scope": "BTCUSDT 1h", "day": d, "status": "passed", "run_id": "r"}
                for d in (kept.date(), hole.date(), day[0].date())
            ],
        )
    with engine.connect() as conn:
        before = warehouse.read_candles(conn, "BTCUSDT", "1h", kept, kept + timedelta(hours=1))["close"].item()
    again = ingest.load_interval(db_cfg, engine, "sample", "candles", *day, context=True)
    assert (again.rows, again.context.written) == (24, 1)
    with engine.connect() as conn:
        assert warehouse.read_candles(conn, "BTCUSDT", "1h", kept, kept + timedelta(hours=1))["close"].item() == before
        assert len(warehouse.read_candles(conn, "BTCUSDT", "1h", hole, hole + timedelta(hours=1))) == 1
        marks = set(conn.execute(sa.select(v.c.day)).scalars())
    assert marks == {kept.date()}, "the interval's day and the filled day lose their marks, nothing else"
    status = report.warehouse_status(db_cfg, engine)["candles"][0]
    assert status["rows"] == 24 + bars and status["gaps"] == []
