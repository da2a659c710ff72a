"""SOFARE prediction service (BentoML 1.4): a thin shell around `sofare.serving`, whose features come
from the same `sofare.data.features` function that training materialised.

The model is declared at class scope: the tag `sofare build` wrote into the bento (bento_model.txt;
`SOFARE_BENTO_MODEL` overrides it), an exported ONNX/TorchScript file and its `ModelMeta`, no training
code. `sofare build` stages this file beside the `sofare` package, the config and a real example
window (bento_example.json), so the bento imports `sofare` as a plain package.

BentoML hosts the process, the model store, `/livez` and `/readyz`; `sofare.serving.http.Gateway`
answers the API itself (limits before parsing, one error shape, bounded queue, bounded metric labels:
see that module). BentoML's own traffic metrics and access log are off: the gateway exports the same
`bentoml_service_request_*` series with `endpoint` bounded to the known routes plus "other", and logs
each refused request in one line. Each deployment sets `SOFARE_VARIANT` (stable | canary); every
answer and metric carries it.
"""

from __future__ import annotations

import gc
import json
import logging
import logging.handlers
import os
from pathlib import Path
from typing import Any

import bentoml
from bentoml._internal.server.http import traffic as _traffic

from sofare.config import load_config
from sofare.serving.app import App
from sofare.serving.http import Gateway, timeout_middleware_call
from sofare.serving.prediction_log import DROP_REASONS
from sofare.serving.predictor import Predictor

HERE = Path(__file__).parent
BUNDLED_CONFIG = HERE / "sofare.yaml"  # staged into the bento by `sofare build`
BUNDLED_MODEL = HERE / "bento_model.txt"  # the model this bento was built around
BUNDLED_EXAMPLE = HERE / "bento_example.json"  # a real window of the data it was trained on
MODEL_TAG = (os.environ.get("SOFARE_BENTO_MODEL")
             or (BUNDLED_MODEL.read_text().strip() if BUNDLED_MODEL.exists() else "sofare-m3:latest"))
SERVICE = "sofare"
LABELS = ["model_version", "variant", "endpoint"]
PREDICTIONS = bentoml.metrics.Counter(name="sofare_predictions", documentation="Predictions served",
                                      labelnames=LABELS)
LATENCY = bentoml.metrics.Histogram(name="sofare_prediction_latency_seconds", labelnames=LABELS,
                                    documentation="Time from request to answer, features and model included",
                                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
DROPPED = bentoml.metrics.Counter(name="sofare_prediction_log_dropped", labelnames=["variant", "reason"],
                                  documentation="Prediction log rows dropped (queue full or database down)")
HTTP_LABELS = ["endpoint", "service_name", "service_version", "http_response_code", "runner_name"]
REQUESTS = bentoml.metrics.Counter(namespace="bentoml_service", name="request", labelnames=HTTP_LABELS,
                                   documentation="Requests answered (endpoint: a known route or 'other')")
DURATION = bentoml.metrics.Histogram(namespace="bentoml_service", name="request_duration_seconds",
                                     labelnames=HTTP_LABELS, documentation="Request duration in seconds",
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
BAD_REQUESTS = bentoml.metrics.Counter(name="sofare_bad_requests", documentation="Requests refused with a 4xx",
                                       labelnames=["variant", "endpoint"])
VARIANT = os.environ.get("SOFARE_VARIANT", "stable")
ENDPOINTS = ("/predict", "/predict_batch", "/predict_latest", "/explain")


def _config() -> Any:
    """The bento's own copy of the config unless SOFARE_CONFIG names another (SOFARE_* overrides apply)."""
    use_bundled = BUNDLED_CONFIG.exists() and not os.environ.get("SOFARE_CONFIG")
    return load_config(BUNDLED_CONFIG if use_bundled else None)


def _observe(endpoint: str, status: int, seconds: float) -> None:
    labels = {"endpoint": endpoint, "service_name": SERVICE, "service_version": MODEL_TAG,
              "http_response_code": str(status), "runner_name": SERVICE}
    REQUESTS.labels(**labels).inc()
    DURATION.labels(**labels).observe(seconds)
    if 400 <= status < 500 and endpoint in ENDPOINTS:
        BAD_REQUESTS.labels(variant=VARIANT, endpoint=endpoint.lstrip("/")).inc()


def _metrics() -> tuple[bytes, str]:
    from bentoml._internal.configuration.containers import BentoMLContainer

    client = BentoMLContainer.metrics_client.get()
    return client.generate_latest(), client.CONTENT_TYPE_LATEST


def _log_to(cfg: Any) -> None:
    """The service's own log (one line per refused request, warnings): a rotating file when
    `serving.log_file` is set (`sofare serve`/`deploy` and the tests set one per process), else stderr
    (a container's log driver rotates it)."""
    handler: logging.Handler = logging.StreamHandler()
    if cfg.serving.log_file:
        path = cfg.resolve(Path(cfg.serving.log_file))
        if cfg.serving.workers > 1:  # one file per worker: rotation is not safe across processes
            path = path.with_name(f"{path.stem}-{bentoml.server_context.worker_index or 0}{path.suffix}")
        handler = logging.handlers.RotatingFileHandler(path,
                                                       maxBytes=cfg.serving.log_max_bytes,
                                                       backupCount=cfg.serving.log_backups)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("sofare")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@bentoml.service(name=SERVICE, traffic={"timeout": 30}, workers=_config().serving.workers, metrics={"enabled": False},
                 logging={"access": {"enabled": False}})
class Sofare:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        cfg = _config()
        _log_to(cfg)
        labels = dict(self.model.info.labels)
        predictor = Predictor.from_directory(cfg, Path(self.model.path), labels.get("model_version", "?"),
                                             info={"semver": labels.get("semver"), "bento_model": str(self.model.tag)})
        for reason in DROP_REASONS:  # exported at 0 from the start, so a query (or a grep) finds 0, not nothing
            DROPPED.labels(variant=predictor.variant, reason=reason).inc(0)
        example = json.loads(BUNDLED_EXAMPLE.read_text()) if BUNDLED_EXAMPLE.exists() else None
        self.app = App(cfg, predictor, example, on_served=self._served,
                       on_drop=lambda n, reason: DROPPED.labels(variant=predictor.variant, reason=reason).inc(n))
        # Everything loaded so far (BentoML, the model, the context tables: ~300k objects) lives as long as the
        # process; out of the collector's sight a full collection of what is left took < 1 ms in process instead
        # of 200-300 ms. Under sustained load the server still logs some of ~100 ms (docs/benchmarks.md).
        gc.collect()
        gc.freeze()

    def _served(self, answers: list[dict[str, Any]], endpoint: str, seconds: float) -> None:
        p = self.app.predictor
        labels = {"model_version": p.version, "variant": p.variant, "endpoint": endpoint}
        PREDICTIONS.labels(**labels).inc(len(answers))
        LATENCY.labels(**labels).observe(seconds)


# BentoML 1.4.39's timeout middleware keeps every request alive for the whole timeout (see the function's
# docstring): its __call__ is replaced by the same code with the timer cancelled. The lock pins bentoml.
_traffic.TimeoutMiddleware.__call__ = timeout_middleware_call  # type: ignore[method-assign]
Sofare.add_asgi_middleware(Gateway, resolve=lambda: bentoml.get_current_service().app, observe=_observe,
                           metrics=_metrics, static_dir=str(Path(bentoml.__file__).parent / "_internal" / "server" /
                                                            "static_content"))
