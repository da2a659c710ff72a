"""Backfill planning: chunks, context for as-of data, and clear errors for bad requests."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from sofare.config import load_config
from sofare.data import ingest

CFG = load_config(env={})


def test_day_range_is_inclusive_utc_days():
    assert ingest.day_range("2023-01-01", "2023-01-01") == (
        datetime(2023, 1, 1, tzinfo=UTC),
        datetime(2023, 1, 2, tzinfo=UTC),
    )
    from sofare.errors import InputError

    with pytest.raises(InputError, match="^end: 2023-01-01 is before start 2023-01-05"):
        ingest.day_range("2023-01-05", "2023-01-01")
    with pytest.raises(InputError, match=r"^start: '2023-13-01' is not a day \(YYYY-MM-DD\)"):
        ingest.day_range("2023-13-01", "2023-12-31")
    with pytest.raises(InputError, match="^end: 'yesterday' is not a day"):
        ingest.day_range("2023-01-01", "yesterday")


def test_chunks_cover_the_range_exactly_once():
    start, end = ingest.day_range("2023-01-01", "2025-06-30")
    chunks = ingest.plan_chunks(start, end, 31)
    assert chunks[0][0] == start and chunks[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert all(hi - lo <= timedelta(days=31) for lo, hi in chunks)


def test_plan_loads_every_modality_of_sample_with_context_for_daily_data():
    start, end = ingest.day_range("2023-01-01", "2023-03-31")
    plan = ingest.plan_backfill(CFG, ["sample"], start, end)
    by_modality = {m: [p for p in plan if p["modality"] == m] for m in ("candles", "safe_haven", "macro")}
    assert by_modality["candles"][0]["start"] == start.isoformat()
    context = (start - timedelta(days=CFG.ingest.context_days)).isoformat()
    assert by_modality["macro"][0]["start"] == context and by_modality["safe_haven"][0]["start"] == context
    for modality, chunks in by_modality.items():  # history before the range only fills gaps; the range is loaded
        assert all(c["history"] == (c["start"] < start.isoformat()) for c in chunks), modality
        assert next(c["start"] for c in chunks if not c["history"]) == start.isoformat()
        assert chunks[-1]["end"] == end.isoformat()
    assert not any(c["history"] for c in by_modality["candles"])
    assert [sum(c["history"] for c in by_modality[m]) for m in ("safe_haven", "macro")] == [1, 1], "one load each"
    assert {p["symbol"] for p in plan} == {"BTCUSDT"} and {p["interval"] for p in plan} == {"1h"}


def test_plan_rejects_unknown_and_conflicting_sources():
    start, end = ingest.day_range("2023-01-01", "2023-01-31")
    with pytest.raises(ValueError, match="unknown source"):
        ingest.plan_backfill(CFG, ["kraken"], start, end)
    with pytest.raises(ValueError, match="both 'sample' and 'binance' provide candles"):
        ingest.plan_backfill(CFG, ["sample", "binance"], start, end)
    with pytest.raises(ValueError, match="unknown interval"):
        ingest.plan_backfill(CFG, ["binance"], start, end, interval="7m")
    assert ingest.expand_sources("all") == ["binance", "yfinance", "fred"]
