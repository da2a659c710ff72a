"""One monitor run (sofare_monitor's tasks, `sofare monitor`, the replay): outcomes -> live quality -> drift
-> serving health -> severity and action, recorded as one `monitoring_runs` row with its reason.

`at` is the logical hour monitored: windows end there, outcomes use only candles closed by then, and the
cool-down counts in it, so a replay of history behaves as the live system would have.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from sofare.contracts import Decision, DriftResult, MonitorRun, ServiceHealth
from sofare.data import warehouse as wh
from sofare.data.features import feature_spec
from sofare.errors import InputError
from sofare.monitoring import outcomes, policy, quality

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from sofare.config import Config

log = logging.getLogger(__name__)


EARLIEST, LATEST = pd.Timestamp("2009-01-01", tz="UTC"), pd.Timestamp("2100-01-01", tz="UTC")  # as the service


def hour_of(value: datetime | str | None, field: str = "at") -> datetime:
    """The monitored hour: `value` (an ISO string or a datetime, UTC if naive) floored to the hour; None: now.
    Anything else, or a date outside 2009 .. 2100, is an InputError naming `field`."""
    if value is None:
        value = datetime.now(UTC)
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{field}: {str(value)[:60]!r} is not an ISO date-time ({exc})") from None
    if stamp is pd.NaT:
        raise InputError(f"{field}: {str(value)[:60]!r} is not an ISO date-time")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    if not EARLIEST <= stamp < LATEST:
        raise InputError(f"{field}: {stamp.isoformat()} is outside {EARLIEST.date()} .. {LATEST.date()}")
    return stamp.floor("h").to_pydatetime()


def engine_of(cfg: Config) -> Engine:
    engine = wh.get_engine(cfg)
    wh.ensure_schema(engine, feature_spec(cfg).columns)
    return engine


# --- drift: the served inputs of the drift window against the version's reference --------------------------


def served_inputs(conn: sa.Connection, start: datetime, end: datetime) -> tuple[str | None, pd.DataFrame]:
    """The features served in (start, end] for the version served most in it: one row per hour (the latest answer
    when an hour was served more than once: clients asking for the latest window get the same one), with its
    prob_up and realised return (NaN while pending)."""
    i, p, o = wh.prediction_inputs, wh.predictions, wh.prediction_outcomes
    counts = conn.execute(
        sa.select(i.c.model_version, sa.func.count())
        .where(i.c.as_of > start, i.c.as_of <= end)
        .group_by(i.c.model_version)
        .order_by(sa.func.count().desc(), i.c.model_version.desc())
    ).all()
    if not counts:
        return None, pd.DataFrame()
    version = str(counts[0][0])
    frame = wh.query_frame(
        conn,
        sa.select(i.c.as_of, i.c.features, p.c.prob_up, p.c.created_at, o.c.realised_return)
        .select_from(
            i.join(p, p.c.prediction_id == i.c.prediction_id).outerjoin(o, o.c.prediction_id == i.c.prediction_id)
        )
        .where(i.c.model_version == version, i.c.as_of > start, i.c.as_of <= end),
    )
    frame = frame.sort_values("created_at").drop_duplicates("as_of", keep="last").reset_index(drop=True)
    features = np.array(
        [[np.nan if v is None else v for v in json.loads(text)] for text in frame["features"]], dtype=float
    )
    out = pd.DataFrame(features, columns=[f"f{k}" for k in range(features.shape[1])])
    out["as_of"] = frame["as_of"].to_numpy()
    out["prob_up"] = frame["prob_up"].to_numpy(dtype=float)
    out["realised_return"] = pd.to_numeric(frame["realised_return"], errors="coerce").to_numpy()
    return version, out.sort_values("as_of").reset_index(drop=True)


def measure_drift(cfg: Config, conn: sa.Connection, at: datetime, run_id: str, html: bool = True) -> DriftResult:
    hours = cfg.monitoring.windows[cfg.monitoring.drift_window]
    version, current = served_inputs(conn, at - timedelta(hours=hours), at)
    if version is None:
        return DriftResult(status="no_data", message=f"nothing served in the {cfg.monitoring.drift_window} before {at}")
    from sofare.monitoring import drift  # Evidently: seconds to import, only when there is something to compare

    reference = drift.load_reference(cfg, version)
    if reference is None:
        return DriftResult(
            status="no_reference",
            model_version=version,
            current_rows=len(current),
            message=f"version {version} was registered without a reference sample: retrain to monitor drift",
        )
    columns = [c for c in reference.columns if c not in ("prob_up", "realised_return", "open_time")]
    served = [c for c in current.columns if c.startswith("f")]
    if len(served) != len(columns):
        return DriftResult(
            status="no_reference",
            model_version=version,
            current_rows=len(current),
            message=f"version {version}'s reference has {len(columns)} features, the served inputs {len(served)}",
        )
    current = current.rename(columns=dict(zip(served, columns, strict=True)))
    label = f"{at:%Y%m%dT%H}-v{version}-{run_id[:8]}"
    result = drift.measure(
        cfg, reference, current, columns, version, cfg.var_dir / "reports" / "drift" if html else None, label, html=html
    )
    return result.model_copy(update={"shares": modality_shares(cfg, result)})


def modality_shares(cfg: Config, result: DriftResult) -> dict[str, float]:
    """The drifted share of each modality's tested features: hourly market features (micro) move with the
    market and drive the severity; daily and monthly context is recorded beside them."""
    spec = feature_spec(cfg)
    drifted = set(result.drifted)
    out = {}
    for name, columns in (("micro", spec.micro), ("safe", spec.safe_haven), ("macro", spec.macro)):
        tested = [c for c in columns if c in result.scores]
        if tested:
            out[name] = sum(c in drifted for c in tested) / len(tested)
    return out


# --- serving health: each variant's /metrics since the previous run -----------------------------------------


def service_health(cfg: Config, previous: list[dict[str, Any]]) -> list[ServiceHealth]:
    """Requests, 5xx share and p95 of each running variant since the previous run (the counters it stored);
    a restarted process (counters went down, or another pid) counts from zero."""
    from sofare.deploy import analysis, rollout

    status = rollout.Deployment(cfg).status(champion=False)
    before = {s["variant"]: s for s in previous}
    out = []
    for variant in ("stable", "canary"):
        backend = status[variant]
        if backend is None or not backend["running"]:
            continue
        try:
            now = analysis.scrape(backend["url"])
        except Exception as exc:  # noqa: BLE001 - an unreachable server is a finding, not a crash
            log.warning("monitor: cannot scrape %s: %s", backend["url"], exc)
            out.append(
                ServiceHealth(
                    variant=variant,
                    model_version=backend["version"],
                    requests=0,
                    server_errors=0,
                    error_rate=None,
                    p95_ms=None,
                    status="unreachable",
                )
            )
            continue
        counters = {
            "pid": backend["pid"],
            "version": backend["version"],
            "sample": {
                "requests": now.requests,
                "server_errors": now.server_errors,
                "client_errors": now.client_errors,
                "buckets": [[str(le), count] for le, count in now.buckets],
            },
        }  # "inf": JSON has no inf
        old = before.get(variant, {}).get("counters", {})
        since = now
        if old.get("pid") == backend["pid"] and old.get("sample"):
            s = old["sample"]
            since = analysis.delta(
                analysis.Sample(
                    s["requests"],
                    s["server_errors"],
                    s["client_errors"],
                    tuple((float(le), float(c)) for le, c in s["buckets"]),
                ),
                now,
            )
        out.append(
            ServiceHealth(
                variant=variant,
                model_version=backend["version"],
                requests=since.requests,
                server_errors=since.server_errors,
                error_rate=since.server_errors / since.requests if since.requests else None,
                p95_ms=analysis.quantile(since, 0.95),
                counters=counters,
            )
        )
    return out


def _deployment_view(cfg: Config) -> tuple[set[str] | None, set[str], str | None]:
    """The versions serving now; those whose failure blames the last change (a live canary; a champion serving as
    stable for less than `fresh_hours`); and the version a rollback would restore (None: nothing to roll back to)."""
    from sofare.deploy import rollout

    deployment = rollout.Deployment(cfg)
    state = deployment.state()
    at_fault: set[str] = set()
    if state.canary is not None:
        at_fault.add(state.canary.version)
    if state.stable is not None:
        since = next(
            (
                row["at"]
                for row in deployment.history(limit=200)
                if row["action"] in ("serve", "promote", "rollback")
                and row["decision"] in ("done", "noop")
                and row["stable_version"] == state.stable.version
            ),
            None,
        )
        if since is not None and datetime.now(UTC) - since < timedelta(hours=cfg.monitoring.fresh_hours):
            at_fault.add(state.stable.version)
    try:
        target: str | None = deployment._default_target(state)
    except Exception:  # noqa: BLE001 - no previous champion in the history
        target = None
    if state.canary is None and state.stable is not None and target == state.stable.version:
        target = None  # the stable itself: nothing to roll back to
    # no deployment here (e.g. serving runs in containers elsewhere): every version that predicted is judged
    serving = {b.version for b in (state.stable, state.canary) if b is not None} or None
    return serving, at_fault, target


# --- the run ------------------------------------------------------------------------------------------------


REPLAY_ACTOR = "replay:"  # a replay's runs carry "replay:<id>": its cool-down counts only its own decisions


def recent_runs(conn: sa.Connection, before: datetime, actor: str, limit: int = 500) -> list[dict[str, Any]]:
    """Earlier runs (newest first) whose decisions count for the cool-down: a replay walks hours that live runs or
    earlier replays may have monitored already, so it sees only its own; every other run sees the others."""
    r = wh.monitoring_runs
    query = sa.select(r.c.at, r.c.action, r.c.service).where(r.c.at <= before)
    query = (
        query.where(r.c.actor == actor)
        if actor.startswith(REPLAY_ACTOR)
        else query.where(sa.not_(r.c.actor.startswith(REPLAY_ACTOR)))
    )
    rows = conn.execute(query.order_by(r.c.at.desc(), r.c.ran_at.desc()).limit(limit)).mappings().all()
    out = []
    for row in rows:
        at = row["at"]
        out.append(
            {
                "at": at if at.tzinfo else at.replace(tzinfo=UTC),
                "action": row["action"],
                "service": json.loads(row["service"]),
            }
        )
    return out


def run(
    cfg: Config,
    at: datetime | str | None = None,
    start: datetime | str | None = None,
    actor: str = "sofare",
    html: bool = True,
    deployment: bool = True,
    drift: bool | None = None,
) -> MonitorRun:
    """Monitor the hour `at` (default: this hour). Outcomes are (re)filled for predictions in (start, at]
    (default: the longest window), so a backfill over an interval fills that interval. `deployment=False` skips
    scraping the serving variants and the deployment checks (a warehouse-only monitor). `drift`: run Evidently
    (None: at hours divisible by `monitoring.drift_every_hours`)."""
    at = hour_of(at)
    m = cfg.monitoring
    longest = timedelta(hours=max(m.windows.values()))
    start_at = hour_of(start, "start") if start is not None else at - longest
    engine = engine_of(cfg)
    run_id = uuid.uuid4().hex
    filled = outcomes.fill(cfg, engine, start_at, at, known_by=at)
    with engine.connect() as conn:
        live = quality.live_quality(conn, cfg, at)
        if drift is None:
            drift = at.hour % m.drift_every_hours == 0
        drift_result = (
            measure_drift(cfg, conn, at, run_id, html)
            if drift
            else DriftResult(status="skipped", message=f"drift is measured at hours divisible by {m.drift_every_hours}")
        )
        history = recent_runs(conn, at, actor)
    service = service_health(cfg, history[0]["service"] if history else []) if deployment else []
    serving, at_fault, target = _deployment_view(cfg) if deployment else (None, set(), None)
    findings = (
        policy.drift_findings(cfg, drift_result)
        + policy.quality_findings(cfg, live, at_fault, serving)
        + policy.error_findings(cfg, service, at_fault)
    )
    decision = policy.decide(cfg, at, findings, history, target)
    result = MonitorRun(
        run_id=run_id,
        at=at.isoformat(),
        outcomes_filled=filled["filled"],
        outcomes_pending=filled["pending"],
        quality=tuple(live),
        drift=drift_result,
        service=tuple(service),
        decision=decision,
    )
    record(engine, result, actor)
    log.info(
        "monitor %s: severity %s, action %s: %s", at.isoformat(), decision.severity, decision.action, decision.reason
    )
    return result


def record(engine: Engine, result: MonitorRun, actor: str) -> None:
    row = {
        "run_id": result.run_id,
        "at": pd.Timestamp(result.at),
        "ran_at": pd.Timestamp.now(tz="UTC"),
        "actor": actor,
        "outcomes_filled": result.outcomes_filled,
        "outcomes_pending": result.outcomes_pending,
        "quality": json.dumps([q.model_dump(mode="json") for q in result.quality]),
        "drift": result.drift.model_dump_json(),
        "drift_share": result.drift.shares.get("micro", result.drift.share),
        "service": json.dumps([s.model_dump(mode="json") for s in result.service]),
        "severity": result.decision.severity,
        "action": result.decision.action,
        "reason": result.decision.reason,
        "decision": result.decision.model_dump_json(),
    }
    with wh.transaction(engine) as conn:
        wh.upsert(conn, wh.monitoring_runs, pd.DataFrame([row]))


def decision_of(result: dict[str, Any]) -> Decision:
    return MonitorRun.model_validate(result).decision
