"""When rows become visible: market closes in exchange time (with DST) and FRED release lags."""

from __future__ import annotations

import pandas as pd

from sofare.config import load_config
from sofare.data.visibility import macro_known_at, safe_haven_known_at

CFG = load_config(env={})


def _known(ticker: str, day: str) -> str:
    return str(safe_haven_known_at(CFG, ticker, pd.Series([pd.Timestamp(day)])).iloc[0])


def test_us_close_in_summer_and_winter():
    assert _known("^GSPC", "2024-06-03") == "2024-06-03 20:30:00+00:00"  # 16:00 EDT + 30 min
    assert _known("^GSPC", "2024-01-03") == "2024-01-03 21:30:00+00:00"  # 16:00 EST + 30 min
    assert _known("^VIX", "2024-06-03") == "2024-06-03 20:45:00+00:00"
    assert _known("GC=F", "2024-06-03") == "2024-06-03 21:30:00+00:00"  # futures session ends 17:00 ET


def _macro(series: str, obs: str, realtime: str | None = None) -> str:
    rt = pd.Series([pd.Timestamp(realtime) if realtime else pd.NaT])
    return str(macro_known_at(CFG, series, pd.Series([pd.Timestamp(obs)]), rt).iloc[0])


def test_publication_lags_count_from_the_end_of_the_period():
    assert _macro("CPIAUCSL", "2024-01-01") == "2024-02-21 00:00:00+00:00"  # January ends 02-01, +20 days
    assert _macro("GDP", "2023-10-01") == "2024-02-05 00:00:00+00:00"  # Q4 ends 01-01, +35 days
    assert _macro("DFF", "2024-03-05") == "2024-03-07 00:00:00+00:00"  # the day ends 03-06, +1 day


def test_vintage_dates_win_over_lags():
    assert _macro("CPIAUCSL", "2024-01-01", "2024-02-13") == "2024-02-14 00:00:00+00:00"
