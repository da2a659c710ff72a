"""Online prediction: a served model version, the checks on a request's window, the one feature
function on that window, and the answer. `bentos/sofare/service.py` is a thin BentoML shell around
`Predictor`; tests and benchmarks call the same code in process.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sofare.config import INTERVALS, interval_delta
from sofare.data import warehouse
from sofare.data.features import compute_features
from sofare.errors import NotFoundError
from sofare.serving.bundle import ServedModel
from sofare.serving.schemas import FUTURE_TOLERANCE, UTC, BadRequest, Candle, MacroObservation, SafeHavenBar, Window

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)


class Predictor:
    """A loaded model version and the checks and features around it."""

    def __init__(self, cfg: Config, model: ServedModel, version: str, variant: str,
                 info: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.meta = meta = model.meta
        self.version = version
        self.variant = variant
        self.info = info or {}
        self.symbol = meta.symbol.upper()
        self.interval = meta.interval
        self.delta = interval_delta(self.interval)
        self.horizon = meta.horizon
        self.needed = meta.warmup_bars + meta.lookback - 1  # candles for one full window
        self.micro = list(meta.groups["micro"])
        self.max_batch = cfg.serving.max_batch_windows
        self.max_candles = max(self.needed, cfg.serving.max_window_candles)
        self.context = WarehouseContext(cfg)

    @classmethod
    def from_directory(cls, cfg: Config, directory: Path, version: str, variant: str | None = None,
                       info: dict[str, Any] | None = None) -> Predictor:
        model = ServedModel.load(directory, cfg.serving.runtime)
        return cls(cfg, model, version, variant or os.environ.get("SOFARE_VARIANT", "stable"), info)

    # --- validation ---

    def check(self, window: Window, where: str = "") -> None:
        if window.symbol.upper() != self.symbol:
            raise BadRequest(f"{where}symbol: {window.symbol!r} is not served here; this model predicts {self.symbol}")
        if window.interval not in INTERVALS:
            raise BadRequest(f"{where}interval: unknown interval {window.interval!r}")
        if window.interval != self.interval:
            raise BadRequest(f"{where}interval: {window.interval!r} is not served here; this model predicts {self.interval} candles")
        candles = window.candles
        if len(candles) < self.needed:
            raise BadRequest(f"{where}candles: {len(candles)} given, at least {self.needed} needed "
                             f"({self.meta.warmup_bars} bars of feature warm-up + lookback {self.meta.lookback} - 1)")
        if len(candles) > self.max_candles:
            raise BadRequest(f"{where}candles: {len(candles)} given, at most {self.max_candles} accepted")
        times = [c.open_time for c in candles]
        for i in range(1, len(times)):
            if times[i] == times[i - 1]:
                raise BadRequest(f"{where}candles[{i}].open_time: duplicate timestamp {times[i].isoformat()}")
            if times[i] < times[i - 1]:
                raise BadRequest(f"{where}candles[{i}].open_time: not sorted ({times[i].isoformat()} after "
                                 f"{times[i - 1].isoformat()}); send candles oldest first")
        step = self.delta.total_seconds()
        for i, t in enumerate(times):
            if t.timestamp() % step:
                raise BadRequest(f"{where}candles[{i}].open_time: {t.isoformat()} is not on the {self.interval} grid")
        if times[-1] + self.delta > datetime.now(UTC) + FUTURE_TOLERANCE:
            raise BadRequest(f"{where}candles[{len(times) - 1}].open_time: {times[-1].isoformat()} is in the future "
                             f"(that candle closes at {(times[-1] + self.delta).isoformat()})")
        for i, c in enumerate(candles):
            if c.high < max(c.open, c.close) or c.low > min(c.open, c.close):
                raise BadRequest(f"{where}candles[{i}]: high/low do not contain open and close")
        span = times[-1] - times[-self.meta.lookback]
        if span != self.delta * (self.meta.lookback - 1):
            raise BadRequest(f"{where}candles: the last {self.meta.lookback} candles must be consecutive "
                             f"{self.interval} bars (they span {span})")
        known_tickers = set(self.cfg.safe_haven.tickers)
        for i, bar in enumerate(window.safe_haven or []):
            if bar.ticker not in known_tickers:
                raise BadRequest(f"{where}safe_haven[{i}].ticker: {bar.ticker!r} is not one of {sorted(known_tickers)}")
        for i, obs in enumerate(window.macro or []):
            if obs.series_id not in self.cfg.macro.series:
                raise BadRequest(f"{where}macro[{i}].series_id: {obs.series_id!r} is not one of {sorted(self.cfg.macro.series)}")

    # --- features ---

    def _context(self, window: Window, first: datetime, as_of: datetime) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Safe-haven and macro rows: the request's, else the warehouse's known by `as_of`."""
        start = (first - timedelta(days=self.cfg.features.daily_context_days)).date()
        since = first - timedelta(days=self.cfg.features.macro_context_days)
        if window.safe_haven is None or window.macro is None:
            safe, macro = self.context.rows(start, since, as_of)
        if window.safe_haven is not None:
            safe = pd.DataFrame([b.model_dump() for b in window.safe_haven], columns=list(SafeHavenBar.model_fields))
            safe["known_at"] = pd.to_datetime(safe["known_at"], utc=True)
        if window.macro is not None:
            macro = pd.DataFrame([m.model_dump() for m in window.macro], columns=list(MacroObservation.model_fields))
            macro["known_at"] = pd.to_datetime(macro["known_at"], utc=True)
        return safe, macro

    def features(self, window: Window) -> np.ndarray:
        """The model's raw input [lookback, features] from the request, via the one feature function."""
        candles = pd.DataFrame([c.model_dump() for c in window.candles])
        candles["open_time"] = pd.to_datetime(candles["open_time"], utc=True)
        if window.safe_haven is None and window.macro is None:  # the common case: no per-request context work
            feats = compute_features(candles, None, None, self.cfg, self.interval, context=self.context.tables())
        else:
            as_of = candles["open_time"].iloc[-1].to_pydatetime() + self.delta
            safe, macro = self._context(window, candles["open_time"].iloc[0].to_pydatetime(), as_of)
            feats = compute_features(candles, safe, macro, self.cfg, self.interval)
        raw = feats[list(self.meta.columns)].to_numpy(dtype=np.float32)[-self.meta.lookback:]
        if np.isnan(raw[:, self.micro]).any():
            raise BadRequest("candles: not enough history for the features of the last window "
                             f"(send at least {self.needed} consecutive candles)")
        return raw

    # --- predictions ---

    def predict_raw(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict_windows(raw)

    def answer(self, window: Window, prob: float, ret: float, started: float) -> dict[str, Any]:
        as_of = window.candles[-1].open_time + self.delta
        return {
            "prediction_id": uuid.uuid4().hex, "model_version": self.version, "variant": self.variant,
            "symbol": self.symbol, "interval": self.interval, "direction": "up" if prob > 0.5 else "down",
            "prob_up": round(float(prob), 6), "confidence": round(float(max(prob, 1 - prob)), 6),
            "expected_return": float(ret), "horizon": self.horizon, "as_of": as_of.isoformat(),
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    def inputs(self, windows: list[Window], batch: bool = False) -> np.ndarray:
        """Validated model inputs [n, lookback, features]; BadRequest names the window and the field."""
        if not windows:
            raise BadRequest("windows: empty batch")
        if len(windows) > self.max_batch:
            raise BadRequest(f"windows: {len(windows)} given, at most {self.max_batch} per request")
        for i, w in enumerate(windows):
            self.check(w, f"windows[{i}]." if batch else "")
        return np.stack([self.features(w) for w in windows])

    def predict(self, window: Window) -> dict[str, Any]:
        """One window in process (what the service answers for /predict)."""
        started = time.perf_counter()
        prob, ret = self.predict_raw(self.inputs([window]))
        return self.answer(window, prob[0], ret[0], started)

    def latest_window(self, symbol: str) -> Window:
        """The newest `needed` candles of `symbol` from the warehouse (safe-haven/macro read as-of)."""
        if symbol.upper() != self.symbol:
            raise BadRequest(f"symbol: {symbol!r} is not served here; this model predicts {self.symbol}")
        engine = warehouse.get_engine(self.cfg)
        with engine.connect() as conn:
            frame = warehouse.read_candles_before(conn, self.symbol, self.interval, datetime.now(UTC) - self.delta + FUTURE_TOLERANCE,
                                                  self.needed)
        if len(frame) < self.needed:
            raise NotFoundError(f"the warehouse holds {len(frame)} {self.symbol} {self.interval} candles; {self.needed} needed")
        candles = [Candle(**{k: row[k] for k in Candle.model_fields}) for row in frame.to_dict("records")]
        return Window(symbol=self.symbol, interval=self.interval, candles=candles)

    def model_info(self) -> dict[str, Any]:
        meta = self.meta
        return {"model": self.cfg.mlflow.model_name, "model_version": self.version, "variant": self.variant,
                "symbol": self.symbol, "interval": self.interval, "horizon": self.horizon,
                "lookback": self.meta.lookback, "candles_needed": self.needed,
                "feature_set_version": meta.feature_set_version, "architecture": meta.architecture,
                "features": len(meta.columns), "max_batch_windows": self.max_batch,
                "runtime": self.model.runtime, **self.info}


class WarehouseContext:
    """Safe-haven bars and macro observations from the warehouse, re-read every
    `serving.context_ttl_seconds` and filtered per request by what was known at the window's close
    (the same rows a direct read would give; new rows appear within the TTL)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ttl = cfg.serving.context_ttl_seconds
        self.loaded_at = -math.inf
        self.lock = threading.Lock()
        self.safe = pd.DataFrame()
        self.macro = pd.DataFrame()
        self.prepared: Any = None

    def _refresh(self) -> None:
        engine = warehouse.get_engine(self.cfg)
        with engine.connect() as conn:
            safe = warehouse.read_safe_haven(conn)
            macro = warehouse.read_macro(conn)
        for frame in (safe, macro):
            if len(frame):
                frame["known_at"] = pd.to_datetime(frame["known_at"], utc=True)
        from sofare.data.features import prepare_context

        self.prepared = prepare_context(safe, macro, self.cfg)
        self.safe, self.macro, self.loaded_at = safe, macro, time.monotonic()

    def _current(self) -> None:
        with self.lock:
            if time.monotonic() - self.loaded_at > self.ttl:
                self._refresh()

    def tables(self) -> Any:
        """Event tables of every row known now (features.prepare_context): as-of lookups only per request."""
        self._current()
        return self.prepared

    def rows(self, start: date, since: datetime, as_of: datetime) -> tuple[pd.DataFrame, pd.DataFrame]:
        self._current()
        safe, macro = self.safe, self.macro
        cutoff = pd.Timestamp(as_of)
        if len(safe):
            safe = safe[(safe["date"] >= start) & (safe["known_at"] <= cutoff)]
        if len(macro):
            macro = macro[(macro["known_at"] >= pd.Timestamp(since)) & (macro["known_at"] <= cutoff)]
        return safe.reset_index(drop=True), macro.reset_index(drop=True)


