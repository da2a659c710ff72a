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
the candle's close (t + interval). Every feature depends on at most `warmup_bars` rows of history
(exactly for windowed indicators, to < 1e-6 for exponentially smoothed ones), and rows with less
history are NULL, so the same window gives the same features in the warehouse and in the service.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from sofare.config import Config

# Bump when the computation changes in a way the column names do not show.
FEATURE_CODE_VERSION = "2"

MICRO_FIXED = (
    "log_ret_1", "hl_range", "oc_body", "parkinson_24",
    "rsi_14", "macd", "macd_signal", "macd_hist", "bb_pctb", "bb_width",
    "sma_ratio_7", "sma_ratio_25", "sma_ratio_99", "ema_ratio_12", "ema_ratio_26",
    "atr_pct_14", "obv_flow_14", "stoch_k", "stoch_d", "willr_14", "cci_20", "adx_14", "mfi_14",
    "log_volume", "volume_ratio_24",
    "hour_sin", "hour_cos", "dow_sin", "dow_cos",
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


def feature_spec(cfg: Config) -> FeatureSpec:
    f = cfg.features
    micro = (
        MICRO_FIXED
        + tuple(f"log_ret_lag_{k}" for k in f.return_lags)
        + tuple(f"mom_{w}" for w in f.momentum_windows)
        + tuple(f"vol_{w}" for w in f.volatility_windows)
    )
    safe = tuple(f"sh_{t.name}_{part}" for t in cfg.safe_haven.tickers.values() for part in SAFE_HAVEN_PARTS)
    macro = tuple(name for sid, s in cfg.macro.series.items() for name in _macro_names(sid, s.kind))
    fingerprint = repr((FEATURE_CODE_VERSION, micro, safe, macro, f.warmup_bars, f.horizon))
    version = f"fs{FEATURE_CODE_VERSION}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:8]}"
    return FeatureSpec(micro, safe, macro, version)


def _safe_div(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    import numpy as np

    out = np.full_like(num, fill, dtype=float)
    ok = np.isfinite(num) & np.isfinite(den) & (den != 0)
    np.divide(num, den, out=out, where=ok)
    out[~np.isfinite(num) | ~np.isfinite(den)] = np.nan
    return out


def micro_features(candles: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """TA, return, volatility, volume and calendar features of consecutive candles."""
    import numpy as np
    import pandas as pd
    import talib

    o, h, l, c, v = (candles[k].to_numpy(dtype=float) for k in ("open", "high", "low", "close", "volume"))
    logc = pd.Series(np.log(c))
    r1 = logc.diff()
    out: dict[str, np.ndarray | pd.Series] = {
        "log_ret_1": r1,
        "hl_range": np.log(h / l),
        "oc_body": np.log(c / o),
        "parkinson_24": np.sqrt((pd.Series(np.log(h / l)) ** 2).rolling(24).mean() / (4 * math.log(2))),
        "rsi_14": talib.RSI(c, 14),
    }
    macd, signal, hist = talib.MACD(c, 12, 26, 9)
    out.update(macd=macd / c, macd_signal=signal / c, macd_hist=hist / c)
    upper, mid, lower = talib.BBANDS(c, 20, 2.0, 2.0)
    out["bb_pctb"] = _safe_div(c - lower, upper - lower, 0.5)
    out["bb_width"] = _safe_div(upper - lower, mid, 0.0)
    for n in (7, 25, 99):
        out[f"sma_ratio_{n}"] = c / talib.SMA(c, n) - 1
    for n in (12, 26):
        out[f"ema_ratio_{n}"] = c / talib.EMA(c, n) - 1
    out["atr_pct_14"] = talib.ATR(h, l, c, 14) / c
    obv = pd.Series(talib.OBV(c, v))
    out["obv_flow_14"] = _safe_div(obv.diff(14).to_numpy(), pd.Series(v).rolling(14).sum().to_numpy(), 0.0)
    # bounded oscillators are clipped to their ranges: TA-Lib's smoothing overshoots 100 by ~1e-14 on
    # flat minute bars (found by the features suite on the real December 2024 minutes)
    stoch_k, stoch_d = talib.STOCH(h, l, c, 14, 3, 0, 3, 0)
    out["stoch_k"], out["stoch_d"] = np.clip(stoch_k, 0, 100), np.clip(stoch_d, 0, 100)
    out["willr_14"] = np.clip(talib.WILLR(h, l, c, 14), -100, 0)
    out["cci_20"] = talib.CCI(h, l, c, 20)
    out["adx_14"] = talib.ADX(h, l, c, 14)
    out["mfi_14"] = talib.MFI(h, l, c, v, 14)
    log_volume = pd.Series(np.log1p(v))
    out["log_volume"] = log_volume
    out["volume_ratio_24"] = log_volume - log_volume.rolling(24).mean()
    times = candles["open_time"]
    hour = (times.dt.hour + times.dt.minute / 60.0).to_numpy()
    dow = times.dt.dayofweek.to_numpy() + hour / 24.0
    out.update(
        hour_sin=np.sin(2 * np.pi * hour / 24), hour_cos=np.cos(2 * np.pi * hour / 24),
        dow_sin=np.sin(2 * np.pi * dow / 7), dow_cos=np.cos(2 * np.pi * dow / 7),
    )
    f = cfg.features
    for k in f.return_lags:
        out[f"log_ret_lag_{k}"] = r1.shift(k)
    for w in f.momentum_windows:
        out[f"mom_{w}"] = logc - logc.shift(w)
    for w in f.volatility_windows:
        out[f"vol_{w}"] = r1.rolling(w).std()
    return pd.DataFrame({k: np.asarray(val, dtype=float) for k, val in out.items()}, index=candles.index)


@dataclass(frozen=True)
class Events:
    """Feature values with the instant each became known, sorted by that instant (ns since epoch)."""

    names: tuple[str, ...]
    keys: np.ndarray  # int64, ascending (stable: ties keep their input order)
    values: np.ndarray  # float, one row per key

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

        found = np.searchsorted(self.keys, instants, side="right") - 1
        out = np.full((len(found), len(self.names)), np.nan)
        hit = found >= 0
        if len(self.values):
            out[hit] = self.values[found[hit]]
        return out


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
        tables.append((names, Events.of(pd.DataFrame({
            "known_at": pd.to_datetime(own["known_at"], utc=True).array,
            names[0]: ret1,
            names[1]: log_close - log_close.shift(5),
            names[2]: ret1.rolling(20).std(),
            names[3]: _safe_div((close - mean20).to_numpy(), std20.to_numpy(), 0.0),
        }), names)))
    return tables


def _macro_events(obs: pd.DataFrame, kind: str, names: tuple[str, ...]) -> pd.DataFrame:
    """Replay vintages in known_at order; after each release, the latest value and its change."""
    import pandas as pd

    ordered = obs.sort_values(["known_at", "observation_date"], kind="stable")
    stamps = ordered["known_at"].tolist()
    known: dict[object, float] = {}
    latest_day = previous_day = None  # the two most recent observation dates known so far
    rows = []
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
    serves every later request (the service keeps one and refreshes it)."""
    return safe_haven_events(safe_haven, cfg) + macro_events(macro, cfg)


def align(as_of: pd.Series, tables: EventTables) -> pd.DataFrame:
    """Every event-table feature as of each instant (NaN before its first event)."""
    import numpy as np
    import pandas as pd

    instants = pd.DatetimeIndex(pd.to_datetime(as_of, utc=True)).as_unit("ns").asi8
    columns: dict[str, np.ndarray] = {}
    for names, events in tables:
        values = np.full((len(instants), len(names)), np.nan) if events is None else events.asof(instants)
        for i, name in enumerate(names):
            columns[name] = values[:, i]
    return pd.DataFrame(columns)


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
    import numpy as np
    import pandas as pd

    from sofare.config import interval_delta

    spec = feature_spec(cfg)
    delta = interval_delta(interval)
    if candles.empty:
        return pd.DataFrame(columns=["open_time", *spec.columns, *TARGET_COLUMNS])
    candles = candles.sort_values("open_time").reset_index(drop=True)
    candles["open_time"] = pd.to_datetime(candles["open_time"], utc=True)
    as_of = candles["open_time"] + delta  # a row is computed when its candle closes
    if context is None:
        context = prepare_context(safe_haven, macro, cfg)
    parts = [micro_features(candles, cfg), align(as_of, context)]
    feats = pd.concat(parts, axis=1)[list(spec.columns)]
    values = feats.to_numpy(dtype=float)
    values[~np.isfinite(values)] = np.nan
    values[: cfg.features.warmup_bars - 1] = np.nan  # not enough history: NULL, never a guess
    out = pd.DataFrame(values, columns=list(spec.columns))
    out.insert(0, "open_time", candles["open_time"])
    return pd.concat([out, targets(candles, delta, cfg.features.horizon)], axis=1)
