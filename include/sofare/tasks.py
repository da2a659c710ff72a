"""Task bodies: every DAG task and every CLI command calls one of these, so they cannot disagree.

Each takes the `Config` its caller loaded once (`orchestration.run` for a DAG task, `cli.main` for a
command) and plain values, and returns JSON-able values (they travel through XCom). Heavy stages
(training, the registry, serving) are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sofare.config import Config
from sofare.data import ingest, report, warehouse
from sofare.data.features import feature_spec
from sofare.errors import InputError, PermanentError

log = logging.getLogger(__name__)


def _engine(cfg: Config) -> Any:
    engine = warehouse.get_engine(cfg)
    warehouse.ensure_schema(engine, feature_spec(cfg).columns)
    return engine


# --- ingest and backfill -------------------------------------------------------------------------------


def load(
    cfg: Config,
    modality: str,
    start: datetime | str,
    end: datetime | str,
    source: str | None = None,
    symbol: str | None = None,
    interval: str | None = None,
    context: bool = False,
    history: bool = False,
) -> dict[str, Any]:
    """Load one modality for one interval (the ingest DAG's sources come from the config). `context`: also what
    the interval's features read (sofare_ingest's runs, so that each is self-contained; see
    `ingest.load_interval`)."""
    source = source or getattr(cfg.ingest.sources, modality)
    result = ingest.load_interval(
        cfg,
        _engine(cfg),
        source,
        modality,
        ingest.utc(start),
        ingest.utc(end),
        symbol,
        interval,
        context=context,
        history=history,
    )
    return result.to_dict()


def build_features(
    cfg: Config, start: datetime | str, end: datetime | str, symbol: str | None = None, interval: str | None = None
) -> dict[str, Any]:
    """Features of [start, end); `validate_from` is where validation must start (the refreshed targets' day)."""
    engine = _engine(cfg)
    rows = ingest.materialize_features(cfg, engine, ingest.utc(start), ingest.utc(end), symbol, interval)
    return {
        "start": ingest.utc(start).isoformat(),
        "end": ingest.utc(end).isoformat(),
        "rows": rows,
        "feature_set": feature_spec(cfg).version,
        "validate_from": ingest.revalidate_from(cfg, engine, ingest.utc(start), symbol, interval).isoformat(),
    }


def plan_backfill(
    cfg: Config, sources: list[str], start: str, end: str, symbol: str | None = None, interval: str | None = None
) -> list[dict[str, Any]]:
    """The mapped load tasks for inclusive days [start, end]."""
    first, stop = ingest.day_range(start, end)
    names = [n for s in sources for n in ingest.expand_sources(s)]
    return ingest.plan_backfill(cfg, names, first, stop, symbol, interval)


def plan_feature_chunks(
    cfg: Config, start: str, end: str, symbol: str | None = None, interval: str | None = None
) -> list[dict[str, Any]]:
    first, stop = ingest.day_range(start, end)
    return [
        {"start": lo.isoformat(), "end": hi.isoformat(), "symbol": symbol, "interval": interval}
        for lo, hi in ingest.plan_chunks(first, stop, cfg.ingest.chunk_days)
    ]


def load_chunk(cfg: Config, chunk: dict[str, Any]) -> dict[str, Any]:
    return load(
        cfg,
        chunk["modality"],
        chunk["start"],
        chunk["end"],
        chunk["source"],
        chunk.get("symbol"),
        chunk.get("interval"),
        history=bool(chunk.get("history")),
    )


def features_chunk(cfg: Config, chunk: dict[str, Any]) -> dict[str, Any]:
    return build_features(cfg, chunk["start"], chunk["end"], chunk.get("symbol"), chunk.get("interval"))


def status(cfg: Config) -> dict[str, Any]:
    return report.warehouse_status(cfg, _engine(cfg))


def summarize(cfg: Config, loads: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows and gaps of a backfill's loads next to the warehouse status; logged for the UI."""
    gaps = [g for result in loads for g in result.get("gaps", [])]
    summary = {
        "loaded_rows": sum(r["rows"] for r in loads),
        "intervals": len(loads),
        "gaps_found": gaps,
        "status": status(cfg),
    }
    log.info(
        "backfill loaded %d rows in %d intervals; gaps: %s\n%s",
        summary["loaded_rows"],
        len(loads),
        gaps or "none",
        report.format_status(summary["status"]),
    )
    return summary


def backfill(
    cfg: Config,
    sources: list[str],
    start: str,
    end: str,
    symbol: str | None = None,
    interval: str | None = None,
    progress: Callable[[str, dict[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """sofare_backfill's steps in this process, in its order (the DAG maps the same steps in parallel):
    plan the loads, load each chunk, plan the feature chunks, build each, summarize."""
    progress = progress or (lambda step, chunk, result: None)
    loads = []
    for chunk in plan_backfill(cfg, sources, start, end, symbol, interval):
        loads.append(load_chunk(cfg, chunk))
        progress("load", chunk, loads[-1])
    for chunk in plan_feature_chunks(cfg, start, end, symbol, interval):
        progress("features", chunk, features_chunk(cfg, chunk))
    return summarize(cfg, loads)


# --- validation ----------------------------------------------------------------------------------------


class ValidationFailed(PermanentError):
    """Data broke an expectation: retrying validates the same data."""


def validation_windows(
    params: dict[str, Any] | None,
    data_interval_start: datetime | None,
    data_interval_end: datetime | None,
    asset_extras: list[dict[str, Any]] | None = None,
) -> list[dict[str, str]]:
    """What a validation run covers: manual start/end Params, else the intervals the triggering asset
    events carry (merged when they touch), else the run's data interval."""
    if params and params.get("start") and params.get("end"):
        spans = [ingest.day_range(params["start"], params["end"])]
    elif asset_extras:
        spans = sorted(
            (ingest.utc(e["start"]), ingest.utc(e["end"])) for e in asset_extras if "start" in e and "end" in e
        )
        if not spans:
            raise InputError("the triggering asset events carry no interval (extra start/end)")
    elif data_interval_start is not None and data_interval_end is not None and data_interval_end > data_interval_start:
        spans = [(ingest.utc(data_interval_start), ingest.utc(data_interval_end))]
    else:
        raise InputError("nothing to validate: give start and end, or run on a schedule or asset event")
    merged: list[list[datetime]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [{"start": lo.isoformat(), "end": hi.isoformat()} for lo, hi in merged]


def validate(
    cfg: Config, suite: str, windows: list[dict[str, str]], symbol: str | None = None, interval: str | None = None
) -> dict[str, Any]:
    """Run one suite over each window; raise ValidationFailed naming every broken expectation."""
    from sofare.validation import suites

    engine = _engine(cfg)
    results = [
        suites.run_suite(cfg, engine, suite, ingest.utc(w["start"]), ingest.utc(w["end"]), symbol, interval)
        for w in windows
    ]
    failed = [r for r in results if not r.success]
    if failed:
        raise ValidationFailed(
            f"{suite}: {sum(len(r.days_failed) for r in failed)} day(s) failed validation\n"
            + "\n".join(r.summary() for r in failed)
            + f"\nData Docs: {suites.data_docs_index(cfg)} (rebuilt at the end of the run)"
        )
    return {"suite": suite, "runs": [r.run_id for r in results], "days": sum(len(r.days_passed) for r in results)}


def validate_range(
    cfg: Config, start: str, end: str, symbol: str | None = None, interval: str | None = None
) -> list[Any]:
    """Every suite over inclusive days [start, end], then Data Docs (the CLI)."""
    from sofare.validation import suites

    engine = _engine(cfg)
    lo, hi = ingest.day_range(start, end)
    results = [suites.run_suite(cfg, engine, suite, lo, hi, symbol, interval) for suite in suites.SUITES]
    suites.build_data_docs(cfg)
    return results


def data_docs(cfg: Config) -> str:
    from sofare.validation import suites

    return str(suites.build_data_docs(cfg))


# --- training (torch, lightning, optuna and mlflow are imported only here) ---------------------------


def train_plan(
    cfg: Config,
    n_trials: int | None = None,
    timeout: int | None = None,
    max_epochs: int | None = None,
    start: str | None = None,
    end: str | None = None,
) -> dict[str, Any]:
    from sofare.training import pipeline

    return pipeline.plan(cfg, n_trials, timeout, max_epochs, start, end).model_dump(mode="json")


def train_tune(cfg: Config, plan: dict[str, Any], worker: int) -> dict[str, Any]:
    from sofare.contracts import TrainingPlan
    from sofare.training import pipeline

    return pipeline.tune(cfg, TrainingPlan.model_validate(plan), worker)


def train_finalize(cfg: Config, plan: dict[str, Any]) -> dict[str, Any]:
    """Final fit and evaluation, then registration: the new version with its report."""
    from sofare.contracts import TrainingPlan
    from sofare.registry import versions
    from sofare.training import pipeline

    trained = pipeline.finalize(cfg, TrainingPlan.model_validate(plan))
    return versions.register(cfg, trained).model_dump(mode="json")


def train(
    cfg: Config,
    n_trials: int | None = None,
    timeout: int | None = None,
    max_epochs: int | None = None,
    start: str | None = None,
    end: str | None = None,
) -> dict[str, Any]:
    """The whole sofare_train DAG from one command (the CLI): plan, the tuning workers side by side in their own
    processes (as the DAG's mapped tasks run), final fit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    plan = train_plan(cfg, n_trials, timeout, max_epochs, start, end)
    workers = cfg.training.workers
    if workers <= 1:
        train_tune(cfg, plan, 0)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in [pool.submit(train_tune, cfg, plan, worker) for worker in range(workers)]:
                done.result()  # a worker's failure fails the command, as a failed mapped task fails the DAG
    return train_finalize(cfg, plan)


def registered(cfg: Config, version: str | None = None) -> dict[str, Any]:
    """A registered version (default: the newest) with its evaluation report."""
    from sofare.registry import versions

    return versions.registered(cfg, version).model_dump(mode="json")


def version_tags(cfg: Config, version: str | None = None) -> dict[str, str]:
    """A registered version's tags: semver, windows, promotion verdict and reasons, bento, container."""
    from sofare.registry import versions

    return dict(versions.resolve(cfg, version).tags)


def model_card(cfg: Config, version: str | None = None, out: Path | None = None) -> dict[str, str]:
    from sofare.registry import model_card as card
    from sofare.registry import versions

    number = versions.version_of(cfg, version)
    return {"version": number, "path": str(card.write(cfg, number, out))}


# --- promotion and the serving bundle --------------------------------------------------------------


def promote(
    cfg: Config,
    version: str | None = None,
    actor: str = "sofare",
    override_reason: str | None = None,
    asset_extras: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The promotion gate on a registered version (default: the one a triggering asset event names, else
    the newest); an override needs a reason."""
    from sofare.registry import gate

    version = version or next((e["version"] for e in asset_extras or [] if e.get("version")), None)
    verdict = gate.gate(cfg, version, actor, override_reason)
    log.info("%s", verdict.summary())
    return verdict.to_xcom()


def build_bento(cfg: Config, version: str | None = None, actor: str = "sofare") -> dict[str, Any]:
    """Import a version's exported model into the bento store and build the bento (default version:
    the challenger, else the newest); the tags are recorded on the version and in the audit log."""
    from sofare.registry import audit, versions
    from sofare.serving import bento

    mv = versions.resolve(cfg, versions.version_of(cfg, version, default_alias="challenger"))
    number = str(mv.version)
    model_tag = bento.import_model(
        cfg,
        versions.download(cfg, number),
        {
            "model_version": number,
            "semver": mv.tags.get("semver", "?"),
            "feature_set_version": mv.tags.get("feature_set_version", "?"),
        },
    )
    built = {**bento.build(cfg, model_tag), "version": number}
    versions.set_tags(cfg, number, {"bento_tag": built["bento"], "bento_model": model_tag})
    audit.record(cfg, actor, "bento_build", number, "built", built)
    return built


def containerize(cfg: Config, version: str, bento_tag: str, actor: str = "sofare") -> dict[str, Any]:
    from sofare.registry import audit, versions
    from sofare.serving import bento

    result = bento.containerize(cfg, bento_tag)
    audit.record(cfg, actor, "containerize", version, "image" if result["built"] else "context_only", result)
    versions.set_tags(cfg, version, {"container": result["image"] or f"not built: {result['engine']}"})
    log.info("%s", result.get("message") or f"image {result['image']} built ({result['engine']})")
    return result


def serve(cfg: Config, version: str | None = None, port: int | None = None, variant: str = "stable") -> dict[str, Any]:
    """Start a background `bentoml serve` of a version's bento (default: the challenger, else the newest)."""
    from sofare.registry import versions
    from sofare.serving import bento

    number = versions.version_of(cfg, version, default_alias="challenger")
    tag = versions.resolve(cfg, number).tags.get("bento_tag")
    if not tag:
        raise PermanentError(f"version {number} has no bento yet; run `sofare build --version {number}`")
    url = bento.serve_detached(cfg, tag, port or cfg.serving.port, variant)
    return {"version": number, "bento": tag, "variant": variant, "url": url}


def stop_serving(cfg: Config, variant: str = "stable") -> bool:
    from sofare.serving import bento

    return bento.stop_detached(cfg, variant)


# --- deployment: the front door, canary, rollback -----------------------------------------------------


def deploy(
    cfg: Config, version: str | None = None, canary_weight: float | None = None, actor: str = "sofare"
) -> dict[str, Any]:
    """Deploy a version (default: the challenger) as canary at `canary_weight` (default deploy.canary_weight)
    behind the front door; when nothing serves yet it becomes the stable (and the champion) instead."""
    from sofare.deploy import rollout

    weight = rollout.check_weight(cfg.deploy.canary_weight if canary_weight is None else canary_weight)
    version = rollout.require_version(cfg, version)
    deployment = rollout.Deployment(cfg, actor)
    stable = deployment.status(champion=False)["stable"]
    if stable is None or not stable["running"]:
        deployment.serve(version, reason="first deployment: nothing served, no stable to compare a canary with")
        from sofare.registry import versions

        versions.set_alias(cfg, "champion", version)
    else:
        deployment.start_canary(version, weight)
    return deployment.status()


def deployment_status(cfg: Config, champion: bool = True) -> dict[str, Any]:
    from sofare.deploy import rollout

    return rollout.Deployment(cfg).status(champion)


def canary(cfg: Config, action: str, reason: str = "", actor: str = "sofare") -> dict[str, Any]:
    """`status`, `promote` (the canary becomes stable and champion) or `abort` (back to stable only)."""
    from sofare.deploy import rollout

    deployment = rollout.Deployment(cfg, actor)
    if action == "promote":
        deployment.promote(reason or f"promoted by {actor}")
    elif action == "abort":
        deployment.abort(reason or f"aborted by {actor}")
    elif action != "status":
        raise InputError(f"canary action must be status, promote or abort, got {action!r}")
    return {**deployment.status(), "history": deployment.history(limit=10)}


def rollback(
    cfg: Config, reason: str, details: str = "", target_version: str | None = None, actor: str = "sofare"
) -> dict[str, Any]:
    """Serve the target version (default: the stable when a canary is live, else the previous champion) as the
    only version, move `champion`, verify through the front door, audit, alert. Idempotent."""
    from sofare.deploy import rollout

    return rollout.Deployment(cfg, actor).rollback(reason, details, target_version)


def start_rollout(
    cfg: Config,
    version: str | None = None,
    steps: list[float] | None = None,
    asset_extras: list[dict[str, Any]] | None = None,
    actor: str = "sofare",
) -> dict[str, Any]:
    """sofare_deploy's first step: the version (Param, else the triggering event's, else the challenger) as a
    canary at the first step's weight; when nothing serves yet, as the stable instead (no analysis then)."""
    from sofare.deploy import canary

    steps = canary.check_steps(list(steps or cfg.deploy.steps))
    version = version or next((e["version"] for e in asset_extras or [] if e.get("version")), None)
    status = deploy(cfg, version, steps[0], actor)
    is_canary = status["canary"] is not None
    return {
        "version": (status["canary"] or status["stable"])["version"],
        "canary": is_canary,
        "steps": steps,
        "frontdoor": status["frontdoor"]["url"],
    }


def analyse_rollout(
    cfg: Config, plan: dict[str, Any], interval_seconds: float | None = None, actor: str = "sofare"
) -> dict[str, Any]:
    """Step the canary through its weights, judging each step from both servers' /metrics."""
    from sofare.deploy import canary, rollout

    if not plan["canary"]:
        return {"decision": "none", "reason": "first deployment: served as stable, nothing to analyse", "steps": []}
    interval = cfg.deploy.interval_seconds if interval_seconds is None else float(interval_seconds)
    return canary.analyse(cfg, rollout.Deployment(cfg, actor), plan["steps"], interval)


def finish_rollout(cfg: Config, outcome: dict[str, Any], actor: str = "sofare") -> dict[str, Any]:
    """Promote the canary (stable and champion), or abort it and roll back to the stable, with an alert."""
    from sofare.deploy import canary, rollout

    if outcome["decision"] == "none":
        return {**outcome, **deployment_status(cfg)}
    return canary.finish(cfg, rollout.Deployment(cfg, actor), outcome)


def stop_deployment(cfg: Config) -> dict[str, Any]:
    from sofare.deploy import rollout

    deployment = rollout.Deployment(cfg)
    deployment.stop()
    return deployment.status()


# --- monitoring: outcomes, live quality, drift, severity -> action, replay ------------------------------------


def monitor(
    cfg: Config,
    at: datetime | str | None = None,
    start: datetime | str | None = None,
    actor: str = "sofare",
    html: bool = True,
    drift: bool | None = None,
) -> dict[str, Any]:
    """One monitor run for the hour `at` (outcomes from `start`; drift always when `drift`, None: on the
    configured hours); the result carries what sofare_monitor's branches need: `action`, the alert, the retrain
    asset event's extra, the sofare_rollback conf."""
    from sofare.monitoring import monitor as mon
    from sofare.monitoring.policy import ROLLBACK_REASONS

    result = mon.run(cfg, at, start, actor, html, drift=drift)
    decision = result.decision
    cause = next((f for f in decision.findings if f.action == decision.action), None)
    details = f"sofare_monitor at {result.at}: {decision.reason}"
    return {
        "run": result.model_dump(mode="json"),
        "action": decision.action,
        "severity": decision.severity,
        "alert": {"severity": decision.severity, "message": details},
        "retrain": {
            "reason": decision.reason,
            "severity": decision.severity,
            "monitor_run": result.run_id,
            "at": result.at,
        },
        "rollback": {
            "reason": ROLLBACK_REASONS.get(cause.rule if cause else "", "other"),
            "details": details[:1990],
            "target_version": decision.rollback_target,
        },
    }


def fill_outcomes(cfg: Config, start: str | None = None, end: str | None = None) -> dict[str, Any]:
    """Backfill outcomes for predictions with as_of in (start, end] (the CLI's `sofare monitor --outcomes-only`)."""
    from sofare.monitoring import monitor as mon
    from sofare.monitoring import outcomes

    lo = mon.hour_of(start, "start") if start else None
    hi = mon.hour_of(end) if end else None
    return outcomes.fill(cfg, mon.engine_of(cfg), lo, hi, known_by=hi)
