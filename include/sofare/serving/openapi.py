"""The service's API document (OpenAPI 3.0.3, valid for that version: `openapi-spec-validator` checks
it in the tests) and the Swagger page, which loads only the service's own assets.

The schemas say exactly what the gateway enforces (types, bounds, required and unknown fields,
array sizes), so a schema-driven fuzzer's "valid" cases are the ones the service can accept, and
every status the service can answer is documented with the one error shape. The examples are real:
a window of the embedded data written into the bento at build time (`bento_example.json`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sofare.config import INTERVALS
from sofare.serving.schemas import EARLIEST, LATEST, MAX_CONTEXT_ROWS, MAX_DETAILS

if TYPE_CHECKING:
    from sofare.config import Config
    from sofare.serving.predictor import Predictor

REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _price(description: str) -> dict[str, Any]:
    return {"type": "number", "minimum": 0, "exclusiveMinimum": True, "description": description}


def _object(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required if required is not None else list(properties),
        "additionalProperties": False,
        **extra,
    }


def schemas(p: Predictor) -> dict[str, Any]:
    stamp = {"type": "string", "format": "date-time"}
    window_candles = {
        "type": "array",
        "items": _ref("Candle"),
        "minItems": 1,
        "maxItems": p.max_candles,
        "description": f"oldest first, consecutive {p.interval} bars: at least {p.needed} "
        f"(feature warm-up + lookback), at most {p.max_candles}; open times between "
        f"{EARLIEST.date()} and {LATEST.date()}, the last one closed",
    }
    error = _object(
        {
            "code": {"type": "string", "example": "invalid_request"},
            "message": {"type": "string", "example": "candles[17].open_time: ... is not on the 1h grid"},
            "details": {"type": "array", "maxItems": MAX_DETAILS, "items": _ref("Problem")},
            "truncated": {"type": "integer", "minimum": 0, "description": "problems found but left out of `details`"},
        }
    )
    return {
        "Candle": _object(
            {
                "open_time": {**stamp, "description": "UTC open time (an offset is converted)"},
                "open": _price("open"),
                "high": _price("high, >= open and close"),
                "low": _price("low, <= open and close"),
                "close": _price("close"),
                "volume": {"type": "number", "minimum": 0},
            }
        ),
        "SafeHavenBar": _object(
            {
                "ticker": {"type": "string", "minLength": 1, "maxLength": 32},
                "date": {"type": "string", "format": "date"},
                "open": _price("open"),
                "high": _price("high"),
                "low": _price("low"),
                "close": _price("close"),
                "known_at": {**stamp, "description": "when the bar became known"},
                "volume": {"type": "number", "minimum": 0, "nullable": True},
            },
            required=["ticker", "date", "open", "high", "low", "close", "known_at"],
        ),
        "MacroObservation": _object(
            {
                "series_id": {"type": "string", "minLength": 1, "maxLength": 32},
                "observation_date": {"type": "string", "format": "date"},
                "known_at": {**stamp, "description": "when this value was released"},
                "value": {"type": "number"},
            }
        ),
        "Window": _object(
            {
                "symbol": {"type": "string", "minLength": 1, "maxLength": 20, "example": p.symbol},
                "interval": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 8,
                    "example": p.interval,
                    "description": f"one of {', '.join(INTERVALS)}; this model serves {p.interval}",
                },
                "candles": window_candles,
                "safe_haven": {
                    "type": "array",
                    "items": _ref("SafeHavenBar"),
                    "maxItems": MAX_CONTEXT_ROWS,
                    "nullable": True,
                    "description": "daily safe-haven bars; omitted: the warehouse's, as known at the close",
                },
                "macro": {
                    "type": "array",
                    "items": _ref("MacroObservation"),
                    "maxItems": MAX_CONTEXT_ROWS,
                    "nullable": True,
                    "description": "macro observations; omitted: the warehouse's, as known at the close",
                },
            },
            required=["symbol", "interval", "candles"],
        ),
        "Batch": _object(
            {"windows": {"type": "array", "items": _ref("Window"), "minItems": 1, "maxItems": p.max_batch}}
        ),
        "LatestRequest": _object({"symbol": {"type": "string", "minLength": 1, "maxLength": 20, "example": p.symbol}}),
        "Prediction": {
            "type": "object",
            "required": [
                "prediction_id",
                "model_version",
                "variant",
                "symbol",
                "interval",
                "direction",
                "prob_up",
                "confidence",
                "expected_return",
                "heads_agree",
                "signal",
                "policy_id",
                "horizon",
                "as_of",
                "latency_ms",
            ],
            "properties": {
                "prediction_id": {"type": "string"},
                "model_version": {"type": "string"},
                "variant": {"type": "string", "enum": ["stable", "canary"]},
                "symbol": {"type": "string"},
                "interval": {"type": "string"},
                "direction": {"type": "string", "enum": ["up", "down"], "description": "prob_up > 0.5"},
                "prob_up": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1,
                    "description": "classification head, calibrated on validation (Platt scaling)",
                },
                "confidence": {"type": "number", "minimum": 0.5, "maximum": 1},
                "expected_return": {
                    "type": "number",
                    "description": "log return over the next horizon bars (regression head)",
                },
                "heads_agree": {
                    "type": "boolean",
                    "description": "whether direction and the sign of expected_return agree: "
                    "two heads, trained together, that can disagree",
                },
                "signal": {
                    "type": "string",
                    "enum": ["long", "flat"],
                    "description": "the version's cost-aware decision policy applied to prob_up (entry rule; once "
                    "long, the policy holds at least its min_hold decisions: GET /model_info)",
                },
                "policy_id": {"type": "string", "description": "which policy made `signal`"},
                "horizon": {"type": "integer", "minimum": 1},
                "as_of": stamp,
                "latency_ms": {"type": "number", "minimum": 0},
            },
        },
        "Predictions": {"type": "array", "items": _ref("Prediction")},
        **explain_schemas(p, window_candles),
        "ModelInfo": {
            "type": "object",
            "required": ["model_version", "variant", "symbol", "interval", "candles_needed"],
            "properties": {
                "model_version": {"type": "string"},
                "variant": {"type": "string"},
                "symbol": {"type": "string"},
                "interval": {"type": "string"},
                "candles_needed": {"type": "integer"},
            },
        },
        "Empty": {"type": "object", "additionalProperties": False, "properties": {}},
        "Problem": _object({"field": {"type": "string"}, "problem": {"type": "string"}}),
        "Error": _object({"error": error}),
    }


def explain_schemas(p: Predictor, window_candles: dict[str, Any]) -> dict[str, Any]:
    """/explain's request (a /predict window or a logged prediction_id, never both; optional caps) and answer."""
    e = p.cfg.serving
    costs = {
        "top_k": {
            "type": "integer",
            "minimum": 1,
            "maximum": e.explain_max_top_k,
            "description": f"how many (feature, time step) cells to report, largest |attribution| first; "
            f"default {e.explain_top_k}",
        },
        "steps": {
            "type": "integer",
            "minimum": 1,
            "maximum": e.explain_max_steps,
            "description": f"Integrated Gradients integration steps (more: smaller convergence_delta, slower); "
            f"default {e.explain_steps}",
        },
    }
    window = {
        "symbol": {"type": "string", "minLength": 1, "maxLength": 20, "example": p.symbol},
        "interval": {
            "type": "string",
            "minLength": 1,
            "maxLength": 8,
            "description": f"one of {', '.join(INTERVALS)}; this model serves {p.interval}",
        },
        "candles": window_candles,
        "safe_haven": {"type": "array", "items": _ref("SafeHavenBar"), "maxItems": MAX_CONTEXT_ROWS, "nullable": True},
        "macro": {"type": "array", "items": _ref("MacroObservation"), "maxItems": MAX_CONTEXT_ROWS, "nullable": True},
    }
    number = {"type": "number"}
    return {
        "ExplainWindow": _object({**window, **costs}, required=["symbol", "interval", "candles"]),
        "ExplainLogged": _object(
            {
                "prediction_id": {
                    "type": "string",
                    "pattern": "^[0-9a-f]{32}$",
                    "description": "a logged prediction of this model version; its window is rebuilt from the "
                    "warehouse (404 if unknown, 422 if it cannot be rebuilt)",
                },
                **costs,
            },
            required=["prediction_id"],
        ),
        "ExplainRequest": {"oneOf": [_ref("ExplainWindow"), _ref("ExplainLogged")]},
        "Contribution": _object(
            {
                "feature": {"type": "string"},
                "modality": {"type": "string", "enum": ["micro", "safe", "macro"]},
                "t": {
                    "type": "integer",
                    "maximum": 0,
                    "description": "time step: 0 the window's last bar, -1 the one before",
                },
                "attribution": number,
            }
        ),
        "Explanation": _object(
            {
                "method": {"type": "string", "enum": ["integrated_gradients"]},
                "target": {
                    "type": "string",
                    "enum": ["prob_up_logit"],
                    "description": "what is explained: the log-odds of prob_up (the calibrated margin of the "
                    "classification head)",
                },
                "baseline": {
                    "type": "string",
                    "description": "the reference input: the training mean of every feature",
                },
                "steps": {"type": "integer", "minimum": 1},
                "output": {**number, "description": "the target at this window"},
                "baseline_output": {**number, "description": "the target at the baseline"},
                "convergence_delta": {
                    **number,
                    "description": "sum of all attributions minus (output - baseline_output): the integral's error",
                },
                "top": {"type": "array", "items": _ref("Contribution"), "maxItems": e.explain_max_top_k},
                "by_modality": _object({"micro": number, "safe": number, "macro": number}),
                "by_time_step": {
                    "type": "array",
                    "items": _object({"t": {"type": "integer", "maximum": 0}, "attribution": number}),
                },
            }
        ),
        "ExplainedPrediction": {
            "allOf": [
                _ref("Prediction"),
                {"type": "object", "required": ["explanation"], "properties": {"explanation": _ref("Explanation")}},
            ]
        },
    }


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "malformed JSON",
        404: "no data for this symbol (/predict_latest), or no such logged prediction (/explain)",
        405: "method not allowed",
        413: "body over the size limit (refused before it is read)",
        415: "not application/json",
        422: "invalid content, or more candles/windows/rows than the caps; details name each field",
        501: "this model version has no differentiable network for /explain (exported before explain.ts)",
        503: "over capacity, starting, or the warehouse unreadable: retry after the Retry-After seconds",
    }
    out: dict[str, Any] = {}
    for code in codes:
        out[str(code)] = {"description": text[code], "content": {"application/json": {"schema": _ref("Error")}}}
        if code == 503:
            out[str(code)]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return out


def _post(summary: str, request: str, response: str, example: Any, codes: tuple[int, ...]) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": _ref(request)}
    if example is not None:
        content["example"] = example
    return {
        "post": {
            "summary": summary,
            "operationId": summary.split(":")[0].strip().lower().replace(" ", "_"),
            "requestBody": {"required": True, "content": {"application/json": content}},
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": _ref(response)}}},
                **_errors(*codes),
            },
        }
    }


def document(cfg: Config, p: Predictor, example: dict[str, Any] | None) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of the service serving `p`; `example` a real /predict body."""
    body_codes = (400, 413, 415, 422, 503)
    info_responses = {"200": {"description": "OK", "content": {"application/json": {"schema": _ref("ModelInfo")}}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "SOFARE prediction service",
            "version": p.version,
            "description": f"{p.symbol} {p.interval} direction and return over the next {p.horizon} bars "
            f"(model version {p.version}, {p.variant}). Every refusal is a 4xx with the Error "
            "shape naming the field; past capacity a 503 with Retry-After.",
        },
        "paths": {
            "/predict": _post("predict: one window of candles", "Window", "Prediction", example, body_codes),
            "/predict_batch": _post(
                "predict_batch: many windows in one request",
                "Batch",
                "Predictions",
                {"windows": [example]} if example else None,
                body_codes,
            ),
            "/predict_latest": _post(
                "predict_latest: the newest complete window in the warehouse",
                "LatestRequest",
                "Prediction",
                {"symbol": p.symbol},
                (*body_codes, 404),
            ),
            "/explain": _post(
                "explain: one window's prediction with signed feature attributions (Integrated Gradients)",
                "ExplainRequest",
                "ExplainedPrediction",
                {**example, "top_k": p.cfg.serving.explain_top_k} if example else None,
                (*body_codes, 404, 501),
            ),
            "/model_info": {
                "get": {"summary": "the served model", "operationId": "model_info", "responses": info_responses},
                "post": {
                    "summary": "the served model (POST, empty object)",
                    "operationId": "model_info_post",
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": _ref("Empty"), "example": {}}},
                    },
                    "responses": {**info_responses, **_errors(400, 413, 415, 422)},
                },
            },
        },
        "components": {"schemas": schemas(p)},
    }


def swagger_page() -> str:
    """Swagger UI from the service's own /static_content (BentoML's bundled copy); nothing external."""
    return """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SOFARE prediction service</title>
<link rel="stylesheet" href="./static_content/swagger-ui.css">
<link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js"></script>
<script src="./static_content/swagger-ui-standalone-preset.js"></script>
<script>
window.onload = function () {
  window.ui = SwaggerUIBundle({url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "BaseLayout"});
};
</script></body></html>
"""
