"""The promotion gate: every rule on measured facts, and the recorded verdict end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from sofare.data import warehouse
from sofare.registry import gate, versions

RULES = SimpleNamespace(baseline_margin=0.0, champion_tolerance=0.01, max_model_mb=50, max_latency_ms=25)


def _facts(**changes):
    facts = {
        "sane": True,
        "sane_detail": "ok",
        "primary": 0.56,
        "size_mb": 3.0,
        "latency_ms": 4.0,
        "baselines": {"persistence": 0.51, "majority": 0.5, "linear": 0.54},
        "champion": None,
    }
    facts.update(changes)
    return facts


def _failed(checks):
    return [c.name for c in checks if not c.passed]


def test_a_first_model_that_beats_every_baseline_passes():
    checks = gate.judge(_facts(), RULES, "roc_auc")
    assert _failed(checks) == []
    assert "no champion yet" in next(c.detail for c in checks if c.name == "not worse than champion")


@pytest.mark.parametrize(
    ("facts", "failed"),
    [
        (_facts(sane=False), ["sane outputs"]),
        (_facts(primary=0.53), ["beats linear"]),
        (_facts(primary=math.nan), ["beats persistence", "beats majority", "beats linear"]),
        (
            _facts(
                champion={
                    "version": "3",
                    "comparable": True,
                    "windows": 500,
                    "candidate": 0.56,
                    "score": 0.58,
                    "feature_set": "fs2",
                }
            ),
            ["not worse than champion"],
        ),
        (
            _facts(
                champion={
                    "version": "3",
                    "comparable": False,
                    "windows": 0,
                    "candidate": None,
                    "score": None,
                    "feature_set": "fs1",
                }
            ),
            ["not worse than champion"],
        ),
        (_facts(size_mb=80.0), ["size budget"]),
        (_facts(latency_ms=30.0), ["latency budget"]),
    ],
)
def test_each_rule_rejects(facts, failed):
    assert _failed(gate.judge(facts, RULES, "roc_auc")) == failed


def test_a_champion_within_tolerance_does_not_block():
    champion = {
        "version": "3",
        "comparable": True,
        "windows": 500,
        "candidate": 0.575,
        "score": 0.58,
        "feature_set": "fs2",
    }
    assert _failed(gate.judge(_facts(champion=champion), RULES, "roc_auc")) == []


def test_the_gate_decides_on_pooled_walk_forward_evidence_not_on_the_test_window():
    from sofare.contracts import EvaluationReport, MetricCI, Paired, WalkForward

    def scores(model: float, linear: float) -> dict:
        return {
            p: {"roc_auc": MetricCI(value=v, ci_low=v - 0.02, ci_high=v + 0.02)}
            for p, v in (
                ("sofare_m3", model),
                ("persistence", 0.5),
                ("majority", 0.5),
                ("linear", linear),
                ("gbm", 0.5),
            )
        }

    lucky_window = scores(0.60, 0.52)  # one good test window ...
    pooled = scores(0.51, 0.53)  # ... that the folds do not confirm
    paired = [
        Paired(
            baseline="linear",
            difference=MetricCI(value=-0.02, ci_low=-0.04, ci_high=0.0),
            share_not_better=0.97,
            verdict="no significant difference",
        )
    ]
    wf = WalkForward.model_construct(mode="expanding", folds=[object()] * 4, pooled=pooled, paired=paired)
    report = EvaluationReport.model_construct(scores=lucky_window, primary_metric="roc_auc", wf=wf)
    where, evidence = report.evidence()
    assert where == "walk-forward, 4 folds pooled" and evidence is pooled
    older = EvaluationReport.model_construct(scores=lucky_window, primary_metric="roc_auc", wf=None)
    assert older.evidence() == ("test window", lucky_window), "versions trained before walk-forward"
    facts = _facts(
        primary=0.51,
        baselines={b: pooled[b]["roc_auc"].value for b in ("persistence", "majority", "linear", "gbm")},
        evidence=where,
        paired={"linear": "no significant difference (difference -0.0200 ...)"},
    )
    checks = gate.judge(facts, RULES, "roc_auc")
    assert _failed(checks) == ["beats linear"]
    detail = next(c.detail for c in checks if c.name == "beats linear")
    assert "walk-forward, 4 folds pooled" in detail and "paired bootstrap: no significant difference" in detail


def test_the_gate_records_its_verdict_and_aliases_only_a_pass(model_home, monkeypatch):
    cfg = model_home["cfg"]
    version = model_home["version"]
    first = model_home["verdict"]
    assert first.version == version and first.champion is None
    assert first.passed == all(c.passed for c in first.checks)
    c = versions.client(cfg)
    tags = c.get_model_version(cfg.mlflow.model_name, version).tags
    assert tags["promotion_verdict"] == ("passed" if first.passed else "rejected")
    assert json.loads(tags["promotion_reasons"]) == first.reasons
    aliases = c.get_registered_model(cfg.mlflow.model_name).aliases
    assert (str(aliases.get("challenger")) == version) == first.passed

    # impossible budgets and margins: the same version is now rejected, and loses nothing it had
    if "challenger" in aliases:
        c.delete_registered_model_alias(cfg.mlflow.model_name, "challenger")
    for key, value in {
        **model_home["env"],
        "SOFARE_PROMOTION__MAX_LATENCY_MS": "0.0001",
        "SOFARE_PROMOTION__BASELINE_MARGIN": "1.0",
    }.items():
        monkeypatch.setenv(key, value)
    from sofare.config import load_config

    strict = gate.gate(load_config(), version, actor="test")
    failed = [x.name for x in strict.checks if not x.passed]
    assert {"latency budget", "beats persistence", "beats majority", "beats linear"} <= set(failed)
    assert "challenger" not in c.get_registered_model(cfg.mlflow.model_name).aliases
    with warehouse.get_engine(cfg).connect() as conn:
        rows = conn.execute(sa.select(warehouse.audit_log).order_by(warehouse.audit_log.c.at)).mappings().all()
    assert [(r["action"], r["model_version"], r["outcome"]) for r in rows][-1] == (
        "promotion_gate",
        version,
        "rejected",
    )
    assert rows[-1]["actor"] == "test" and "latency budget" in rows[-1]["details"]


def _task_states(run) -> dict[str, str]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return {ti.task_id: str(ti.state) for ti in run.get_task_instances(session=session)}


def test_promote_dag_stops_at_a_rejection_and_builds_after_an_override(model_home, airflow_db, monkeypatch, tmp_path):
    from sofare import runtime
    from sofare.config import load_config

    for key, value in {**model_home["env"], "SOFARE_PROMOTION__BASELINE_MARGIN": "1.0"}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config()
    version = model_home["version"]
    run = runtime.run_dag(cfg, "sofare_promote", conf={"version": version}, logfile=tmp_path / "dag.log")
    assert _task_states(run) == {"gate": "success", "build": "skipped", "containerize": "skipped"}

    run = runtime.run_dag(
        cfg,
        "sofare_promote",
        conf={"version": version, "override_reason": "demo of the serving path"},
        logfile=tmp_path / "dag.log",
    )
    assert set(_task_states(run).values()) == {"success"}
    c = versions.client(cfg)
    tags = c.get_model_version(cfg.mlflow.model_name, version).tags
    assert tags["promotion_verdict"] == "overridden" and tags["bento_tag"].startswith("sofare:")
    assert tags["container"].startswith("not built: ")  # no container engine on this machine
    assert str(c.get_registered_model(cfg.mlflow.model_name).aliases["challenger"]) == version
    dockerfiles = list((cfg.var_dir / "containers").glob("*/env/docker/Dockerfile"))
    assert any(tags["bento_tag"].split(":")[1] in str(p) for p in dockerfiles)
    with warehouse.get_engine(cfg).connect() as conn:
        actions = [
            (r["action"], r["outcome"])
            for r in conn.execute(sa.select(warehouse.audit_log).order_by(warehouse.audit_log.c.at)).mappings()
        ]
    assert actions[-3:] == [
        ("promotion_gate", "overridden"),
        ("bento_build", "built"),
        ("containerize", "context_only"),
    ]


def test_cli_promote_exits_1_on_a_rejection_and_build_says_why_no_image(model_home):
    import os
    import subprocess
    import sys

    env = {**os.environ, **model_home["env"], "SOFARE_PROMOTION__MAX_LATENCY_MS": "0.0001"}

    def sofare(*args):
        return subprocess.run(
            [sys.executable, "-m", "sofare.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )

    done = sofare("promote", "--version", model_home["version"], "--actor", "oncall")
    assert done.returncode == 1
    assert "REJECTED" in done.stdout and "FAIL latency budget" in done.stdout
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"sofare promote: error: version {model_home['version']} rejected by the promotion gate"
    )
    built = sofare("build", "--version", model_home["version"])
    assert built.returncode == 0, built.stderr[-2000:]
    assert "bento sofare:" in built.stdout and "no image built: no container engine" in built.stdout
