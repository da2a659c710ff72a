"""The one feature function, used by training (materialised features table) and by serving.

`compute_features` turns a window of candles (+ daily safe-haven bars and macro observations, each
with the instant it became visible) into one row per candle:

- micro: TA-Lib indicators (RSI, MACD, Bollinger, SMA/EMA ratios, ATR, OBV flow, stochastic,
  Williams %R, CCI, ADX, MFI), log returns and lags, momentum, volatility, volume, calendar;
- safe haven: per ticker, daily return, 5-day return, 20-day volatility and z-score of the close;
- macro: per series, level and change (rates) or growth (index levels);
- targets: log return over the next `horizon` bars and its sign (up = 1), NULL when that candle is
  not there.

No look-ahead: row t uses candles up to t and daily/macro values whose `known_at` is at or before
the candle's close (t + interval). Windowed indicators depend on exactly their window; the exponentially
smoothed ones (Wilder's ADX/RSI/ATR, MACD's EMAs) on all earlier candles with a geometrically decaying
weight, and `warmup_bars` is long enough for it to vanish: a row computed from `warmup_bars` - 1 candles
of history is within 1e-9 of the row computed from all of it (measured: docs/architecture.md, "Features").
Rows with less history are NULL. So a service window and the warehouse agree within 1e-9, and the
warehouse computes each row in a fixed block (`sofare.data.ingest.feature_blocks`), bit-identical
however a backfill was chunked.

There is one computation, on numpy arrays and TA-Lib, without pandas: `micro_array` (the candle features)
and `feature_matrix` (every feature column of one window, what the prediction service calls per request).
`compute_features` is the pandas entry used by training over long histories; it only unpacks the frames,
calls `feature_matrix` and adds the targets.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from sofare.config import Config

# Bump when the computation changes in a way the column names do not show.
FEATURE_CODE_VERSION = "4"

MICRO_FIXED = (
    "log_ret_1",
    "hl_range",
    "oc_body",
    "parkinson_24",
    "rsi_14",
    "macd",
    "macd_signal",
    "macd_hist",
    "bb_pctb",
    "bb_width",
    "sma_ratio_7",
    "sma_ratio_25",
    "sma_ratio_99",
    "ema_ratio_12",
    "ema_ratio_26",
    "atr_pct_14",
    "obv_flow_14",
    "stoch_k",
    "stoch_d",
    "willr_14",
    "cci_20",
    "adx_14",
    "mfi_14",
    "log_volume",
    "volume_ratio_24",
    "hour_sin",
    "hour_cos",
    "dow_sin",
    "dow_cos",
)
SAFE_HAVEN_PARTS = ("ret1", "ret5", "vol20", "z20")
TARGET_COLUMNS = ("target_return", "target_up")


@dataclass(frozen=True)
class FeatureSpec:
    """The feature columns for a configuration, grouped by modality, and their version."""

    micro: tuple[str, ...]
    safe_haven: tuple[str, ...]
    macro: tuple[str, ...]
    version: str

    @property
    def columns(self) -> tuple[str, ...]:
        return self.micro + self.safe_haven + self.macro


def _macro_names(series_id: str, kind: str) -> tuple[str, ...]:
    base = f"macro_{series_id.lower()}"
    return (f"{base}_growth",) if kind == "index" else (base, f"{base}_chg")


def _micro_names(cfg: Config) -> tuple[str, ...]:
    f = cfg.features
    return (
        MICRO_FIXED
        + tuple(f"log_ret_lag_{k}" for k in f.return_lags)
        + tuple(f"mom_{w}" for w in f.momentum_windows)
        + tuple(f"vol_{w}" for w in f.volatility_windows)
    )


def _safe_haven_names(cfg: Config) -> tuple[str, ...]:
    return tuple(f"sh_{t.name}_{part}" for t in cfg.safe_haven.tickers.values() for part in SAFE_HAVEN_PARTS)


def _all_macro_names(cfg: Config) -> tuple[str, ...]:
    return tuple(name for sid, s in cfg.macro.series.items() for name in _macro_names(sid, s.kind))


def feature_spec(cfg: Config) -> FeatureSpec:
    f = cfg.features
    micro, safe, macro = _micro_names(cfg), _safe_haven_names(cfg), _all_macro_names(cfg)
    fingerprint = repr((FEATURE_CODE_VERSION, micro, safe, macro, f.warmup_bars, f.horizon))
    version = f"fs{FEATURE_CODE_VERSION}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:8]}"
    return FeatureSpec(micro, safe, macro, version)


def _safe_div(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    import numpy as np

    out = np.full_like(num, fill, dtype=float)
    finite = np.isfinite(num) & np.isfinite(den)
    np.divide(num, den, out=out, where=finite & (den != 0))
    out[~finite] = np.nan
    return out


_NS_PER_MINUTE = 60 * 10**9
_MINUTES_PER_DAY = 24 * 60
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0, as pandas' dayofweek)
_ROLLING_BLOCK = 4096  # windows per block of a rolling statistic: bounds the temporaries on long histories


def _lag(x: np.ndarray, k: int) -> np.ndarray:
    """x shifted down by k rows, NaN in front (pandas `shift(k)`)."""
    import numpy as np

    out = np.full(len(x), np.nan)
    if k < len(x):
        out[k:] = x[: len(x) - k]
    return out


def _rolling(x: np.ndarray, window: int, stat: str) -> np.ndarray:
    """pandas `rolling(window).<stat>()` for stat in mean, sum, std (ddof=1): NaN for the first window-1 rows
    (min_periods = window) and wherever the window holds a NaN (or an infinity).

    From prefix sums (a window of 300 candles costs a few vectorised calls, not one reduction per window),
    restarted every `_ROLLING_BLOCK` windows so rounding cannot build up over a long history: results match
    pandas' online algorithm to ~1e-13 relative. The std uses raw sums of squares, accurate when a series'
    mean is small against its spread (log returns, the only series it is used on)."""
    import numpy as np

    n = len(x)
    out = np.full(n, np.nan)
    finite = np.isfinite(x)
    first = int(finite.argmax()) if n else 0
    if n - first < window or not finite[first]:
        return out
    # the sums start at the first finite value whatever follows, so a row's result depends on nothing after it
    lo, bad = first, None
    if not finite[first:].all():  # the usual case has NaN only in front (the first log return)
        bad = ~finite
        x = np.where(finite, x, 0.0)
    for start in range(lo, n - window + 1, _ROLLING_BLOCK):
        stop = min(start + _ROLLING_BLOCK, n - window + 1)  # the windows x[i : i + window], start <= i < stop
        seg = x[start : stop + window - 1]
        dest = out[start + window - 1 : stop + window - 1]
        total = np.cumsum(seg)
        s1 = np.empty(stop - start)
        s1[0] = total[window - 1]
        np.subtract(total[window:], total[:-window], out=s1[1:])
        if stat == "sum":
            dest[:] = s1
        elif stat == "mean":
            np.divide(s1, window, out=dest)
        else:
            total = np.cumsum(seg * seg)
            s2 = np.empty(stop - start)
            s2[0] = total[window - 1]
            np.subtract(total[window:], total[:-window], out=s2[1:])
            s2 -= s1 * s1 / window
            np.maximum(s2, 0.0, out=s2)  # rounding must not make a variance negative
            np.sqrt(s2 / (window - 1), out=dest)
        if bad is not None:
            count = np.cumsum(bad[start : stop + window - 1])
            hit = np.empty(stop - start, dtype=bool)
            hit[0] = count[window - 1] > 0
            np.greater(count[window:], count[:-window], out=hit[1:])
            dest[hit] = np.nan
    return out


def micro_array(
    o: np.ndarray, h: np.ndarray, l: np.ndarray, c: np.ndarray, v: np.ndarray, open_ns: np.ndarray, cfg: Config
) -> np.ndarray:
    """TA, return, volatility, volume and calendar features of consecutive candles, without pandas.

    o, h, l, c, v: float64 arrays of one length n (open, high, low, close, volume); open_ns: int64 candle
    open times, ns since the epoch (UTC). Returns [n, len(feature_spec(cfg).micro)] in that column order."""
    import numpy as np
    import talib

    o, h, l, c, v = (np.ascontiguousarray(x, dtype=np.float64) for x in (o, h, l, c, v))
    open_ns = np.asarray(open_ns, dtype=np.int64)
    names = _micro_names(cfg)
    n = len(c)
    if n == 0:
        return np.empty((0, len(names)))
    logc = np.log(c)
    r1 = _lag(logc, 1)
    np.subtract(logc, r1, out=r1)  # logc[t] - logc[t-1], NaN at t = 0
    hl = np.log(h / l)
    out: dict[str, np.ndarray] = {
        "log_ret_1": r1,
        "hl_range": hl,
        "oc_body": np.log(c / o),
        "parkinson_24": np.sqrt(_rolling(hl**2, 24, "mean") / (4 * math.log(2))),
        "rsi_14": talib.RSI(c, 14),
    }
    macd, signal, hist = talib.MACD(c, 12, 26, 9)
    out.update(macd=macd / c, macd_signal=signal / c, macd_hist=hist / c)
    upper, mid, lower = talib.BBANDS(c, 20, 2.0, 2.0)
    out["bb_pctb"] = _safe_div(c - lower, upper - lower, 0.5)
    out["bb_width"] = _safe_div(upper - lower, mid, 0.0)
    for w in (7, 25, 99):
        out[f"sma_ratio_{w}"] = c / talib.SMA(c, w) - 1
    for w in (12, 26):
        out[f"ema_ratio_{w}"] = c / talib.EMA(c, w) - 1
    out["atr_pct_14"] = talib.ATR(h, l, c, 14) / c
    obv = talib.OBV(c, v)
    # |OBV change| <= the volume it sums, so the flow is in [-1, 1]; the two running sums round apart (a
    # 14-candle up run gave 1 + 7e-11: the features suite failed 2025-01-10 of the real hourly candles)
    out["obv_flow_14"] = np.clip(_safe_div(obv - _lag(obv, 14), _rolling(v, 14, "sum"), 0.0), -1.0, 1.0)
    # bounded oscillators are clipped to their ranges: TA-Lib's smoothing overshoots 100 by ~1e-14 on
    # flat minute bars (found by the features suite on the real December 2024 minutes)
    stoch_k, stoch_d = talib.STOCH(h, l, c, 14, 3, talib.MA_Type.SMA, 3, talib.MA_Type.SMA)
    out["stoch_k"], out["stoch_d"] = np.clip(stoch_k, 0, 100), np.clip(stoch_d, 0, 100)
    out["willr_14"] = np.clip(talib.WILLR(h, l, c, 14), -100, 0)
    out["cci_20"] = talib.CCI(h, l, c, 20)
    out["adx_14"] = talib.ADX(h, l, c, 14)
    out["mfi_14"] = talib.MFI(h, l, c, v, 14)
    log_volume = np.log1p(v)
    out["log_volume"] = log_volume
    out["volume_ratio_24"] = log_volume - _rolling(log_volume, 24, "mean")
    minutes = open_ns // _NS_PER_MINUTE  # floor division: right before 1970 too
    hour = (minutes % _MINUTES_PER_DAY) / 60.0  # the UTC hour + minute/60
    dow = (minutes // _MINUTES_PER_DAY + _EPOCH_WEEKDAY) % 7 + hour / 24.0  # Monday = 0
    hour *= 2 * math.pi / 24
    dow *= 2 * math.pi / 7
    out.update(hour_sin=np.sin(hour), hour_cos=np.cos(hour), dow_sin=np.sin(dow), dow_cos=np.cos(dow))
    f = cfg.features
    for k in f.return_lags:
        out[f"log_ret_lag_{k}"] = _lag(r1, k)
    for w in f.momentum_windows:
        out[f"mom_{w}"] = logc - _lag(logc, w)
    for w in f.volatility_windows:
        out[f"vol_{w}"] = _rolling(r1, w, "std")
    matrix = np.empty((n, len(names)))
    for j, name in enumerate(names):
        matrix[:, j] = out[name]
    return matrix


def micro_features(candles: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """`micro_array` of a candles frame (open_time, open, high, low, close, volume) as a frame."""
    import pandas as pd

    o, h, l, c, v = (candles[k].to_numpy(dtype=float) for k in ("open", "high", "low", "close", "volume"))
    values = micro_array(o, h, l, c, v, _ns(candles["open_time"]), cfg)
    return pd.DataFrame(values, columns=list(_micro_names(cfg)), index=candles.index)


def _ns(times: pd.Series) -> np.ndarray:
    """Instants (naive ones read as UTC) as int64 ns since the epoch."""
    import pandas as pd

    return pd.DatetimeIndex(pd.to_datetime(times, utc=True)).as_unit("ns").asi8


@dataclass(frozen=True)
class Events:
    """Feature values with the instant each became known, sorted by that instant (ns since epoch)."""

    names: tuple[str, ...]
    keys: np.ndarray  # int64, ascending (stable: ties keep their input order)
    values: np.ndarray  # float, one row per key
    padded: np.ndarray = field(init=False, repr=False, compare=False)  # values after a row of NaN ("before")

    def __post_init__(self) -> None:
        import numpy as np

        padded = np.full((len(self.keys) + 1, len(self.names)), np.nan)
        padded[1:] = self.values
        object.__setattr__(self, "padded", padded)

    @classmethod
    def of(cls, frame: pd.DataFrame, names: tuple[str, ...]) -> Events:
        import numpy as np
        import pandas as pd

        keys = pd.DatetimeIndex(pd.to_datetime(frame["known_at"], utc=True)).as_unit("ns").asi8
        order = np.argsort(keys, kind="stable")
        return cls(names, keys[order], frame[list(names)].to_numpy(dtype=float)[order])

    def asof(self, instants: np.ndarray) -> np.ndarray:
        """For each instant (int64 ns), the values of the latest event known at or before it (ties:
        the last one); NaN before the first event. A binary search, no pandas merge: serving calls
        this on every request."""
        import numpy as np

        return self.padded[np.searchsorted(self.keys, instants, side="right")]


EventTables = list[tuple[tuple[str, ...], "Events | None"]]  # feature names, their events (None: no data)


def safe_haven_events(bars: pd.DataFrame, cfg: Config) -> EventTables:
    """Per ticker: 1- and 5-day log return, 20-day volatility, 20-day z-score, each known at its bar's known_at."""
    import numpy as np
    import pandas as pd

    tables: EventTables = []
    for ticker, spec in cfg.safe_haven.tickers.items():
        names = tuple(f"sh_{spec.name}_{part}" for part in SAFE_HAVEN_PARTS)
        own = bars[bars["ticker"] == ticker].sort_values("date") if not bars.empty else bars
        if own.empty:
            tables.append((names, None))
            continue
        close = own["close"].astype(float).reset_index(drop=True)
        log_close = np.log(close)
        ret1 = log_close.diff()
        mean20, std20 = close.rolling(20).mean(), close.rolling(20).std()
        tables.append(
            (
                names,
                Events.of(
                    pd.DataFrame(
                        {
                            "known_at": pd.to_datetime(own["known_at"], utc=True).array,
                            names[0]: ret1,
                            names[1]: log_close - log_close.shift(5),
                            names[2]: ret1.rolling(20).std(),
                            names[3]: _safe_div((close - mean20).to_numpy(), std20.to_numpy(), 0.0),
                        }
                    ),
                    names,
                ),
            )
        )
    return tables


def _macro_events(obs: pd.DataFrame, kind: str, names: tuple[str, ...]) -> pd.DataFrame:
    """Replay vintages in known_at order; after each release, the latest value and its change."""
    import pandas as pd

    ordered = obs.sort_values(["known_at", "observation_date"], kind="stable")
    stamps = ordered["known_at"].tolist()
    known: dict[object, float] = {}
    latest_day = previous_day = None  # the two most recent observation dates known so far
    rows: list[tuple[object, ...]] = []
    for i, (stamp, day, value) in enumerate(zip(stamps, ordered["observation_date"], ordered["value"].astype(float))):
        known[day] = value
        if latest_day is None or day > latest_day:
            previous_day, latest_day = latest_day, day
        elif day != latest_day and (previous_day is None or day > previous_day):
            previous_day = day
        if i + 1 < len(stamps) and stamps[i + 1] == stamp:
            continue  # emit once per release, after all of its values
        latest = known[latest_day]
        previous = known[previous_day] if previous_day is not None else math.nan
        if kind == "index":
            growth = math.log(latest / previous) if previous > 0 and latest > 0 else math.nan
            rows.append((stamp, growth))
        else:
            rows.append((stamp, latest, latest - previous))
    return pd.DataFrame(rows, columns=["known_at", *names])


def macro_events(observations: pd.DataFrame, cfg: Config) -> EventTables:
    """Per series: level and change (rates) or growth (index levels) after each release."""
    import pandas as pd

    tables: EventTables = []
    for series_id, spec in cfg.macro.series.items():
        names = _macro_names(series_id, spec.kind)
        own = observations[observations["series_id"] == series_id] if not observations.empty else observations
        if own.empty:
            tables.append((names, None))
            continue
        own = own.assign(known_at=pd.to_datetime(own["known_at"], utc=True))
        tables.append((names, Events.of(_macro_events(own, spec.kind, names), names)))
    return tables


def prepare_context(safe_haven: pd.DataFrame, macro: pd.DataFrame, cfg: Config) -> EventTables:
    """The safe-haven and macro inputs of the feature function as event tables. Rows known after an
    instant never reach that instant's features, so one table built from all rows known so far
    serves every later request (the service keeps one and refreshes it). The tables come merged into
    one, so a request costs one binary search, not one per ticker and series."""
    return merge_events(safe_haven_events(safe_haven, cfg) + macro_events(macro, cfg))


def merge_events(tables: EventTables) -> EventTables:
    """One event table with every feature of `tables` that answers every as-of lookup exactly as they do:
    a row per distinct instant holding each table's values as of that instant. (Tables that share a
    feature name are returned as they are: which one wins is theirs to say.)"""
    import numpy as np

    names = tuple(name for table_names, _ in tables for name in table_names)
    if len(set(names)) != len(names) or len(tables) < 2:
        return tables
    present = [events for _, events in tables if events is not None]
    keys = np.unique(np.concatenate([events.keys for events in present])) if present else np.empty(0, np.int64)
    values = np.full((len(keys), len(names)), np.nan)
    col = 0
    for table_names, events in tables:
        if events is not None:
            values[:, col : col + len(table_names)] = events.asof(keys)
        col += len(table_names)
    return [(names, Events(names, keys.astype(np.int64), values))]


def _context_values(instants: np.ndarray, tables: EventTables, names: tuple[str, ...]) -> np.ndarray:
    """[len(instants), len(names)]: each named event-table feature as of each instant (int64 ns), NaN before
    its first event or where its table has no data. A KeyError names any that no table provides."""
    import numpy as np

    out = np.full((len(instants), len(names)), np.nan)
    where = {name: j for j, name in enumerate(names)}
    seen: set[str] = set()
    for table_names, events in tables:
        seen.update(table_names)
        if events is None or not table_names:
            continue
        j = where.get(table_names[0], -1)
        if j >= 0 and names[j : j + len(table_names)] == table_names:  # the usual case: a run of columns
            out[:, j : j + len(table_names)] = events.asof(instants)
            continue
        pairs = [(i, where[name]) for i, name in enumerate(table_names) if name in where]
        if pairs:
            out[:, [j for _, j in pairs]] = events.asof(instants)[:, [i for i, _ in pairs]]
    if missing := set(names) - seen:
        raise KeyError(f"the context has no event table for {sorted(missing)}")
    return out


def align(as_of: pd.Series, tables: EventTables) -> pd.DataFrame:
    """Every event-table feature as of each instant (NaN before its first event)."""
    import pandas as pd

    names = tuple(dict.fromkeys(name for table_names, _ in tables for name in table_names))
    return pd.DataFrame(_context_values(_ns(as_of), tables, names), columns=list(names))


def feature_matrix(
    o: np.ndarray,
    h: np.ndarray,
    l: np.ndarray,
    c: np.ndarray,
    v: np.ndarray,
    open_ns: np.ndarray,
    cfg: Config,
    interval: str,
    context: EventTables,
) -> np.ndarray:
    """Every feature column of feature_spec(cfg), in order, for consecutive candles: [n, len(columns)].

    The micro features of `micro_array`, then the safe-haven and macro features of `context`
    (`prepare_context`) as of each candle's close (open_ns + interval); non-finite values and the first
    warmup_bars - 1 rows are NaN. No pandas: the service calls this for one window per request, training
    (`compute_features`) for the whole history."""
    import numpy as np

    from sofare.config import interval_delta

    micro = micro_array(o, h, l, c, v, open_ns, cfg)
    n, m = micro.shape
    names = _safe_haven_names(cfg) + _all_macro_names(cfg)
    # a row is computed when its candle closes
    closes = np.asarray(open_ns, dtype=np.int64) + interval_delta(interval) // timedelta(microseconds=1) * 1000
    out = np.empty((n, m + len(names)))
    out[:, :m] = micro
    out[:, m:] = _context_values(closes, context, names)
    warm = max(cfg.features.warmup_bars - 1, 0)
    out[:warm] = np.nan  # not enough history: NULL, never a guess
    rest = out[warm:]
    rest[~np.isfinite(rest)] = np.nan
    # one zero: -0.0 becomes 0.0. numpy's clip/maximum may return either zero for a signed-zero tie depending on
    # whether an element falls in a SIMD or a scalar loop, i.e. on the array's length; stored rows are compared
    # byte for byte (`sofare status --checksum`)
    rest += 0.0
    return out


def targets(candles: pd.DataFrame, delta: timedelta, horizon: int) -> pd.DataFrame:
    """Log return from close(t) to close(t + horizon*interval); NULL where that candle is missing."""
    import numpy as np
    import pandas as pd

    log_close = pd.Series(np.log(candles["close"].to_numpy(dtype=float)), index=candles["open_time"].to_numpy())
    future = log_close.reindex(candles["open_time"] + delta * horizon).to_numpy()
    ret = future - log_close.to_numpy()
    up = np.where(np.isnan(ret), np.nan, (ret > 0).astype(float))
    return pd.DataFrame({"target_return": ret, "target_up": up}, index=candles.index)


def compute_features(
    candles: pd.DataFrame,
    safe_haven: pd.DataFrame | None,
    macro: pd.DataFrame | None,
    cfg: Config,
    interval: str,
    context: EventTables | None = None,
) -> pd.DataFrame:
    """The one feature function: open_time, every feature column of feature_spec(cfg), targets.

    `context`: safe-haven and macro inputs already turned into event tables by `prepare_context`
    (then `safe_haven` and `macro` are not read)."""
    import pandas as pd

    from sofare.config import interval_delta

    spec = feature_spec(cfg)
    delta = interval_delta(interval)
    if candles.empty:
        return pd.DataFrame(columns=["open_time", *spec.columns, *TARGET_COLUMNS])
    candles = candles.sort_values("open_time").reset_index(drop=True)
    candles["open_time"] = pd.to_datetime(candles["open_time"], utc=True)
    if context is None:
        context = prepare_context(safe_haven, macro, cfg)
    o, h, l, c, v = (candles[k].to_numpy(dtype=float) for k in ("open", "high", "low", "close", "volume"))
    values = feature_matrix(o, h, l, c, v, _ns(candles["open_time"]), cfg, interval, context)
    out = pd.DataFrame(values, columns=list(spec.columns))
    out.insert(0, "open_time", candles["open_time"])
    return pd.concat([out, targets(candles, delta, cfg.features.horizon)], axis=1)
