"""Adaptive batching of model calls across concurrent requests."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np


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
                    slot["prob"], slot["ret"] = prob[offset : offset + len(raw)], ret[offset : offset + len(raw)]
                    offset += len(raw)
                    done.set()
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, (done, slot) in items:
                    slot["error"] = exc
                    done.set()
