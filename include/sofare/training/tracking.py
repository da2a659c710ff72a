"""MLflow tracking for training runs: where runs go (config `mlflow.*`) and which code made them.

Tracking and registry default to SQLite under var/ (sqlite:///var/mlflow.db, artifacts in
var/mlartifacts); `mlflow.tracking_uri` points them at a server in production.
"""

from __future__ import annotations

import logging
import subprocess
from typing import TYPE_CHECKING

import mlflow

if TYPE_CHECKING:
    from sofare.config import Config
    from sofare.contracts import WalkForward


def setup(cfg: Config) -> str:
    """Point MLflow at the configured tracking store; the experiment's id (created on first use)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow_tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    cfg.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.mlflow_artifacts.as_uri())


def client(cfg: Config) -> mlflow.MlflowClient:
    setup(cfg)
    return mlflow.MlflowClient()


def git_commit(cfg: Config) -> str:
    """The commit the code was trained from (`-dirty` with uncommitted changes), or 'unknown'."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cfg.root, capture_output=True, text=True,
                              timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cfg.root,
                               capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    if done.returncode != 0:
        return "unknown"
    return done.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _key(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def walk_forward_metrics(wf: WalkForward) -> dict[str, float]:
    """The walk-forward evidence as flat `wf_*` MLflow metrics (pooled with CIs, per fold, paired, policy,
    ablations)."""
    out: dict[str, float] = {"wf_folds": len(wf.folds), "wf_seconds": wf.seconds}
    for predictor, scores in wf.pooled.items():
        for metric, s in scores.items():
            out.update({f"wf_{predictor}_{metric}": s.value, f"wf_{predictor}_{metric}_ci_low": s.ci_low,
                        f"wf_{predictor}_{metric}_ci_high": s.ci_high})
    for fold in wf.folds:
        out[f"wf_fold{fold.fold}_sofare_m3"] = fold.score.value
        out.update({f"wf_fold{fold.fold}_{b}": s.value for b, s in fold.baselines.items()})
    for p in wf.paired:
        out.update({f"wf_paired_{p.baseline}_diff": p.difference.value, f"wf_paired_{p.baseline}_ci_low": p.difference.ci_low,
                    f"wf_paired_{p.baseline}_ci_high": p.difference.ci_high})
    for name, result in wf.policy.items():
        out.update({f"wf_policy_{_key(name)}_{k}": float(v) for k, v in result.model_dump().items()})
    out.update({f"wf_ablation_{_key(k)}": s.value for k, s in wf.ablations.items()})
    if wf.reliability is not None:
        out.update({"wf_brier_raw": wf.reliability.brier_raw, "wf_brier_calibrated": wf.reliability.brier,
                    "wf_ece_raw": wf.reliability.ece_raw, "wf_ece_calibrated": wf.reliability.ece})
    return {k: float(v) for k, v in out.items()}
