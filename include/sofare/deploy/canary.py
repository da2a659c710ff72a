"""Automatic canary analysis: raise the canary's weight step by step; at each step let traffic flow for an
interval, then compare canary with stable from each server's /metrics (error rate, p95 latency). A failure
past `deploy.failure_limit` aborts and rolls back; too little traffic is inconclusive and is measured again
at the same weight, up to `deploy.inconclusive_limit` times, then aborts (never promoted blind); success at
the last step (100 %) promotes the canary to stable and champion. Every measurement is a
`deployment_events` row. (Argo Rollouts' AnalysisTemplate and Flagger's stepWeight/threshold, in small.)

Directional accuracy joins the measurements once `sofare_monitor` records prediction outcomes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sofare.deploy import analysis
from sofare.deploy.rollout import DeployError, Deployment, check_weight

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)
ROLLBACK_REASON = {"error_rate": "incident", "p95_latency_ms": "latency"}  # failed measurement -> rollback reason


def rules(cfg: Config) -> analysis.Rules:
    d = cfg.deploy
    return analysis.Rules(
        min_requests=d.min_requests,
        max_error_rate=d.max_error_rate,
        max_p95_ms=d.max_p95_ms,
        max_latency_ratio=d.max_latency_ratio,
        latency_floor_ms=d.latency_floor_ms,
    )


def check_steps(steps: list[float]) -> list[float]:
    """Weights that rise within (0, 1] and end at 1 (the canary must carry all traffic before it is promoted)."""
    weights = [check_weight(w) for w in steps]
    if not weights or any(w <= 0 for w in weights) or weights != sorted(weights) or weights[-1] != 1.0:
        raise DeployError(f"steps must rise within (0, 1] and end at 1, got {steps}")
    return weights


def _measure(
    deployment: Deployment, interval: float, sleep: Callable[[float], None], cfg_rules: analysis.Rules
) -> list[analysis.Measurement]:
    state = deployment.state()
    if state.stable is None or state.canary is None:
        raise DeployError("the canary or the stable stopped during the analysis")
    before = {b.variant: analysis.scrape(b.url) for b in (state.stable, state.canary)}
    sleep(interval)
    try:
        canary = analysis.delta(before["canary"], analysis.scrape(state.canary.url))
    except analysis.ScrapeError as exc:  # a canary that stops answering has failed, whatever its numbers were
        return [
            analysis.Measurement(
                name="error_rate",
                outcome="failure",
                canary=None,
                stable=None,
                requests=0,
                detail=f"the canary's /metrics did not answer: {exc}",
            )
        ]
    stable = analysis.delta(before["stable"], analysis.scrape(state.stable.url))
    return analysis.judge(canary, stable, cfg_rules)


def analyse(
    cfg: Config,
    deployment: Deployment,
    steps: list[float],
    interval: float,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Run the steps; {"decision": "promote" | "abort", "reason", "steps": [...]}. Changes only the weight."""
    weights = check_steps(steps)
    verdicts: list[str] = []
    record: list[dict[str, Any]] = []
    cfg_rules = rules(cfg)
    index, applied = 0, None
    while index < len(weights):
        weight = weights[index]
        if weight != applied:
            deployment.set_weight(weight, action="step", reason=f"step {index + 1}/{len(weights)}")
            applied = weight
        measurements = _measure(deployment, interval, sleep, cfg_rules)
        verdict = analysis.verdict(measurements)
        verdicts.append(verdict)
        decision = analysis.step_decision(verdicts, cfg.deploy.failure_limit, cfg.deploy.inconclusive_limit)
        summary = "; ".join(m.detail for m in measurements)
        record.append(
            {
                "step": index + 1,
                "weight": weight,
                "verdict": verdict,
                "decision": decision,
                "measurements": [m.to_dict() for m in measurements],
            }
        )
        state = deployment.state()
        deployment.event(
            state,
            "analysis",
            decision,
            f"step {index + 1}/{len(weights)} at weight {weight:g}: {verdict} ({summary})",
            [m.to_dict() for m in measurements],
        )
        log.info(
            "canary step %d/%d at weight %g: %s -> %s (%s)", index + 1, len(weights), weight, verdict, decision, summary
        )
        if decision == "abort":
            failed = [m for m in measurements if m.outcome == "failure"]
            reason = ROLLBACK_REASON.get(failed[0].name, "other") if failed else "other"
            why = f"canary analysis {verdict} at weight {weight:g}: {summary}"
            return {"decision": "abort", "reason": reason, "details": why, "steps": record}
        if decision == "continue":
            index += 1
    return {"decision": "promote", "reason": "canary analysis passed every step", "details": "", "steps": record}


def finish(cfg: Config, deployment: Deployment, outcome: dict[str, Any]) -> dict[str, Any]:
    """Promote the canary, or abort and roll back to the stable (with an alert)."""
    if outcome["decision"] == "promote":
        state = deployment.promote(outcome["reason"])
        return {**outcome, "stable": state.stable.version if state.stable else None}
    state = deployment.state()
    target = state.stable.version if state.stable else None
    result = deployment.rollback(outcome["reason"], outcome["details"], target)
    return {**outcome, "stable": result["target"], "rollback": result}
