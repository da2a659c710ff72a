"""The sofare_validate DAG under dag.test(): a pass marks every day validated and builds Data Docs;
a broken value fails the run naming the expectation, keeps the day out of training and fires an
alert that reaches a webhook (a local HTTP server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import sqlalchemy as sa

from sofare import runtime, tasks
from sofare.config import load_config
from sofare.data import ingest, warehouse
from sofare.training import dataset
from sofare.validation import suites

DAYS = ("2023-03-20", "2023-03-23")


class Webhook:
    """Collects the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def loaded(airflow_db, monkeypatch, tmp_path, webhook):
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", f"sqlite:///{tmp_path / 'wh.db'}")
    monkeypatch.setenv("SOFARE_INGEST__CONTEXT_DAYS", "40")
    monkeypatch.setenv("SOFARE_ALERTS__WEBHOOK_URL", webhook.url)
    tasks.backfill(load_config(), ["sample"], "2023-02-01", DAYS[1])
    return load_config()


def _marks(engine) -> dict[tuple[str, str], str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(warehouse.validated_days)).mappings().all()
    return {(r["suite"], str(r["day"])): r["status"] for r in rows}


def test_a_passing_run_marks_every_day_and_builds_data_docs(loaded, tmp_path, webhook):
    cfg = loaded
    runtime.run_dag(cfg, "sofare_validate", conf={"start": DAYS[0], "end": DAYS[1]}, logfile=tmp_path / "dag.log")
    engine = warehouse.get_engine(cfg)
    marks = _marks(engine)
    assert len(marks) == 4 * 4 and set(marks.values()) == {"passed"}
    assert len(dataset.training_frame(cfg, engine, *ingest.day_range(*DAYS))) == 4 * 24
    index = suites.data_docs_index(cfg)
    assert index.exists() and all(suite in index.read_text() for suite in suites.SUITES)
    assert webhook.received == []


def test_a_broken_value_fails_the_run_loudly_and_alerts(loaded, webhook, capsys):
    cfg = loaded
    engine = warehouse.get_engine(cfg)
    with engine.begin() as conn:
        c = warehouse.candles
        conn.execute(
            sa.update(c)
            .where(c.c.open_time == pd.Timestamp("2023-03-22 05:00", tz="UTC").to_pydatetime())
            .values(high=c.c.low - 10)
        )
    with pytest.raises(runtime.DagRunFailed, match=r"failed tasks: \['validate\[0\]', 'verdict'\]"):
        runtime.run_dag(cfg, "sofare_validate", conf={"start": DAYS[0], "end": DAYS[1]})
    output = capsys.readouterr()
    logs = output.out + output.err
    assert "high >= max(open, close): 1 row(s) break it; days: 2023-03-22" in logs
    assert "up_for_retry" not in logs, "failed data is permanent: no retry"
    marks = _marks(engine)
    assert marks[("candles", "2023-03-22")] == "failed"
    assert marks[("candles", "2023-03-21")] == "passed" and marks[("features", "2023-03-22")] == "passed"
    with pytest.raises(suites.UnvalidatedIntervalError, match="candles .* failed validation: 2023-03-22"):
        dataset.training_frame(cfg, engine, *ingest.day_range(*DAYS))
    [alert] = webhook.received
    assert alert["source"] == "airflow:sofare_validate.validate" and alert["severity"] == "high"
    assert "high >= max(open, close)" in alert["message"] and alert["details"]["map_index"] == 0
    with engine.connect() as conn:
        stored = conn.execute(sa.select(warehouse.alerts)).mappings().all()
    assert [(a["alert_id"], a["delivered"]) for a in stored] == [(alert["alert_id"], True)]
    assert suites.data_docs_index(cfg).exists(), "Data Docs are rebuilt even when validation fails"


def test_a_scheduled_run_validates_its_data_interval(loaded, tmp_path):
    cfg = loaded
    # the daily run for logical date 2023-03-22 covers [2023-03-21, 2023-03-22)
    runtime.run_dag(
        cfg,
        "sofare_validate",
        logical_date=pd.Timestamp("2023-03-22", tz="UTC").to_pydatetime(),
        logfile=tmp_path / "dag.log",
    )
    marks = _marks(warehouse.get_engine(cfg))
    assert sorted(marks) == sorted((suite, "2023-03-21") for suite in suites.SUITES)


def test_backfilling_the_next_week_keeps_the_validated_history_and_the_training_window(monkeypatch, tmp_path):
    """Found by the Celery e2e tier: a backfill's daily/macro history chunks reloaded (and un-validated) the
    `ingest.context_days` before it, so after backfilling one new week no day passed every suite and sofare_train
    had no window. History chunks now only fill gaps; the features refresh of the last day before the week is
    revalidated through the features event's interval."""
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", f"sqlite:///{tmp_path / 'wh.db'}")
    monkeypatch.setenv("SOFARE_INGEST__CONTEXT_DAYS", "40")
    cfg = load_config()
    tasks.backfill(cfg, ["sample"], "2023-02-01", "2023-02-28")
    tasks.validate_range(cfg, "2023-02-01", "2023-02-28")
    engine = warehouse.get_engine(cfg)
    before = _marks(engine)
    plan = tasks.plan_backfill(cfg, ["sample"], "2023-03-01", "2023-03-07")
    history = [c for c in plan if c["history"]]
    assert history and all(c["modality"] != "candles" for c in history)
    results = [tasks.load_chunk(cfg, c) for c in plan]
    assert all(r["note"] == "" for r in results if r["history"]), "history chunks are not 'no rows' failures"
    features = [tasks.features_chunk(cfg, c) for c in tasks.plan_feature_chunks(cfg, "2023-03-01", "2023-03-07")]
    after = _marks(engine)
    lost = sorted(key for key in before if key not in after)
    assert lost == [("features", "2023-02-28")], "only the day whose last targets the week's features set"
    assert features[0]["validate_from"].startswith("2023-02-28T00:00"), "... which the features event revalidates"
    windows = tasks.validation_windows(
        None, None, None, [{"start": features[0]["validate_from"], "end": features[-1]["end"]}]
    )
    for suite in suites.SUITES:
        tasks.validate(cfg, suite, windows)
    with engine.connect() as conn:
        assert dataset.validated_span(conn, cfg) == (
            pd.Timestamp("2023-02-01").date(),
            pd.Timestamp("2023-03-07").date(),
        )
