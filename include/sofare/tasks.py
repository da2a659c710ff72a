"""Task bodies: every DAG task and every CLI command calls one of these, so they cannot disagree.

Each reads the configuration when it runs (workers may differ from the parser), takes plain values
and returns JSON-able dicts (they travel through XCom).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sofare import ingest, report, warehouse
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
