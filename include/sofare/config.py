"""The one configuration: include/config/sofare.yaml read into typed objects, with env overrides.

Overrides are SOFARE_<SECTION>__<KEY>[__<KEY>…] (case-insensitive, values parsed as YAML scalars).
SOFARE_CONFIG points at another YAML file. Nothing here runs at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sofare.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "include" / "config" / "sofare.yaml"
ENV_PREFIX = "SOFARE_"

# Binance kline intervals SOFARE accepts, as durations.
INTERVALS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1),
    "3m": timedelta(minutes=3),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "30m": timedelta(minutes=30),
    "1h": timedelta(hours=1),
    "2h": timedelta(hours=2),
    "4h": timedelta(hours=4),
    "6h": timedelta(hours=6),
    "8h": timedelta(hours=8),
    "12h": timedelta(hours=12),
    "1d": timedelta(days=1),
}

Modality = Literal["candles", "safe_haven", "macro"]
SourceName = Literal["sample", "binance", "yfinance", "fred"]


class ConfigError(InputError):
    """The configuration file or an override is invalid; the message names the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Model):
    var: Path
    sample_data: Path


class WarehouseConfig(_Model):
    url: str | None = None
    conn_id: str = "sofare_warehouse"


class MarketConfig(_Model):
    symbol: str
    interval: str

    @field_validator("interval")
    @classmethod
    def _known_interval(cls, value: str) -> str:
        if value not in INTERVALS:
            raise ValueError(f"unknown interval {value!r}; expected one of {', '.join(INTERVALS)}")
        return value

    @field_validator("symbol")
    @classmethod
    def _upper_symbol(cls, value: str) -> str:
        if not value.isalnum():
            raise ValueError(f"symbol {value!r} must be alphanumeric, like BTCUSDT")
        return value.upper()


class IngestSources(_Model):
    candles: Literal["sample", "binance"]
    safe_haven: Literal["sample", "yfinance"]
    macro: Literal["sample", "fred"]


class IngestConfig(_Model):
    schedule: str
    start_date: str
    sources: IngestSources
    chunk_days: int = Field(gt=0)
    context_days: int = Field(ge=0)
    retries: int = Field(ge=2)
    retry_delay_seconds: float = Field(gt=0)
    max_retry_delay_seconds: float = Field(gt=0)


class TickerConfig(_Model):
    name: str
    timezone: str
    close: time


class SafeHavenConfig(_Model):
    visibility_delay_minutes: int = Field(ge=0)
    max_gap_days: int = Field(gt=0)
    tickers: dict[str, TickerConfig]


class SeriesConfig(_Model):
    frequency: Literal["D", "M", "Q"]
    publication_lag_days: int = Field(ge=0)
    kind: Literal["rate", "index"] = "rate"  # index series (CPI, GDP levels) enter as growth


class MacroConfig(_Model):
    max_gap_days: int = Field(gt=0)
    series: dict[str, SeriesConfig]


class FeaturesConfig(_Model):
    warmup_bars: int = Field(ge=100)
    horizon: int = Field(ge=1)
    return_lags: list[int]
    momentum_windows: list[int]
    volatility_windows: list[int]
    daily_context_days: int = Field(gt=0)
    macro_context_days: int = Field(gt=0)


class KnownGap(_Model):
    symbol: str
    interval: str
    first: datetime
    last: datetime
    reason: str


class ValidationConfig(_Model):
    max_abs_log_return: float = Field(gt=0)
    freshness_bars: int = Field(ge=0)
    safe_haven_max_abs_log_return: dict[str, float]
    macro_max_abs_change: dict[str, float]
    known_gaps: list[KnownGap] = Field(default_factory=list)

    @field_validator("safe_haven_max_abs_log_return", "macro_max_abs_change")
    @classmethod
    def _has_default(cls, value: dict[str, float]) -> dict[str, float]:
        if "default" not in value:
            raise ValueError("needs a 'default' entry")
        return value

    def limit(self, table: dict[str, float], key: str) -> float:
        return table.get(key, table["default"])


class AlertsConfig(_Model):
    webhook_url: str | None = None
    timeout_seconds: float = Field(gt=0)


class SplitConfig(_Model):
    train: float = Field(gt=0, lt=1)
    validation: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @field_validator("test")
    @classmethod
    def _sums_to_one(cls, test: float, info: Any) -> float:
        total = test + info.data.get("train", 0) + info.data.get("validation", 0)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1, got {total:g}")
        return test


class WalkForwardConfig(_Model):
    folds: int = Field(ge=0)  # 0: off
    mode: Literal["expanding", "sliding"]
    test_share: float = Field(default=0.4, gt=0, lt=0.8)  # the folds' test parts tile this last share of the rows


class SearchSpaceConfig(_Model):
    hidden_size: tuple[int, int, int]  # low, high, step
    num_layers: tuple[int, int]
    num_heads: list[int]
    dropout: tuple[float, float]
    learning_rate: tuple[float, float]  # log scale
    batch_size: list[int]
    weight_decay: tuple[float, float]  # log scale
    lookback: list[int]


class TrainingConfig(_Model):
    schedule: str
    seed: int
    start: str | None = None  # training window (inclusive days); null: the latest validated span
    end: str | None = None
    split: SplitConfig
    purge_bars: int | None = Field(default=None, ge=0)  # null: max lookback + horizon
    walk_forward: WalkForwardConfig
    loss_weight: float = Field(ge=0, le=1)
    huber_delta: float = Field(gt=0)
    max_epochs: int = Field(ge=1)
    patience: int = Field(ge=1)
    warmup_fraction: float = Field(ge=0, lt=1)
    gradient_clip: float = Field(gt=0)
    threads: int = Field(ge=1)
    n_trials: int = Field(ge=1)
    timeout_seconds: int = Field(ge=1)
    workers: int = Field(ge=1, le=16)
    pruner: Literal["hyperband", "median", "none"]
    study_name: str
    search_space: SearchSpaceConfig


class EvaluationConfig(_Model):
    primary_metric: Literal["roc_auc", "accuracy", "f1", "mcc", "ic"]
    bootstrap_samples: int = Field(ge=100)
    bootstrap_block_bars: int = Field(ge=1)
    fee_bps: float = Field(ge=0)  # per side, per position change
    decision_threshold: float = Field(gt=0, lt=1)
    slippage_bps: float = Field(default=0.0, ge=0)  # per side, on top of the fee
    calibration: Literal["platt", "none"] = "platt"
    policy_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.52, 0.54, 0.56, 0.58, 0.6, 0.65])
    policy_min_hold: list[int] = Field(default_factory=lambda: [1, 3, 6, 12, 24])
    ablations: bool = True  # walk-forward also with micro only and micro + safe haven
    global_view: bool = True  # attributions + permutation importance per feature and modality (explain.global_view)
    global_view_windows: int = Field(default=512, ge=16)  # test windows sampled, per fold and from the test window
    global_view_repeats: int = Field(default=3, ge=1)  # seeded shuffles per feature (and modality) per fold


class PromotionConfig(_Model):
    baseline_margin: float = Field(default=0.0, ge=0)  # primary metric must beat each baseline by more
    champion_tolerance: float = Field(default=0.0, ge=0)  # may trail the champion by at most this
    max_model_mb: float = Field(default=50.0, gt=0)
    max_latency_ms: float = Field(default=25.0, gt=0)  # p95 of one window, in process


class ServingConfig(_Model):
    port: int = Field(default=3000, ge=1, le=65535)
    runtime: Literal["onnx", "torch"] = "onnx"  # the faster on this model (docs/benchmarks.md)
    max_batch_windows: int = Field(default=256, ge=1)
    max_window_candles: int = Field(default=2000, ge=1)
    context_ttl_seconds: float = Field(default=30.0, ge=0)  # safe-haven/macro rows re-read this often
    batch_wait_ms: float = Field(default=0.0, ge=0)  # extra wait to fill a forward pass; 0: take what is queued
    workers: int = Field(default=2, ge=1)  # bentoml serve worker processes (2 on 2 cores: measured, docs/benchmarks.md)
    model_threads: int = Field(
        default=1, ge=1
    )  # ONNX Runtime intra-op threads (1 measured fastest, docs/benchmarks.md)
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)  # larger bodies: 413 before reading them
    max_batch_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)  # the same for /predict_batch
    max_pending: int = Field(default=8, ge=1)  # /predict requests waiting per worker; beyond: 503 + Retry-After
    max_pending_batches: int = Field(default=2, ge=1)  # /predict_batch requests in flight per worker; beyond: 503
    latest_refresh_seconds: float = Field(default=1.0, gt=0)  # how often the newest candles are looked for
    log_file: str | None = None  # the service's own log (refused requests, warnings), rotated; None: stderr
    log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    log_backups: int = Field(default=3, ge=0)
    log_queue_size: int = Field(default=10_000, ge=1)
    log_batch_size: int = Field(default=500, ge=1)
    log_flush_seconds: float = Field(default=0.5, gt=0)
    # POST /explain (Integrated Gradients, sofare.explain): each request's cost capped before any work (a 422 names
    # the field), its own admission bound (a 503 + Retry-After beyond it), computed on one thread off the event loop
    explain_steps: int = Field(default=32, ge=1)  # integration steps when a request names none
    explain_max_steps: int = Field(default=128, ge=1)  # a request's `steps` above this: 422
    explain_top_k: int = Field(default=10, ge=1)  # top (feature, time step) cells when a request names none
    explain_max_top_k: int = Field(default=50, ge=1)  # a request's `top_k` above this: 422
    explain_max_pending: int = Field(default=2, ge=1)  # /explain requests in flight per worker; beyond: 503
    explain_slots: int = Field(default=1, ge=1)  # explanations computing at once on this machine; beyond: 503
    explain_threads: int = Field(default=1, ge=1)  # torch intra-op threads of the explaining worker
    explain_nice: int = Field(default=10, ge=0, le=19)  # the explain thread's nice value (Linux): /predict first


class DeployConfig(_Model):
    """The canary front door, canary analysis and rollback (docs/runbook.md)."""

    frontdoor_port: int = Field(default=8000, ge=1, le=65535)  # nginx on 127.0.0.1: what clients call
    canary_weight: float = Field(default=0.1, ge=0, le=1)  # `sofare deploy` without --canary-weight
    steps: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0])  # sofare_deploy: weight per step
    interval_seconds: float = Field(default=300, ge=0)  # traffic observed at each step before judging it
    min_requests: int = Field(default=50, ge=1)  # fewer canary requests in a step: inconclusive, never success
    max_error_rate: float = Field(default=0.01, ge=0, le=1)  # canary 5xx share above this fails the step
    max_p95_ms: float = Field(default=500.0, gt=0)  # canary p95 latency above this fails the step
    max_latency_ratio: float = Field(default=1.5, ge=1)  # ... or above stable's p95 times this
    latency_floor_ms: float = Field(default=25.0, ge=0)  # ... unless the canary's p95 is at or under this (noise)
    failure_limit: int = Field(default=0, ge=0)  # failed steps tolerated before the rollout aborts
    inconclusive_limit: int = Field(default=2, ge=1)  # inconclusive measurements in a row before it aborts
    verify_requests: int = Field(default=5, ge=1)  # live requests through the front door that verify a switch
    start_timeout_seconds: float = Field(default=180, gt=0)  # a `bentoml serve` must be ready within this

    @field_validator("steps")
    @classmethod
    def _rising_weights(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < w <= 1 for w in steps) or steps != sorted(steps) or steps[-1] != 1:
            raise ValueError(f"steps must rise within (0, 1] and end at 1, got {steps}")
        return steps


class DriftRulesConfig(_Model):
    """Severity from the share of the hourly (micro) input features Evidently finds drifted (level: share >= value)."""

    low: float = Field(default=0.2, ge=0, le=1)
    medium: float = Field(default=0.35, ge=0, le=1)
    high: float = Field(default=0.5, ge=0, le=1)


class ErrorRulesConfig(_Model):
    """Severity from a variant's 5xx share since the previous monitor run (each level: rate >= value)."""

    medium: float = Field(default=0.01, ge=0, le=1)
    high: float = Field(default=0.05, ge=0, le=1)
    critical: float = Field(default=0.2, ge=0, le=1)


class MonitoringConfig(_Model):
    """sofare_monitor: outcomes, live quality, drift, severity -> action (docs/runbook.md)."""

    schedule: str = "@hourly"  # and whenever new candles land
    windows: dict[str, int] = Field(default_factory=lambda: {"24h": 24, "7d": 168})  # rolling quality windows (hours)
    drift_window: str = "7d"  # which window's served inputs are compared with the reference
    min_outcomes: int = Field(default=48, ge=2)  # fewer outcomes in a window: "insufficient", never a number
    min_drift_rows: int = Field(default=120, ge=2)  # fewer served hours: drift is "insufficient"
    reference_rows: int = Field(default=1000, ge=50)  # reference sample stored with a version (K-S up to 1,000)
    drift_every_hours: int = Field(default=6, ge=1)  # Evidently runs at hours divisible by this (it takes seconds)
    drift_method: str | None = "wasserstein"  # null: Evidently's default (K-S up to 1,000 rows, else Wasserstein)
    drift_threshold: float | None = 0.5  # null: the method's default
    drift: DriftRulesConfig = DriftRulesConfig()
    errors: ErrorRulesConfig = ErrorRulesConfig()
    min_requests: int = Field(default=50, ge=1)  # fewer requests since the last run: the error rule does not fire
    fresh_hours: int = Field(default=72, ge=0)  # a champion younger than this is "fresh": at fault -> rollback
    cooldown_hours: int = Field(default=24, ge=0)  # an action is not repeated within this (logical hours)
    bootstrap_samples: int = Field(default=500, ge=50)
    bootstrap_block_bars: int = Field(default=6, ge=1)
    reports_kept: int = Field(default=48, ge=1)  # Evidently HTML reports kept under var/reports/drift

    @model_validator(mode="after")
    def _consistent(self) -> MonitoringConfig:
        if not self.windows or any(h < 1 for h in self.windows.values()):
            raise ValueError(f"windows must name at least one window of >= 1 hour, got {self.windows}")
        if self.drift_window not in self.windows:
            raise ValueError(f"drift_window {self.drift_window!r} is not one of windows {sorted(self.windows)}")
        d, e = self.drift, self.errors
        if not (d.low <= d.medium <= d.high and e.medium <= e.high <= e.critical):
            raise ValueError("drift and error severity thresholds must rise with the level")
        return self


class MlflowConfig(_Model):
    tracking_uri: str | None = None  # null: sqlite:///<var>/mlflow.db, artifacts in <var>/mlartifacts
    experiment: str
    model_name: str


class HttpConfig(_Model):
    timeout_seconds: float = Field(gt=0)
    max_attempts: int = Field(ge=1)
    backoff_base_seconds: float = Field(ge=0)
    backoff_max_seconds: float = Field(ge=0)


class BinanceConfig(_Model):
    base_url: str
    page_limit: int = Field(gt=0, le=1000)
    weight_limit_per_minute: int = Field(gt=0)


class YfinanceConfig(_Model):
    base_url: str | None = None


class FredConfig(_Model):
    base_url: str
    api_key_env: str
    conn_id: str


class SourcesConfig(_Model):
    http: HttpConfig
    binance: BinanceConfig
    yfinance: YfinanceConfig
    fred: FredConfig


class Config(_Model):
    root: Path
    paths: PathsConfig
    warehouse: WarehouseConfig
    market: MarketConfig
    ingest: IngestConfig
    safe_haven: SafeHavenConfig
    macro: MacroConfig
    features: FeaturesConfig
    validation: ValidationConfig
    alerts: AlertsConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    mlflow: MlflowConfig
    promotion: PromotionConfig = PromotionConfig()
    serving: ServingConfig = ServingConfig()
    deploy: DeployConfig = DeployConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    sources: SourcesConfig

    def resolve(self, path: Path) -> Path:
        """A configured path, absolute (relative ones are relative to the project root)."""
        return path if path.is_absolute() else (self.root / path).resolve()

    @property
    def var_dir(self) -> Path:
        return self.resolve(self.paths.var)

    @property
    def sample_dir(self) -> Path:
        return self.resolve(self.paths.sample_data)

    @property
    def airflow_home(self) -> Path:
        return self.var_dir / "airflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.var_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.var_dir / "mlartifacts"

    @property
    def default_warehouse_url(self) -> str:
        return f"sqlite:///{self.var_dir / 'warehouse.db'}"


def _apply_override(tree: dict[str, Any], keys: list[str], raw: str, env_name: str) -> None:
    node: Any = tree
    for depth, key in enumerate(keys):
        if not isinstance(node, dict):
            raise ConfigError(f"{env_name}: {'.'.join(keys[:depth])} is not a section")
        match = next((k for k in node if str(k).lower() == key.lower()), None)
        if match is None:
            raise ConfigError(f"{env_name}: unknown config key {'.'.join(keys[: depth + 1]).lower()!r}")
        if depth == len(keys) - 1:
            node[match] = yaml.safe_load(raw) if raw != "" else None
        else:
            node = node[match]


def config_file(env: Mapping[str, str] | None = None) -> Path:
    """The YAML file load_config reads by default: $SOFARE_CONFIG, else include/config/sofare.yaml."""
    env = os.environ if env is None else env
    return Path(env.get("SOFARE_CONFIG") or DEFAULT_CONFIG_FILE)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file, apply SOFARE_* overrides and validate into a frozen Config.

    Call it once at an entry point (a CLI command, a DAG task, the service) and pass the Config down."""
    env = os.environ if env is None else env
    file = Path(path) if path else config_file(env)
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {file}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from exc
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and "__" in name:
            keys = name[len(ENV_PREFIX) :].split("__")
            _apply_override(tree, keys, env[name], name)
    tree.setdefault("root", str(PROJECT_ROOT))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid configuration ({file}): {problems}") from None


def interval_delta(interval: str) -> timedelta:
    """The duration of a kline interval such as '1h'; a clear error for unknown ones."""
    try:
        return INTERVALS[interval]
    except KeyError:
        raise ConfigError(f"unknown interval {interval!r}; expected one of {', '.join(INTERVALS)}") from None
