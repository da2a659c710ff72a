"""SOFARE prediction service (BentoML 1.4): a thin shell around `sofare.serving`, whose features come
from the same `sofare.data.features` function that training materialised.

The model is declared at class scope: the tag `sofare build` wrote into the bento (bento_model.txt;
`SOFARE_BENTO_MODEL` overrides it), an exported ONNX/TorchScript file and its `ModelMeta`, no training
code. `sofare build` stages this file beside the `sofare` package and the config, so the bento imports
it as a plain package.
Each deployment sets `SOFARE_VARIANT` (stable | canary); every answer and metric carries it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument, NotFound

from sofare.config import load_config
from sofare.errors import NotFoundError
from sofare.serving.batching import MicroBatcher
from sofare.serving.prediction_log import PredictionLog, log_row
from sofare.serving.predictor import Predictor
from sofare.serving.schemas import BadRequest, Batch, LatestRequest, Window

BUNDLED_CONFIG = Path(__file__).with_name("sofare.yaml")  # staged into the bento by `sofare build`
BUNDLED_MODEL = Path(__file__).with_name("bento_model.txt")  # the model this bento was built around
MODEL_TAG = (os.environ.get("SOFARE_BENTO_MODEL")
             or (BUNDLED_MODEL.read_text().strip() if BUNDLED_MODEL.exists() else "sofare-m3:latest"))
LABELS = ["model_version", "variant", "endpoint"]
PREDICTIONS = bentoml.metrics.Counter(name="sofare_predictions", documentation="Predictions served",
                                      labelnames=LABELS)
LATENCY = bentoml.metrics.Histogram(name="sofare_prediction_latency_seconds", labelnames=LABELS,
                                    documentation="Time from request to answer, features and model included",
                                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
BAD_REQUESTS = bentoml.metrics.Counter(name="sofare_bad_requests", documentation="Requests refused with a 4xx",
                                       labelnames=["variant", "endpoint"])
DROPPED = bentoml.metrics.Counter(name="sofare_prediction_log_dropped", labelnames=["variant", "reason"],
                                  documentation="Prediction log rows dropped (queue full or database down)")


def _config() -> Any:
    """The bento's own copy of the config unless SOFARE_CONFIG names another (SOFARE_* overrides apply)."""
    use_bundled = BUNDLED_CONFIG.exists() and not os.environ.get("SOFARE_CONFIG")
    return load_config(BUNDLED_CONFIG if use_bundled else None)


@bentoml.service(name="sofare", traffic={"timeout": 30}, workers=1)
class Sofare:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        cfg = _config()
        labels = dict(self.model.info.labels)
        self.predictor = Predictor.from_directory(cfg, Path(self.model.path), labels.get("model_version", "?"),
                                                  info={"semver": labels.get("semver"), "bento_model": str(self.model.tag)})
        variant = self.predictor.variant
        self.log = PredictionLog(cfg, on_drop=lambda n, reason: DROPPED.labels(variant=variant, reason=reason).inc(n))
        self.infer = MicroBatcher(self.predictor.predict_raw, cfg.serving.max_batch_windows, cfg.serving.batch_wait_ms)

    def _served(self, answers: list[dict[str, Any]], endpoint: str, started: float) -> None:
        labels = {"model_version": self.predictor.version, "variant": self.predictor.variant, "endpoint": endpoint}
        PREDICTIONS.labels(**labels).inc(len(answers))
        LATENCY.labels(**labels).observe(time.perf_counter() - started)
        for answer in answers:
            self.log.put(log_row(answer, endpoint))

    def _windows(self, windows: list[Window], endpoint: str) -> list[dict[str, Any]]:
        started = time.perf_counter()
        p = self.predictor
        try:
            raw = p.inputs(windows, batch=endpoint == "predict_batch")
        except BadRequest as exc:
            BAD_REQUESTS.labels(variant=p.variant, endpoint=endpoint).inc()
            raise InvalidArgument(str(exc)) from None
        prob, ret = self.infer(raw)
        answers = [p.answer(w, pr, r, started) for w, pr, r in zip(windows, prob, ret, strict=True)]
        self._served(answers, endpoint, started)
        return answers

    @bentoml.api(route="/predict", input_spec=Window)
    def predict(self, **window: Any) -> dict[str, Any]:
        """One window of candles (oldest first; optional safe-haven bars and macro observations) →
        direction, prob_up, confidence, expected_return, horizon, as_of."""
        return self._windows([Window(**window)], "predict")[0]

    @bentoml.api(route="/predict_batch", input_spec=Batch)
    def predict_batch(self, windows: list[Window]) -> list[dict[str, Any]]:
        """Many windows in one request; concurrent requests share forward passes (adaptive batching)."""
        return self._windows(windows, "predict_batch")

    @bentoml.api(route="/predict_latest", input_spec=LatestRequest)
    def predict_latest(self, symbol: str) -> dict[str, Any]:
        """The latest complete window of `symbol` read from the warehouse."""
        try:
            window = self.predictor.latest_window(symbol)
        except BadRequest as exc:
            BAD_REQUESTS.labels(variant=self.predictor.variant, endpoint="predict_latest").inc()
            raise InvalidArgument(str(exc)) from None
        except NotFoundError as exc:
            raise NotFound(str(exc)) from None
        return self._windows([window], "predict_latest")[0]

    @bentoml.api(route="/model_info")
    def model_info(self) -> dict[str, Any]:
        return {**self.predictor.model_info(), "prediction_log": {"written": self.log.written, "dropped": self.log.dropped}}
