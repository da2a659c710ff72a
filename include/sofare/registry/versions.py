"""The `sofare-m3` registry in MLflow: registering a trained model, resolving versions and aliases,
reading a version's report and files, semver tags.

Every "which version?" question goes through `resolve`: a number, an alias (`champion`,
`challenger`) or None for the newest registered version.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel  # mlflow.pyfunc is a lazy loader: mypy sees no class through it

from sofare.contracts import EvaluationReport, RegisteredVersion, model_dir
from sofare.errors import NotFoundError
from sofare.training.tracking import client, scoped

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from sofare.config import Config
    from sofare.training.pipeline import Trained

log = logging.getLogger(__name__)
ALIASES = ("champion", "challenger")


# --- resolving versions -------------------------------------------------------------------------------


def resolve(cfg: Config, ref: str | int | None = None) -> ModelVersion:
    """The registered version `ref` names: a number, an alias, or None/'latest' for the newest."""
    c = client(cfg)
    name = cfg.mlflow.model_name
    ref = None if ref in (None, "", "latest") else str(ref)
    if ref is None:
        versions = c.search_model_versions(f"name = '{name}'")
        if not versions:
            raise NotFoundError(f"no registered {name} version; run `sofare train` first")
        return max(versions, key=lambda v: int(v.version))
    try:
        if ref.isdigit():
            return c.get_model_version(name, ref)
        return c.get_model_version_by_alias(name, ref)
    except MlflowException:
        what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
        raise NotFoundError(f"{name} has no {what}") from None


def version_of(cfg: Config, ref: str | int | None = None, *, default_alias: str | None = None) -> str:
    """The version number of `ref`; with no `ref`, the `default_alias` if it is set, else the newest."""
    if ref in (None, "") and default_alias:
        try:
            return str(resolve(cfg, default_alias).version)
        except NotFoundError:
            pass
    return str(resolve(cfg, ref).version)


def alias_version(cfg: Config, alias: str) -> str | None:
    """The version an alias points at, or None when it is not set."""
    try:
        return str(resolve(cfg, alias).version)
    except NotFoundError:
        return None


def set_alias(cfg: Config, alias: str, version: str) -> None:
    client(cfg).set_registered_model_alias(cfg.mlflow.model_name, alias, str(version))


def set_tags(cfg: Config, version: str, tags: dict[str, str]) -> None:
    c = client(cfg)
    for key, value in tags.items():
        c.set_model_version_tag(cfg.mlflow.model_name, str(version), key, value)


def report(cfg: Config, mv: ModelVersion) -> EvaluationReport:
    """The evaluation report of a version's training run."""
    run_id = mv.run_id or mv.tags.get("training_run_id")
    path = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="evaluation.json", tracking_uri=cfg.mlflow_tracking_uri
        )
    )
    return EvaluationReport.model_validate_json(path.read_text())


def registered(cfg: Config, ref: str | int | None = None) -> RegisteredVersion:
    """A registered version (default: the newest) with its semver and evaluation report."""
    mv = resolve(cfg, ref)
    return RegisteredVersion(
        model=cfg.mlflow.model_name,
        version=str(mv.version),
        semver=mv.tags.get("semver", "?"),
        run_id=mv.run_id or "",
        model_card=str(cfg.var_dir / "reports" / "model_card.md"),
        report=report(cfg, mv),
    )


def download(cfg: Config, version: str) -> Path:
    """A version's model directory (meta.json, weights, ONNX and TorchScript files), downloaded."""
    with scoped(cfg):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.mlflow.model_name}/{version}"))
    return model_dir(local)


# --- registering ----------------------------------------------------------------------------------------


class SofareM3Pyfunc(PythonModel):
    """Input: raw feature windows float32 [batch, lookback, features] in `meta.json`'s column order
    (the feature function's output); output: prob_up and expected_return per window."""

    def load_context(self, context):
        from sofare.training.export import TorchModel

        self.model = TorchModel(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):
        prob, ret = self.model.predict_windows(np.asarray(model_input, dtype=np.float32))
        return pd.DataFrame({"prob_up": prob, "expected_return": ret})


def _log_model(cfg: Config, directory: Path, example: np.ndarray, feature_set: str) -> Any:
    """Log the pyfunc under the active run and register a new `sofare-m3` version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1], example.shape[2]))]),
        outputs=Schema([ColSpec("double", "prob_up"), ColSpec("double", "expected_return")]),
    )
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=SofareM3Pyfunc(),
        artifacts={"model": str(directory)},
        signature=signature,
        input_example=example.astype(np.float32),
        registered_model_name=cfg.mlflow.model_name,
        pip_requirements=[],
        metadata={"feature_set_version": feature_set},
    )


def register(cfg: Config, trained: Trained) -> RegisteredVersion:
    """Register a trained model as a new version with semver, data window, feature set and git tags;
    write its model card."""
    import shutil

    from sofare.registry import model_card
    from sofare.training.tracking import git_commit

    rep = trained.report
    metric = rep.primary_metric
    try:
        with scoped(cfg), mlflow.start_run(run_id=trained.run_id):
            info = _log_model(cfg, trained.directory, trained.example, rep.feature_set_version)
            version = str(info.registered_model_version)
            semver = next_semver(
                previous_tags(cfg, below=int(version)), rep.architecture, rep.feature_set_version, rep.metric(), metric
            )
            set_tags(
                cfg,
                version,
                {
                    "semver": semver,
                    "architecture": rep.architecture,
                    "data_window": rep.data_window.label,
                    "test_window": rep.test_window,
                    "feature_set_version": rep.feature_set_version,
                    "git_commit": git_commit(cfg),
                    "primary_metric": metric,
                    "training_run_id": trained.run_id,
                    **{f"test_{m}": f"{s.value:.4f}" for m, s in rep.scores["sofare_m3"].items()},
                },
            )
            mlflow.set_tags({"semver": semver, "model_version": version})
    finally:
        shutil.rmtree(trained.directory, ignore_errors=True)
    card = model_card.write(cfg, version)
    client(cfg).log_artifact(trained.run_id, str(card))
    log.info(
        "registered %s version %s (%s): test %s = %.4f", cfg.mlflow.model_name, version, semver, metric, rep.metric()
    )
    return registered(cfg, version)


# --- semver ----------------------------------------------------------------------------------------


def next_semver(
    previous: dict[str, str] | None, architecture: str, feature_set: str, primary: float, metric: str
) -> str:
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


def previous_tags(cfg: Config, below: int) -> dict[str, str] | None:
    """Tags of the newest registered version older than `below`."""
    older = [
        v for v in client(cfg).search_model_versions(f"name = '{cfg.mlflow.model_name}'") if int(v.version) < below
    ]
    return dict(max(older, key=lambda v: int(v.version)).tags) if older else None
