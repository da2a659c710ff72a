"""When each daily and macro row became visible: the rule that keeps as-of joins free of look-ahead.

- A daily safe-haven bar dated D (exchange-local) is visible at D's local close time, converted to
  UTC, plus `safe_haven.visibility_delay_minutes`.
- A macro observation with a FRED realtime (vintage) date R is visible from R + 1 day 00:00 UTC
  (FRED publishes during US business hours; the next UTC midnight is after every release).
- Without a vintage date (files of revised values) it is visible `publication_lag_days` after the
  END of its period (observation dates are period starts).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from sofare.config import Config

REALTIME_VISIBILITY = timedelta(days=1)
_PERIOD_MONTHS = {"M": 1, "Q": 3}


def safe_haven_known_at(cfg: Config, ticker: str, dates: pd.Series) -> pd.Series:
    """UTC instants at which the bars dated `dates` (exchange-local trading dates) became visible."""
    import pandas as pd

    spec = cfg.safe_haven.tickers[ticker]
    close = timedelta(hours=spec.close.hour, minutes=spec.close.minute)
    local = pd.to_datetime(dates).dt.normalize() + close
    utc = local.dt.tz_localize(spec.timezone, nonexistent="shift_forward", ambiguous=False).dt.tz_convert("UTC")
    return utc + pd.Timedelta(minutes=cfg.safe_haven.visibility_delay_minutes)


def period_end(frequency: str, observation_dates: pd.Series) -> pd.Series:
    """The first instant after the period that starts at each observation date (UTC midnight)."""
    import pandas as pd

    start = pd.to_datetime(observation_dates).dt.normalize()
    if frequency == "D":
        end = start + pd.Timedelta(days=1)
    else:
        end = start + pd.DateOffset(months=_PERIOD_MONTHS[frequency])
    return end.dt.tz_localize("UTC")


def macro_known_at(cfg: Config, series_id: str, observation_dates: pd.Series, realtime_start: pd.Series) -> pd.Series:
    """UTC instants at which macro observations became visible (vintage date if known, else lag)."""
    import pandas as pd

    spec = cfg.macro.series[series_id]
    lagged = period_end(spec.frequency, observation_dates) + pd.Timedelta(days=spec.publication_lag_days)
    vintage = pd.to_datetime(realtime_start).dt.normalize()
    if vintage.dt.tz is None:
        vintage = vintage.dt.tz_localize("UTC")
    vintage = vintage + pd.Timedelta(REALTIME_VISIBILITY)
    return vintage.where(vintage.notna(), lagged)
