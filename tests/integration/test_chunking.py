"""Features do not depend on how a backfill was chunked: the same hour gets the same row, bit for bit, whatever
interval computed it, so `sofare status --checksum` compares across any reruns (SQLite and PostgreSQL)."""

from __future__ import annotations

import random
import uuid

import numpy as np
import pandas as pd
import pytest

from sofare import tasks
from sofare.config import load_config
from sofare.data import report, warehouse
from sofare.data.features import compute_features, feature_spec

START, END = "2023-12-13", "2024-01-31"  # December holds the warm-up of January (warmup_bars = 450 hours)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def three_urls(request, tmp_path) -> list[str]:
    """Three empty warehouses of one kind (SQLite, then the real PostgreSQL server)."""
    if request.param == "sqlite":
        return [f"sqlite:///{tmp_path / f'w{k}.db'}" for k in range(3)]
    server = request.getfixturevalue("postgres")
    return [server.create_database(f"t_{uuid.uuid4().hex[:12]}") for _ in range(3)]


def _config(monkeypatch, tmp_path, url: str, chunk_days: int):
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", url)
    monkeypatch.setenv("SOFARE_INGEST__CHUNK_DAYS", str(chunk_days))
    return load_config()


def _shuffled_backfill(cfg, start: str, end: str, seed: int) -> None:
    """sofare_backfill's steps with its loads and its feature chunks each in a shuffled order (the DAG maps them
    in parallel: any order may happen)."""
    order = random.Random(seed)
    loads = tasks.plan_backfill(cfg, ["sample"], start, end)
    order.shuffle(loads)
    for chunk in loads:
        tasks.load_chunk(cfg, chunk)
    chunks = tasks.plan_feature_chunks(cfg, start, end)
    order.shuffle(chunks)
    for chunk in chunks:
        tasks.features_chunk(cfg, chunk)


def _content(cfg) -> tuple[dict[str, str], pd.DataFrame]:
    engine = warehouse.get_engine(cfg)
    columns = feature_spec(cfg).columns
    with engine.connect() as conn:
        rows = warehouse.read_features(conn, warehouse.features_table(columns), "BTCUSDT", "1h")
    return report.table_checksums(engine, columns), rows


def test_three_chunkings_of_a_backfill_give_the_same_features_and_checksums(three_urls, monkeypatch, tmp_path):
    # one chunk for both months, 7-day chunks, 1-day chunks in a shuffled order
    first = _config(monkeypatch, tmp_path, three_urls[0], 50)
    tasks.backfill(first, ["sample"], START, END)
    second = _config(monkeypatch, tmp_path, three_urls[1], 7)
    tasks.backfill(second, ["sample"], START, END)
    third = _config(monkeypatch, tmp_path, three_urls[2], 1)
    _shuffled_backfill(third, START, END, seed=17)

    (sums, rows), *others = (_content(cfg) for cfg in (first, second, third))
    columns = list(feature_spec(first).columns)
    january = rows["open_time"] >= pd.Timestamp("2024-01-01", tz="UTC")
    assert len(rows) == 50 * 24 and january.sum() == 31 * 24
    assert rows.loc[january, columns].notna().all().all(), "December's candles are January's warm-up"
    for other_sums, other in others:
        pd.testing.assert_series_equal(other["open_time"], rows["open_time"])
        # every feature of every hour: equal to the bit (the zeros' signs too), NULLs (December's warm-up rows) in
        # the same places
        got, want = other[columns].to_numpy(dtype=float), rows[columns].to_numpy(dtype=float)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
        assert other_sums == sums

    # and within 1e-9 of the features computed over the whole stored history at once (the Wilder/EMA smoothing
    # has converged after warmup_bars candles, the bound docs/architecture.md states)
    with warehouse.get_engine(first).connect() as conn:
        candles = warehouse.read_candles(conn, "BTCUSDT", "1h")
        bars, macro = warehouse.read_safe_haven(conn), warehouse.read_macro(conn)
    whole = compute_features(candles, bars, macro, first, "1h")
    assert whole["open_time"].tolist() == rows["open_time"].tolist()
    np.testing.assert_allclose(
        rows.loc[january, columns].to_numpy(dtype=float),
        whole.loc[january.to_numpy(), columns].to_numpy(),
        rtol=0,
        atol=1e-9,
    )

    # the README's rerun: backfilling a part of January again, in other chunks, changes no byte
    _shuffled_backfill(_config(monkeypatch, tmp_path, three_urls[0], 3), "2024-01-10", "2024-01-20", seed=3)
    assert _content(first)[0] == sums
