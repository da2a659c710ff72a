"""Evaluate-then-promote: a registered version gets the `challenger` alias only through this gate.

All must hold (thresholds in `promotion.*`):
1. outputs are sane on the candidate's test window (finite, P(up) in [0, 1]);
2. the primary metric beats every baseline's (by `baseline_margin`) on the walk-forward folds pooled (the
   test window for versions trained without walk-forward), the paired bootstrap quoted beside it;
3. it is not worse than the current `champion` re-scored on the *same* test rows
   (the very first model has no champion and skips this check);
4. the weights fit `max_model_mb` and one window predicts within `max_latency_ms` (p95, in process).

The verdict and every reason are recorded as MLflow version tags and in the `audit_log` table.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from sofare.contracts import BASELINES, Check, EvaluationReport, Verdict
from sofare.errors import InputError
from sofare.registry import audit, versions
from sofare.training import evaluation, pipeline
from sofare.training.export import TorchModel

if TYPE_CHECKING:
    from sofare.config import Config


def _primary(cfg: Config, model: TorchModel, windows: np.ndarray, y_up: np.ndarray, y_ret: np.ndarray) -> float:
    prob, ret = model.predict_windows(windows[:, -model.lookback :])
    return evaluation.metric(
        cfg.evaluation.primary_metric, y_up, y_ret, evaluation.Predictions(prob, ret), cfg.evaluation.decision_threshold
    )


def latency_p95_ms(model: TorchModel, window: np.ndarray, repeats: int = 200) -> float:
    model.predict_windows(window)  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model.predict_windows(window)
        times.append((time.perf_counter() - began) * 1000)
    return float(np.percentile(times, 95))


def judge(facts: dict[str, Any], p: Any, metric: str) -> list[Check]:
    """The gate's rules on measured facts (pure: unit-tested for every pass and fail path)."""
    checks = [Check(name="sane outputs", passed=facts["sane"], detail=facts["sane_detail"])]
    mine = facts["primary"]
    where = facts.get("evidence", "test window")
    for baseline, theirs in facts["baselines"].items():
        ok = bool(np.isfinite(mine) and (not np.isfinite(theirs) or mine > theirs + p.baseline_margin))
        paired = facts.get("paired", {}).get(baseline)
        checks.append(
            Check(
                name=f"beats {baseline}",
                passed=ok,
                detail=f"{metric} {mine:.4f} vs {theirs:.4f} on the {where} (margin {p.baseline_margin})"
                + (f"; paired bootstrap: {paired}" if paired else ""),
            )
        )
    champion = facts.get("champion")
    name = "not worse than champion"
    if champion is None:
        checks.append(Check(name=name, passed=True, detail="no champion yet: the baselines are the bar"))
    elif not champion["comparable"]:
        checks.append(
            Check(
                name=name,
                passed=False,
                detail=f"champion v{champion['version']} uses another feature set ({champion['feature_set']}); "
                "it cannot be re-scored on the same windows: review and promote by hand",
            )
        )
    else:
        ok = bool(champion["candidate"] >= champion["score"] - p.champion_tolerance)
        checks.append(
            Check(
                name=name,
                passed=ok,
                detail=f"{metric} on the same {champion['windows']} test windows: {champion['candidate']:.4f} "
                f"vs champion v{champion['version']} {champion['score']:.4f} "
                f"(tolerance {p.champion_tolerance})",
            )
        )
    checks.append(
        Check(
            name="size budget",
            passed=facts["size_mb"] <= p.max_model_mb,
            detail=f"{facts['size_mb']:.2f} MB (budget {p.max_model_mb} MB)",
        )
    )
    checks.append(
        Check(
            name="latency budget",
            passed=facts["latency_ms"] <= p.max_latency_ms,
            detail=f"p95 {facts['latency_ms']:.2f} ms per window in process (budget {p.max_latency_ms} ms)",
        )
    )
    return checks


def measure(cfg: Config, version: str, report: EvaluationReport) -> tuple[dict[str, Any], str | None]:
    """The facts the gate judges: outputs, metrics, the champion re-scored on the same rows, size, latency."""
    metric = report.primary_metric
    where, evidence = report.evidence()
    candidate = TorchModel(versions.download(cfg, version))
    champion = versions.alias_version(cfg, "champion")
    champion = champion if champion != version else None
    champion_model = TorchModel(versions.download(cfg, champion)) if champion else None
    lookback = max(candidate.lookback, champion_model.lookback if champion_model else 0)
    windows, y_up, y_ret = pipeline.test_set(cfg, report, lookback)
    prob, ret = candidate.predict_windows(windows[:, -candidate.lookback :])
    finite = bool(np.isfinite(prob).all() and np.isfinite(ret).all())
    facts: dict[str, Any] = {
        "sane": bool(finite and (prob >= 0).all() and (prob <= 1).all()),
        "sane_detail": f"{len(prob)} test windows: P(up) in [{np.nanmin(prob):.3f}, {np.nanmax(prob):.3f}], all finite: {finite}",
        "primary": evidence["sofare_m3"][metric].value,
        "baselines": {b: evidence[b][metric].value for b in BASELINES if b in evidence},
        "evidence": where,
        "paired": {
            p.baseline: f"{p.verdict} (difference {p.difference.value:+.4f} "
            f"[{p.difference.ci_low:+.4f}, {p.difference.ci_high:+.4f}])"
            for p in (report.wf.paired if report.wf is not None and where != "test window" else [])
        },
        "size_mb": candidate.size_mb,
        "latency_ms": latency_p95_ms(candidate, windows[-1:, -candidate.lookback :]),
        "champion": None,
    }
    if champion_model is not None:
        comparable = champion_model.meta.columns == candidate.meta.columns
        facts["champion"] = {
            "version": champion,
            "comparable": comparable,
            "windows": len(y_up),
            "feature_set": champion_model.meta.feature_set_version,
            "candidate": _primary(cfg, candidate, windows, y_up, y_ret) if comparable else None,
            "score": _primary(cfg, champion_model, windows, y_up, y_ret) if comparable else None,
        }
    return facts, champion


def gate(cfg: Config, version: str | None = None, actor: str = "sofare", override_reason: str | None = None) -> Verdict:
    """Judge a registered version (default: the newest); record the verdict; alias it on success.

    `override_reason`: a person promotes the version even if it fails (recorded as `overridden`,
    with who and why, next to every failed check)."""
    if override_reason and not override_reason.strip():
        raise InputError("override_reason: an override needs a reason")
    mv = versions.resolve(cfg, version)
    number = str(mv.version)
    facts, champion = measure(cfg, number, versions.report(cfg, mv))
    checks = judge(facts, cfg.promotion, cfg.evaluation.primary_metric)
    passed = all(c.passed for c in checks)
    override = f"{actor}: {override_reason.strip()}" if override_reason and not passed else None
    verdict = Verdict(
        model=cfg.mlflow.model_name,
        version=number,
        passed=passed,
        checks=tuple(checks),
        champion=champion,
        override=override,
    )
    verdict = verdict.model_copy(
        update={"audit_id": audit.record(cfg, actor, "promotion_gate", number, verdict.outcome, verdict.to_xcom())}
    )
    versions.set_tags(
        cfg,
        number,
        {
            "promotion_verdict": verdict.outcome,
            "promotion_reasons": json.dumps(verdict.reasons),
            "promotion_audit_id": verdict.audit_id,
        },
    )
    if verdict.promoted:
        versions.set_alias(cfg, "challenger", number)
    return verdict
