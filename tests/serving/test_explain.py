"""POST /explain on the session's real `bentoml serve` (tests/serving/conftest.py): a window's prediction with
complete attributions, a logged prediction explained from its rebuilt window, the caps and the error contract
of /predict, and the prediction-log drop counter exported from 0."""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.serving.conftest import window_payload
from tests.serving.test_service import BAD, CONTRACT, _logged_inputs, _mutate

END = "2024-03-21T09:00:00+00:00"


def _complete(explanation: dict) -> float:
    """The gap completeness leaves: sum of attributions - (output - baseline_output) - convergence_delta."""
    total = sum(explanation["by_modality"].values())
    return total - (explanation["output"] - explanation["baseline_output"]) - explanation["convergence_delta"]


def test_explain_answers_a_window_with_complete_attributions(served):
    client, cfg = served["client"], served["cfg"]
    body = window_payload(cfg, END)
    status, predicted = client.post("/predict", body)
    assert status == 200, predicted
    status, answer = client.post("/explain", body)
    assert status == 200, answer
    assert CONTRACT <= set(answer) and answer["model_version"] == served["version"] and answer["variant"] == "stable"
    assert answer["prob_up"] == predicted["prob_up"] and answer["as_of"] == predicted["as_of"]
    assert answer["prediction_id"] != predicted["prediction_id"]
    e = answer["explanation"]
    assert (e["method"], e["target"], e["steps"]) == (
        "integrated_gradients",
        "prob_up_logit",
        cfg.serving.explain_steps,
    )
    assert "training mean" in e["baseline"]
    # the target is the log-odds of the answered prob_up (explain.ts against the served ONNX file: float error)
    assert 1 / (1 + math.exp(-e["output"])) == pytest.approx(answer["prob_up"], abs=1e-5)
    assert abs(_complete(e)) < 1e-4  # attributions + Captum's delta add up to output - baseline_output
    gap = e["output"] - e["baseline_output"]
    assert abs(e["convergence_delta"]) <= 0.05 * abs(gap) + 1e-3, e
    steps = e["by_time_step"]
    assert [s["t"] for s in steps] == list(range(-23, 1))  # lookback 24, oldest first, 0 the last bar
    assert sum(s["attribution"] for s in steps) == pytest.approx(sum(e["by_modality"].values()), abs=1e-6)
    assert set(e["by_modality"]) == {"micro", "safe", "macro"}
    top = e["top"]
    assert len(top) == cfg.serving.explain_top_k
    assert [abs(c["attribution"]) for c in top] == sorted((abs(c["attribution"]) for c in top), reverse=True)
    assert all(-23 <= c["t"] <= 0 and c["modality"] in ("micro", "safe", "macro") for c in top)
    # a request's own k and steps; the same window explains the same way
    status, small = client.post("/explain", {**body, "top_k": 3, "steps": 64})
    assert status == 200 and len(small["explanation"]["top"]) == 3 and small["explanation"]["steps"] == 64
    assert abs(_complete(small["explanation"])) < 1e-4
    assert abs(small["explanation"]["output"] - e["output"]) < 1e-9  # the same window, the same prediction
    status, again = client.post("/explain", body)
    assert status == 200 and again["explanation"] == e


def test_a_logged_prediction_is_explained_from_its_rebuilt_window(served):
    client, cfg = served["client"], served["cfg"]
    body = window_payload(cfg, END)
    status, predicted = client.post("/predict", body)
    assert status == 200
    _logged_inputs(cfg, predicted["prediction_id"])  # written by the log thread; polled, bounded
    status, answer = client.post("/explain", {"prediction_id": predicted["prediction_id"], "top_k": 5})
    assert status == 200, answer
    assert answer["prediction_id"] == predicted["prediction_id"] and answer["prob_up"] == predicted["prob_up"]
    status, from_window = client.post("/explain", {**body, "top_k": 5})
    assert answer["explanation"] == from_window["explanation"]  # the very window, rebuilt from the warehouse

    # a window the warehouse does not hold (its own last close) was logged, but cannot be rebuilt: a 422 saying so
    altered = json.loads(json.dumps(body))
    last = altered["candles"][-1]
    last["close"] = last["high"] = last["close"] * 1.01
    status, own = client.post("/predict", altered)
    assert status == 200
    _logged_inputs(cfg, own["prediction_id"])
    status, refused = client.post("/explain", {"prediction_id": own["prediction_id"]})
    assert status == 422 and refused["error"]["details"][0]["field"] == "prediction_id", refused
    assert "cannot be rebuilt" in refused["error"]["message"]

    status, unknown = client.post("/explain", {"prediction_id": "0" * 32})
    assert status == 404 and unknown["error"]["details"][0]["field"] == "prediction_id"


CAPS = [  # body change, status, field named
    ({"steps": 10_000}, 422, "steps"),
    ({"top_k": 10_000}, 422, "top_k"),
    ({"steps": 0}, 422, "steps"),
    ({"top_k": 1.5}, 422, "top_k"),
    ({"prediction_id": "0" * 32}, 422, "symbol"),  # a window and a prediction_id: not both
    ({"symbol": None}, 422, "symbol"),
]


@pytest.mark.parametrize(("change", "status", "field"), CAPS, ids=[c[2] + str(i) for i, c in enumerate(CAPS)])
def test_explain_costs_are_capped_before_any_work(served, change, status, field):
    got, answer = served["client"].post("/explain", {**window_payload(served["cfg"], END), **change})
    assert got == status, answer
    assert answer["error"]["details"][0]["field"] == field, answer


def test_explain_needs_a_window_or_a_prediction_id(served):
    for body, field in (({}, "symbol"), ({"symbol": "BTCUSDT", "interval": "1h"}, "candles"), ({"top_k": 2}, "symbol")):
        status, answer = served["client"].post("/explain", body)
        assert status == 422 and answer["error"]["details"][0]["field"] == field, answer
    status, answer = served["client"].post("/explain", {"prediction_id": "not-an-id"})
    assert status == 422 and answer["error"]["details"][0]["field"] == "prediction_id", answer


# /predict's bad-input table, on a window of 27 candles more than needed (whatever the feature warm-up is)
BAD_WINDOWS = [(how, "candles: 100 given, at least" if how == "too short" else message) for how, message in BAD]


@pytest.mark.parametrize(("how", "message"), BAD_WINDOWS, ids=[b[0] for b in BAD_WINDOWS])
def test_bad_windows_get_the_predict_error_contract(served, how, message):
    cfg = served["cfg"]
    candles = cfg.features.warmup_bars + max(cfg.training.search_space.lookback) + 26
    status, answer = served["client"].post("/explain", None, raw=_mutate(window_payload(cfg, candles=candles), how))
    assert 400 <= status < 500, (status, answer)
    assert set(answer["error"]) == {"code", "message", "details", "truncated"}, answer
    assert message in json.dumps(answer), answer


def test_prediction_log_drops_are_exported_from_zero(served):
    metrics = served["client"].get("/metrics")[1]
    found = {
        m[1]: float(m[2])
        for m in re.finditer(
            r'^sofare_prediction_log_dropped_total\{reason="([^"]+)",variant="stable"\} (\S+)$', metrics, re.MULTILINE
        )
    }
    assert set(found) == {"queue full", "database"}, metrics[-3000:]
    assert found["queue full"] == 0.0  # a 10,000-row queue never fills in these tests


def test_a_busy_machine_answers_explain_503_and_predict_as_ever(served):
    """This test holds the machine's one explanation slot (the lock file the server's workers take from): a checked
    window gets a 503 with Retry-After at once, /predict is answered, and once the slot is free /explain is too."""
    from sofare.serving.explainer import Slots

    client, cfg = served["client"], served["cfg"]
    body = window_payload(cfg, END)
    held = Slots(cfg.var_dir / "run" / "explain-slots", cfg.serving.explain_slots)
    taken = [held.take() for _ in range(cfg.serving.explain_slots)]
    try:
        assert None not in taken
        status, answer = client.post("/explain", body)
        assert status == 503 and answer["error"]["code"] == "overloaded", answer
        assert client.post("/predict", body)[0] == 200
        assert client.post("/explain", {**body, "steps": 10_000})[0] == 422  # bad input: refused before a slot
    finally:
        for slot in taken:
            if slot is not None:
                held.give(slot)
    assert client.post("/explain", body)[0] == 200
