"""Ingest on SQLite and PostgreSQL: exact intervals, idempotent reruns, nothing half-written, gaps."""

from __future__ import annotations

import gzip
import shutil

import pandas as pd
import pytest
import sqlalchemy as sa

from sofare import tasks
from sofare.config import load_config
from sofare.data import ingest, report, warehouse
from sofare.data.features import feature_spec
from sofare.data.sources import MalformedDataError


def backfill(start: str, end: str) -> dict:
    """The sofare_backfill DAG's steps in order (the DAG itself runs in test_dags_run.py)."""
    return tasks.backfill(load_config(), ["sample"], start, end)


def test_backfill_twice_gives_identical_rows_and_content(db_cfg, engine):
    first = backfill("2023-03-01", "2023-04-15")
    sums = report.table_checksums(engine, feature_spec(db_cfg).columns)
    second = backfill("2023-03-01", "2023-04-15")
    assert report.table_checksums(engine, feature_spec(db_cfg).columns) == sums
    assert first["status"] == second["status"]
    candles = first["status"]["candles"][0]
    assert candles["rows"] == 46 * 24 - 1
    assert [g["first_missing"] for g in candles["gaps"]] == ["2023-03-24T13:00:00+00:00"]
    assert [g["first_missing"] for g in first["gaps_found"]] == ["2023-03-24T13:00:00+00:00"]
    feats = first["status"]["features"][0]
    assert feats["rows"] == candles["rows"]
    # every target is filled, across chunk boundaries, except before the missing hour and at the end
    assert feats["rows_with_target"] == candles["rows"] - 2


def test_each_modality_loads_exactly_its_interval(db_cfg, engine):
    start, end = ingest.day_range("2024-02-20", "2024-02-20")
    results = {m: ingest.load_interval(db_cfg, engine, "sample", m, start, end) for m in ingest.MODALITIES}
    assert results["candles"].rows == 24
    assert results["safe_haven"].rows == 6  # a Tuesday: one bar per ticker
    with engine.connect() as conn:
        bars = warehouse.read_safe_haven(conn)
        macro = warehouse.read_macro(conn)
    assert set(bars["date"].astype(str)) == {"2024-02-20"}
    assert macro["known_at"].between(start, end, inclusive="left").all()
    assert "CPIAUCSL" not in set(macro["series_id"]), "January CPI is known on 02-21, not 02-20"
    assert results["candles"].note == "" and results["candles"].to_dict()["note"] == ""


def test_an_interval_with_no_data_says_why(db_cfg, engine):
    """A daily sofare_ingest run after the embedded history ends goes green with 0 rows: it must say why."""
    start, end = ingest.day_range("2030-01-02", "2030-01-02")
    result = ingest.load_interval(db_cfg, engine, "sample", "candles", start, end)
    assert result.rows == 0 and result.note.startswith("no rows: sample has no candles for this interval")
    assert "embedded sample is a fixed history" in result.to_dict()["note"] and result.note in str(result)


def test_malformed_source_data_rejects_the_interval_and_writes_nothing(db_cfg, engine, tmp_path, monkeypatch):
    sample = tmp_path / "sample"
    shutil.copytree(db_cfg.sample_dir, sample)
    path = sample / "binance" / "BTCUSDT_1h.csv.gz"
    frame = pd.read_csv(path)
    frame["high"] = frame["high"].astype(object)
    frame.loc[frame["timestamp"] == "2023-05-02 07:00:00+00:00", "high"] = "12x"
    with gzip.open(path, "wt") as out:
        frame.to_csv(out, index=False)
    monkeypatch.setenv("SOFARE_PATHS__SAMPLE_DATA", str(sample))
    cfg = load_config()
    ingest.load_interval(cfg, engine, "sample", "candles", *ingest.day_range("2023-05-01", "2023-05-01"))
    with pytest.raises(MalformedDataError, match=r"column 'high' has 1 value.*2023-05-02 07:00:00\+00:00.*'12x'"):
        ingest.load_interval(cfg, engine, "sample", "candles", *ingest.day_range("2023-05-02", "2023-05-02"))
    with engine.connect() as conn:
        days = conn.execute(sa.select(sa.func.count()).select_from(warehouse.candles)).scalar_one()
    assert days == 24, "the good day stays, the bad day wrote nothing"


def test_features_refresh_the_previous_targets_when_the_next_interval_arrives(db_cfg, engine):
    d1 = ingest.day_range("2024-01-10", "2024-01-10")
    d2 = ingest.day_range("2024-01-11", "2024-01-11")
    table = warehouse.features_table(feature_spec(db_cfg).columns)
    ingest.load_interval(db_cfg, engine, "sample", "candles", *d1)
    ingest.materialize_features(db_cfg, engine, *d1)
    with engine.connect() as conn:
        assert warehouse.read_features(conn, table, "BTCUSDT", "1h")["target_return"].isna().sum() == 1
    ingest.load_interval(db_cfg, engine, "sample", "candles", *d2)
    ingest.materialize_features(db_cfg, engine, *d2)
    with engine.connect() as conn:
        feats = warehouse.read_features(conn, table, "BTCUSDT", "1h")
    assert len(feats) == 48
    assert feats["target_return"].isna().sum() == 1 and pd.isna(feats["target_return"].iloc[-1])


def test_feature_chunks_give_identical_content_in_any_task_order(db_cfg, engine, monkeypatch):
    """Mapped feature tasks may run in any order (or in parallel): the result must not depend on it."""
    monkeypatch.setenv("SOFARE_INGEST__CHUNK_DAYS", "4")
    for chunk in tasks.plan_backfill(load_config(), ["sample"], "2023-04-01", "2023-04-30"):
        tasks.load_chunk(load_config(), chunk)
    chunks = tasks.plan_feature_chunks(load_config(), "2023-04-01", "2023-04-30")
    assert len(chunks) == 8
    for chunk in chunks:
        tasks.features_chunk(load_config(), chunk)
    forward = report.table_checksums(engine, feature_spec(db_cfg).columns)["features"]
    with engine.begin() as conn:
        conn.execute(sa.delete(warehouse.features_table(feature_spec(db_cfg).columns)))
    for chunk in reversed(chunks):
        tasks.features_chunk(load_config(), chunk)
    assert report.table_checksums(engine, feature_spec(db_cfg).columns)["features"] == forward
