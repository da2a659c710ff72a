"""MLflow tracking and the `sofare-m3` registry: the pyfunc model, semver tags, lookups.

Tracking and registry default to SQLite under var/ (sqlite:///var/mlflow.db, artifacts in
var/mlartifacts); `mlflow.tracking_uri` points them at a server in production.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from sofare.config import Config


def setup(cfg: Config) -> str:
    """Point MLflow at the configured tracking store; the experiment's id (created on first use)."""
    import logging

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


# --- the model as an MLflow pyfunc -------------------------------------------------------------------


class SofareM3Pyfunc(mlflow.pyfunc.PythonModel):
    """Input: raw feature windows float32 [batch, lookback, features] in `meta.json`'s column order
    (the feature function's output); output: prob_up and expected_return per window."""

    def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow validates annotated signatures
        self.bundle = load_bundle(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        prob, ret = self.bundle.predict_windows(np.asarray(model_input, dtype=np.float32))
        return pd.DataFrame({"prob_up": prob, "expected_return": ret})


class Bundle:
    """The trained network with everything needed to use it: scaler, columns, lookback, versions."""

    def __init__(self, model: Any, meta: dict[str, Any]) -> None:
        from sofare.training import Scaler

        self.model = model
        self.meta = meta
        self.scaler = Scaler.from_dict(meta["scaler"])
        self.lookback = int(meta["hyper"]["lookback"])
        self.columns = list(meta["columns"])
        self.groups = {k: np.asarray(v, dtype=int) for k, v in meta["groups"].items()}

        self.runtime = "torch"
        self._onnx: Any = None

    def use_onnx(self, path: Path) -> None:
        """Export the network to ONNX at `path` and run it with ONNX Runtime from now on."""
        import onnxruntime as ort
        import torch

        shapes = {g: len(self.groups[g]) for g in ("micro", "safe", "macro")}
        example = tuple(torch.zeros(2, self.lookback, max(shapes[g], 1)) for g in ("micro", "safe", "macro"))
        torch.onnx.export(self.model, example, str(path), input_names=["micro", "safe", "macro"],
                          output_names=["logits", "ret"], dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in ("micro", "safe", "macro", "logits", "ret")})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self._onnx = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.runtime = "onnx"

    def _network(self, micro: np.ndarray, safe: np.ndarray, macro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._onnx is not None:
            logits, ret = self._onnx.run(None, {"micro": micro, "safe": safe, "macro": macro})
            return logits, ret
        import torch

        with torch.no_grad():
            logits, ret = self.model(torch.from_numpy(micro), torch.from_numpy(safe), torch.from_numpy(macro))
        return logits.numpy(), ret.numpy()

    def predict_windows(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw feature windows [B, L, F] -> (prob_up, expected log return)."""
        if raw.ndim != 3 or raw.shape[1:] != (self.lookback, len(self.columns)):
            raise ValueError(f"expected windows of shape (batch, {self.lookback}, {len(self.columns)}), got {raw.shape}")
        x = (raw.astype(np.float64) - self.scaler.mean) / self.scaler.std
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        logits, ret = self._network(*(np.ascontiguousarray(x[:, :, self.groups[g]]) for g in ("micro", "safe", "macro")))
        z = logits - logits.max(axis=1, keepdims=True)
        prob = (np.exp(z[:, 1]) / np.exp(z).sum(axis=1)).astype(np.float64)
        return prob, ret.astype(np.float64) * self.scaler.ret_std + self.scaler.ret_mean


def save_bundle(directory: Path, model: Any, meta: dict[str, Any]) -> Path:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, default=float))
    return directory


def load_bundle(directory: Path) -> Bundle:
    import torch

    from sofare.model import SofareM3

    meta = json.loads((directory / "meta.json").read_text())
    n = meta["n_inputs"]
    model = SofareM3(n["micro"], n["safe"], n["macro"], meta["hyper"], **meta["loss"])
    model.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))
    model.eval()
    return Bundle(model, meta)


def log_model(cfg: Config, bundle_dir: Path, example: np.ndarray) -> Any:
    """Log the pyfunc under the active run and register a new `sofare-m3` version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1], example.shape[2]))]),
        outputs=Schema([ColSpec("double", "prob_up"), ColSpec("double", "expected_return")]),
    )
    return mlflow.pyfunc.log_model(
        name="model", python_model=SofareM3Pyfunc(), artifacts={"model": str(bundle_dir)}, signature=signature,
        input_example=example.astype(np.float32), registered_model_name=cfg.mlflow.model_name,
        pip_requirements=[], metadata={"feature_set_version": json.loads((bundle_dir / "meta.json").read_text())["feature_set_version"]},
    )


# --- semver ----------------------------------------------------------------------------------------


def next_semver(previous: dict[str, str] | None, architecture: str, feature_set: str, primary: float, metric: str) -> str:
    """MAJOR: architecture or feature set changed; MINOR: primary metric up by > 0.05; PATCH otherwise."""
    if not previous or "semver" not in previous:
        return "1.0.0"
    major, minor, patch = (int(x) for x in previous["semver"].split("."))
    if previous.get("architecture") != architecture or previous.get("feature_set_version") != feature_set:
        return f"{major + 1}.0.0"
    before = float(previous.get(f"test_{metric}", "nan"))
    if np.isfinite(before) and primary - before > 0.05:
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def latest_version_tags(cfg: Config, below: int | None = None) -> dict[str, str] | None:
    """Tags of the newest registered version (older than `below` when given)."""
    c = client(cfg)
    versions = [v for v in c.search_model_versions(f"name = '{cfg.mlflow.model_name}'")
                if below is None or int(v.version) < below]
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    return dict(newest.tags)
