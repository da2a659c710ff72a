"""Task bodies: every DAG task and every CLI command calls one of these, so they cannot disagree.

Each reads the configuration when it runs (workers may differ from the parser), takes plain values
and returns JSON-able dicts (they travel through XCom).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sofare import ingest, report, validation, warehouse
from sofare.config import Config, load_config
from sofare.features import feature_spec

log = logging.getLogger(__name__)


def _engine(cfg: Config) -> Any:
    engine = warehouse.get_engine(cfg)
    warehouse.ensure_schema(engine, feature_spec(cfg).columns)
    return engine


def load(
    modality: str,
    start: datetime | str,
    end: datetime | str,
    source: str | None = None,
    symbol: str | None = None,
    interval: str | None = None,
) -> dict[str, Any]:
    """Load one modality for one interval (the ingest DAG's sources come from the config)."""
    cfg = load_config()
    source = source or getattr(cfg.ingest.sources, modality)
    result = ingest.load_interval(cfg, _engine(cfg), source, modality, ingest.utc(start), ingest.utc(end), symbol, interval)
    return result.to_dict()


def build_features(
    start: datetime | str, end: datetime | str, symbol: str | None = None, interval: str | None = None
) -> dict[str, Any]:
    cfg = load_config()
    rows = ingest.materialize_features(cfg, _engine(cfg), ingest.utc(start), ingest.utc(end), symbol, interval)
    return {"start": ingest.utc(start).isoformat(), "end": ingest.utc(end).isoformat(), "rows": rows,
            "feature_set": feature_spec(cfg).version}


def plan_backfill(
    sources: list[str], start: str, end: str, symbol: str | None = None, interval: str | None = None
) -> list[dict[str, Any]]:
    """The mapped load tasks for inclusive days [start, end]."""
    cfg = load_config()
    first, stop = ingest.day_range(start, end)
    names = [n for s in sources for n in ingest.expand_sources(s)]
    return ingest.plan_backfill(cfg, names, first, stop, symbol, interval)


def plan_feature_chunks(start: str, end: str, symbol: str | None = None, interval: str | None = None) -> list[dict[str, Any]]:
    cfg = load_config()
    first, stop = ingest.day_range(start, end)
    return [
        {"start": lo.isoformat(), "end": hi.isoformat(), "symbol": symbol, "interval": interval}
        for lo, hi in ingest.plan_chunks(first, stop, cfg.ingest.chunk_days)
    ]


def load_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    return load(chunk["modality"], chunk["start"], chunk["end"], chunk["source"], chunk.get("symbol"), chunk.get("interval"))


def features_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    return build_features(chunk["start"], chunk["end"], chunk.get("symbol"), chunk.get("interval"))


def status() -> dict[str, Any]:
    cfg = load_config()
    return report.warehouse_status(cfg, _engine(cfg))


def summarize(loads: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows and gaps of a backfill's loads next to the warehouse status; logged for the UI."""
    gaps = [g for result in loads for g in result.get("gaps", [])]
    summary = {"loaded_rows": sum(r["rows"] for r in loads), "intervals": len(loads), "gaps_found": gaps,
               "status": status()}
    log.info("backfill loaded %d rows in %d intervals; gaps: %s\n%s", summary["loaded_rows"], len(loads),
             gaps or "none", report.format_status(summary["status"]))
    return summary


class ValidationFailed(ValueError):
    """Data broke an expectation: a permanent failure (retrying validates the same data)."""


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
        spans = sorted((ingest.utc(e["start"]), ingest.utc(e["end"])) for e in asset_extras if "start" in e and "end" in e)
        if not spans:
            raise ValueError("the triggering asset events carry no interval (extra start/end)")
    elif data_interval_start is not None and data_interval_end is not None and data_interval_end > data_interval_start:
        spans = [(ingest.utc(data_interval_start), ingest.utc(data_interval_end))]
    else:
        raise ValueError("nothing to validate: give start and end, or run on a schedule or asset event")
    merged: list[list[datetime]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [{"start": lo.isoformat(), "end": hi.isoformat()} for lo, hi in merged]


def validate(suite: str, windows: list[dict[str, str]], symbol: str | None = None, interval: str | None = None) -> dict[str, Any]:
    """Run one suite over each window; raise ValidationFailed naming every broken expectation."""
    cfg = load_config()
    engine = _engine(cfg)
    results = [validation.run_suite(cfg, engine, suite, ingest.utc(w["start"]), ingest.utc(w["end"]), symbol, interval)
               for w in windows]
    failed = [r for r in results if not r.success]
    if failed:
        raise ValidationFailed(
            f"{suite}: {sum(len(r.days_failed) for r in failed)} day(s) failed validation\n"
            + "\n".join(r.summary() for r in failed)
            + f"\nData Docs: {validation.data_docs_index(cfg)} (rebuilt at the end of the run)"
        )
    return {"suite": suite, "runs": [r.run_id for r in results], "days": sum(len(r.days_passed) for r in results)}


def validate_range(start: str, end: str, symbol: str | None = None, interval: str | None = None) -> list[Any]:
    """Every suite over inclusive days [start, end], then Data Docs (the CLI)."""
    cfg = load_config()
    engine = _engine(cfg)
    lo, hi = ingest.day_range(start, end)
    results = [validation.run_suite(cfg, engine, suite, lo, hi, symbol, interval) for suite in validation.SUITES]
    validation.build_data_docs(cfg)
    return results


def data_docs() -> str:
    return str(validation.build_data_docs(load_config()))


# --- training (torch, lightning, optuna and mlflow are imported only here) ---------------------------


def train_plan(n_trials: int | None = None, timeout: int | None = None, max_epochs: int | None = None,
               start: str | None = None, end: str | None = None) -> dict[str, Any]:
    from sofare import pipeline

    return pipeline.plan(load_config(), n_trials, timeout, max_epochs, start, end)


def train_tune(plan: dict[str, Any], worker: int) -> dict[str, Any]:
    from sofare import pipeline

    return pipeline.tune(load_config(), plan, worker)


def train_finalize(plan: dict[str, Any]) -> dict[str, Any]:
    from sofare import pipeline

    return pipeline.finalize(load_config(), plan)


def train(n_trials: int | None = None, timeout: int | None = None, max_epochs: int | None = None,
          start: str | None = None, end: str | None = None) -> dict[str, Any]:
    """The whole sofare_train DAG in one process (the CLI): plan, each tuning worker in turn, final fit."""
    plan = train_plan(n_trials, timeout, max_epochs, start, end)
    for worker in range(load_config().training.workers):
        train_tune(plan, worker)
    return train_finalize(plan)


# --- promotion and the serving bundle --------------------------------------------------------------


def promote(version: str | None = None, actor: str = "sofare", override_reason: str | None = None) -> dict[str, Any]:
    """The promotion gate on a registered version (default: the newest); an override needs a reason."""
    from sofare import promotion

    verdict = promotion.gate(load_config(), version, actor, override_reason)
    log.info("%s", verdict.summary())
    return verdict.to_dict()


def build_bento(version: str, actor: str = "sofare") -> dict[str, Any]:
    from sofare import audit, bento

    cfg = load_config()
    built = bento.build(cfg, version)
    audit.record(cfg, actor, "bento_build", version, "built", built)
    return built


def containerize(version: str, bento_tag: str, actor: str = "sofare") -> dict[str, Any]:
    from sofare import audit, bento, registry

    cfg = load_config()
    result = bento.containerize(cfg, bento_tag)
    audit.record(cfg, actor, "containerize", version, "image" if result["built"] else "context_only", result)
    registry.client(cfg).set_model_version_tag(cfg.mlflow.model_name, version, "container",
                                               result["image"] or f"not built: {result['engine']}")
    log.info("%s", result.get("message") or f"image {result['image']} built ({result['engine']})")
    return result
