"""`sofare replay` end to end through the real parts: the ingest function on the embedded data, real nginx and
`bentoml serve`, outcomes, live quality, Evidently drift, severity -> action. An injected bad canary must be rolled
back; injected drift must end in a retrain request with its reason; the plain replay only records."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from tests.deploy.conftest import copy_home

pytestmark = pytest.mark.slow
DAYS = ("2024-04-01", "2024-04-03")  # after the session model's training window (2024-01-12 .. 2024-03-31)


@pytest.fixture
def home(model_home, tmp_path):
    """A private copy of the session's model home, the version deployed as the stable behind the front door.
    Smaller quality and drift minimums so three days are enough to judge (the rules are the production ones)."""
    env = copy_home(
        model_home,
        tmp_path,
        SOFARE_MONITORING__MIN_OUTCOMES="24",
        SOFARE_MONITORING__BOOTSTRAP_SAMPLES="200",
        SOFARE_DEPLOY__VERIFY_REQUESTS="3",
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from sofare import tasks
        from sofare.config import load_config
        from sofare.deploy import rollout

        cfg = load_config()
        tasks.deploy(cfg, model_home["version"], actor="test")
        try:
            yield {"cfg": cfg, "version": model_home["version"]}
        finally:
            rollout.Deployment(cfg).stop()


def _runs(cfg) -> list[dict]:
    from sofare.data import warehouse

    r = warehouse.monitoring_runs
    with warehouse.get_engine(cfg).connect() as conn:
        return [dict(x) for x in conn.execute(sa.select(r).order_by(r.c.at)).mappings()]


def test_a_bad_canary_is_rolled_back_by_the_monitor(home):
    from sofare.deploy import rollout
    from sofare.monitoring import replay
    from sofare.registry import versions

    cfg = home["cfg"]
    summary = replay.replay(cfg, *DAYS, inject="bad-canary").to_dict()
    sabotaged = next(
        v
        for v in versions.client(cfg).search_model_versions(f"name = '{cfg.mlflow.model_name}'")
        if "injected" in v.tags
    )
    assert summary["hours"] == 72 and summary["refused"] == 0
    assert summary["predictions"][f"{home['version']}/stable"] == 72
    assert summary["predictions"][f"{sabotaged.version}/canary"] >= 24  # served until rolled back
    (rollback,) = [a for a in summary["actions"] if a["action"] == "rollback"]
    assert rollback["severity"] == "critical" and f"version {sabotaged.version} (canary" in rollback["reason"]
    assert rollback["rollback"]["target"] == home["version"]
    assert rollback["rollback"]["verified"] == [f"{home['version']}/stable"] * cfg.deploy.verify_requests
    state = rollout.Deployment(cfg).state()
    assert state.canary is None and state.stable.version == home["version"]
    assert versions.alias_version(cfg, "champion") == home["version"]
    runs = _runs(cfg)
    assert len(runs) == 72 and [r["action"] for r in runs].count("rollback") == 1
    critical = next(r for r in runs if r["action"] == "rollback")
    assert any(
        f["rule"] in ("quality", "calibration") and f["variant"] == "canary"
        for f in json.loads(critical["decision"])["findings"]
    )
    assert summary["quality"] and all(q["n"] > 0 for q in summary["quality"])


def test_injected_drift_ends_in_a_retrain_request_with_its_reason(home, monkeypatch):
    from sofare.config import load_config
    from sofare.monitoring import replay

    monkeypatch.setenv("SOFARE_MONITORING__MIN_DRIFT_ROWS", "40")  # three days: judge from the 40th served hour on
    cfg = load_config()
    summary = replay.replay(cfg, *DAYS, inject="drift").to_dict()
    started = summary["notes"][-1].rsplit(" ", 1)[-1]
    retrains = [a for a in summary["actions"] if a["action"] == "retrain"]
    assert retrains, summary["actions"]
    event = retrains[-1]["asset_event"]
    assert event["asset"] == "sofare_retrain_request" and event["extra"]["severity"] == "high"
    assert "of the hourly input features drifted" in event["extra"]["reason"]
    runs = _runs(cfg)
    assert [r["action"] for r in runs].count("retrain") == len(retrains), "every retrain is recorded with its run"
    measured = [(r["at"].isoformat(), r["drift_share"]) for r in runs if r["drift_share"] is not None]
    before = [share for at, share in measured if at <= started]
    last = measured[-1][1]
    assert last >= cfg.monitoring.drift.high, measured  # two of three days injected: the hourly features moved
    assert not before or max(before) < last, measured
    reports = sorted((cfg.var_dir / "reports" / "drift").glob("*.html"))
    assert reports, "the Evidently HTML of the drift runs"
    html = reports[-1].read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "parkinson_24" in html and "drift" in html.lower()
