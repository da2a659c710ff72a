"""The `sofare` command: the same task functions the DAGs run, for people and scripts.

Exit status 0 on success; on failure a one-line reason on stderr and a non-zero status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from sofare.config import INTERVALS, load_config

log = logging.getLogger("sofare")
DEMO_START, DEMO_END = "2023-01-01", "2025-06-30"


def _print(text: str = "") -> None:
    print(text, flush=True)


def cmd_init(args: argparse.Namespace) -> int:
    from sofare import runtime

    for line in runtime.init(load_config(), rebuild_features=args.rebuild_features, airflow=not args.no_airflow):
        _print(f"✓ {line}")
    return 0


def run_backfill(sources: list[str], start: str, end: str, symbol: str | None, interval: str | None) -> dict[str, Any]:
    """The sofare_backfill DAG's steps, in order, in this process."""
    from sofare import tasks

    plan = tasks.plan_backfill(sources, start, end, symbol, interval)
    loads = []
    for n, chunk in enumerate(plan, 1):
        result = tasks.load_chunk(chunk)
        loads.append(result)
        gaps = f"  gaps: {len(result['gaps'])}" if result["gaps"] else ""
        _print(f"  [{n}/{len(plan)}] {chunk['source']:<8} {chunk['modality']:<10} {chunk['start'][:10]} .. "
               f"{chunk['end'][:10]}  {result['rows']:>6} rows{gaps}")
    for chunk in tasks.plan_feature_chunks(start, end, symbol, interval):
        result = tasks.features_chunk(chunk)
        _print(f"  features {chunk['start'][:10]} .. {chunk['end'][:10]}  {result['rows']:>6} rows")
    return tasks.summarize(loads)


def cmd_backfill(args: argparse.Namespace) -> int:
    from sofare import ingest, report

    summary = run_backfill(ingest.expand_sources(args.source), args.start, args.end, args.symbol, args.interval)
    _print()
    _print(report.format_status(summary["status"]))
    _print(f"\nloaded {summary['loaded_rows']} rows in {summary['intervals']} intervals; "
           f"gaps found: {len(summary['gaps_found'])}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sofare import report, tasks

    status = tasks.status()
    if args.checksum:
        from sofare import warehouse
        from sofare.features import feature_spec

        cfg = load_config()
        status["checksums"] = report.table_checksums(warehouse.get_engine(cfg), feature_spec(cfg).columns)
    if args.json:
        _print(json.dumps(status, indent=2, default=str))
        return 0
    _print(report.format_status(status))
    for table, digest in status.get("checksums", {}).items():
        _print(f"checksum {table:<20} {digest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up, run the pipeline through the DAGs on the embedded data, report."""
    from sofare import report, runtime, warehouse
    from sofare.features import feature_spec

    cfg = load_config()
    started = time.monotonic()
    _print("== SOFARE demo: embedded real market data through the Airflow DAGs ==")
    for line in runtime.init(cfg):
        _print(f"✓ {line}")
    logfile = cfg.var_dir / "logs" / "demo.log"
    _print(f"\n[1/1] sofare_backfill {DEMO_START} .. {DEMO_END}, source sample (task logs: {logfile})")
    runtime.run_dag(cfg, "sofare_backfill",
                    conf={"sources": ["sample"], "start": DEMO_START, "end": DEMO_END}, logfile=logfile)
    engine = warehouse.get_engine(cfg)
    status = report.warehouse_status(cfg, engine)
    _print(report.format_status(status))
    gaps = [(e["key"], g) for e in status["candles"] for g in e["gaps"]]
    _print(f"\ncandle gaps found: {len(gaps)}" + "".join(f"\n  {key}: {g['first_missing']} ({g['missing']} missing)"
                                                     for key, g in gaps))
    for table, digest in report.table_checksums(engine, feature_spec(cfg).columns).items():
        _print(f"checksum {table:<20} {digest}")
    _print(f"\ndemo finished in {time.monotonic() - started:.0f}s; run it again: same rows, same checksums.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sofare", description="SOFARE: crypto price prediction MLOps")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create var/, the warehouse schema, Airflow's DB and connection")
    p.add_argument("--rebuild-features", action="store_true", help="drop and rebuild a features table of another feature set")
    p.add_argument("--no-airflow", action="store_true", help="only the warehouse (no Airflow metadata DB)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("backfill", help="load [start, end] (inclusive days) from a source, then features")
    p.add_argument("--source", required=True, choices=["sample", "binance", "yfinance", "fred", "all"])
    p.add_argument("--start", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--end", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--symbol", default=None, help="default: market.symbol from the config")
    p.add_argument("--interval", default=None, choices=list(INTERVALS), help="default: market.interval")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("status", help="rows, ranges and gaps per warehouse table")
    p.add_argument("--json", action="store_true")
    p.add_argument("--checksum", action="store_true", help="also a content checksum per table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="the whole pipeline through the DAGs on the embedded data")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        from sofare import runtime

        runtime.use_airflow_environment(load_config())
        return func(args)
    except KeyboardInterrupt:
        print(f"sofare {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, non-zero exit
        if args.verbose:
            log.exception("failed")
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"sofare {args.command}: error: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
