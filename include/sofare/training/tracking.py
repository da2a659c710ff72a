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
