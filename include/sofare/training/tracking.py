"""MLflow tracking for training runs: where runs go (config `mlflow.*`) and which code made them.

Tracking and registry default to SQLite under var/ (sqlite:///var/mlflow.db, artifacts in
var/mlartifacts); `mlflow.tracking_uri` points them at a server in production.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import mlflow

if TYPE_CHECKING:
    from sofare.config import Config
    from sofare.contracts import WalkForward


def client(cfg: Config) -> mlflow.MlflowClient:
    """A client of the configured tracking store and registry (both given: nothing process-wide is read or set)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow.MlflowClient(tracking_uri=cfg.mlflow_tracking_uri, registry_uri=cfg.mlflow_tracking_uri)


def experiment_id(cfg: Config) -> str:
    """The experiment's id (created on first use, with its artifacts under var/mlartifacts)."""
    c = client(cfg)
    experiment = c.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    cfg.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return c.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.mlflow_artifacts.as_uri())


@contextmanager
def scoped(cfg: Config) -> Iterator[None]:
    """For MLflow's fluent API (start_run, log_*, pyfunc.log_model, models:/ downloads), which reads process-wide
    URIs: they point at the configured store inside this block only, and what was there is put back after, so a
    caller's own MLflow settings survive a training run (library code leaves process state as it found it)."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow_tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def git_commit(cfg: Config) -> str:
    """The commit the code was trained from (`-dirty` with uncommitted changes), or 'unknown'."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=cfg.root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cfg.root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
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
            out.update(
                {
                    f"wf_{predictor}_{metric}": s.value,
                    f"wf_{predictor}_{metric}_ci_low": s.ci_low,
                    f"wf_{predictor}_{metric}_ci_high": s.ci_high,
                }
            )
    for fold in wf.folds:
        out[f"wf_fold{fold.fold}_sofare_m3"] = fold.score.value
        out.update({f"wf_fold{fold.fold}_{b}": s.value for b, s in fold.baselines.items()})
    for p in wf.paired:
        out.update(
            {
                f"wf_paired_{p.baseline}_diff": p.difference.value,
                f"wf_paired_{p.baseline}_ci_low": p.difference.ci_low,
                f"wf_paired_{p.baseline}_ci_high": p.difference.ci_high,
            }
        )
    for name, result in wf.policy.items():
        out.update({f"wf_policy_{_key(name)}_{k}": float(v) for k, v in result.model_dump().items()})
    out.update({f"wf_ablation_{_key(k)}": s.value for k, s in wf.ablations.items()})
    if wf.reliability is not None:
        out.update(
            {
                "wf_brier_raw": wf.reliability.brier_raw,
                "wf_brier_calibrated": wf.reliability.brier,
                "wf_ece_raw": wf.reliability.ece_raw,
                "wf_ece_calibrated": wf.reliability.ece,
            }
        )
    return {k: float(v) for k, v in out.items()}
