"""Severity -> action: rules from `monitoring.*` in sofare.yaml, minimum samples, and a cool-down.

Rules (each a `Finding`; the run's severity is the highest, its action the strongest):
- drift: the share of the hourly (micro) input features Evidently finds drifted >= drift.low / medium / high ->
  low (recorded), medium (alert), high (retrain: the market moved away from the training window). Daily and
  monthly context, prediction drift or target drift alone is low: worth recording, not acting on.
- quality: a version's accuracy provably below persistence on the same hours (the paired 95% interval of the
  difference lies below 0) or its Brier score provably worse than a coin's (interval above 0.25), in the
  longest window with enough outcomes -> high (retrain); critical (rollback) when that version is a canary or
  a fresh champion (serving as stable for less than `fresh_hours`): the last change is at fault.
- errors: a variant's 5xx share since the previous run >= errors.medium / high / critical (with at least
  `min_requests` requests) -> alert; critical for a canary or a fresh champion -> rollback.
Nothing fires on an insufficient sample. An action taken (not held back) within `cooldown_hours` of logical
time is not taken again: it is recorded as held back, with the time it was last taken.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sofare.contracts import (
    ACTIONS,
    SEVERITIES,
    Action,
    Decision,
    DriftResult,
    Finding,
    LiveQuality,
    ServiceHealth,
    Severity,
)

if TYPE_CHECKING:
    from sofare.config import Config


ROLLBACK_REASONS = {"quality": "bad-predictions", "calibration": "bad-predictions", "errors": "incident"}  # the form's


def _pct(x: float) -> str:
    return f"{x:.1%}"


def drift_findings(cfg: Config, drift: DriftResult) -> list[Finding]:
    """Severity from the drifted share of the hourly (micro) features; the daily and monthly context cannot match a
    month-long reference within one week, so its drift is recorded (low), never acted on."""
    rules = cfg.monitoring.drift
    out: list[Finding] = []
    if drift.status != "ok":
        return out
    micro = drift.shares.get("micro", drift.share)
    names = ", ".join(drift.drifted[:5]) + (" …" if len(drift.drifted) > 5 else "")
    if micro is not None:
        levels: tuple[Severity, ...] = ("high", "medium", "low")
        level = next((lvl for lvl in levels if micro >= getattr(rules, lvl)), None)
        if level:
            actions: dict[Severity, Action] = {"low": "none", "medium": "alert", "high": "retrain"}
            action = actions[level]
            out.append(
                Finding(
                    rule="drift",
                    severity=level,
                    action=action,
                    model_version=drift.model_version,
                    message=f"{_pct(micro)} of the hourly input features drifted (>= "
                    f"{_pct(getattr(rules, level))}; {drift.drifted_columns}/{drift.columns} of all "
                    f"features): {names}",
                )
            )
    slow = {k: v for k, v in drift.shares.items() if k != "micro" and v >= rules.high}
    if slow:
        out.append(
            Finding(
                rule="drift",
                severity="low",
                action="none",
                model_version=drift.model_version,
                message="daily/monthly context drifted from the reference ("
                + ", ".join(f"{k} {_pct(v)}" for k, v in sorted(slow.items()))
                + "): recorded",
            )
        )
    if drift.prediction_drifted:
        out.append(
            Finding(
                rule="prediction_drift",
                severity="low",
                action="none",
                model_version=drift.model_version,
                message=f"prob_up drifted from the reference (score {drift.prediction_drift:.3g})",
            )
        )
    if drift.target_drifted:
        out.append(
            Finding(
                rule="target_drift",
                severity="low",
                action="none",
                model_version=drift.model_version,
                message=f"realised returns drifted from the reference (score {drift.target_drift:.3g})",
            )
        )
    return out


def quality_findings(
    cfg: Config, quality: Iterable[LiveQuality], at_fault: set[str], serving: set[str] | None = None
) -> list[Finding]:
    """`at_fault`: versions whose failure means the last change is to blame (the canary, a fresh champion);
    `serving`: the versions serving now (None: every version judged). A version that no longer serves is still
    reported, but nothing is done about it: its old predictions stay in the window for a while."""
    longest: dict[tuple[str, str], LiveQuality] = {}
    windows = cfg.monitoring.windows
    for q in quality:
        if q.status != "ok" or (serving is not None and q.model_version not in serving):
            continue
        key = (q.model_version, q.variant)
        if key not in longest or windows[q.window] > windows[longest[key].window]:
            longest[key] = q
    out: list[Finding] = []
    for (version, variant), q in sorted(longest.items()):
        severe = version in at_fault
        severity: Severity
        action: Action
        severity, action = ("critical", "rollback") if severe else ("high", "retrain")
        who = f"version {version} ({variant}, {q.window}, n={q.n})"
        if q.vs_persistence is not None and q.vs_persistence.ci_high < 0:
            out.append(
                Finding(
                    rule="quality",
                    severity=severity,
                    action=action,
                    model_version=version,
                    variant=variant,
                    message=f"{who}: accuracy {_pct(q.accuracy.value) if q.accuracy else '?'} below "
                    f"persistence by {_pct(-q.vs_persistence.value)} "
                    f"[95% CI {_pct(-q.vs_persistence.ci_high)}, {_pct(-q.vs_persistence.ci_low)}]",
                )
            )
        if q.vs_coin_brier is not None and q.vs_coin_brier.ci_low > 0:
            out.append(
                Finding(
                    rule="calibration",
                    severity=severity,
                    action=action,
                    model_version=version,
                    variant=variant,
                    message=f"{who}: Brier {q.brier.value if q.brier else float('nan'):.3f} worse than a "
                    f"coin's 0.250 [95% CI of the excess {q.vs_coin_brier.ci_low:.3f}, "
                    f"{q.vs_coin_brier.ci_high:.3f}]",
                )
            )
    return out


def error_findings(cfg: Config, service: Iterable[ServiceHealth], at_fault: set[str]) -> list[Finding]:
    m = cfg.monitoring
    out: list[Finding] = []
    levels: tuple[Severity, ...] = ("critical", "high", "medium")
    for s in service:
        if s.error_rate is None or s.requests < m.min_requests:
            continue
        level = next((lvl for lvl in levels if s.error_rate >= getattr(m.errors, lvl)), None)
        if level is None:
            continue
        severity: Severity = level
        action: Action = "alert"
        if level == "critical":
            severity, action = ("critical", "rollback") if s.model_version in at_fault else ("high", "alert")
        out.append(
            Finding(
                rule="errors",
                severity=severity,
                action=action,
                model_version=s.model_version,
                variant=s.variant,
                message=f"{s.variant} (version {s.model_version}): {_pct(s.error_rate)} "
                f"of {s.requests:.0f} requests answered 5xx since the last run",
            )
        )
    return out


def decide(
    cfg: Config, at: datetime, findings: list[Finding], history: list[dict[str, Any]], rollback_target: str | None
) -> Decision:
    """The run's severity and action. `history`: earlier runs' (at, action) -- actions actually taken -- newest
    first. A rollback without a version to roll back to becomes a retrain (and says so)."""
    severity: Literal["none", Severity] = max((f.severity for f in findings), key=SEVERITIES.index, default="none")
    wanted: Action = max((f.action for f in findings), key=ACTIONS.index, default="none")
    notes = []
    if wanted == "rollback" and rollback_target is None:
        wanted = "retrain"
        notes.append("no version to roll back to: retrain instead")
    action: Action = wanted
    cooldown: str | None = None
    if wanted != "none":
        since = at - timedelta(hours=cfg.monitoring.cooldown_hours)
        last = next((h for h in history if h["action"] == wanted and since < h["at"] <= at), None)
        if last is not None:
            action = "none"
            cooldown = (
                f"{wanted} held back: last taken at {last['at'].isoformat()}, within the "
                f"{cfg.monitoring.cooldown_hours} h cool-down"
            )
    ordered = sorted(findings, key=lambda f: (-SEVERITIES.index(f.severity), -ACTIONS.index(f.action)))
    reason = "; ".join(f.message for f in ordered[:3]) or "nothing fired: every measurement within its rules"
    if len(ordered) > 3:
        reason += f"; +{len(ordered) - 3} more"
    if notes:
        reason += f" ({'; '.join(notes)})"
    if cooldown:
        reason += f" [{cooldown}]"
    return Decision(
        severity=severity,
        action=action,
        wanted=wanted,
        reason=reason,
        findings=tuple(ordered),
        cooldown=cooldown,
        rollback_target=rollback_target if action == "rollback" else None,
    )
