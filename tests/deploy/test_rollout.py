"""Stable and canary `bentoml serve` processes behind the real nginx front door: deploy, refuse bad input,
survive a killed canary, roll back a failing canary, promote under load, and the on-call rollback DAG.

The tests share one deployment and run in file order (each starts from what the previous one left).
Traffic that a step judges is sent by the test itself (analysis takes a `sleep` that sends requests
instead of waiting), so no outcome depends on how busy the machine is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import sqlalchemy as sa

from tests.deploy.conftest import copy_home

pytestmark = pytest.mark.slow


def call(url: str, path: str, body: dict, client: str) -> tuple[int, dict, str]:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-Client-Id": client},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers.get("X-Served-By", "")
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read().decode(errors="replace")[:300]}, error.headers.get("X-Served-By", "")


class Load:
    """Sequential requests through the front door from rotating client ids, until stopped (bounded)."""

    def __init__(self, url: str, path: str = "/model_info", body: dict | None = None, limit: int = 5000) -> None:
        self.url, self.path, self.body, self.limit = url, path, body or {}, limit
        self.results: list[tuple[int, str, str]] = []  # status, X-Served-By, model_version
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.is_set() and len(self.results) < self.limit:
            n = len(self.results)
            status, answer, served_by = call(self.url, self.path, self.body, f"load-{n % 211}")
            self.results.append((status, served_by, str(answer.get("model_version"))))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(120)

    def wait_for(self, count: int) -> None:
        """Until `count` more requests were answered (bounded by the request limit)."""
        target = min(len(self.results) + count, self.limit)
        while len(self.results) < target and self.thread.is_alive():
            self.thread.join(0.05)

    @property
    def errors(self) -> list[tuple[int, str, str]]:
        return [r for r in self.results if r[0] != 200]


def _wait_dead(arbiter: int, pids: set[int], bound: float = 30.0) -> None:
    """Until none of `pids` runs (SIGKILL is not refusable; the bound only stops a broken kernel hanging CI)."""
    import time

    from sofare.serving import bento

    deadline = time.monotonic() + bound
    while alive := {p for p, (state, _, _) in bento._processes().items() if p in pids and state not in "ZX"}:
        assert time.monotonic() < deadline, f"still running after SIGKILL: {alive}"
        bento.process_tree(arbiter)  # reaps the arbiter if it is our child
        time.sleep(0.05)


def traffic(url: str, path: str, body: dict, n: int):
    """A `sleep` for canary analysis: instead of waiting, send `n` requests from fixed client ids."""

    def send(_seconds: float) -> None:
        for i in range(n):
            call(url, path, body, f"judged-{i}")

    return send


@pytest.fixture(scope="module")
def home(model_home, tmp_path_factory, airflow_db):
    """A copy of the served model's var/ (MLflow, bento store, warehouse) with version 2 registered from the same
    run and built, the front door and the servers on free ports."""
    env = copy_home(
        model_home,
        tmp_path_factory.mktemp("deploy"),
        SOFARE_DEPLOY__MIN_REQUESTS="5",
        SOFARE_DEPLOY__VERIFY_REQUESTS="8",
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from sofare import tasks
        from sofare.config import load_config
        from sofare.deploy import rollout
        from sofare.registry import versions

        cfg = load_config()
        c = versions.client(cfg)
        v1 = versions.resolve(cfg, model_home["version"])
        from sofare.training import tracking

        with tracking.scoped(cfg):  # MLflow resolves a models:/m-… source through the process-wide tracking URI
            v2 = c.create_model_version(cfg.mlflow.model_name, source=v1.source, run_id=v1.run_id)
        for key in ("semver", "feature_set_version", "data_window"):
            c.set_model_version_tag(cfg.mlflow.model_name, v2.version, key, v1.tags.get(key, "?"))
        tasks.build_bento(cfg, str(v2.version))
        deployment = rollout.Deployment(cfg, actor="test")
        try:
            yield {"cfg": cfg, "env": env, "v1": str(v1.version), "v2": str(v2.version), "deployment": deployment}
        finally:
            deployment.stop()


def _events(cfg) -> list[dict]:
    from sofare.data import warehouse

    e = warehouse.deployment_events
    with warehouse.get_engine(cfg).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(e).order_by(e.c.at)).mappings().all()]


def test_first_deploy_serves_stable_and_bad_input_changes_nothing(home):
    from sofare import tasks
    from sofare.errors import InputError, NotFoundError
    from sofare.registry import versions

    cfg, d = home["cfg"], home["deployment"]
    status = tasks.deploy(cfg, home["v1"], actor="test")
    assert status["stable"]["version"] == home["v1"] and status["canary"] is None and status["stable"]["running"]
    assert status["champion"] == home["v1"] and status["frontdoor"]["running"]
    assert d.verify(home["v1"]) == [f"{home['v1']}/stable"] * cfg.deploy.verify_requests

    before, events = d.state_path.read_bytes(), len(_events(cfg))
    for weight in (1.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(InputError, match="canary weight"):
            tasks.deploy(cfg, home["v2"], weight)
    with pytest.raises(NotFoundError, match="has no version 99"):
        tasks.deploy(cfg, "99", 0.5)
    versions.client(cfg).delete_registered_model_alias(cfg.mlflow.model_name, "challenger")
    with pytest.raises(NotFoundError, match="no challenger"):
        tasks.deploy(cfg, None, 0.5)
    cli = [sys.executable, "-m", "sofare.cli"]
    for args, message in (
        (["deploy", "--version", home["v2"], "--canary-weight", "nan"], "canary weight"),
        (["deploy", "--version", home["v2"], "--canary-weight", "abc"], "--canary-weight"),
        (["deploy", "--version", "99", "--canary-weight", "0.5"], "no version 99"),
        (["rollback", "--reason", "boredom"], "reason must be one of"),
        (["canary", "promote"], "no canary is live"),
    ):
        done = subprocess.run(cli + args, capture_output=True, text=True, env={**os.environ}, timeout=300, check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and lines and message in lines[-1], (args, done.stderr[-2000:])
    assert d.state_path.read_bytes() == before and len(_events(cfg)) == events, "refused input changed nothing"


def test_a_second_canary_is_refused_and_a_killed_canary_loses_no_request(home):
    from sofare import tasks
    from sofare.deploy.rollout import DeployError
    from sofare.serving import bento

    cfg, d = home["cfg"], home["deployment"]
    status = tasks.deploy(cfg, home["v2"], 0.5, actor="test")
    assert status["canary"]["version"] == home["v2"] and status["canary_weight"] == 0.5
    with pytest.raises(DeployError, match="already live"):
        tasks.deploy(cfg, home["v2"], 0.2)
    try:
        with Load(d.url) as load:
            load.wait_for(60)
            assert {r[1] for r in load.results} == {"stable", "canary"}, "weight 0.5 sends clients to both"
            # A crash: the arbiter first (so it cannot respawn a worker it sees die), then every worker.
            arbiter = d.state().canary.pid
            family = bento.process_tree(arbiter)
            for pid in [arbiter, *sorted(family - {arbiter})]:
                os.kill(pid, signal.SIGKILL)
            _wait_dead(arbiter, family)
            load.wait_for(120)
        assert load.errors == [], load.errors[:5]
        late = [r for r in load.results[-60:] if r[2] != home["v1"] or r[1] != "stable"]
        assert not late, f"after the kill, stable answers every client: {late[:5]}"
    finally:
        tasks.canary(cfg, "abort", "the canary process died", actor="test")
    assert d.state().canary is None and d.verify(home["v1"])


def test_a_failing_canary_is_analysed_as_failed_and_rolled_back(home):
    from sofare.deploy import canary

    cfg, d = home["cfg"], home["deployment"]
    broken = {"SOFARE_WAREHOUSE__URL": "postgresql://sofare@127.0.0.1:9/nowhere"}  # reads fail: 500 answers
    d.start_canary(home["v2"], 0.5, env=broken)
    send = traffic(d.url, "/predict_latest", {"symbol": cfg.market.symbol}, 60)
    outcome = canary.analyse(cfg, d, [0.5, 1.0], interval=0, sleep=send)
    assert outcome["decision"] == "abort" and outcome["reason"] == "incident", outcome
    step = outcome["steps"][-1]
    assert step["verdict"] == "failure" and step["weight"] == 0.5
    error_rate = next(m for m in step["measurements"] if m["name"] == "error_rate")
    assert error_rate["outcome"] == "failure" and error_rate["canary"] > cfg.deploy.max_error_rate
    result = canary.finish(cfg, d, outcome)
    assert result["rollback"]["target"] == home["v1"] and result["rollback"]["decision"] == "done"
    assert d.state().canary is None and d.verify(home["v1"])
    actions = [(e["action"], e["decision"]) for e in _events(cfg)[-3:]]
    assert actions == [("step", "done"), ("analysis", "abort"), ("rollback", "done")], actions
    from sofare.data import warehouse

    with warehouse.get_engine(cfg).connect() as conn:
        alert = conn.execute(
            sa.select(warehouse.alerts.c.message).order_by(warehouse.alerts.c.raised_at.desc())
        ).first()
    assert alert is not None and f"rolled back to version {home['v1']}" in alert[0]


def test_promotion_to_stable_under_load_drops_nothing(home):
    from sofare.deploy import canary
    from sofare.registry import versions

    cfg, d = home["cfg"], home["deployment"]
    d.start_canary(home["v2"], 0.5)
    send = traffic(d.url, "/predict_latest", {"symbol": cfg.market.symbol}, 60)
    outcome = canary.analyse(cfg, d, [0.5, 1.0], interval=0, sleep=send)
    assert outcome["decision"] == "promote", outcome
    assert [s["verdict"] for s in outcome["steps"]] == ["success", "success"]
    with Load(d.url) as load:
        load.wait_for(20)
        canary.finish(cfg, d, outcome)  # a fresh stable of v2, a reload, the old processes stop
        load.wait_for(40)
    assert load.errors == [], load.errors[:5]
    assert load.results[-1][2] == home["v2"] and load.results[-1][1] == "stable"
    assert d.state().stable.version == home["v2"] and d.state().canary is None
    assert versions.alias_version(cfg, "champion") == home["v2"]


def test_rollback_dag_restores_the_previous_champion_once_and_refuses_unknown_versions(home):
    from sofare.runtime import DagRunFailed, run_dag

    cfg, d = home["cfg"], home["deployment"]
    before = d.state_path.read_bytes()
    with pytest.raises(DagRunFailed, match="failed tasks: \\['rollback'\\]"):
        run_dag(cfg, "sofare_rollback", conf={"reason": "incident", "details": "test", "target_version": "99"})
    assert d.state_path.read_bytes() == before, "an unknown target changes nothing"

    run_dag(
        cfg,
        "sofare_rollback",
        conf={"reason": "bad-predictions", "details": "v2 says up all day", "target_version": None},
    )
    assert d.state().stable.version == home["v1"], "the previous champion serves again"
    assert d.verify(home["v1"])
    run_dag(
        cfg, "sofare_rollback", conf={"reason": "bad-predictions", "details": "clicked twice", "target_version": None}
    )
    rollbacks = [e for e in _events(cfg) if e["action"] == "rollback"]
    assert [e["decision"] for e in rollbacks[-2:]] == ["done", "noop"]
    assert "verified 8 live requests" in rollbacks[-1]["reason"]


def test_deploy_dag_without_traffic_never_promotes(home):
    from sofare.runtime import run_dag

    cfg, d = home["cfg"], home["deployment"]
    run_dag(cfg, "sofare_deploy", conf={"version": home["v2"], "steps": [0.5, 1.0], "interval_seconds": 0})
    analyses = [e for e in _events(cfg) if e["action"] == "analysis"][-2:]
    assert [e["decision"] for e in analyses] == ["retry", "abort"], "inconclusive twice, then abort"
    assert all(json.loads(e["measurements"])[0]["outcome"] == "inconclusive" for e in analyses)
    assert d.state().stable.version == home["v1"] and d.state().canary is None
