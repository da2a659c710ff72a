"""The typed contracts that pass between stages (and through XCom, as JSON).

    training ──TrainingPlan──► tune workers ──► finalize ──EvaluationReport + ModelMeta──► registry
    registry ──Verdict──► CLI, DAGs, deploy          registry ──ModelMeta (meta.json)──► serving

Frozen pydantic models: `.model_dump(mode="json")` goes into XCom or a file, `Model.model_validate(...)`
comes back out. Pure (numpy and pydantic only), so every stage, the served bundle included, may import it.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sofare.errors import InputError, NotFoundError

MODALITIES = ("micro", "safe", "macro")
PREDICTORS = ("sofare_m3", "persistence", "majority", "linear")  # the model, then the naive baselines
BASELINES = PREDICTORS[1:]
META_FILE = "meta.json"  # a model directory's ModelMeta


class _Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DateWindow(_Contract):
    """Inclusive UTC days."""

    start: date
    end: date

    @property
    def label(self) -> str:
        return f"{self.start}..{self.end}"


class TrainingPlan(_Contract):
    """What `plan` fixed for the tuning workers and the final fit of one training run."""

    window: DateWindow
    study: str
    parent_run_id: str
    rows: int
    parts: dict[str, int]
    n_trials: int
    timeout: int
    max_epochs: int
    trials_done_before: int


class MetricCI(_Contract):
    """A metric on the test window with its 95% bootstrap confidence interval."""

    value: float
    ci_low: float
    ci_high: float


class Backtest(_Contract):
    class Side(_Contract):
        total_return: float
        sharpe: float
        max_drawdown: float

    strategy: Side
    buy_and_hold: Side
    trades: int
    exposure: float


class Fold(_Contract):
    fold: int
    test_start: str
    test_end: str
    score: MetricCI  # the primary metric on the fold's test part


class Trial(_Contract):
    number: int
    state: str
    value: float | None
    epochs: int | None
    params: dict[str, Any]


class EvaluationReport(_Contract):
    """Everything the evaluation of one trained version found: what the gate and the model card read."""

    data_window: DateWindow
    test_start: str
    test_end: str
    rows: int
    parts: dict[str, int]
    purge_rows: int
    train_windows: int
    test_windows: int
    epochs: int
    hyper: dict[str, Any]
    best_trial: int
    best_val_loss: float
    scores: dict[str, dict[str, MetricCI]]  # predictor (PREDICTORS) -> metric -> value with CI
    backtest: Backtest
    walk_forward: list[Fold] = Field(default_factory=list)
    primary_metric: str
    fee_bps: float
    trials: list[Trial]
    seed: int
    architecture: str
    feature_set_version: str
    symbol: str
    interval: str
    horizon: int
    threshold: float
    bootstrap_samples: int
    bootstrap_block_bars: int

    @property
    def test_window(self) -> str:
        return f"{self.test_start}..{self.test_end}"

    def metric(self, predictor: str = "sofare_m3", name: str | None = None) -> float:
        """A metric's value (default: the primary one) of the model or a baseline."""
        return self.scores[predictor][name or self.primary_metric].value


class RegisteredVersion(_Contract):
    """A registered model version and its evaluation report (what `sofare train` prints)."""

    model: str
    version: str
    semver: str
    run_id: str
    model_card: str
    report: EvaluationReport


class Scaling(_Contract):
    """Per-column standardisation fitted on the training rows, and the return's (for the regression head)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    ret_mean: float
    ret_std: float


class ModelMeta(_Contract):
    """What a served model needs besides its weights; travels as `meta.json` beside the model file."""

    architecture: str
    hyper: dict[str, Any]
    lookback: int
    columns: tuple[str, ...]
    groups: dict[str, tuple[int, ...]]  # modality (MODALITIES) -> column indices
    n_inputs: dict[str, int]
    loss: dict[str, float]
    scaler: Scaling
    feature_set_version: str
    symbol: str
    interval: str
    horizon: int
    warmup_bars: int
    threshold: float
    data_window: DateWindow
    runtime_files: dict[str, str] = Field(default_factory=dict)  # runtime (onnx | torch) -> file name

    @classmethod
    def read(cls, directory: Path) -> ModelMeta:
        return cls.model_validate_json((directory / META_FILE).read_text())

    def inputs(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw feature windows [B, lookback, features] -> the network's scaled (micro, safe, macro) inputs."""
        if raw.ndim != 3 or raw.shape[1:] != (self.lookback, len(self.columns)):
            raise InputError(f"expected windows of shape (batch, {self.lookback}, {len(self.columns)}), got {raw.shape}")
        x = (raw.astype(np.float64) - np.asarray(self.scaler.mean)) / np.asarray(self.scaler.std)
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        return tuple(np.ascontiguousarray(x[:, :, list(self.groups[g])]) for g in MODALITIES)  # type: ignore[return-value]

    def outputs(self, logits: np.ndarray, ret: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's outputs -> (P(up), expected log return)."""
        z = logits - logits.max(axis=1, keepdims=True)
        prob = (np.exp(z[:, 1]) / np.exp(z).sum(axis=1)).astype(np.float64)
        return prob, ret.astype(np.float64) * self.scaler.ret_std + self.scaler.ret_mean


class Check(_Contract):
    name: str
    passed: bool
    detail: str


class Verdict(_Contract):
    """The promotion gate's decision on one version, with every check and, if any, the on-call override."""

    model: str
    version: str
    passed: bool
    checks: tuple[Check, ...] = ()
    champion: str | None = None
    audit_id: str = ""
    override: str | None = None  # an on-call engineer promoted a rejected version: who and why

    @property
    def promoted(self) -> bool:
        return self.passed or self.override is not None

    @property
    def reasons(self) -> list[str]:
        return [f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]

    @property
    def outcome(self) -> Literal["passed", "rejected", "overridden"]:
        return "passed" if self.passed else "overridden" if self.override else "rejected"

    def summary(self) -> str:
        state = {"passed": "PROMOTED to challenger", "rejected": "REJECTED",
                 "overridden": f"REJECTED by the gate, PROMOTED to challenger by override ({self.override})"}[self.outcome]
        head = f"{self.model} version {self.version}: {state} (champion: {self.champion or 'none'})"
        return "\n".join([head, *(f"  {r}" for r in self.reasons)])

    def to_xcom(self) -> dict[str, Any]:
        """JSON for XCom, with the derived fields a DAG branches on."""
        return {**self.model_dump(mode="json"), "reasons": self.reasons, "outcome": self.outcome,
                "promoted": self.promoted}

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> Verdict:
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


def model_dir(directory: Path) -> Path:
    """The model directory (the one holding meta.json) at or below `directory`: a bento model, an MLflow download."""
    meta = next(Path(directory).rglob(META_FILE), None)
    if meta is None:
        raise NotFoundError(f"no SofareM3 model ({META_FILE}) under {directory}")
    return meta.parent
