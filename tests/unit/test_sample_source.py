"""The `sample` source replays the embedded files with the live adapters' canonical columns."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest

from sofare.config import load_config
from sofare.data.sources import SourceError, get_source
from sofare.data.sources.base import CANDLE_COLUMNS, MACRO_COLUMNS, SAFE_HAVEN_COLUMNS, FetchRequest

CFG = load_config(env={})
SRC = get_source("sample", CFG)


def _req(modality: str, start: str, end: str, **kw) -> FetchRequest:
    return FetchRequest(
        modality,
        datetime.fromisoformat(start).replace(tzinfo=UTC),
        datetime.fromisoformat(end).replace(tzinfo=UTC),
        **kw,
    )


def test_candles_are_exactly_the_requested_half_open_interval():
    out = SRC.fetch(_req("candles", "2023-03-24", "2023-03-25", symbol="BTCUSDT", interval="1h"))
    assert list(out.columns) == list(CANDLE_COLUMNS)
    assert len(out) == 23  # 24 hours minus the real 13:00 halt
    assert out["open_time"].min() == pd.Timestamp("2023-03-24", tz="UTC")
    assert out["open_time"].max() == pd.Timestamp("2023-03-24 23:00", tz="UTC")


def test_minute_file_and_coarser_intervals_from_complete_buckets_only():
    minutes = SRC.fetch(_req("candles", "2024-12-02", "2024-12-03", symbol="BTCUSDT", interval="1m"))
    assert len(minutes) == 1440
    four = SRC.fetch(_req("candles", "2023-03-24", "2023-03-25", symbol="BTCUSDT", interval="4h"))
    assert len(four) == 5, "the 12:00-16:00 bucket lacks the 13:00 hour and must not be invented"
    hourly = SRC.fetch(_req("candles", "2023-03-24", "2023-03-25", symbol="BTCUSDT", interval="1h"))
    first = hourly.head(4)
    assert four.iloc[0][["open", "high", "low", "close", "volume"]].tolist() == pytest.approx(
        [first["open"].iloc[0], first["high"].max(), first["low"].min(), first["close"].iloc[-1], first["volume"].sum()]
    )


def test_unknown_symbol_or_series_is_a_clear_error():
    with pytest.raises(SourceError, match="no ETHUSDT candles at 1h or finer"):
        SRC.fetch(_req("candles", "2024-01-01", "2024-01-02", symbol="ETHUSDT", interval="1h"))
    with pytest.raises(SourceError, match="no FRED series 'NOPE'"):
        SRC.fetch(_req("macro", "2024-01-01", "2024-01-02", series=("NOPE",)))


def test_daily_and_macro_columns():
    bars = SRC.fetch(_req("safe_haven", "2024-01-01", "2024-01-10", tickers=("^VIX",)))
    assert list(bars.columns) == list(SAFE_HAVEN_COLUMNS) and set(bars["ticker"]) == {"^VIX"}
    macro = SRC.fetch(_req("macro", "2024-01-01", "2024-01-10", series=("DGS10",)))
    assert list(macro.columns) == list(MACRO_COLUMNS)
    assert macro["value"].notna().all(), "empty FRED cells are 'no publication', not rows"


def test_a_source_refuses_modalities_it_does_not_provide(live_cfg):
    with pytest.raises(SourceError, match="'binance' does not provide 'macro'"):
        get_source("binance", live_cfg).fetch(_req("macro", "2024-01-01", "2024-01-02", series=("DFF",)))
