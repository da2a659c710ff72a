"""Evaluate-then-promote: a registered version gets the `challenger` alias only through this gate.

All must hold (thresholds in `promotion.*`):
1. outputs are sane on the candidate's test window (finite, P(up) in [0, 1]);
2. the primary metric beats every baseline's on that window (by `baseline_margin`);
3. it is not worse than the current `champion` re-scored on the *same* test rows
   (the very first model has no champion and skips this check);
4. the weights fit `max_model_mb` and one window predicts within `max_latency_ms` (p95, in process).

The verdict and every reason are recorded as MLflow version tags and in the `audit_log` table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sofare.config import Config
    from sofare.registry import Bundle

BASELINES = ("persistence", "majority", "linear")


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Verdict:
    model: str
    version: str
    passed: bool
    checks: list[Check] = field(default_factory=list)
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
    def outcome(self) -> str:
        return "passed" if self.passed else "overridden" if self.override else "rejected"

    def summary(self) -> str:
        state = {"passed": "PROMOTED to challenger", "rejected": "REJECTED",
                 "overridden": f"REJECTED by the gate, PROMOTED to challenger by override ({self.override})"}[self.outcome]
        head = f"{self.model} version {self.version}: {state} (champion: {self.champion or 'none'})"
        return "\n".join([head, *(f"  {r}" for r in self.reasons)])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(reasons=self.reasons, outcome=self.outcome, promoted=self.promoted)
        return out


def version_bundle(cfg: Config, version: str) -> tuple[Bundle, Path]:
    """The network and its metadata of a registered version (downloaded from the registry)."""
    import mlflow

    from sofare import registry

    registry.setup(cfg)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.mlflow.model_name}/{version}"))
    meta = next(local.rglob("meta.json"), None)
    if meta is None:
        raise LookupError(f"{cfg.mlflow.model_name} version {version} has no SofareM3 bundle (meta.json)")
    return registry.load_bundle(meta.parent), meta.parent


def champion_version(cfg: Config) -> str | None:
    from mlflow.exceptions import MlflowException

    from sofare import registry

    try:
        return str(registry.client(cfg).get_model_version_by_alias(cfg.mlflow.model_name, "champion").version)
    except MlflowException:
        return None


def test_windows(cfg: Config, report: dict[str, Any], lookback: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw feature windows ending on the candidate's test rows (with `lookback` bars), and their targets."""
    from sofare import pipeline
    from sofare.training import window_ends

    start, end = report["data_window"].split("..")
    data = pipeline.load_data(cfg, start, end)
    ends = window_ends(data.frame, data.spec, data.parts["test"], lookback, data.delta)
    raw = data.frame[list(data.spec.columns)].to_numpy(dtype=np.float32)
    windows = raw[ends[:, None] + np.arange(-lookback + 1, 1)[None, :]]
    return (windows, ends, data.frame["target_up"].to_numpy()[ends].astype(int),
            data.frame["target_return"].to_numpy()[ends].astype(float))


def _primary(cfg: Config, bundle: Bundle, windows: np.ndarray, y_up: np.ndarray, y_ret: np.ndarray) -> float:
    from sofare import evaluation

    prob, ret = bundle.predict_windows(windows[:, -bundle.lookback:])
    return evaluation._metric(cfg.evaluation.primary_metric, y_up, y_ret, evaluation.Predictions(prob, ret),
                              cfg.evaluation.decision_threshold)


def latency_p95_ms(bundle: Bundle, window: np.ndarray, repeats: int = 200) -> float:
    bundle.predict_windows(window)  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        bundle.predict_windows(window)
        times.append((time.perf_counter() - began) * 1000)
    return float(np.percentile(times, 95))


def judge(facts: dict[str, Any], p: Any, metric: str) -> list[Check]:
    """The gate's rules on measured facts (pure: unit-tested for every pass and fail path)."""
    checks = [Check("sane outputs", facts["sane"], facts["sane_detail"])]
    mine = facts["primary"]
    for baseline in BASELINES:
        theirs = facts["baselines"][baseline]
        ok = bool(np.isfinite(mine) and (not np.isfinite(theirs) or mine > theirs + p.baseline_margin))
        checks.append(Check(f"beats {baseline}", ok, f"{metric} {mine:.4f} vs {theirs:.4f} (margin {p.baseline_margin})"))
    champion = facts.get("champion")
    if champion is None:
        checks.append(Check("not worse than champion", True, "no champion yet: the baselines are the bar"))
    elif not champion["comparable"]:
        checks.append(Check("not worse than champion", False,
                            f"champion v{champion['version']} uses another feature set ({champion['feature_set']}); it "
                            "cannot be re-scored on the same windows: review and promote by hand"))
    else:
        ok = bool(champion["candidate"] >= champion["score"] - p.champion_tolerance)
        checks.append(Check("not worse than champion", ok,
                            f"{metric} on the same {champion['windows']} test windows: {champion['candidate']:.4f} vs "
                            f"champion v{champion['version']} {champion['score']:.4f} (tolerance {p.champion_tolerance})"))
    checks.append(Check("size budget", facts["size_mb"] <= p.max_model_mb,
                        f"{facts['size_mb']:.2f} MB (budget {p.max_model_mb} MB)"))
    checks.append(Check("latency budget", facts["latency_ms"] <= p.max_latency_ms,
                        f"p95 {facts['latency_ms']:.2f} ms per window in process (budget {p.max_latency_ms} ms)"))
    return checks


def measure(cfg: Config, summary: dict[str, Any], report: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The facts the gate judges: outputs, metrics, the champion re-scored on the same rows, size, latency."""
    metric = cfg.evaluation.primary_metric
    version = summary["version"]
    candidate, bundle_dir = version_bundle(cfg, version)
    champion = champion_version(cfg)
    champion = champion if champion != version else None
    champion_bundle = version_bundle(cfg, champion)[0] if champion else None
    lookback = max(candidate.lookback, champion_bundle.lookback if champion_bundle else 0)
    windows, _, y_up, y_ret = test_windows(cfg, report, lookback)
    prob, ret = candidate.predict_windows(windows[:, -candidate.lookback:])
    finite = bool(np.isfinite(prob).all() and np.isfinite(ret).all())
    facts: dict[str, Any] = {
        "sane": bool(finite and (prob >= 0).all() and (prob <= 1).all()),
        "sane_detail": f"{len(prob)} test windows: P(up) in [{np.nanmin(prob):.3f}, {np.nanmax(prob):.3f}], all finite: {finite}",
        "primary": summary["scores"]["sofare_m3"][metric],
        "baselines": {b: summary["scores"][b][metric] for b in BASELINES},
        "size_mb": (bundle_dir / "weights.pt").stat().st_size / 2**20,
        "latency_ms": latency_p95_ms(candidate, windows[-1:, -candidate.lookback:]),
        "champion": None,
    }
    if champion_bundle is not None:
        comparable = champion_bundle.columns == candidate.columns
        facts["champion"] = {"version": champion, "comparable": comparable, "windows": len(y_up),
                             "feature_set": champion_bundle.meta["feature_set_version"],
                             "candidate": _primary(cfg, candidate, windows, y_up, y_ret) if comparable else None,
                             "score": _primary(cfg, champion_bundle, windows, y_up, y_ret) if comparable else None}
    return facts, champion


def gate(cfg: Config, version: str | None = None, actor: str = "sofare", override_reason: str | None = None) -> Verdict:
    """Judge a registered version (default: the newest); record the verdict; alias it on success.

    `override_reason`: a person promotes the version even if it fails (recorded as `overridden`,
    with who and why, next to every failed check)."""
    import mlflow

    from sofare import pipeline, registry

    summary = pipeline.registered_summary(cfg, version)
    name = cfg.mlflow.model_name
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=summary["run_id"], artifact_path="evaluation.json", tracking_uri=cfg.mlflow_tracking_uri)).read_text())
    facts, champion = measure(cfg, summary, report)
    checks = judge(facts, cfg.promotion, cfg.evaluation.primary_metric)
    verdict = Verdict(name, summary["version"], all(c.passed for c in checks), checks, champion)
    if not verdict.passed and override_reason:
        if not override_reason.strip():
            raise ValueError("an override needs a reason")
        verdict.override = f"{actor}: {override_reason.strip()}"
    _record(cfg, verdict, actor)
    c = registry.client(cfg)
    for key, value in (("promotion_verdict", verdict.outcome),
                       ("promotion_reasons", json.dumps(verdict.reasons)), ("promotion_audit_id", verdict.audit_id)):
        c.set_model_version_tag(name, verdict.version, key, value)
    if verdict.promoted:
        c.set_registered_model_alias(name, "challenger", verdict.version)
    return verdict


def _record(cfg: Config, verdict: Verdict, actor: str) -> None:
    from sofare import audit

    verdict.audit_id = audit.record(cfg, actor, "promotion_gate", verdict.version, verdict.outcome, verdict.to_dict())
