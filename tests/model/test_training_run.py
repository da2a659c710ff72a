"""Training end to end: the sofare_train DAG under dag.test(), the registered version in MLflow
(tags, metrics with CIs, baselines, plots, model card, a loadable pyfunc), reproducibility, a killed
study that resumes, and the `sofare train` CLI."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest

from sofare import runtime, tasks
from sofare.explain import global_view
from sofare.registry import model_card, versions
from sofare.training import tuning

WINDOW = {"start": "2024-01-12", "end": "2024-03-31"}


def _conf(**extra):
    return {"n_trials": 3, "timeout": 600, "max_epochs": 2, **WINDOW, **extra}


def test_train_dag_registers_a_version_with_honest_metrics_and_reproduces_them(
    train_cfg, airflow_db, tmp_path, monkeypatch
):
    monkeypatch.setenv("SOFARE_TRAINING__WALK_FORWARD__FOLDS", "3")  # the full evidence: folds, ablations, global view
    monkeypatch.setenv("SOFARE_EVALUATION__ABLATIONS", "true")
    monkeypatch.setenv("SOFARE_EVALUATION__GLOBAL_VIEW", "true")
    monkeypatch.setenv("SOFARE_EVALUATION__GLOBAL_VIEW_WINDOWS", "48")  # (~2 s: 48 windows, 1 shuffle, 3 folds)
    monkeypatch.setenv("SOFARE_EVALUATION__GLOBAL_VIEW_REPEATS", "1")
    from sofare.config import load_config

    cfg = load_config()
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    runtime.run_dag(cfg, "sofare_train", conf=_conf(), logfile=tmp_path / "dag.log")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before, (
        "training leaves MLflow's process-wide URIs as it found them (dag.test runs the tasks in this process)"
    )
    c = versions.client(cfg)
    [v1] = c.search_model_versions("name = 'sofare-m3'")
    tags = v1.tags
    assert tags["semver"] == "1.0.0" and tags["data_window"] == "2024-01-12..2024-03-31"
    assert tags["feature_set_version"].startswith("fs") and tags["git_commit"] and tags["architecture"] == "SofareM3/1"
    run = c.get_run(v1.run_id)
    metrics = run.data.metrics
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "mcc", "brier", "mae", "rmse", "r2", "ic"):
        for prefix in ("test", "wf_sofare_m3"):
            assert (
                metrics[f"{prefix}_{name}_ci_low"] <= metrics[f"{prefix}_{name}"] <= metrics[f"{prefix}_{name}_ci_high"]
            )
        for baseline in ("persistence", "majority", "linear", "gbm"):
            assert f"baseline_{baseline}_{name}" in metrics and f"wf_{baseline}_{name}_ci_low" in metrics
    assert {"backtest_strategy_sharpe", "backtest_buy_and_hold_total_return", "backtest_strategy_max_drawdown"} <= set(
        metrics
    )
    assert metrics["wf_folds"] == 3 and {f"wf_fold{k}_sofare_m3" for k in range(3)} <= set(metrics)
    assert {f"wf_paired_{b}_diff" for b in ("persistence", "majority", "linear", "gbm")} <= set(metrics)
    assert {"wf_ablation_micro", "wf_ablation_micro_safe", "wf_ablation_micro_safe_macro"} <= set(metrics)
    assert {
        "wf_policy_sofare_m3_fees_paid",
        "wf_policy_sofare_m3_turnover",
        "wf_policy_buy_and_hold_total_return",
        "policy_test_fees_paid",
        "calibration_scale",
    } <= set(metrics)
    artifacts = {a.path for a in c.list_artifacts(v1.run_id, "plots")}
    assert artifacts == {
        f"plots/{p}.png"
        for p in (
            "learning_curves",
            "confusion_matrix",
            "calibration",
            "equity_curve",
            "walk_forward",
            "reliability",
            "policy_equity",
            "global_view",
        )
    }
    report = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=v1.run_id, artifact_path="evaluation.json", tracking_uri=cfg.mlflow_tracking_uri
            )
        ).read_text()
    )
    assert report["purge_rows"] >= 24 + 1 and report["parts"]["test"] > 0
    wf = report["wf"]
    folds = wf["folds"]
    assert len(folds) == 3 and all(a["test_end"] < b["test_start"] for a, b in itertools.pairwise(folds))
    assert all(f["train_rows"] < g["train_rows"] for f, g in itertools.pairwise(folds)), "expanding windows"
    assert folds[-1]["test_end"][:10] == report["test_end"][:10], "the last fold ends where the data end"
    assert {p["baseline"] for p in wf["paired"]} == {"persistence", "majority", "linear", "gbm"}
    assert set(wf["ablations"]) == {"micro", "micro+safe", "micro+safe+macro"}
    # nothing was tuned on test data: calibration and policy name the validation days they were fitted on
    validation_days = report["calibration"]["fitted_on"]
    assert validation_days == report["policy"]["chosen_on"] and validation_days[:10] < report["test_start"][:10]
    assert validation_days[-10:] < report["test_start"][:10]
    meta = versions.download(cfg, str(v1.version))
    served = json.loads((next(meta.rglob("meta.json"))).read_text())
    assert served["policy"] == report["policy"] and served["calibration"] == report["calibration"]
    children = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{v1.run_id}'")
    assert len(children) == 3 and {r.data.tags["sofare.kind"] for r in children} == {"trial"}
    card = (cfg.var_dir / "reports" / "model_card.md").read_text()
    assert f"MLflow run `{v1.run_id}`" in card and "| ROC-AUC |" in card and "nan" not in card.lower()
    for section in (
        "## Walk-forward evidence",
        "### Ablations",
        "## Calibration",
        "## Decision policy",
        "gradient-boosted trees",
        "logistic / ridge",
        "the study took",
        "fees + slippage paid",
    ):
        assert section in card, section
    for plot in ("walk_forward", "reliability", "policy_equity", "global_view"):
        assert (cfg.var_dir / "reports" / "model_card_plots" / f"{plot}.png").stat().st_size > 1000
    # the global view: both views for every input column, from the final model and the 3 folds' models
    view = model_card.global_view(cfg, v1)
    assert view is not None and view.metric == "roc_auc" and view.permutation_folds == 3
    assert [f.name for f in view.features] == list(served["columns"])
    assert [m.name for m in view.modalities] == ["micro", "safe", "macro"]
    assert view.attribution_windows == 48 and view.permutation_windows == [48, 48, 48]
    assert view.test_window == f"{report['test_start']}..{report['test_end']}"
    for item in view.features + view.modalities:
        assert item.attribution is not None and item.attribution >= 0 and len(item.permutation_folds) == 3
    assert sum(f.attribution_share for f in view.features) == pytest.approx(1.0)
    assert view.agreement is not None and view.agreement.features == len(view.features)
    assert "## What the model relies on (global view)" in card
    said = global_view.findings(view, "ROC-AUC")
    assert said[0].startswith("By permutation, ") and all(f"- {s}" in card for s in said), said

    from sofare.training import tracking

    with tracking.scoped(cfg):
        model = mlflow.pyfunc.load_model(f"models:/sofare-m3/{v1.version}")
    example = np.asarray(model.input_example, dtype=np.float32)
    out = model.predict(example)
    assert list(out.columns) == ["prob_up", "expected_return"] and 0 <= out["prob_up"].iloc[0] <= 1
    assert example.shape[:2] == (1, 24)

    # same data, same seed: the resumed study runs no new trial and the final fit gives the same numbers
    monkeypatch.setenv("SOFARE_EVALUATION__ABLATIONS", "false")  # (the ablations' refits are the slow part)
    monkeypatch.setenv("SOFARE_EVALUATION__GLOBAL_VIEW", "false")  # (seeded: tests/unit/test_global_view.py)
    runtime.run_dag(cfg, "sofare_train", conf=_conf(), logfile=tmp_path / "dag.log")
    v2 = max(c.search_model_versions("name = 'sofare-m3'"), key=lambda v: int(v.version))
    assert str(v2.version) == "2" and v2.tags["semver"] == "1.0.1"
    again = c.get_run(v2.run_id).data.metrics
    reproduced = ("test_", "baseline_", "backtest_", "wf_", "policy_")
    same = {k for k in metrics if k.startswith(reproduced) and k != "wf_seconds" and "ablation" not in k}
    assert len(same) > 200 and {k: again[k] for k in same} == {k: metrics[k] for k in same}
    study = optuna.load_study(
        study_name=tags.get("study") or c.get_run(v2.run_id).data.tags["study"], storage=tuning.storage(cfg)
    )
    assert tuning.finished_trials(study) == 3


def test_a_killed_study_resumes(train_cfg, monkeypatch):
    cfg = train_cfg
    plan = tasks.train_plan(cfg, n_trials=3, timeout=600, max_epochs=3, **WINDOW)
    code = (
        "import json, sys; from sofare import tasks; "
        "from sofare.config import load_config; tasks.train_tune(load_config(), json.loads(sys.argv[1]), 0)"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(plan)],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    study = optuna.load_study(study_name=plan["study"], storage=tuning.storage(cfg))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill at a known point: trial 1 finished, a later one has parameters
        trials = study.get_trials(deepcopy=False)
        if (
            trials[:1]
            and trials[0].state == optuna.trial.TrialState.COMPLETE
            and trials[-1].state == optuna.trial.TrialState.RUNNING
            and trials[-1].params
        ):
            break
        assert worker.poll() is None, "the worker ended before it could be killed"
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    first = study.get_trials(deepcopy=False)[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials(deepcopy=False))

    monkeypatch.setattr(tuning, "GRACE_SECONDS", 1)  # the dead worker's heartbeat is already stale
    time.sleep(2)
    result = tasks.train_tune(cfg, plan, 0)
    trials = study.get_trials(deepcopy=False)
    assert tuning.finished_trials(study) == 3 and result["finished"] == 3
    assert trials[0].params == first.params and trials[0].value == first.value, "finished work is kept"
    killed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) == 1
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert killed[0].params, "killed after it had suggested parameters"
    assert retried, "the killed trial is retried"
    # a trial may be killed between two suggestions: the retry keeps every parameter the killed one had
    assert {k: retried[0].params[k] for k in killed[0].params} == killed[0].params


def test_cli_train_prints_the_version_beside_the_baselines_and_refuses_unvalidated_days(train_cfg):
    env = {**os.environ}

    def sofare(*args):
        return subprocess.run(
            [sys.executable, "-m", "sofare.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )

    done = sofare("train", "--trials", "2", "--max-epochs", "1", "--start", WINDOW["start"], "--end", WINDOW["end"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered sofare-m3 version 1 (semver 1.0.0)" in done.stdout
    header = next(line for line in done.stdout.splitlines() if line.startswith("test metric"))
    assert header.split() == ["test", "metric", "sofare_m3", "persistence", "majority", "linear", "gbm"]
    assert "(walk-forward, 2 folds pooled)" in done.stdout.splitlines()[0]
    assert any(line.startswith("walk-forward") for line in done.stdout.splitlines())
    assert any(line.startswith("policy ") and "after costs" in line for line in done.stdout.splitlines())
    bad = sofare("train", "--trials", "1", "--max-epochs", "1", "--start", "2023-09-01", "--end", "2024-01-31")
    assert bad.returncode == 1
    assert "not validated: 2023-09-01 .. 2023-09-30" in bad.stderr.strip().splitlines()[-1]
