"""Monitoring on a real warehouse (SQLite and PostgreSQL) and through real Airflow runs (dag.test): outcomes
stay pending until their candle exists, fill once, and reruns change nothing; sofare_monitor emits the retrain
asset event with its reason, and a failing canary triggers sofare_rollback."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from sofare.data import warehouse as wh
from sofare.monitoring import monitor, outcomes

H = timedelta(hours=1)
T0 = datetime(2025, 6, 1, tzinfo=UTC)


def _candles(first: int, last: int, seed: int = 0) -> pd.DataFrame:
    """Hourly candles opening at T0 + k h for k in [first, last], a seeded random walk."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 400)))
    ks = range(first, last + 1)
    return pd.DataFrame(
        {
            "symbol": "BTCUSDT",
            "interval": "1h",
            "open_time": [T0 + k * H for k in ks],
            "open": [close[k] for k in ks],
            "high": [close[k] * 1.01 for k in ks],
            "low": [close[k] * 0.99 for k in ks],
            "close": [close[k] for k in ks],
            "volume": 1.0,
            "source": "test",
        }
    )


def _predictions(
    as_of_hours: range, prob, version: str = "1", variant: str = "stable", copies: int = 1
) -> pd.DataFrame:
    rows = []
    for k in as_of_hours:
        for _ in range(copies):
            p = prob(k) if callable(prob) else prob
            rows.append(
                {
                    "prediction_id": uuid.uuid4().hex,
                    "created_at": T0 + k * H,
                    "endpoint": "predict",
                    "model_version": version,
                    "variant": variant,
                    "symbol": "BTCUSDT",
                    "interval": "1h",
                    "as_of": T0 + k * H,
                    "horizon": 1,
                    "prob_up": p,
                    "expected_return": 0.0,
                    "latency_ms": 1.0,
                }
            )
    return pd.DataFrame(rows)


def _write(engine, table, frame) -> None:
    with wh.transaction(engine) as conn:
        wh.upsert(conn, table, frame)


def _outcome_rows(engine) -> list[dict]:
    o = wh.prediction_outcomes
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(o).order_by(o.c.as_of)).mappings()]


def test_outcomes_stay_pending_fill_when_the_candle_arrives_and_reruns_change_nothing(db_cfg, engine):
    _write(engine, wh.candles, _candles(0, 9))  # candles opening at hours 0..9: closes known at 1..10
    _write(engine, wh.predictions, _predictions(range(5, 12), 0.6))  # as_of hours 5..11
    result = outcomes.fill(db_cfg, engine, known_by=T0 + 100 * H)
    assert (result["filled"], result["pending"]) == (5, 2)  # 10 and 11 wait for the closes at 11 and 12
    assert result["oldest_pending"] == (T0 + 10 * H).isoformat()
    rows = _outcome_rows(engine)
    closes = _candles(0, 9)["close"].to_numpy()
    assert [r["as_of"] for r in rows] == [T0 + k * H for k in range(5, 10)]
    first = rows[0]  # as_of hour 5: the candle opening at 4 closes then; the target opens at 5
    assert first["base_close"] == pytest.approx(closes[4]) and first["target_close"] == pytest.approx(closes[5])
    assert first["realised_return"] == pytest.approx(np.log(closes[5] / closes[4]))
    assert first["correct"] == (closes[5] > closes[4])
    assert first["last_return"] == pytest.approx(np.log(closes[4] / closes[3]))
    again = outcomes.fill(db_cfg, engine, known_by=T0 + 100 * H)
    assert (again["filled"], again["pending"]) == (0, 2)
    assert _outcome_rows(engine) == rows  # a rerun changes nothing, not even filled_at

    not_yet = outcomes.fill(db_cfg, engine, known_by=T0 + 10 * H)  # hour 10's target closes at 11: not known yet
    _write(engine, wh.candles, _candles(10, 10))
    assert outcomes.fill(db_cfg, engine, known_by=T0 + 10 * H)["filled"] == 0 == not_yet["filled"]
    arrived = outcomes.fill(db_cfg, engine, known_by=T0 + 11 * H)
    assert (arrived["filled"], arrived["pending"]) == (1, 1)
    assert _outcome_rows(engine)[-1]["target_close"] == pytest.approx(_candles(10, 10)["close"].iloc[0])


def test_outcomes_backfill_only_the_interval_asked_for(db_cfg, engine):
    _write(engine, wh.candles, _candles(0, 30))
    _write(engine, wh.predictions, _predictions(range(2, 30), 0.6))
    result = outcomes.fill(db_cfg, engine, T0 + 10 * H, T0 + 20 * H, known_by=T0 + 100 * H)
    assert result["filled"] == 10
    assert {r["as_of"] for r in _outcome_rows(engine)} == {T0 + k * H for k in range(11, 21)}


@pytest.fixture
def overconfident(cfg):
    """A week of hourly candles and a version that says 99% up every hour: its Brier score is provably worse
    than a coin's. Hours are predicted three times each (they count once)."""
    engine = monitor.engine_of(cfg)
    _write(engine, wh.candles, _candles(0, 200, seed=3))
    _write(engine, wh.predictions, _predictions(range(10, 190), 0.99, copies=3))
    return engine


def test_a_monitor_run_records_quality_beside_persistence_and_its_decision(cfg, overconfident):
    result = monitor.run(cfg, T0 + 190 * H, start=T0, deployment=False, drift=True)
    by_window = {q.window: q for q in result.quality}
    week = by_window["7d"]
    assert week.status == "ok" and week.n == 167 and week.pending == 0  # as_of hours 23..189, each counted once
    day = by_window["24h"]
    assert day.status == "insufficient" and day.n == 23 and day.accuracy is None  # fewer than min_outcomes
    assert week.persistence_accuracy is not None and week.always_up_accuracy is not None
    assert week.brier.value > 0.4 and week.vs_coin_brier.ci_low > 0
    assert result.drift.status == "no_data"  # no served inputs logged in this test
    assert (result.decision.severity, result.decision.action) == ("high", "retrain")
    assert any(f.rule == "calibration" for f in result.decision.findings)
    r = wh.monitoring_runs
    with overconfident.connect() as conn:
        (row,) = conn.execute(sa.select(r)).mappings().all()
    assert (row["severity"], row["action"]) == ("high", "retrain") and "Brier" in row["reason"]
    assert json.loads(row["decision"])["findings"][0]["rule"] == "calibration"
    assert row["outcomes_filled"] == 180 * 3  # every copy of hours 10..189 (189's target closes at 190: known)

    held = monitor.run(cfg, T0 + 191 * H, deployment=False)  # an hour later: same finding, held back
    assert (held.decision.wanted, held.decision.action) == ("retrain", "none") and held.decision.cooldown


def test_too_few_outcomes_are_insufficient_never_a_number(cfg):
    engine = monitor.engine_of(cfg)
    _write(engine, wh.candles, _candles(0, 40))
    _write(engine, wh.predictions, _predictions(range(10, 30), 0.99))
    result = monitor.run(cfg, T0 + 40 * H, deployment=False)
    assert result.quality and all(q.status == "insufficient" and q.accuracy is None for q in result.quality)
    assert result.decision.action == "none"


def test_the_monitor_dag_emits_the_retrain_asset_event_with_its_reason(cfg, overconfident, airflow_db, tmp_path):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    from sofare import runtime

    run = runtime.run_dag(
        cfg,
        "sofare_monitor",
        conf={"at": (T0 + 190 * H).isoformat(), "start": T0.isoformat()},
        logfile=tmp_path / "dag.log",
    )
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states["request_retrain"] == "success" and states["alert"] == "success"
    assert states["trigger_rollback"] == "skipped" and states["done"] == "skipped"
    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == "sofare_retrain_request", AssetEvent.source_run_id == run.run_id)
            .all()
        )
        assert len(events) == 1
        extra = events[0].extra
    assert extra["severity"] == "high" and "Brier" in extra["reason"] and extra["at"] == (T0 + 190 * H).isoformat()
    a = wh.alerts
    with overconfident.connect() as conn:
        alerts = conn.execute(sa.select(a.c.source, a.c.severity, a.c.message)).all()
    assert [(s, sev) for s, sev, _ in alerts] == [("sofare_monitor", "high")] and "Brier" in alerts[0][2]


def test_a_critical_canary_triggers_the_rollback_dag(cfg, airflow_db, tmp_path):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from sofare import runtime
    from sofare.deploy.rollout import Backend, Deployment, State

    engine = monitor.engine_of(cfg)
    _write(engine, wh.candles, _candles(0, 200, seed=4))
    _write(
        engine,
        wh.predictions,
        pd.concat(
            [_predictions(range(10, 190), 0.5, "1", "stable"), _predictions(range(10, 190), 0.99, "2", "canary")]
        ),
    )
    dead = 2**22 + 12345  # no such process: the variants are not scraped, the state is what counts
    state = State(
        stable=Backend(version="1", bento="sofare:a", port=1, pid=dead, variant="stable"),
        canary=Backend(version="2", bento="sofare:b", port=2, pid=dead, variant="canary"),
        canary_weight=0.5,
        deployment_id="d1",
    )
    deployment = Deployment(cfg)
    deployment.dir.mkdir(parents=True, exist_ok=True)
    deployment.state_path.write_text(state.model_dump_json())
    run = runtime.run_dag(cfg, "sofare_monitor", conf={"at": (T0 + 190 * H).isoformat()}, logfile=tmp_path / "dag.log")
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states["trigger_rollback"] == "success" and states["request_retrain"] == "skipped"
    with create_session() as session:
        triggered = session.query(DagRun).filter(DagRun.dag_id == "sofare_rollback").all()
        confs = [r.conf for r in triggered]
    conf = next(c for c in confs if "version 2 (canary" in c.get("details", ""))
    assert conf["reason"] == "bad-predictions" and conf["target_version"] == "1"
