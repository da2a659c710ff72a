"""Online prediction: request schemas and their validation, the one feature function on the request's
window, the model, and non-blocking prediction logging. `bentos/sofare/service.py` is a thin BentoML
shell around `Predictor`; tests and benchmarks call the same code in process.

Bad input raises `BadRequest` (the service answers 400) with a message naming the field.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sofare import warehouse
from sofare.config import INTERVALS, interval_delta
from sofare.features import compute_features

if TYPE_CHECKING:
    from sofare.config import Config
    from sofare.registry import Bundle

log = logging.getLogger(__name__)
UTC = timezone.utc
FUTURE_TOLERANCE = timedelta(seconds=5)  # clock skew allowed for "the candle has closed"


class BadRequest(ValueError):
    """The request is invalid; the message names the field."""


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UTCTime = Annotated[datetime, AfterValidator(_utc)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class Candle(_Strict):
    open_time: UTCTime
    open: Positive
    high: Positive
    low: Positive
    close: Positive
    volume: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SafeHavenBar(_Strict):
    ticker: str
    date: date
    open: Positive
    high: Positive
    low: Positive
    close: Positive
    volume: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    known_at: UTCTime


class MacroObservation(_Strict):
    series_id: str
    observation_date: date
    known_at: UTCTime
    value: Finite


class Window(_Strict):
    """One self-contained prediction request: enough candles for the features' warm-up plus the
    model's lookback; safe-haven bars and macro observations optional (else read from the warehouse)."""

    symbol: str = Field(min_length=1, max_length=20)
    interval: str
    candles: list[Candle] = Field(min_length=1)
    safe_haven: list[SafeHavenBar] | None = None
    macro: list[MacroObservation] | None = None


class LatestRequest(_Strict):
    symbol: str = Field(min_length=1, max_length=20)


# --- the predictor ------------------------------------------------------------------------------------


class Predictor:
    """A loaded model version and the checks and features around it."""

    def __init__(self, cfg: Config, bundle: Bundle, version: str, variant: str, info: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.version = version
        self.variant = variant
        self.info = info or {}
        meta = bundle.meta
        self.symbol = str(meta["symbol"]).upper()
        self.interval = str(meta["interval"])
        self.delta = interval_delta(self.interval)
        self.horizon = int(meta["horizon"])
        self.needed = int(meta["warmup_bars"]) + bundle.lookback - 1  # candles for one full window
        self.max_batch = cfg.serving.max_batch_windows
        self.max_candles = max(self.needed, cfg.serving.max_window_candles)
        self.context = WarehouseContext(cfg)

    @classmethod
    def from_directory(cls, cfg: Config, directory: Path, version: str, variant: str | None = None,
                       info: dict[str, Any] | None = None) -> Predictor:
        from sofare.registry import load_bundle

        meta = next(Path(directory).rglob("meta.json"), None)
        if meta is None:
            raise LookupError(f"no SofareM3 bundle (meta.json) under {directory}")
        bundle = load_bundle(meta.parent)
        if cfg.serving.runtime == "onnx":
            import tempfile

            bundle.use_onnx(Path(tempfile.mkdtemp(prefix="sofare-onnx-")) / "sofare-m3.onnx")
        return cls(cfg, bundle, version, variant or os.environ.get("SOFARE_VARIANT", "stable"), info)

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
                             f"({self.bundle.meta['warmup_bars']} bars of feature warm-up + lookback {self.bundle.lookback} - 1)")
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
        span = times[-1] - times[-self.bundle.lookback]
        if span != self.delta * (self.bundle.lookback - 1):
            raise BadRequest(f"{where}candles: the last {self.bundle.lookback} candles must be consecutive "
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
        raw = feats[self.bundle.columns].to_numpy(dtype=np.float32)[-self.bundle.lookback:]
        if np.isnan(raw[:, self.bundle.groups["micro"]]).any():
            raise BadRequest("candles: not enough history for the features of the last window "
                             f"(send at least {self.needed} consecutive candles)")
        return raw

    # --- predictions ---

    def predict_raw(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.bundle.predict_windows(raw)

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
            raise LookupError(f"the warehouse holds {len(frame)} {self.symbol} {self.interval} candles; {self.needed} needed")
        candles = [Candle(**{k: row[k] for k in Candle.model_fields}) for row in frame.to_dict("records")]
        return Window(symbol=self.symbol, interval=self.interval, candles=candles)

    def model_info(self) -> dict[str, Any]:
        meta = self.bundle.meta
        return {"model": self.cfg.mlflow.model_name, "model_version": self.version, "variant": self.variant,
                "symbol": self.symbol, "interval": self.interval, "horizon": self.horizon,
                "lookback": self.bundle.lookback, "candles_needed": self.needed,
                "feature_set_version": meta["feature_set_version"], "architecture": meta["architecture"],
                "features": len(self.bundle.columns), "max_batch_windows": self.max_batch,
                "runtime": self.bundle.runtime, **self.info}


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
        from sofare.features import prepare_context

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


# --- prediction log ----------------------------------------------------------------------------------


class PredictionLog:
    """A bounded queue drained by one thread that inserts rows in batches; the request never waits.

    A full queue or a failing database drops rows and counts them (`dropped`), never raising."""

    def __init__(self, cfg: Config, on_drop: Any = None) -> None:
        s = cfg.serving
        self.cfg = cfg
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=s.log_queue_size)
        self.batch = s.log_batch_size
        self.flush_seconds = s.log_flush_seconds
        self.dropped = 0
        self.written = 0
        self.on_drop = on_drop or (lambda n, reason: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sofare-prediction-log", daemon=True)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            self._drop(1, "queue full")

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        self.on_drop(n, reason)

    def _run(self) -> None:
        while not self._stop.is_set() or not self.queue.empty():
            rows = []
            deadline = time.monotonic() + self.flush_seconds
            while len(rows) < self.batch and time.monotonic() < deadline:
                try:
                    rows.append(self.queue.get(timeout=max(deadline - time.monotonic(), 0.001)))
                except queue.Empty:
                    if self._stop.is_set():
                        break
            if rows:
                self._write(rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            frame = pd.DataFrame(rows)
            for column in ("created_at", "as_of"):
                frame[column] = pd.to_datetime(frame[column], utc=True)
            with warehouse.transaction(warehouse.get_engine(self.cfg)) as conn:
                warehouse.upsert(conn, warehouse.predictions, frame)
            self.written += len(rows)
        except Exception as exc:  # noqa: BLE001 - the database may be down: count, never fail a prediction
            log.warning("prediction log: %d row(s) dropped: %s", len(rows), str(exc).splitlines()[0][:200])
            self._drop(len(rows), "database")

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def log_row(answer: dict[str, Any], endpoint: str) -> dict[str, Any]:
    return {"prediction_id": answer["prediction_id"], "created_at": datetime.now(UTC), "endpoint": endpoint,
            "model_version": answer["model_version"], "variant": answer["variant"], "symbol": answer["symbol"],
            "interval": answer["interval"], "as_of": answer["as_of"], "horizon": answer["horizon"],
            "prob_up": answer["prob_up"], "expected_return": answer["expected_return"],
            "latency_ms": answer["latency_ms"]}


class MicroBatcher:
    """Adaptive batching of model calls across concurrent requests: windows that arrive while the
    model is busy (or within `max_latency_ms`) run as one forward pass of at most `max_batch` windows.

    Requests are validated before they get here, so one bad request never fails its neighbours
    (which BentoML's `batchable` APIs would do: they merge requests before our checks run)."""

    def __init__(self, predict: Any, max_batch: int, max_latency_ms: float) -> None:
        self.predict = predict
        self.max_batch = max_batch
        self.max_latency = max_latency_ms / 1000
        self.queue: queue.Queue[tuple[np.ndarray, Any]] = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._run, name="sofare-batcher", daemon=True).start()

    def __call__(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        done = threading.Event()
        slot: dict[str, Any] = {}
        self.queue.put((raw, (done, slot)))
        done.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["prob"], slot["ret"]

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            size = len(items[0][0])
            deadline = time.monotonic() + self.max_latency
            while size < self.max_batch:  # what is queued now, or arrives before the deadline
                try:
                    item = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                items.append(item)
                size += len(item[0])
            self.batches += 1
            try:
                prob, ret = self.predict(np.concatenate([raw for raw, _ in items]))
                offset = 0
                for raw, (done, slot) in items:
                    slot["prob"], slot["ret"] = prob[offset: offset + len(raw)], ret[offset: offset + len(raw)]
                    offset += len(raw)
                    done.set()
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, (done, slot) in items:
                    slot["error"] = exc
                    done.set()


class Batch(_Strict):
    windows: list[Window] = Field(min_length=1)


def request_body(cfg: Config, last_open: datetime, candles: int | None = None, context: bool = False) -> dict[str, Any]:
    """A /predict body from the warehouse: the candles up to `last_open` (inclusive; default: as many as
    one window needs), optionally with the safe-haven bars and macro observations known at its close."""
    symbol, interval = cfg.market.symbol, cfg.market.interval
    delta = interval_delta(interval)
    engine = warehouse.get_engine(cfg)
    with engine.connect() as conn:
        needed = cfg.features.warmup_bars + max(cfg.training.search_space.lookback) - 1
        frame = warehouse.read_candles_before(conn, symbol, interval, last_open + delta, candles or needed)
        body: dict[str, Any] = {"symbol": symbol, "interval": interval, "candles": [
            {"open_time": r["open_time"].isoformat(), **{k: float(r[k]) for k in ("open", "high", "low", "close", "volume")}}
            for r in frame.to_dict("records")]}
        if context:
            first = frame["open_time"].iloc[0].to_pydatetime()
            known = last_open + delta + timedelta(microseconds=1)
            safe = warehouse.read_safe_haven(conn, (first - timedelta(days=cfg.features.daily_context_days)).date(), known)
            macro = warehouse.read_macro(conn, first - timedelta(days=cfg.features.macro_context_days), known)
            body["safe_haven"] = [{"ticker": r["ticker"], "date": str(r["date"]), "known_at": r["known_at"].isoformat(),
                                   **{k: (None if r[k] != r[k] else float(r[k])) for k in ("open", "high", "low", "close", "volume")}}
                                  for r in safe.to_dict("records")]
            body["macro"] = [{"series_id": r["series_id"], "observation_date": str(r["observation_date"]),
                              "known_at": r["known_at"].isoformat(), "value": float(r["value"])}
                             for r in macro.to_dict("records")]
    return body
