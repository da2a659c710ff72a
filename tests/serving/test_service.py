"""The BentoML service, served by a real `bentoml serve` on 127.0.0.1: every endpoint, the bad-input
table, served = in-process predictions, labelled metrics."""

from __future__ import annotations

import copy
import json
import re
import time
from datetime import datetime, timedelta

import numpy as np
import pytest

from sofare.config import load_config
from sofare.registry import versions
from sofare.serving import predictor, schemas
from tests.serving.conftest import candles_needed, window_payload

CONTRACT = {
    "prediction_id",
    "model_version",
    "variant",
    "latency_ms",
    "direction",
    "prob_up",
    "confidence",
    "expected_return",
    "heads_agree",
    "signal",
    "policy_id",
    "horizon",
    "as_of",
    "symbol",
    "interval",
}


def test_every_endpoint_answers(served):
    client, version = served["client"], served["version"]
    status, answer = client.post("/predict", window_payload(served["cfg"]))
    assert status == 200, answer
    assert CONTRACT <= set(answer) and answer["model_version"] == version and answer["variant"] == "stable"
    assert answer["as_of"] == "2024-03-20T13:00:00+00:00" and answer["direction"] in ("up", "down")
    assert 0 <= answer["prob_up"] <= 1 and answer["latency_ms"] > 0
    status, info = client.post("/model_info", {})
    policy = info["policy"]  # the version's cost-aware policy, stored with it, decides `signal`
    assert (
        answer["policy_id"] == policy["id"]
        and policy["chosen_on"]
        and info["calibration"]["method"] in ("platt", "none")
    )
    want = "long" if policy["threshold"] is not None and answer["prob_up"] > policy["threshold"] else "flat"
    assert answer["signal"] == want
    windows = [
        window_payload(served["cfg"], end)
        for end in ("2024-03-20T12:00:00+00:00", "2024-03-21T12:00:00+00:00", "2024-03-22T12:00:00+00:00")
    ]
    status, answers = client.post("/predict_batch", {"windows": windows})
    assert status == 200 and [a["as_of"][:10] for a in answers] == ["2024-03-20", "2024-03-21", "2024-03-22"]
    assert answers[0]["prob_up"] == answer["prob_up"]
    assert len({a["prediction_id"] for a in answers}) == 3
    status, latest = client.post("/predict_latest", {"symbol": "BTCUSDT"})
    assert status == 200 and latest["as_of"] == "2024-07-01T00:00:00+00:00"  # the newest candle loaded
    status, info = client.post("/model_info", {})
    assert status == 200 and info["model_version"] == version and info["lookback"] == 24
    needed = served["cfg"].features.warmup_bars + info["lookback"] - 1
    assert info["candles_needed"] == needed and info["feature_set_version"].startswith("fs")
    for path in ("/livez", "/readyz"):
        assert client.get(path)[0] == 200
    spec = json.loads(client.get("/docs.json")[1])
    assert {"/predict", "/predict_batch", "/predict_latest", "/model_info"} <= set(spec["paths"])
    assert "swagger" in client.get("/")[1].lower()


def _mutate(body, how):
    b = copy.deepcopy(body)
    c = b["candles"]
    if how == "missing field":
        del b["candles"]
    elif how == "extra field":
        b["comment"] = "hi"
    elif how == "extra candle field":
        c[3]["vwap"] = 1.0
    elif how == "wrong type":
        c[5]["close"] = "a lot"
    elif how == "nan":
        return json.dumps(b).replace(json.dumps(c[7]["close"]), "NaN", 1).encode()
    elif how == "infinity":
        return json.dumps(b).replace(json.dumps(c[7]["volume"]), "Infinity", 1).encode()
    elif how == "negative price":
        c[9]["low"] = -1.0
    elif how == "too short":
        b["candles"] = c[-100:]
    elif how == "unsorted":
        c[10], c[11] = c[11], c[10]
    elif how == "duplicate":
        c[12] = dict(c[11])
    elif how == "off grid":
        c[-1]["open_time"] = c[-1]["open_time"].replace(":00:00+", ":30:00+")
    elif how == "future":
        c[-1]["open_time"] = "2099-01-01T00:00:00+00:00"
    elif how == "wrong symbol":
        b["symbol"] = "ETHUSDT"
    elif how == "wrong interval":
        b["interval"] = "5m"
    elif how == "unknown interval":
        b["interval"] = "7m"
    elif how == "high below close":
        c[20]["high"] = c[20]["close"] / 2
    elif how == "unknown ticker":
        b["safe_haven"] = [
            {
                "ticker": "BTC-USD",
                "date": "2024-03-19",
                "open": 1,
                "high": 1,
                "low": 1,
                "close": 1,
                "known_at": "2024-03-19T22:00:00+00:00",
            }
        ]
        b["macro"] = []
    elif how == "gap in the lookback":
        del c[-3]
    return json.dumps(b).encode()


BAD = [  # how, message fragment that names the field
    ("missing field", "candles"),
    ("extra field", "comment"),
    ("extra candle field", "vwap"),
    ("wrong type", "close"),
    ("nan", "close"),
    ("infinity", "volume"),
    ("negative price", "low"),
    ("too short", "candles: 100 given, at least {needed} needed"),
    ("unsorted", "candles[11].open_time: not sorted"),
    ("duplicate", "candles[12].open_time: duplicate"),
    ("off grid", "not on the 1h grid"),
    ("future", "is in the future"),
    ("wrong symbol", "symbol: 'ETHUSDT' is not served here"),
    ("wrong interval", "interval: '5m' is not served here"),
    ("unknown interval", "interval: unknown interval '7m'"),
    ("high below close", "candles[20]: high/low"),
    ("unknown ticker", "safe_haven[0].ticker"),
    ("gap in the lookback", "must be consecutive"),
]


@pytest.mark.parametrize(("how", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(served, how, message):
    status, answer = served["client"].post(
        "/predict", None, raw=_mutate(window_payload(served["cfg"], candles=candles_needed(served["cfg"]) + 27), how)
    )
    assert 400 <= status < 500, (status, answer)
    assert set(answer["error"]) == {"code", "message", "details", "truncated"}, answer
    assert message.format(needed=candles_needed(served["cfg"])) in json.dumps(answer), answer


def test_a_full_batch_of_the_longest_windows_fits_the_batch_body_limit(served):
    """The configured serving.max_batch_windows windows of the size a window needs (warm-up + lookback - 1 candles;
    context from the service's warehouse) fit the configured serving.max_batch_body_bytes: with the warm-up at 450
    candles a full batch was 16.5 MiB against a 16 MiB limit (every 256-window request of the serving benchmark
    was refused), so the documented maximum batch could not be sent. (This server runs 8-window batches.)"""
    shipped = load_config(env={}).serving
    window = json.dumps(window_payload(served["cfg"])).encode()
    assert len(window) > 40_000, "a real window of candles"
    full = len(b'{"windows": []}') + shipped.max_batch_windows * (len(window) + 2)
    assert full <= shipped.max_batch_body_bytes, (full, shipped.max_batch_body_bytes)


def test_bad_batches_are_refused_by_window(served):
    client = served["client"]
    good = window_payload(served["cfg"])
    status, answer = client.post("/predict_batch", {"windows": [good] * 9})
    assert status == 422 and "windows: 9 given, at most 8" in json.dumps(answer)
    bad = copy.deepcopy(good)
    bad["symbol"] = "ETHUSDT"
    status, answer = client.post("/predict_batch", {"windows": [good, bad]})
    assert status == 422 and [d["field"] for d in answer["error"]["details"]] == ["windows[1].symbol"]
    status, answer = client.post("/predict_batch", {"windows": []})
    assert status == 422 and "windows" in json.dumps(answer)
    status, answer = client.post("/predict_latest", {"symbol": "DOGEUSDT"})
    assert status == 422 and answer["error"]["details"][0]["field"] == "symbol"


def _logged_inputs(cfg, prediction_id: str, timeout: float = 60.0) -> dict:
    """The prediction_inputs row of a prediction (the log writes asynchronously; the bound ends a broken run)."""
    import time

    import sqlalchemy as sa

    from sofare.data import warehouse

    i = warehouse.prediction_inputs
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with warehouse.get_engine(cfg).connect() as conn:
            row = conn.execute(sa.select(i).where(i.c.prediction_id == prediction_id)).mappings().first()
        if row is not None:
            return dict(row)
        time.sleep(0.2)
    raise AssertionError(f"no prediction_inputs row for {prediction_id}")


def test_served_prediction_equals_the_in_process_prediction(served):
    cfg = served["cfg"]
    body = window_payload(cfg, "2024-03-25T06:00:00+00:00", candles=candles_needed(cfg) + 127, context=True)
    status, answer = served["client"].post("/predict", body)
    assert status == 200, answer
    model_dir = versions.download(cfg, served["version"])
    in_process = predictor.Predictor.from_directory(cfg, model_dir, served["version"], "stable")
    window = schemas.decode(json.dumps(body).encode(), schemas.Window)
    local = in_process.predict(window)
    assert answer["prob_up"] == local["prob_up"]
    (prepared,) = in_process.prepare_all([window])  # what drift monitoring compares: the served features at as_of
    logged = _logged_inputs(cfg, answer["prediction_id"])
    assert logged["model_version"] == served["version"] and logged["as_of"].isoformat() == answer["as_of"]
    features = np.array([np.nan if v is None else v for v in json.loads(logged["features"])])
    assert features.shape == (len(in_process.meta.columns),)
    np.testing.assert_allclose(features, prepared.raw[-1].astype(float), rtol=1e-6, equal_nan=True)
    assert answer["expected_return"] == pytest.approx(local["expected_return"], rel=1e-6, abs=1e-12)
    without_context = {k: v for k, v in body.items() if k not in ("safe_haven", "macro")}
    status, from_warehouse = served["client"].post("/predict", without_context)
    assert status == 200 and from_warehouse["prob_up"] == answer["prob_up"], (
        "the service reads the same safe-haven and macro rows from the warehouse"
    )


def test_metrics_expose_labelled_series(served):
    client, version = served["client"], served["version"]
    assert client.post("/predict", window_payload(served["cfg"]))[0] == 200
    client.post(
        "/predict", {"symbol": "ETHUSDT", "interval": "1h", "candles": window_payload(served["cfg"])["candles"]}
    )
    time.sleep(0.5)
    metrics = client.get("/metrics")[1]
    served_line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("sofare_predictions_total{") and 'endpoint="predict"' in line
    )
    assert f'model_version="{version}"' in served_line and 'variant="stable"' in served_line
    assert float(served_line.rsplit(" ", 1)[1]) >= 1
    assert (
        f'sofare_prediction_latency_seconds_bucket{{endpoint="predict",le="0.05",model_version="{version}",variant="stable"}}'
        in metrics
    )
    assert 'sofare_bad_requests_total{endpoint="predict",variant="stable"}' in metrics
    assert 'variant="canary"' not in metrics, "each server exports only its own series (its own Prometheus folder)"
    for code in ("200", "422"):  # what canary analysis reads, labelled as BentoML labels it
        pattern = r'bentoml_service_request_total\{endpoint="/predict",http_response_code="' + code + r'",[^}]*\} [1-9]'
        assert re.search(pattern, metrics), code


def test_both_served_runtimes_equal_the_trained_network(model_home):
    """The exported ONNX and TorchScript files answer what the trained network answers, at any batch size."""
    import numpy as np

    from sofare.serving.bundle import ServedModel
    from sofare.training.export import TorchModel

    directory = versions.download(model_home["cfg"], model_home["version"])
    trained = TorchModel(directory)
    raw = np.random.default_rng(7).normal(size=(9, trained.lookback, len(trained.meta.columns))).astype(np.float32)
    raw[2, :, 5] = np.nan  # a series not yet published: scaled to 0 on every path
    for runtime in ("onnx", "torch"):
        served = ServedModel.load(directory, runtime)
        for batch in (raw[:1], raw):
            want, got = trained.predict_windows(batch), served.predict_windows(batch)
            np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5, err_msg=f"{runtime} prob_up")
            np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-7, err_msg=f"{runtime} expected_return")


def test_predict_latest_is_served_from_memory_and_follows_new_candles(served):
    """The newest window is kept in memory; a candle that reaches the warehouse moves the answer on (the
    refresher looks every serving.latest_refresh_seconds; the wait below is a generous bound, not a goal)."""
    import pandas as pd

    from sofare.data import warehouse

    cfg, client = served["cfg"], served["client"]
    status, before = client.post("/predict_latest", {"symbol": "BTCUSDT"})
    assert status == 200
    opens = datetime.fromisoformat(before["as_of"])  # the next candle opens when the newest one closes
    engine = warehouse.get_engine(cfg)
    with engine.connect() as conn:
        last = warehouse.read_candles_before(conn, "BTCUSDT", "1h", opens, 1).iloc[-1]
    row = pd.DataFrame(
        [
            {
                "symbol": "BTCUSDT",
                "interval": "1h",
                "open_time": opens,
                "open": last["close"],
                "high": last["close"] * 1.01,
                "low": last["close"] * 0.99,
                "close": last["close"] * 1.005,
                "volume": last["volume"],
                "quote_volume": None,
                "trade_count": None,
                "source": "test",
            }
        ]
    )
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, row)
    try:
        deadline = time.monotonic() + 60
        while True:
            status, after = client.post("/predict_latest", {"symbol": "BTCUSDT"})
            if after["as_of"] == (opens + timedelta(hours=1)).isoformat():
                break
            assert time.monotonic() < deadline, f"still {after['as_of']}"
            time.sleep(0.2)
        assert after["prediction_id"] != before["prediction_id"]
    finally:
        with warehouse.transaction(engine) as conn:
            conn.execute(warehouse.candles.delete().where(warehouse.candles.c.source == "test"))


def test_an_unreadable_warehouse_is_a_503_never_a_500(served, tmp_path):
    """Context rows or the latest window from a warehouse that cannot be read: 503 + Retry-After naming it."""
    from sofare.serving.schemas import Unavailable

    cfg = served["cfg"]
    gone = cfg.model_copy(
        update={"warehouse": cfg.warehouse.model_copy(update={"url": f"sqlite:///{tmp_path}/missing/dir/warehouse.db"})}
    )
    local = predictor.Predictor.from_directory(
        gone, versions.download(cfg, served["version"]), served["version"], "stable"
    )
    body = json.dumps(window_payload(cfg)).encode()  # no safe_haven/macro: the warehouse's are needed
    with pytest.raises(Unavailable) as refused:
        local.predict(schemas.decode(body, schemas.Window))
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
    with pytest.raises(Unavailable):
        predictor.Latest(local).answer("BTCUSDT", time.perf_counter())
