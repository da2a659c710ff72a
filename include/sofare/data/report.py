"""`sofare status`: rows, ranges and gaps per warehouse table (computed from the data, never cached)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from sofare.config import interval_delta
from sofare.data import quality, warehouse
from sofare.data.features import feature_spec

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from sofare.config import Config


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _monthly_gaps(dates: list[Any], months: int) -> list[quality.Gap]:
    """Missing period starts of a monthly/quarterly series between its first and last observation."""
    import pandas as pd

    have = set(pd.PeriodIndex(pd.to_datetime(pd.Series(dates)), freq="M"))
    first, last = min(have), max(have)
    expected = [first + k for k in range(0, (last - first).n + 1, months)]
    missing = [p for p in expected if p not in have]
    return [quality.Gap(p.start_time.date(), p.start_time.date(), 1) for p in missing]


def _candles(conn: Connection) -> list[dict[str, Any]]:
    t = warehouse.candles
    groups = conn.execute(
        sa.select(t.c.symbol, t.c.interval, sa.func.count(), sa.func.min(t.c.open_time), sa.func.max(t.c.open_time))
        .group_by(t.c.symbol, t.c.interval)
        .order_by(t.c.symbol, t.c.interval)
    ).all()
    out = []
    for symbol, interval, rows, first, last in groups:
        times = warehouse.read_column(conn, t, "open_time", symbol=symbol, interval=interval)
        gaps = quality.candle_gaps(times, interval_delta(interval))
        out.append(
            {
                "key": f"{symbol} {interval}",
                "rows": rows,
                "first": _iso(first),
                "last": _iso(last),
                "gaps": [g.to_dict() for g in gaps],
                "missing": sum(g.missing for g in gaps),
            }
        )
    return out


def _safe_haven(conn: Connection, cfg: Config) -> list[dict[str, Any]]:
    t = warehouse.safe_haven_bars
    groups = conn.execute(
        sa.select(t.c.ticker, sa.func.count(), sa.func.min(t.c.date), sa.func.max(t.c.date))
        .group_by(t.c.ticker)
        .order_by(t.c.ticker)
    ).all()
    out = []
    for ticker, rows, first, last in groups:
        gaps = quality.date_gaps(warehouse.read_column(conn, t, "date", ticker=ticker), cfg.safe_haven.max_gap_days)
        out.append(
            {
                "key": ticker,
                "rows": rows,
                "first": _iso(first),
                "last": _iso(last),
                "gaps": [g.to_dict() for g in gaps],
                "missing": sum(g.missing for g in gaps),
            }
        )
    return out


def _macro(conn: Connection, cfg: Config) -> list[dict[str, Any]]:
    t = warehouse.macro_observations
    groups = conn.execute(
        sa.select(
            t.c.series_id,
            sa.func.count(),
            sa.func.min(t.c.observation_date),
            sa.func.max(t.c.observation_date),
            sa.func.max(t.c.known_at),
        )
        .group_by(t.c.series_id)
        .order_by(t.c.series_id)
    ).all()
    out = []
    for series_id, rows, first, last, known in groups:
        dates = warehouse.read_column(conn, t, "observation_date", series_id=series_id)
        spec = cfg.macro.series.get(series_id)
        if spec is None or spec.frequency == "D":
            gaps = quality.date_gaps(dates, cfg.macro.max_gap_days)
        else:
            gaps = _monthly_gaps(dates, 1 if spec.frequency == "M" else 3)
        out.append(
            {
                "key": series_id,
                "rows": rows,
                "first": _iso(first),
                "last": _iso(last),
                "last_known_at": _iso(known),
                "gaps": [g.to_dict() for g in gaps],
                "missing": sum(g.missing for g in gaps),
            }
        )
    return out


def _features(conn: Connection, cfg: Config) -> list[dict[str, Any]]:
    spec = feature_spec(cfg)
    t = warehouse.features_table(spec.columns)
    complete = sa.and_(*(t.c[name].is_not(None) for name in spec.columns))
    groups = conn.execute(
        sa.select(
            t.c.symbol,
            t.c.interval,
            sa.func.count(),
            sa.func.min(t.c.open_time),
            sa.func.max(t.c.open_time),
            sa.func.sum(sa.case((complete, 1), else_=0)),
            sa.func.sum(sa.case((t.c.target_return.is_not(None), 1), else_=0)),
        )
        .group_by(t.c.symbol, t.c.interval)
        .order_by(t.c.symbol, t.c.interval)
    ).all()
    return [
        {
            "key": f"{symbol} {interval}",
            "rows": rows,
            "first": _iso(first),
            "last": _iso(last),
            "complete_rows": int(full or 0),
            "rows_with_target": int(targets or 0),
            "feature_set": spec.version,
            "gaps": [],
            "missing": 0,
        }
        for symbol, interval, rows, first, last, full, targets in groups
    ]


def warehouse_status(cfg: Config, engine: Engine) -> dict[str, Any]:
    """Per table and key: rows, first/last, gaps (and feature completeness)."""
    with engine.connect() as conn:
        return {
            "warehouse": warehouse.describe(engine),
            "candles": _candles(conn),
            "safe_haven_bars": _safe_haven(conn, cfg),
            "macro_observations": _macro(conn, cfg),
            "features": _features(conn, cfg),
        }


def format_status(status: dict[str, Any], max_gaps: int = 5) -> str:
    """A plain-text table of warehouse_status for people."""
    lines = [f"warehouse: {status['warehouse']}"]
    for table in ("candles", "safe_haven_bars", "macro_observations", "features"):
        entries = status[table]
        lines.append(f"\n{table}: {sum(e['rows'] for e in entries)} rows")
        if not entries:
            lines.append("  (empty)")
        for e in entries:
            extra = ""
            if table == "features":
                extra = f"  complete={e['complete_rows']} with_target={e['rows_with_target']} ({e['feature_set']})"
            lines.append(
                f"  {e['key']:<18} {e['rows']:>8} rows  {e['first']} .. {e['last']}  gaps={len(e['gaps'])}{extra}"
            )
            for gap in e["gaps"][:max_gaps]:
                span = (
                    gap["first_missing"]
                    if gap["first_missing"] == gap["last_missing"]
                    else f"{gap['first_missing']} .. {gap['last_missing']}"
                )
                lines.append(f"      gap: {span} ({gap['missing']} missing)")
            if len(e["gaps"]) > max_gaps:
                lines.append(f"      … and {len(e['gaps']) - max_gaps} more gaps")
    return "\n".join(lines)


def table_checksums(engine: Engine, feature_columns: tuple[str, ...]) -> dict[str, str]:
    """A SHA-256 per table over every row in primary-key order: equal content, equal digest."""
    import hashlib

    tables = [table for table, _ in warehouse.RAW_TABLES.values()] + [warehouse.features_table(feature_columns)]
    digests = {}
    with engine.connect() as conn:
        for table in tables:
            digest = hashlib.sha256()
            query = sa.select(table).order_by(*table.primary_key.columns)
            for row in conn.execute(query).yield_per(10_000):
                digest.update(repr(tuple(row)).encode())
            digests[table.name] = digest.hexdigest()[:16]
    return digests


def latest_validations(engine: Engine, start: Any, end: Any) -> list[str]:
    """One line per suite: the most recent run over exactly [start, end), with its known gaps."""
    import json

    v = warehouse.validation_runs
    lines = []
    with engine.connect() as conn:
        for suite in ("candles", "safe_haven_bars", "macro_observations", "features"):
            row = (
                conn.execute(
                    sa.select(v)
                    .where(v.c.suite == suite, v.c.interval_start == start, v.c.interval_end == end)
                    .order_by(v.c.run_at.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
            if row is None:
                lines.append(f"{suite:<20} not validated")
                continue
            stats = json.loads(row["statistics"])
            failed = json.loads(row["failed_expectations"])
            state = "passed" if row["success"] else f"FAILED ({len(failed)} expectation(s))"
            lines.append(
                f"{suite:<20} {state}: {stats['successful_expectations']}/{stats['evaluated_expectations']} "
                f"expectations over {row['rows']} rows"
            )
            lines += [f"{'':<20} known gap {g['first']} ({g['reason']})" for g in json.loads(row["known_gaps"])]
    return lines
