"""The live adapters (python-binance, yfinance, fredapi) end to end against a local HTTP server that
answers in the real APIs' formats, including 429, 5xx, timeouts, empty and malformed pages."""

from __future__ import annotations

import json
import math
from datetime import date

import pandas as pd
import pytest
import sqlalchemy as sa

from sofare.data import ingest, warehouse
from sofare.data.features import feature_spec
from sofare.data.sources import MalformedDataError, SourceError, TransientSourceError, get_source
from tests.fakes.market_api import empty, malformed, status, timeout


@pytest.fixture
def wh(live_cfg):
    engine = warehouse.get_engine(live_cfg)
    warehouse.init_schema(engine, feature_spec(live_cfg).columns)
    return engine


def _rows(engine, table) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(sa.select(table)).mappings().all())


def _load(cfg, engine, source, modality, start, end, sleeps=None, **kw):
    src = get_source(source, cfg, sleep=sleeps) if sleeps is not None else source
    return ingest.load_interval(cfg, engine, src, modality, *ingest.day_range(start, end), **kw)


# --- Binance ---------------------------------------------------------------------------------------


def test_binance_pages_through_klines_and_matches_the_sample(live_cfg, wh, market_api, sleeps):
    result = _load(live_cfg, wh, "binance", "candles", "2024-12-02", "2024-12-03", sleeps, interval="1m")
    assert result.rows == 2880 and result.gaps == []
    assert market_api.data_requests("binance") == 3  # 1000 + 1000 + 880
    live = _rows(wh, warehouse.candles).drop(columns="source").sort_values("open_time").reset_index(drop=True)
    src = get_source("sample", live_cfg)
    expected = (
        ingest._prepare_candles(
            src.fetch(
                ingest.FetchRequest(
                    "candles", *ingest.day_range("2024-12-02", "2024-12-03"), symbol="BTCUSDT", interval="1m"
                )
            ),
            ingest.FetchRequest(
                "candles", *ingest.day_range("2024-12-02", "2024-12-03"), symbol="BTCUSDT", interval="1m"
            ),
            "sample",
        )
        .drop(columns="source")
        .reset_index(drop=True)
    )
    for column in ("open", "high", "low", "close", "volume", "quote_volume"):
        assert live[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-9)
    assert list(live["trade_count"]) == list(expected["trade_count"])


def test_binance_reports_the_real_gap(live_cfg, wh, sleeps):
    result = _load(live_cfg, wh, "binance", "candles", "2023-03-24", "2023-03-24", sleeps)
    assert result.rows == 23 and [str(g) for g in result.gaps] == ["2023-03-24T13:00:00+00:00 (1 missing)"]


def test_binance_retries_429_5xx_and_timeouts_with_backoff(live_cfg, wh, market_api, sleeps):
    market_api.fail(
        "binance",
        status(429, b'{"code":-1003,"msg":"Too many requests"}', Retry_After="2"),
        status(503, b"<html>Service Unavailable</html>"),
        timeout(1.5),
    )
    result = _load(live_cfg, wh, "binance", "candles", "2024-01-01", "2024-01-01", sleeps)
    assert result.rows == 24
    assert len(sleeps.calls) == 3 and sleeps.calls[0] >= 2.0, "Retry-After is honoured"
    assert sleeps.calls[2] > sleeps.calls[1] / 2, "back-off grows"


def test_binance_gives_up_after_max_attempts_and_writes_nothing(live_cfg, wh, market_api, sleeps):
    market_api.fail("binance", *[status(502, b"bad gateway")] * 4)
    with pytest.raises(TransientSourceError, match="gave up after 4 attempts.*HTTP 502"):
        _load(live_cfg, wh, "binance", "candles", "2024-01-01", "2024-01-01", sleeps)
    assert _rows(wh, warehouse.candles).empty


def test_binance_malformed_second_page_rejects_the_whole_interval(live_cfg, wh, market_api, sleeps):
    good = market_api.klines(
        {"symbol": ["BTCUSDT"], "interval": ["1m"], "startTime": ["1733097600000"], "limit": ["1000"]}
    )
    market_api.fail(
        "binance",
        malformed(json.dumps(good).encode()),
        malformed(b'[[1733157600000,"97000.1","97100","96900","oops","1.0",1733157659999,"9","1","0","0","0"]]'),
    )
    with pytest.raises(MalformedDataError, match="page 2 row 0: field 'close' is not a number: 'oops'"):
        _load(live_cfg, wh, "binance", "candles", "2024-12-02", "2024-12-02", sleeps, interval="1m")
    assert _rows(wh, warehouse.candles).empty


def test_binance_non_json_page_is_malformed(live_cfg, wh, market_api, sleeps):
    market_api.fail("binance", malformed(b"<html>maintenance</html>"))
    with pytest.raises(MalformedDataError, match="not JSON"):
        _load(live_cfg, wh, "binance", "candles", "2024-01-01", "2024-01-01", sleeps)


def test_binance_empty_answer_is_reported_as_a_gap(live_cfg, wh, market_api, sleeps):
    market_api.fail("binance", empty())
    result = _load(live_cfg, wh, "binance", "candles", "2024-01-01", "2024-01-01", sleeps)
    assert result.rows == 0 and [g.missing for g in result.gaps] == [24]


def test_binance_backs_off_when_the_weight_limit_is_near(live_cfg, wh, market_api, sleeps, monkeypatch):
    monkeypatch.setenv("SOFARE_SOURCES__BINANCE__WEIGHT_LIMIT_PER_MINUTE", "2")
    from sofare.config import load_config

    cfg = load_config()
    _load(cfg, wh, "binance", "candles", "2024-01-01", "2024-01-01", sleeps)
    assert sleeps.calls and all(1 <= s <= 61 for s in sleeps.calls)


def test_binance_client_errors_are_final(live_cfg, wh, market_api, sleeps):
    market_api.fail("binance", status(400, b'{"code":-1121,"msg":"Invalid symbol."}'))
    with pytest.raises(SourceError, match="Binance rejected the request.*-1121.*Invalid symbol"):
        _load(live_cfg, wh, "binance", "candles", "2024-01-01", "2024-01-01", sleeps)
    assert sleeps.calls == []


# --- Yahoo Finance ----------------------------------------------------------------------------------


def test_yfinance_daily_bars_match_the_sample(live_cfg, wh, sleeps):
    result = _load(live_cfg, wh, "yfinance", "safe_haven", "2024-03-04", "2024-03-10", sleeps)
    assert result.rows == 5 * 6
    live = _rows(wh, warehouse.safe_haven_bars).sort_values(["ticker", "date"]).reset_index(drop=True)
    assert set(live["date"].astype(str)) == {f"2024-03-0{d}" for d in range(4, 9)}
    gspc = pd.read_csv(live_cfg.sample_dir / "yahoo" / "^GSPC.csv.gz").set_index("date")
    row = live[(live["ticker"] == "^GSPC") & (live["date"] == date(2024, 3, 6))].iloc[0]
    assert row["close"] == pytest.approx(gspc.loc["2024-03-06", "close"])
    assert pd.Timestamp(row["known_at"]).tz_convert("UTC") == pd.Timestamp("2024-03-06 21:30", tz="UTC")


def test_yfinance_weekend_is_empty_not_an_error(live_cfg, wh, sleeps):
    assert _load(live_cfg, wh, "yfinance", "safe_haven", "2024-03-09", "2024-03-10", sleeps).rows == 0
    assert sleeps.calls == []


def test_yfinance_retries_rate_limits_server_errors_and_timeouts(live_cfg, wh, market_api, sleeps):
    market_api.fail(
        "yahoo",
        status(429, b"Too Many Requests\r\n"),
        status(429, b"Too Many Requests\r\n"),
        status(500, b"<html>oops</html>"),
        status(500, b"<html>oops</html>"),
        timeout(1.5),
    )
    result = _load(live_cfg, wh, "yfinance", "safe_haven", "2024-03-04", "2024-03-04", sleeps)
    assert result.rows == 6 and len(sleeps.calls) >= 3


def test_yfinance_malformed_chart_rejects_the_interval(live_cfg, wh, market_api, sleeps):
    market_api.fail("yahoo", malformed(b'{"chart": {"result": [{"meta": {}, "timestamp": [1], "indicators": {}}]'))
    with pytest.raises(MalformedDataError, match="Yahoo chart answer for GC=F"):
        _load(live_cfg, wh, "yfinance", "safe_haven", "2024-03-04", "2024-03-04", sleeps)
    assert _rows(wh, warehouse.safe_haven_bars).empty


# --- FRED -------------------------------------------------------------------------------------------


def test_fred_observations_known_in_the_interval_match_the_sample(live_cfg, wh, sleeps):
    live = _load(live_cfg, wh, "fred", "macro", "2024-02-01", "2024-02-29", sleeps)
    live_rows = _rows(wh, warehouse.macro_observations).drop(columns="source")
    with wh.begin() as conn:
        conn.execute(sa.delete(warehouse.macro_observations))
    sample = _load(live_cfg, wh, "sample", "macro", "2024-02-01", "2024-02-29")
    sample_rows = _rows(wh, warehouse.macro_observations).drop(columns="source")
    assert live.rows == sample.rows > 0
    key = ["series_id", "observation_date", "known_at"]
    pd.testing.assert_frame_equal(
        live_rows.sort_values(key).reset_index(drop=True), sample_rows.sort_values(key).reset_index(drop=True)
    )


def test_fred_revisions_are_kept_as_vintages_and_used_point_in_time(live_cfg, wh, market_api, sleeps):
    market_api.revise("GDP", date(2023, 10, 1), released=date(2024, 2, 28), value=28000.0)
    _load(live_cfg, wh, "fred", "macro", "2023-06-01", "2024-03-31", sleeps)
    gdp = _rows(wh, warehouse.macro_observations).query("series_id == 'GDP'")
    q4 = gdp[gdp["observation_date"] == date(2023, 10, 1)].sort_values("known_at")
    assert len(q4) == 2 and q4["value"].iloc[1] == 28000.0
    assert pd.Timestamp(q4["known_at"].iloc[1]).tz_convert("UTC") == pd.Timestamp("2024-02-29", tz="UTC")
    _load(live_cfg, wh, "sample", "candles", "2024-02-01", "2024-03-05")
    ingest.materialize_features(live_cfg, wh, *ingest.day_range("2024-02-20", "2024-03-05"))
    with wh.connect() as conn:
        feats = warehouse.read_features(
            conn,
            warehouse.features_table(feature_spec(live_cfg).columns),
            "BTCUSDT",
            "1h",
            start=pd.Timestamp("2024-02-28 20:00", tz="UTC"),
            end=pd.Timestamp("2024-02-29 02:00", tz="UTC"),
        ).set_index("open_time")
    q3 = gdp[gdp["observation_date"] == date(2023, 7, 1)]["value"].iloc[0]
    before = feats.loc[pd.Timestamp("2024-02-28 22:00", tz="UTC"), "macro_gdp_growth"]
    after = feats.loc[pd.Timestamp("2024-02-28 23:00", tz="UTC"), "macro_gdp_growth"]
    assert before == pytest.approx(math.log(q4["value"].iloc[0] / q3)), "the first release until the revision is known"
    assert after == pytest.approx(math.log(28000.0 / q3)), (
        "the revision from 2024-02-29 00:00 (the 23:00 candle's close)"
    )


def test_fred_retries_and_classifies_failures(live_cfg, wh, market_api, sleeps):
    market_api.fail(
        "fred",
        status(429, b'<?xml version="1.0"?><error code="429" message="Too Many Requests.  Exceeded Rate Limit"/>'),
        status(503, b"<html>down</html>"),
        timeout(1.5),
    )
    assert _load(live_cfg, wh, "fred", "macro", "2024-02-01", "2024-02-05", sleeps).rows > 0
    assert len(sleeps.calls) == 3


def test_fred_malformed_xml_and_unknown_series(live_cfg, wh, market_api, sleeps):
    market_api.fail("fred", malformed(b"<observations><observation date="))
    with pytest.raises(MalformedDataError, match="FRED answer for DFF could not be read"):
        _load(live_cfg, wh, "fred", "macro", "2024-02-01", "2024-02-05", sleeps)
    src = get_source("fred", live_cfg, sleep=sleeps)
    with pytest.raises(SourceError, match="FRED rejected NOPE.*series does not exist"):
        src._releases("NOPE", "2024-01-01", "2024-01-31")
    assert _rows(wh, warehouse.macro_observations).empty


def test_fred_needs_an_api_key(live_cfg, monkeypatch):
    monkeypatch.delenv("FRED_API_KEY")
    with pytest.raises(SourceError, match=r"FRED needs an API key: set \$FRED_API_KEY"):
        get_source("fred", live_cfg)


def test_a_fred_fetch_leaves_process_wide_http_settings_alone(live_cfg, wh, market_api, sleeps):
    """The adapter's timeout is per call: urllib's global opener and the default socket timeout are what
    they were (an installed opener once cut every other caller's timeout to 10 s)."""
    import socket
    import urllib.request

    opener, default_timeout = urllib.request._opener, socket.getdefaulttimeout()
    market_api.fail("fred", timeout(1.5))  # one slow answer: the per-call timeout fires, then a retry
    assert _load(live_cfg, wh, "fred", "macro", "2024-02-01", "2024-02-05", sleeps).rows > 0
    assert len(sleeps.calls) == 1
    assert urllib.request._opener is opener and socket.getdefaulttimeout() == default_timeout
