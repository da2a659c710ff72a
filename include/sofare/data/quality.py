"""Data quality at load time: reject malformed source data before it is written; find gaps.

The checks here are the structural minimum that makes a row storable and meaningful (types, finite
numbers, grid alignment, OHLC consistency, unique keys). The full daily suites (Great Expectations)
run later, in the validation stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sofare.data.sources.base import MalformedDataError

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Gap:
    """A run of missing rows: first and last missing timestamp (or date) and how many are missing."""

    first_missing: datetime | date
    last_missing: datetime | date
    missing: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        first, last = self.first_missing.isoformat(), self.last_missing.isoformat()
        span = first if first == last else f"{first} .. {last}"
        return f"{span} ({self.missing} missing)"


def _numeric(frame: pd.DataFrame, columns: list[str], what: str, key: str, required: bool = True) -> pd.DataFrame:
    """Coerce columns to float; name the first value that is not a finite number."""
    import numpy as np
    import pandas as pd

    for column in columns:
        if column not in frame.columns:
            if required:
                raise MalformedDataError(f"{what}: missing column {column!r}")
            continue
        coerced = pd.to_numeric(frame[column], errors="coerce")
        bad = coerced.isna() & frame[column].notna()
        if required:
            bad |= coerced.isna()
        bad |= np.isinf(coerced.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            row = frame.loc[bad].iloc[0]
            raise MalformedDataError(
                f"{what}: column {column!r} has {int(bad.sum())} value(s) that are not finite numbers "
                f"(first at {key}={row[key]}: {row[column]!r})"
            )
        frame[column] = coerced.astype(float)
    return frame


def _ohlc(frame: pd.DataFrame, what: str, key: str) -> None:
    """Prices positive, high/low enclosing open and close, volume non-negative."""
    rules = {
        "open, high, low and close must be > 0": (frame[["open", "high", "low", "close"]] <= 0).any(axis=1),
        "high must be >= low": frame["high"] < frame["low"],
        "high must be >= open and close": frame["high"] < frame[["open", "close"]].max(axis=1),
        "low must be <= open and close": frame["low"] > frame[["open", "close"]].min(axis=1),
    }
    if "volume" in frame:
        rules["volume must be >= 0"] = frame["volume"] < 0
    for rule, broken in rules.items():
        if broken.any():
            row = frame.loc[broken].iloc[0]
            raise MalformedDataError(
                f"{what}: {int(broken.sum())} row(s) break '{rule}' (first at {key}={row[key]}: "
                f"open={row['open']}, high={row['high']}, low={row['low']}, close={row['close']})"
            )


def _unique(frame: pd.DataFrame, keys: list[str], what: str) -> pd.DataFrame:
    """Drop exact repeats; two different rows for one key are malformed."""
    frame = frame.drop_duplicates()
    clash = frame.duplicated(subset=keys, keep=False)
    if clash.any():
        example = frame.loc[clash, keys].iloc[0].to_dict()
        raise MalformedDataError(f"{what}: {int(clash.sum())} rows disagree for the same key, e.g. {example}")
    return frame


def check_candles(raw: pd.DataFrame, delta: timedelta, what: str) -> pd.DataFrame:
    """Validated candles (float prices, aligned UTC open times, unique, OHLC-consistent)."""
    import pandas as pd

    if "open_time" not in raw.columns:
        raise MalformedDataError(f"{what}: missing column 'open_time'")
    frame = raw.copy()
    times = pd.to_datetime(frame["open_time"], utc=True, errors="coerce")
    if times.isna().any():
        raise MalformedDataError(f"{what}: {int(times.isna().sum())} open_time value(s) are not timestamps")
    frame["open_time"] = times
    misaligned = (times - pd.Timestamp(0, tz="UTC")) % delta != pd.Timedelta(0)
    if misaligned.any():
        raise MalformedDataError(
            f"{what}: open_time {times[misaligned].iloc[0]} is not on the {delta} grid "
            f"({int(misaligned.sum())} misaligned)"
        )
    frame = _numeric(frame, ["open", "high", "low", "close", "volume"], what, "open_time")
    frame = _numeric(frame, ["quote_volume", "trade_count"], what, "open_time", required=False)
    _ohlc(frame, what, "open_time")
    if "trade_count" in frame:
        frame["trade_count"] = frame["trade_count"].round().astype("Int64")
    return _unique(frame, ["open_time"], what).sort_values("open_time").reset_index(drop=True)


def _dated(raw: pd.DataFrame, keys: tuple[str, str], what: str) -> pd.DataFrame:
    """A copy with both key columns present and the second (a date) parsed; names what is wrong."""
    import pandas as pd

    for column in keys:
        if column not in raw.columns:
            raise MalformedDataError(f"{what}: missing column {column!r}")
    frame = raw.copy()
    dates = pd.to_datetime(frame[keys[1]], errors="coerce")
    if dates.isna().any():
        raise MalformedDataError(f"{what}: {int(dates.isna().sum())} {keys[1]} value(s) are not dates")
    frame[keys[1]] = dates.dt.date
    return frame


def check_safe_haven(raw: pd.DataFrame, what: str) -> pd.DataFrame:
    frame = _dated(raw, ("ticker", "date"), what)
    frame = _numeric(frame, ["open", "high", "low", "close"], what, "date")
    frame = _numeric(frame, ["volume"], what, "date", required=False)
    _ohlc(frame, what, "date")
    return _unique(frame, ["ticker", "date"], what).sort_values(["ticker", "date"]).reset_index(drop=True)


def check_macro(raw: pd.DataFrame, what: str) -> pd.DataFrame:
    import pandas as pd

    frame = _numeric(_dated(raw, ("series_id", "observation_date"), what), ["value"], what, "observation_date")
    if "realtime_start" not in frame:
        frame["realtime_start"] = pd.NaT
    return _unique(frame, ["series_id", "observation_date", "realtime_start"], what)


# --- gaps ----------------------------------------------------------------------------------------


def candle_gaps(
    open_times: pd.Series | list[datetime],
    delta: timedelta,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[Gap]:
    """Missing grid points among open times; with start/end, also missing edges of [start, end)."""
    import pandas as pd

    times = pd.Series(pd.to_datetime(pd.Series(open_times), utc=True)).sort_values().reset_index(drop=True)
    if start is not None:
        times = pd.concat([pd.Series([pd.Timestamp(start) - delta]), times], ignore_index=True)
    if end is not None:
        times = pd.concat([times, pd.Series([pd.Timestamp(end)])], ignore_index=True)
    if len(times) < 2:
        return []
    steps = times.diff().iloc[1:]
    gaps = []
    for index in steps.index[steps > delta]:
        before, after = times[index - 1], times[index]
        missing = int((after - before) / delta) - 1
        gaps.append(Gap((before + delta).to_pydatetime(), (after - delta).to_pydatetime(), missing))
    return gaps


def date_gaps(dates: pd.Series | list[date], max_gap_days: int) -> list[Gap]:
    """Runs of more than `max_gap_days` calendar days without a row (weekends stay quiet)."""
    import pandas as pd

    days = pd.Series(pd.to_datetime(pd.Series(dates))).drop_duplicates().sort_values().reset_index(drop=True)
    if len(days) < 2:
        return []
    steps = days.diff().dt.days.iloc[1:]
    gaps = []
    for index in steps.index[steps > max_gap_days]:
        before, after = days[index - 1], days[index]
        gaps.append(
            Gap((before + pd.Timedelta(days=1)).date(), (after - pd.Timedelta(days=1)).date(), int(steps[index]) - 1)
        )
    return gaps
