"""Online prediction: a served model version, the checks on a request's window, the one feature
function on that window, and the answer. `bentos/sofare/service.py` is a thin BentoML shell around
`Predictor` (through `sofare.serving.http`); tests and benchmarks call the same code in process.

The hot path has no pandas: a decoded window (`schemas.Window`) becomes five float arrays and one
int64 array of open times, every check is vectorised over them, and `features.feature_matrix` (the
numpy/TA-Lib core of the one feature function training uses) computes the model's input.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsInt

import numpy as np

from sofare.config import INTERVALS, interval_delta
from sofare.data import warehouse
from sofare.data.features import feature_matrix, feature_spec, prepare_context
from sofare.serving.bundle import ServedModel
from sofare.serving.schemas import (
    EARLIEST,
    FUTURE_TOLERANCE,
    LATEST,
    MAX_CONTEXT_ROWS,
    UTC,
    BadRequest,
    Candle,
    NoData,
    Problem,
    Problems,
    TooMany,
    Unavailable,
    Window,
    utc,
)

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CONTEXT_EARLIEST = date(1900, 1, 1)  # safe-haven and macro history may predate Bitcoin


@dataclass(frozen=True)
class Prepared:
    """One checked window as the model sees it."""

    raw: np.ndarray  # [lookback, features] float32
    as_of: datetime  # the close of its last candle: what the prediction is "as of"


class Predictor:
    """A loaded model version and the checks and features around it."""

    def __init__(
        self, cfg: Config, model: ServedModel, version: str, variant: str, info: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.meta = meta = model.meta
        self.version = version
        self.variant = variant
        self.info = info or {}
        self.symbol = meta.symbol.upper()
        self.interval = meta.interval
        self.delta = interval_delta(self.interval)
        self.step_us = int(self.delta / timedelta(microseconds=1))
        self.horizon = meta.horizon
        self.policy = meta.decision_policy()
        self.lookback = meta.lookback
        self.needed = meta.warmup_bars + meta.lookback - 1  # candles for one full window
        spec = feature_spec(cfg)
        self.columns = [spec.columns.index(c) for c in meta.columns]  # feature_matrix column -> model column
        self.micro = list(meta.groups["micro"])
        self.max_batch = cfg.serving.max_batch_windows
        self.max_candles = max(self.needed, cfg.serving.max_window_candles)
        self.tickers = set(cfg.safe_haven.tickers)
        self.series = set(cfg.macro.series)
        self.context = WarehouseContext(cfg)

    @classmethod
    def from_directory(
        cls, cfg: Config, directory: Path, version: str, variant: str | None = None, info: dict[str, Any] | None = None
    ) -> Predictor:
        model = ServedModel.load(directory, cfg.serving.runtime, cfg.serving.model_threads)
        return cls(cfg, model, version, variant or os.environ.get("SOFARE_VARIANT", "stable"), info)

    # --- checks and features ---

    def prepare(self, window: Window, where: str, problems: Problems) -> Prepared | None:
        """The window's model input, or None with what is wrong added to `problems` (field names
        prefixed by `where`, e.g. "windows[3]."). A window over the candle cap raises TooMany."""
        found = len(problems.items) + problems.truncated
        if window.symbol.upper() != self.symbol:
            problems.add(f"{where}symbol", f"{window.symbol!r} is not served here; this model predicts {self.symbol}")
        if window.interval not in INTERVALS:
            problems.add(f"{where}interval", f"unknown interval {window.interval!r} (one of {', '.join(INTERVALS)})")
        elif window.interval != self.interval:
            problems.add(
                f"{where}interval",
                f"{window.interval!r} is not served here; this model predicts {self.interval} candles",
            )
        candles = window.candles
        n = len(candles)
        if n > self.max_candles:
            raise TooMany(
                f"{where}candles: {n} given, at most {self.max_candles} accepted",
                [Problem(f"{where}candles", f"{n} given, at most {self.max_candles} accepted")],
            )
        if n < self.needed:
            problems.add(
                f"{where}candles",
                f"{n} given, at least {self.needed} needed ({self.meta.warmup_bars} bars "
                f"of feature warm-up + lookback {self.lookback} - 1)",
            )
            return None
        stamps = np.array(
            [(t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp() for t in [c.open_time for c in candles]]
        )
        out_of_range = np.flatnonzero((stamps < EARLIEST.timestamp()) | (stamps >= LATEST.timestamp()))
        problems.add_each(
            out_of_range,
            lambda i: f"{where}candles[{i}].open_time",
            lambda i: f"{candles[i].open_time.isoformat()} is outside {EARLIEST.date()} .. {LATEST.date()}",
        )
        if len(out_of_range):
            return None
        us = np.rint(stamps * 1e6).astype(np.int64)
        gaps = np.diff(us)
        problems.add_each(
            np.flatnonzero(gaps <= 0) + 1,
            lambda i: f"{where}candles[{i}].open_time",
            lambda i: (
                f"duplicate timestamp {_iso(us[i])}"
                if us[i] == us[i - 1]
                else f"not sorted ({_iso(us[i])} after {_iso(us[i - 1])}); send candles oldest first"
            ),
        )
        problems.add_each(
            np.flatnonzero(us % self.step_us),
            lambda i: f"{where}candles[{i}].open_time",
            lambda i: f"{_iso(us[i])} is not on the {self.interval} grid",
        )
        closes_at = EPOCH + timedelta(microseconds=int(us[-1])) + self.delta
        if closes_at > datetime.now(UTC) + FUTURE_TOLERANCE:
            problems.add(
                f"{where}candles[{n - 1}].open_time",
                f"{_iso(us[-1])} is in the future (that candle closes at {closes_at.isoformat()})",
            )
        o, h, lo, c, v = np.array(
            [(k.open, k.high, k.low, k.close, k.volume) for k in candles], dtype=np.float64
        ).T.copy()
        for name, values in (("open", o), ("high", h), ("low", lo), ("close", c), ("volume", v)):
            problems.add_each(
                np.flatnonzero(~np.isfinite(values)),
                lambda i, name=name: f"{where}candles[{i}].{name}",
                lambda i: "must be a finite number",
            )
        problems.add_each(
            np.flatnonzero((h < np.maximum(o, c)) | (lo > np.minimum(o, c))),
            lambda i: f"{where}candles[{i}]",
            lambda i: "high/low do not contain open and close",
        )
        span = int(us[-1] - us[-self.lookback])
        if span != self.step_us * (self.lookback - 1):
            problems.add(
                f"{where}candles",
                f"the last {self.lookback} candles must be consecutive {self.interval} bars "
                f"(they span {timedelta(microseconds=span)})",
            )
        self._check_context(window, where, problems)
        if len(problems.items) + problems.truncated > found:
            return None
        as_of = closes_at
        matrix = feature_matrix(o, h, lo, c, v, us * 1000, self.cfg, self.interval, self._tables(window, us, as_of))
        raw = matrix[-self.lookback :, self.columns].astype(np.float32)
        if np.isnan(raw[:, self.micro]).any():
            problems.add(
                f"{where}candles",
                "not enough history for the features of the last window "
                f"(send at least {self.needed} consecutive candles)",
            )
            return None
        return Prepared(raw, as_of)

    def _check_context(self, window: Window, where: str, problems: Problems) -> None:
        contexts: tuple[tuple[str, list[Any] | None, str, set[str]], ...] = (
            ("safe_haven", window.safe_haven, "ticker", self.tickers),
            ("macro", window.macro, "series_id", self.series),
        )
        for name, rows, key, known in contexts:
            if rows is None:
                continue
            if len(rows) > MAX_CONTEXT_ROWS:
                raise TooMany(
                    f"{where}{name}: {len(rows)} rows given, at most {MAX_CONTEXT_ROWS} accepted",
                    [Problem(f"{where}{name}", f"{len(rows)} rows given, at most {MAX_CONTEXT_ROWS}")],
                )
            day_field = "date" if name == "safe_haven" else "observation_date"
            for i, row in enumerate(rows):
                if getattr(row, key) not in known:
                    problems.add(f"{where}{name}[{i}].{key}", f"{getattr(row, key)!r} is not one of {sorted(known)}")
                day = getattr(row, day_field)
                if not CONTEXT_EARLIEST <= day < LATEST.date():
                    problems.add(
                        f"{where}{name}[{i}].{day_field}", f"{day} is outside {CONTEXT_EARLIEST} .. {LATEST.date()}"
                    )
                if not CONTEXT_EARLIEST <= utc(row.known_at).date() < LATEST.date():
                    problems.add(
                        f"{where}{name}[{i}].known_at",
                        f"{row.known_at.isoformat()} is outside {CONTEXT_EARLIEST} .. {LATEST.date()}",
                    )
                if name == "safe_haven" and (row.high < max(row.open, row.close) or row.low > min(row.open, row.close)):
                    problems.add(f"{where}{name}[{i}]", "high/low do not contain open and close")
                if name == "macro" and not math.isfinite(row.value):
                    problems.add(f"{where}{name}[{i}].value", "must be a finite number")

    def _tables(self, window: Window, us: np.ndarray, as_of: datetime) -> Any:
        """Safe-haven and macro event tables: the service's cached ones, or built from the request's
        rows (and, for the part the request leaves out, the warehouse's rows known by `as_of`)."""
        if window.safe_haven is None and window.macro is None:  # the common case: no per-request context work
            return _from_warehouse(self.context.tables)
        import pandas as pd

        first = EPOCH + timedelta(microseconds=int(us[0]))
        start = (first - timedelta(days=self.cfg.features.daily_context_days)).date()
        since = first - timedelta(days=self.cfg.features.macro_context_days)
        if window.safe_haven is None or window.macro is None:
            safe, macro = _from_warehouse(lambda: self.context.rows(start, since, as_of))
        if window.safe_haven is not None:
            safe = pd.DataFrame(
                [{f: getattr(b, f) for f in b.__struct_fields__} for b in window.safe_haven],
                columns=["ticker", "date", "open", "high", "low", "close", "known_at", "volume"],
            )
            safe["known_at"] = pd.to_datetime(safe["known_at"], utc=True)
        if window.macro is not None:
            macro = pd.DataFrame(
                [{f: getattr(m, f) for f in m.__struct_fields__} for m in window.macro],
                columns=["series_id", "observation_date", "known_at", "value"],
            )
            macro["known_at"] = pd.to_datetime(macro["known_at"], utc=True)
        return prepare_context(safe, macro, self.cfg)

    def prepare_all(self, windows: list[Window], batch: bool = False) -> list[Prepared]:
        """Every window checked and turned into model input; one BadRequest naming each bad field
        (in a batch, `windows[i].`) otherwise."""
        if batch and not windows:
            raise BadRequest("windows: empty batch", [Problem("windows", "empty batch: send at least one window")])
        if len(windows) > self.max_batch:
            raise TooMany(
                f"windows: {len(windows)} given, at most {self.max_batch} per request",
                [Problem("windows", f"{len(windows)} given, at most {self.max_batch} per request")],
            )
        problems = Problems()
        prepared = [self.prepare(w, f"windows[{i}]." if batch else "", problems) for i, w in enumerate(windows)]
        problems.raise_if_any()
        ready = [p for p in prepared if p is not None]
        assert len(ready) == len(prepared)  # prepare gives None only after adding a problem, raised just above
        return ready

    # --- predictions ---

    def predict_raw(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict_windows(raw)

    def answer(self, as_of: datetime, prob: float, ret: float, started: float) -> dict[str, Any]:
        """The response for one window. `direction`/`prob_up` come from the classification head and
        `expected_return` from the regression head; they are trained together but can disagree, which
        `heads_agree` says (docs/model_card.md)."""
        prob, ret = float(prob), float(ret)
        return {
            "prediction_id": uuid.uuid4().hex,
            "model_version": self.version,
            "variant": self.variant,
            "symbol": self.symbol,
            "interval": self.interval,
            "direction": "up" if prob > 0.5 else "down",
            "prob_up": round(prob, 6),
            "confidence": round(max(prob, 1 - prob), 6),
            "expected_return": ret,
            "heads_agree": (prob > 0.5) == (ret > 0),
            "signal": self.policy.signal(prob),
            "policy_id": self.policy.id,
            "horizon": self.horizon,
            "as_of": as_of.isoformat(),
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    def predict_many(
        self, windows: list[Window], batch: bool = False, started: float | None = None
    ) -> list[dict[str, Any]]:
        started = time.perf_counter() if started is None else started
        prepared = self.prepare_all(windows, batch)
        prob, ret = self.predict_raw(np.stack([p.raw for p in prepared]))
        return [self.answer(p.as_of, pr, r, started) for p, pr, r in zip(prepared, prob, ret, strict=True)]

    def predict(self, window: Window) -> dict[str, Any]:
        """One window in process (what the service answers for /predict)."""
        return self.predict_many([window])[0]

    def latest_window(self, symbol: str) -> Window:
        """The newest `needed` candles of `symbol` from the warehouse (safe-haven/macro read as-of)."""
        if symbol.upper() != self.symbol:
            raise BadRequest(
                f"symbol: {symbol!r} is not served here; this model predicts {self.symbol}",
                [Problem("symbol", f"{symbol!r} is not served here; this model predicts {self.symbol}")],
            )
        frame = self._candles_before(datetime.now(UTC) - self.delta + FUTURE_TOLERANCE)
        if len(frame) < self.needed:
            raise NoData(
                f"symbol: the warehouse holds {len(frame)} {self.symbol} {self.interval} candles; {self.needed} needed",
                [Problem("symbol", f"{len(frame)} candles in the warehouse, {self.needed} needed")],
            )
        return self._window(frame)

    def window_at(self, symbol: str, as_of: datetime) -> Window:
        """The window a prediction `as_of` (the close of its last candle) was made on, rebuilt from the warehouse's
        candles (safe-haven/macro read as-of, as for any window without them); a 422 naming `prediction_id` when
        the warehouse lacks any of its candles."""
        last_open = as_of - self.delta
        frame = _from_warehouse(lambda: self._candles_before(as_of)) if symbol.upper() == self.symbol else None
        times = [] if frame is None else list(frame["open_time"])
        first = last_open - self.delta * (self.needed - 1)
        if frame is None or len(times) != self.needed or times[0] != first or times[-1] != last_open:
            raise BadRequest(  # unique grid times, so the right count between the right ends is consecutive
                f"prediction_id: its window cannot be rebuilt from the warehouse (the {self.needed} consecutive "
                f"{symbol} {self.interval} candles up to {last_open.isoformat()} are not all there)",
                [Problem("prediction_id", "window not rebuildable from the warehouse")],
            )
        return self._window(frame)

    def _candles_before(self, before: datetime) -> Any:
        engine = warehouse.get_engine(self.cfg)
        with engine.connect() as conn:
            return warehouse.read_candles_before(conn, self.symbol, self.interval, before, self.needed)

    def _window(self, frame: Any) -> Window:
        candles = [
            Candle(
                row["open_time"].to_pydatetime(), *(float(row[k]) for k in ("open", "high", "low", "close", "volume"))
            )
            for row in frame.to_dict("records")
        ]
        return Window(symbol=self.symbol, interval=self.interval, candles=candles)

    def model_info(self) -> dict[str, Any]:
        meta = self.meta
        return {
            "model": self.cfg.mlflow.model_name,
            "model_version": self.version,
            "variant": self.variant,
            "symbol": self.symbol,
            "interval": self.interval,
            "horizon": self.horizon,
            "lookback": self.lookback,
            "candles_needed": self.needed,
            "feature_set_version": meta.feature_set_version,
            "architecture": meta.architecture,
            "features": len(meta.columns),
            "max_batch_windows": self.max_batch,
            "max_window_candles": self.max_candles,
            "runtime": self.model.runtime,
            "calibration": meta.calibration.model_dump(),
            "policy": self.policy.model_dump(),
            **self.info,
        }


class Latest:
    """The answer to /predict_latest kept in memory: the newest complete window's model input, refreshed
    by `refresh()` when a newer candle reaches the warehouse (or the safe-haven/macro context changes).
    A request only stamps a fresh prediction_id and latency on it."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.key: tuple[Any, ...] | None = None
        self.current: tuple[datetime, float, float, np.ndarray] | None = None
        self.error: Exception | None = None

    def refresh(self) -> None:
        p = self.predictor
        with warehouse.get_engine(p.cfg).connect() as conn:  # one row: is there anything new?
            newest = warehouse.read_candles_before(
                conn, p.symbol, p.interval, datetime.now(UTC) - p.delta + FUTURE_TOLERANCE, 1
            )
        if not newest.empty and (newest["open_time"].iloc[-1].to_pydatetime(), p.context.loaded_at) == self.key:
            return
        try:
            window = p.latest_window(p.symbol)
        except NoData as exc:
            self.key, self.current, self.error = None, None, exc
            return
        key = (window.candles[-1].open_time, p.context.loaded_at)
        (prepared,) = p.prepare_all([window])
        prob, ret = p.predict_raw(prepared.raw[None])
        self.key, self.current, self.error = (
            key,
            (prepared.as_of, float(prob[0]), float(ret[0]), prepared.raw[-1]),
            None,
        )

    def answer(self, symbol: str, started: float) -> tuple[dict[str, Any], np.ndarray]:
        """The latest window's answer and its features at as_of (for the prediction log)."""
        p = self.predictor
        if symbol.upper() != p.symbol:
            raise BadRequest(
                f"symbol: {symbol!r} is not served here; this model predicts {p.symbol}",
                [Problem("symbol", f"{symbol!r} is not served here; this model predicts {p.symbol}")],
            )
        if self.current is None:
            if self.error is not None:
                raise self.error
            _from_warehouse(self.refresh)
            if self.current is None:
                raise self.error or Unavailable(
                    "symbol: no latest window yet",
                    [Problem("symbol", "no latest window yet; retry")],
                    headers={"Retry-After": "1"},
                )
        as_of, prob, ret, features = self.current
        return p.answer(as_of, prob, ret, started), features


def _from_warehouse(read: Any) -> Any:
    """`read()`, or a 503 naming the warehouse when it cannot be read (never a 500)."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - any driver error: the dependency is down, not the request wrong
        log.warning("warehouse read failed: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        raise Unavailable(
            "warehouse: cannot be read now; retry later (or send safe_haven and macro rows)",
            [Problem("warehouse", "unavailable")],
            headers={"Retry-After": "1"},
        ) from None


class WarehouseContext:
    """Safe-haven bars and macro observations from the warehouse, re-read every
    `serving.context_ttl_seconds` (by the service's refresher thread, or on access in process) and
    filtered per request by what was known at the window's close (the same rows a direct read would
    give; new rows appear within the TTL)."""

    def __init__(self, cfg: Config) -> None:
        import pandas as pd

        self.cfg = cfg
        self.ttl = cfg.serving.context_ttl_seconds
        self.loaded_at = -math.inf
        self.lock = threading.Lock()
        self.safe = pd.DataFrame()
        self.macro = pd.DataFrame()
        self.prepared: Any = None
        self.managed = False  # True: a refresher thread keeps it current; requests never read the warehouse

    def refresh(self) -> None:
        import pandas as pd

        engine = warehouse.get_engine(self.cfg)
        with engine.connect() as conn:
            safe = warehouse.read_safe_haven(conn)
            macro = warehouse.read_macro(conn)
        for frame in (safe, macro):
            if len(frame):
                frame["known_at"] = pd.to_datetime(frame["known_at"], utc=True)
        prepared = prepare_context(safe, macro, self.cfg)
        with self.lock:
            self.safe, self.macro, self.prepared, self.loaded_at = safe, macro, prepared, time.monotonic()

    def _current(self) -> None:
        if self.managed and self.prepared is not None:
            return
        if time.monotonic() - self.loaded_at > self.ttl:
            with self.lock:
                stale = time.monotonic() - self.loaded_at > self.ttl
            if stale:
                self.refresh()

    def tables(self) -> Any:
        """Event tables of every row known now (features.prepare_context): as-of lookups only per request."""
        self._current()
        return self.prepared

    def rows(self, start: date, since: datetime, as_of: datetime) -> tuple[Any, Any]:
        import pandas as pd

        self._current()
        safe, macro = self.safe, self.macro
        cutoff = pd.Timestamp(as_of)
        if len(safe):
            safe = safe[(safe["date"] >= start) & (safe["known_at"] <= cutoff)]
        if len(macro):
            macro = macro[(macro["known_at"] >= pd.Timestamp(since)) & (macro["known_at"] <= cutoff)]
        return safe.reset_index(drop=True), macro.reset_index(drop=True)


def _iso(us: SupportsInt) -> str:
    return (EPOCH + timedelta(microseconds=int(us))).isoformat()
