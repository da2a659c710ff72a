"""Prediction logging never blocks or fails a prediction: rows reach the `predictions` table in
batches, and while the (real PostgreSQL) database is down predictions still succeed and the
dropped-log counter rises."""

from __future__ import annotations

import time

import sqlalchemy as sa

from sofare.data import warehouse
from sofare.data.features import feature_spec
from sofare.data.pgserver import LocalPostgres
from sofare.serving import bento
from tests.serving.conftest import Client, candles_needed, free_port, window_payload


def _count(url: str) -> int:
    engine = warehouse.engine_for(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(warehouse.predictions)).scalar_one()
    finally:
        engine.dispose()


def _dropped(client: Client) -> float:
    """Prediction-log rows dropped because of the database, summed over the server's workers."""
    lines = [
        line
        for line in client.get("/metrics")[1].splitlines()
        if line.startswith('sofare_prediction_log_dropped_total{reason="database",variant="canary"}')
    ]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def _wait(predicate, timeout: float = 180.0) -> bool:
    """Poll until `predicate` holds; the bound only ends a broken run, it is not a speed requirement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_predictions_survive_a_database_outage(model_home):
    cfg = model_home["cfg"]
    # self-contained: needs no warehouse read
    body = window_payload(cfg, candles=candles_needed(cfg) + 27, context=True)
    with LocalPostgres() as pg:
        url = pg.create_database("served")
        warehouse.init_schema(warehouse.engine_for(url), feature_spec(cfg).columns)
        with bento.Server(
            cfg,
            model_home["built"]["bento"],
            free_port(),
            "canary",
            SOFARE_WAREHOUSE__URL=url,
            SOFARE_SERVING__LOG_FLUSH_SECONDS="0.2",
        ) as server:
            client = Client(server.url)
            for _ in range(3):
                status, answer = client.post("/predict", body)
                assert status == 200 and answer["variant"] == "canary"
            assert _wait(lambda: _count(url) == 3), "logged rows reach the predictions table"

            pg.pause()  # the server process is stopped: connections hang, nothing answers
            for _ in range(4):  # answered while the database is still down: logging never blocks a prediction
                status, answer = client.post("/predict", body)
                assert status == 200, answer
            assert _wait(lambda: _dropped(client) >= 4)  # /metrics sums the workers (/model_info is one worker's)
            info = client.post("/model_info", {})[1]["prediction_log"]
            assert set(info) == {"written", "dropped", "worker"}  # one worker's counts, named

            pg.resume()
            assert client.post("/predict", body)[0] == 200
            assert _wait(lambda: _count(url) == 4), "logging resumes when the database is back"
