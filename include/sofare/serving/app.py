"""The prediction application behind the HTTP gateway: a `Predictor`, the in-memory latest window,
the non-blocking prediction log, the API document, the explainer (loaded on the first /explain only), and one
refresher thread that re-reads the warehouse (safe-haven/macro context, newest candles) so no request waits on
the database.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from sofare.serving import openapi
from sofare.serving.batching import MicroBatcher
from sofare.serving.explainer import Explainer
from sofare.serving.prediction_log import PredictionLog, log_row
from sofare.serving.predictor import Latest, Predictor
from sofare.serving.schemas import ExplainRequest, decode

if TYPE_CHECKING:
    from sofare.config import Config
    from sofare.serving.schemas import Batch, LatestRequest, Window

log = logging.getLogger(__name__)
Served = Callable[[list[dict[str, Any]], str, float], None]


class App:
    def __init__(
        self,
        cfg: Config,
        predictor: Predictor,
        example: dict[str, Any] | None = None,
        on_served: Served | None = None,
        on_drop: Callable[[int, str], None] | None = None,
        refresh: bool = True,
    ) -> None:
        s = cfg.serving
        self.cfg = cfg
        self.predictor = predictor
        self.latest = Latest(predictor)
        self.log = PredictionLog(cfg, on_drop=on_drop)
        self.on_served = on_served or (lambda answers, endpoint, seconds: None)
        self.infer = MicroBatcher(predictor.predict_raw, s.max_batch_windows, s.batch_wait_ms)
        self.explainer = Explainer(predictor)
        self.max_pending = s.max_pending
        self.max_pending_batches = s.max_pending_batches
        self.limits = {
            "/predict": s.max_body_bytes,
            "/predict_latest": s.max_body_bytes,
            "/model_info": s.max_body_bytes,
            "/predict_batch": s.max_batch_body_bytes,
            "/explain": s.max_body_bytes,
        }
        self.openapi = msgspec.json.encode(openapi.document(cfg, predictor, example))
        self.index = openapi.swagger_page().encode()
        self._stop = threading.Event()
        if refresh:
            predictor.context.managed = True
            self.refresh_once()
            threading.Thread(target=self._refresher, name="sofare-refresher", daemon=True).start()

    # --- the endpoints (the gateway has checked method, media type, size and admission) ---

    def predict(self, window: Window, endpoint: str = "predict") -> bytes:
        started = time.perf_counter()
        p = self.predictor
        (prepared,) = p.prepare_all([window])
        prob, ret = p.predict_raw(prepared.raw[None])
        answer = p.answer(prepared.as_of, prob[0], ret[0], started)
        return self._served([answer], endpoint, started, [prepared.raw[-1]], single=True)

    def predict_batch(self, batch: Batch) -> bytes:
        started = time.perf_counter()
        p = self.predictor
        prepared = p.prepare_all(batch.windows, batch=True)
        prob, ret = self.infer(np.stack([w.raw for w in prepared]))
        answers = [p.answer(w.as_of, pr, r, started) for w, pr, r in zip(prepared, prob, ret, strict=True)]
        return self._served(answers, "predict_batch", started, [w.raw[-1] for w in prepared])

    def predict_latest(self, request: LatestRequest) -> bytes:
        started = time.perf_counter()
        answer, inputs = self.latest.answer(request.symbol, started)
        return self._served([answer], "predict_latest", started, [inputs], single=True)

    def explain(self, body: bytes) -> bytes:
        """/explain, on the gateway's explain thread (decoding included: nothing of it runs on the event loop).
        Not written to the prediction log: an explanation is a diagnostic, not a served decision."""
        started = time.perf_counter()
        self.explainer.lower_priority()
        answer = self.explainer.answer(decode(body, ExplainRequest), started)
        self.on_served([answer], "explain", time.perf_counter() - started)
        return msgspec.json.encode(answer)

    def model_info(self) -> bytes:
        return msgspec.json.encode(
            {
                **self.predictor.model_info(),
                "prediction_log": {"written": self.log.written, "dropped": self.log.dropped, "worker": os.getpid()},
                "explainer_load_seconds": self.explainer.load_seconds,  # None until this worker's first /explain
            }
        )  # this worker's; /metrics sums them

    def _served(
        self,
        answers: list[dict[str, Any]],
        endpoint: str,
        started: float,
        inputs: list[np.ndarray],
        single: bool = False,
    ) -> bytes:
        """Count, log (with the features served at as_of: what drift monitoring compares) and encode."""
        self.on_served(answers, endpoint, time.perf_counter() - started)
        for answer, features in zip(answers, inputs, strict=True):
            self.log.put(log_row(answer, endpoint, features, self.predictor.meta.feature_set_version))
        return msgspec.json.encode(answers[0] if single else answers)

    # --- the warehouse, off the request path ---

    def refresh_once(self) -> None:
        """Re-read the safe-haven/macro context when its TTL passed, then the newest window."""
        p = self.predictor
        try:
            if time.monotonic() - p.context.loaded_at > p.context.ttl:
                p.context.refresh()
            self.latest.refresh()
        except Exception as exc:  # noqa: BLE001 - the warehouse may be down: keep serving what we have
            log.warning("refresh from the warehouse failed: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)

    def _refresher(self) -> None:
        while not self._stop.wait(self.cfg.serving.latest_refresh_seconds):
            self.refresh_once()

    def close(self) -> None:
        self._stop.set()
        self.log.close()
