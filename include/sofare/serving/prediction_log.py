"""Non-blocking prediction logging: a bounded queue drained by one thread into the `predictions` table."""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sofare.data import warehouse
from sofare.serving.schemas import UTC

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)
DROP_REASONS = ("queue full", "database")  # the `reason` label of dropped rows (each exported from 0 at start)


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
            self._drop(1, DROP_REASONS[0])

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        self.on_drop(n, reason)

    def _run(self) -> None:
        while not self._stop.is_set() or not self.queue.empty():
            rows: list[dict[str, Any]] = []
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
            frame["features"] = [encode_features(v) for v in frame["features"]]
            inputs = frame.loc[frame["features"].notna(), list(INPUT_COLUMNS)]
            with warehouse.transaction(warehouse.get_engine(self.cfg)) as conn:  # both or neither
                warehouse.upsert(
                    conn,
                    warehouse.predictions,
                    frame.drop(columns=["features", "feature_set_version"], errors="ignore"),
                )
                warehouse.upsert(conn, warehouse.prediction_inputs, inputs)
            self.written += len(rows)
        except Exception as exc:  # noqa: BLE001 - the database may be down: count, never fail a prediction
            log.warning("prediction log: %d row(s) dropped: %s", len(rows), str(exc).splitlines()[0][:200])
            self._drop(len(rows), DROP_REASONS[1])

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


INPUT_COLUMNS = ("prediction_id", "as_of", "model_version", "variant", "feature_set_version", "features")


def log_row(
    answer: dict[str, Any], endpoint: str, features: np.ndarray | None = None, feature_set_version: str = ""
) -> dict[str, Any]:
    """A `predictions` row; with `features` (the window's last row, the version's column order) also the
    `prediction_inputs` row drift monitoring reads (encoded by the writer thread, off the request path)."""
    return {
        "features": None if features is None else np.array(features, dtype=np.float32),
        "feature_set_version": feature_set_version,
        "prediction_id": answer["prediction_id"],
        "created_at": datetime.now(UTC),
        "endpoint": endpoint,
        "model_version": answer["model_version"],
        "variant": answer["variant"],
        "symbol": answer["symbol"],
        "interval": answer["interval"],
        "as_of": answer["as_of"],
        "horizon": answer["horizon"],
        "prob_up": answer["prob_up"],
        "expected_return": answer["expected_return"],
        "latency_ms": answer["latency_ms"],
    }


def encode_features(values: np.ndarray | None) -> str | None:
    """JSON list of the float32 features (exact); non-finite values as null (JSON has no NaN)."""
    if values is None:
        return None
    listed = values.tolist()
    if not np.isfinite(values).all():
        listed = [v if math.isfinite(v) else None for v in listed]
    return json.dumps(listed)
