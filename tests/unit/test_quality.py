"""Load-time data quality: malformed data is rejected with a message naming it; gaps are found."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from sofare.data import quality
from sofare.data.sources.base import MalformedDataError

HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def real_hourly(request):
    root = request.config.rootpath
    frame = pd.read_csv(root / "include/sample_data/binance/BTCUSDT_1h.csv.gz")
    return frame.rename(columns={"timestamp": "open_time"}).drop(columns=["symbol", "interval"])


def test_real_hourly_data_passes_and_has_exactly_the_known_gap(real_hourly):
    checked = quality.check_candles(real_hourly, HOUR, "real")
    assert len(checked) == 21887
    gaps = quality.candle_gaps(checked["open_time"], HOUR)
    assert [str(g) for g in gaps] == ["2023-03-24T13:00:00+00:00 (1 missing)"]
    zero = checked[checked["open_time"] == pd.Timestamp("2023-03-24 12:00", tz="UTC")]
    assert float(zero["volume"].iloc[0]) == 0.0  # the real zero-volume bar is kept, not dropped


def test_gap_edges_inside_requested_interval():
    times = [datetime(2024, 1, 1, h, tzinfo=UTC) for h in (2, 3, 6)]
    gaps = quality.candle_gaps(times, HOUR, datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, 9, tzinfo=UTC))
    assert [(g.first_missing.hour, g.last_missing.hour, g.missing) for g in gaps] == [(0, 1, 2), (4, 5, 2), (7, 8, 2)]
    assert (
        quality.candle_gaps([], HOUR, datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, 3, tzinfo=UTC))[0].missing
        == 3
    )


def test_date_gaps_ignore_weekends_but_report_long_runs():
    days = [date(2024, 1, 5), date(2024, 1, 8), date(2024, 1, 9), date(2024, 1, 20)]  # Fri, Mon, Tue, +11 days
    gaps = quality.date_gaps(days, max_gap_days=4)
    assert [(g.first_missing, g.last_missing, g.missing) for g in gaps] == [(date(2024, 1, 10), date(2024, 1, 19), 10)]


def _bar(**overrides):
    row = {
        "open_time": "2024-01-01 00:00:00+00:00",
        "open": 10.0,
        "high": 12.0,
        "low": 9.0,
        "close": 11.0,
        "volume": 5.0,
        "quote_volume": 50.0,
        "trade_count": 7,
    }
    row.update(overrides)
    return pd.DataFrame([row])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"close": "abc"}, "column 'close' has 1 value.*not finite numbers.*'abc'"),
        ({"open": np.nan}, "column 'open' has 1 value"),
        ({"high": np.inf}, "column 'high' has 1 value"),
        ({"open_time": "2024-01-01 00:30:00+00:00"}, "is not on the 1:00:00 grid"),
        ({"open_time": "yesterday"}, "open_time value.*not timestamps"),
        ({"high": 8.5}, "break 'high must be >= low'"),
        ({"high": 10.5}, "break 'high must be >= open and close'"),
        ({"low": 10.5}, "break 'low must be <= open and close'"),
        ({"volume": -1.0}, "break 'volume must be >= 0'"),
        ({"low": -1.0}, "must be > 0"),
    ],
)
def test_malformed_candles_are_rejected_naming_the_problem(overrides, message):
    with pytest.raises(MalformedDataError, match=message):
        quality.check_candles(_bar(**overrides), HOUR, "test")


def test_missing_column_is_named():
    with pytest.raises(MalformedDataError, match="missing column 'volume'"):
        quality.check_candles(_bar().drop(columns="volume"), HOUR, "test")


def test_exact_repeats_are_collapsed_but_conflicting_rows_rejected():
    assert len(quality.check_candles(pd.concat([_bar(), _bar()]), HOUR, "t")) == 1
    with pytest.raises(MalformedDataError, match="disagree for the same key"):
        quality.check_candles(pd.concat([_bar(), _bar(close=11.5)]), HOUR, "t")


def test_safe_haven_and_macro_checks():
    bars = pd.DataFrame(
        [{"ticker": "GC=F", "date": "2024-01-02", "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": None}]
    )
    assert quality.check_safe_haven(bars, "t")["volume"].isna().all()  # flat bars and missing volume are real
    with pytest.raises(MalformedDataError, match="date value"):
        quality.check_safe_haven(bars.assign(date="not a date"), "t")
    obs = pd.DataFrame([{"series_id": "DFF", "observation_date": "2024-01-02", "value": "n/a"}])
    with pytest.raises(MalformedDataError, match="column 'value'"):
        quality.check_macro(obs, "t")
