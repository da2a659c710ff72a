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
PREDICTORS = ("sofare_m3", "persistence", "majority", "linear", "gbm")  # the model, then the baselines
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


class Calibration(_Contract):
    """P(up) = sigmoid(scale * margin + bias), margin = logit(up) - logit(down): Platt scaling of the
    classification head (temperature scaling is bias 0; identity is scale 1, bias 0). A monotone map, so
    ROC-AUC is unchanged; fitted on validation predictions only."""

    method: Literal["none", "platt"] = "none"
    scale: float = 1.0
    bias: float = 0.0
    fitted_on: str = ""  # the rows it was fitted on (a window label)

    def apply(self, margin: np.ndarray) -> np.ndarray:
        z = np.clip(self.scale * np.asarray(margin, dtype=np.float64) + self.bias, -50, 50)
        return 1.0 / (1.0 + np.exp(-z))


class Policy(_Contract):
    """The cost-aware decision policy served with a version: long when calibrated P(up) > threshold, then held
    for at least `min_hold` decisions (of `horizon` bars each); `threshold` None means always flat (nothing
    beat staying out after costs on validation). Chosen on validation only."""

    id: str
    threshold: float | None
    min_hold: int = 1
    fee_bps: float
    slippage_bps: float
    chosen_on: str = ""

    @classmethod
    def make(
        cls, threshold: float | None, min_hold: int, fee_bps: float, slippage_bps: float, chosen_on: str = ""
    ) -> Policy:
        cost = f"c{fee_bps + slippage_bps:g}"
        pid = "flat" if threshold is None else f"long>{threshold:.2f}-hold{min_hold}"
        return cls(
            id=f"{pid}-{cost}",
            threshold=threshold,
            min_hold=int(min_hold),
            fee_bps=fee_bps,
            slippage_bps=slippage_bps,
            chosen_on=chosen_on,
        )

    def longs(self, prob_up: np.ndarray) -> np.ndarray:
        """The entry rule, per decision (what the service's `signal` says for one window)."""
        prob_up = np.asarray(prob_up, dtype=np.float64)
        if self.threshold is None:
            return np.zeros(prob_up.shape, dtype=bool)
        return prob_up > self.threshold

    def signal(self, prob_up: float) -> Literal["long", "flat"]:
        return "long" if self.threshold is not None and prob_up > self.threshold else "flat"


class PolicyResult(_Contract):
    """A policy traded on held-out decisions: log-return based, after fees and slippage."""

    total_return: float
    sharpe: float  # annualised
    max_drawdown: float
    exposure: float  # share of decisions spent long
    trades: int  # position changes (entries + exits)
    turnover: float  # position changes per year
    fees_paid: float  # fees + slippage as a share of starting equity (sum of per-trade costs)
    decisions: int


class Fold(_Contract):
    fold: int
    test_start: str
    test_end: str
    score: MetricCI  # the primary metric of SofareM3 on the fold's test part
    train_rows: int = 0
    test_windows: int = 0
    epochs: int = 0
    baselines: dict[str, MetricCI] = Field(default_factory=dict)  # primary metric per baseline, same windows
    calibration: Calibration | None = None
    policy: Policy | None = None  # chosen on the fold's validation part


class Paired(_Contract):
    """SofareM3 minus a baseline on the same hours (paired moving-block bootstrap of the primary metric)."""

    baseline: str
    difference: MetricCI
    share_not_better: float  # bootstrap draws where SofareM3 is not better (a one-sided p-value)
    verdict: Literal["better", "worse", "no significant difference"]


class Reliability(_Contract):
    """Calibration on held-out hours: mean predicted P(up) and observed up-rate per quantile bin."""

    predicted: tuple[float, ...]
    observed: tuple[float, ...]
    count: tuple[int, ...]
    brier_raw: float  # before calibration
    brier: float  # after
    ece_raw: float
    ece: float


class WalkForward(_Contract):
    """Expanding-window walk-forward evidence: every fold retrains (tuned hyper-parameters) on the rows before
    it, purged, early-stopped on its own validation part, calibrated and given a policy on that part, then
    scored on its test part. Pooled = every fold's test windows together."""

    mode: str
    folds: list[Fold]
    pooled: dict[str, dict[str, MetricCI]]  # predictor -> metric -> value with CI
    paired: list[Paired]
    reliability: Reliability | None = None
    policy: dict[str, PolicyResult] = Field(
        default_factory=dict
    )  # "sofare_m3", "best baseline: <name>", "buy_and_hold"
    best_baseline: str = ""
    ablations: dict[str, MetricCI] = Field(default_factory=dict)  # modalities ("micro", "micro+safe", ...) -> primary
    seconds: float = 0.0


class Trial(_Contract):
    number: int
    state: str
    value: float | None
    epochs: int | None
    params: dict[str, Any]
    seconds: float | None = None


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
    wf: WalkForward | None = None  # walk-forward evidence (what the promotion gate decides on), when run
    calibration: Calibration = Field(default_factory=Calibration)  # of the final model, fitted on validation
    reliability: Reliability | None = None  # of the final model on the test window
    policy: Policy | None = None  # chosen on validation, served with the version
    policy_test: PolicyResult | None = None  # that policy on the test window
    policy_buy_and_hold: PolicyResult | None = None  # buy and hold on the same test decisions
    primary_metric: str
    fee_bps: float
    trials: list[Trial]
    study_seconds: float | None = None  # the Optuna study's wall time: first trial start to last trial end
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
        """A metric's value (default: the primary one) of the model or a baseline on the test window."""
        return self.scores[predictor][name or self.primary_metric].value

    def evidence(self) -> tuple[str, dict[str, dict[str, MetricCI]]]:
        """What the promotion gate judges: the pooled walk-forward scores when walk-forward ran, else the test
        window's (versions trained before walk-forward, or with `training.walk_forward.folds: 0`)."""
        if self.wf is not None and self.wf.folds:
            return f"walk-forward, {len(self.wf.folds)} folds pooled", self.wf.pooled
        return "test window", self.scores


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
    runtime_files: dict[str, str] = Field(default_factory=dict)  # runtime (onnx | torch | explain) -> file name
    reference_file: str | None = None  # the drift reference sample beside meta.json (None: registered before it)
    calibration: Calibration = Field(default_factory=Calibration)  # applied to every P(up) served
    policy: Policy | None = None  # None: registered before policies; `decision_policy()` falls back to the threshold

    def decision_policy(self) -> Policy:
        return self.policy or Policy.make(self.threshold, 1, 0.0, 0.0, "legacy: the direction threshold")

    @classmethod
    def read(cls, directory: Path) -> ModelMeta:
        return cls.model_validate_json((directory / META_FILE).read_text())

    def inputs(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw feature windows [B, lookback, features] -> the network's scaled (micro, safe, macro) inputs."""
        if raw.ndim != 3 or raw.shape[1:] != (self.lookback, len(self.columns)):
            raise InputError(
                f"expected windows of shape (batch, {self.lookback}, {len(self.columns)}), got {raw.shape}"
            )
        x = (raw.astype(np.float64) - np.asarray(self.scaler.mean)) / np.asarray(self.scaler.std)
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        micro, safe, macro = (np.ascontiguousarray(x[:, :, list(self.groups[g])]) for g in MODALITIES)
        return micro, safe, macro

    def outputs(self, logits: np.ndarray, ret: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network's outputs -> (P(up), expected log return)."""
        logits = np.asarray(logits, dtype=np.float64)
        prob = self.calibration.apply(logits[:, 1] - logits[:, 0])
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
        state = {
            "passed": "PROMOTED to challenger",
            "rejected": "REJECTED",
            "overridden": f"REJECTED by the gate, PROMOTED to challenger by override ({self.override})",
        }[self.outcome]
        head = f"{self.model} version {self.version}: {state} (champion: {self.champion or 'none'})"
        return "\n".join([head, *(f"  {r}" for r in self.reasons)])

    def to_xcom(self) -> dict[str, Any]:
        """JSON for XCom, with the derived fields a DAG branches on."""
        return {
            **self.model_dump(mode="json"),
            "reasons": self.reasons,
            "outcome": self.outcome,
            "promoted": self.promoted,
        }

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> Verdict:
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


def model_dir(directory: Path) -> Path:
    """The model directory (the one holding meta.json) at or below `directory`: a bento model, an MLflow download."""
    meta = next(Path(directory).rglob(META_FILE), None)
    if meta is None:
        raise NotFoundError(f"no SofareM3 model ({META_FILE}) under {directory}")
    return meta.parent


# --- monitoring (sofare.monitoring -> monitoring_runs, the plugin page, the gauges) --------------------


class _Measured(_Contract):
    """Monitoring figures may be NaN (a drift score Evidently could not compute): written as NaN, read back."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


Severity = Literal["low", "medium", "high", "critical"]  # of one finding; a run without any is "none"
Action = Literal["none", "alert", "retrain", "rollback"]
SEVERITIES: tuple[Literal["none", Severity], ...] = ("none", "low", "medium", "high", "critical")
ACTIONS: tuple[Action, ...] = ("none", "alert", "retrain", "rollback")  # in rising strength


class LiveScore(_Measured):
    """A live metric with its 95% moving-block bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float


class LiveQuality(_Measured):
    """One model version and variant over one rolling window ending at the monitored hour. Hours predicted
    more than once count once (their mean prob_up). With fewer than `monitoring.min_outcomes` outcomes the
    status is "insufficient" and no metric is given."""

    model_version: str
    variant: str
    window: str  # e.g. "24h", from monitoring.windows
    start: str  # ISO, exclusive
    end: str  # ISO, inclusive
    n: int  # hours with an outcome
    pending: int  # hours predicted whose outcome is not known yet
    status: Literal["ok", "insufficient"]
    accuracy: LiveScore | None = None
    roc_auc: LiveScore | None = None
    brier: LiveScore | None = None
    ece: float | None = None  # expected calibration error, 10 equal-width bins
    persistence_accuracy: LiveScore | None = None  # sign of the bar ending at as_of, same hours
    always_up_accuracy: LiveScore | None = None  # the share of hours that went up
    vs_persistence: LiveScore | None = None  # accuracy - persistence accuracy, paired on the same hours
    vs_coin_brier: LiveScore | None = None  # Brier - 0.25 (a constant 0.5), paired: > 0 is worse than a coin


class DriftResult(_Measured):
    """Evidently data drift of the served input features against the version's reference sample, plus
    prediction (prob_up) and target (realised return) drift."""

    status: Literal["ok", "insufficient", "no_reference", "no_data", "skipped"]
    model_version: str | None = None  # whose reference and served inputs were compared
    reference_rows: int = 0
    current_rows: int = 0
    method: str | None = None
    columns: int = 0
    drifted_columns: int = 0
    share: float | None = None
    drifted: tuple[str, ...] = ()  # the drifted features, most drifted first
    shares: dict[str, float] = Field(default_factory=dict)  # drifted share per modality (micro, safe, macro)
    scores: dict[str, float] = Field(default_factory=dict)  # per feature: the drift score Evidently used
    prediction_drift: float | None = None  # score of prob_up
    prediction_drifted: bool | None = None
    target_drift: float | None = None  # score of realised_return
    target_drifted: bool | None = None
    report: str | None = None  # the Evidently HTML report, relative to var/
    message: str = ""


class ServiceHealth(_Measured):
    """One serving variant's traffic since the previous monitor run, from its /metrics."""

    variant: str
    model_version: str
    requests: float
    server_errors: float
    error_rate: float | None  # None without requests
    p95_ms: float | None
    counters: dict[str, Any] = Field(default_factory=dict)  # cumulative scrape (the next run's baseline)
    status: Literal["ok", "unreachable"] = "ok"


class Finding(_Measured):
    """One rule that fired."""

    rule: Literal["drift", "prediction_drift", "target_drift", "quality", "calibration", "errors"]
    severity: Severity
    action: Action
    model_version: str | None = None
    variant: str | None = None
    message: str


class Decision(_Measured):
    """Severity and action of one monitor run, with every finding and the cool-down that held an action back."""

    severity: Literal["none", Severity]
    action: Action
    wanted: Action  # before the cool-down
    reason: str
    findings: tuple[Finding, ...] = ()
    cooldown: str | None = None  # why `wanted` was held back
    rollback_target: str | None = None


class MonitorRun(_Measured):
    """What one monitor run found and decided (a `monitoring_runs` row)."""

    run_id: str
    at: str
    outcomes_filled: int
    outcomes_pending: int
    quality: tuple[LiveQuality, ...]
    drift: DriftResult
    service: tuple[ServiceHealth, ...]
    decision: Decision
