"""The `sofare` command: the same task functions the DAGs run, for people and scripts.

Exit status 0 on success; on failure a one-line reason on stderr and a non-zero status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sofare.config import INTERVALS, load_config

log = logging.getLogger("sofare")
DEMO_START, DEMO_END = "2023-01-01", "2025-06-30"
DEMO_TRAIN = ("2025-01-01", "2025-06-30")  # six months: a small study takes minutes on 2 cores
DEMO_TRIALS, DEMO_EPOCHS = 4, 3


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


def cmd_validate(args: argparse.Namespace) -> int:
    from sofare import tasks, validation

    results = tasks.validate_range(args.start, args.end, args.symbol, args.interval)
    for result in results:
        _print(result.summary())
    _print(f"Data Docs: {validation.data_docs_index(load_config())}")
    failed = [f"{r.suite} ({len(r.failures)} expectation(s), {len(r.days_failed)} day(s))" for r in results if not r.success]
    if failed:
        print(f"sofare validate: error: validation failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def format_training(result: dict[str, Any]) -> str:
    """The registered version with its test metrics beside the baselines."""
    names = ("sofare_m3", "persistence", "majority", "linear")
    scores = result["scores"]
    metrics = list(scores["sofare_m3"])
    lines = [f"registered {result['model']} version {result['version']} (semver {result['semver']}), MLflow run "
             f"{result['run_id']}; primary metric {result['primary_metric']} = {result['primary']:.4f}",
             f"{'test metric':<12}" + "".join(f"{n:>13}" for n in names)]
    lines += [f"{m:<12}" + "".join(f"{scores[n][m]:>13.4f}" for n in names) for m in metrics]
    lines.append(f"model card (95% CIs, backtest): {result['model_card']}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from sofare import tasks

    result = tasks.train(args.trials, args.timeout, args.max_epochs, args.start, args.end)
    _print(format_training(result))
    return 0


def cmd_model_card(args: argparse.Namespace) -> int:
    from sofare import model_card, registry

    cfg = load_config()
    version = args.version
    if version is None:
        versions = registry.client(cfg).search_model_versions(f"name = '{cfg.mlflow.model_name}'")
        if not versions:
            raise LookupError(f"no registered {cfg.mlflow.model_name} version; run `sofare train` first")
        version = str(max(int(v.version) for v in versions))
    _print(f"model card of {cfg.mlflow.model_name} version {version}: {model_card.write(cfg, version, args.out)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from sofare import tasks

    from sofare.promotion import Check, Verdict

    d = tasks.promote(args.version, actor=args.actor, override_reason=args.override)
    verdict = Verdict(d["model"], d["version"], d["passed"], [Check(**c) for c in d["checks"]], d["champion"],
                      d["audit_id"], d["override"])
    _print(verdict.summary() + f"\n  audit record: {verdict.audit_id}")
    if not verdict.promoted:
        print(f"sofare promote: error: version {verdict.version} rejected by the promotion gate", file=sys.stderr)
        return 1
    return 0


def _version_or_alias(cfg: Any, version: str | None) -> str:
    """An explicit version, else the `challenger`, else the newest registered version."""
    from sofare import pipeline, registry

    if version:
        return version
    try:
        return str(registry.client(cfg).get_model_version_by_alias(cfg.mlflow.model_name, "challenger").version)
    except Exception:  # noqa: BLE001 - no challenger alias: fall back to the newest version
        return pipeline.registered_summary(cfg)["version"]


def cmd_build(args: argparse.Namespace) -> int:
    from sofare import tasks

    version = _version_or_alias(load_config(), args.version)
    built = tasks.build_bento(version)
    _print(f"bento {built['bento']} (model {built['model']}, {load_config().mlflow.model_name} version {version})")
    result = tasks.containerize(version, built["bento"])
    _print(result.get("message") or f"image {result['image']} built ({result['engine']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sofare import bento, registry

    cfg = load_config()
    if args.stop:
        _print("stopped" if bento.stop_detached(cfg, args.variant) else f"no {args.variant} server running")
        return 0
    version = _version_or_alias(cfg, args.version)
    tag = registry.client(cfg).get_model_version(cfg.mlflow.model_name, version).tags.get("bento_tag")
    if not tag:
        raise LookupError(f"version {version} has no bento yet; run `sofare build --version {version}`")
    port = args.port or cfg.serving.port
    url = bento.serve_detached(cfg, tag, port, args.variant)
    _print(f"serving {tag} ({cfg.mlflow.model_name} version {version}, {args.variant}) on {url} "
           f"(Swagger UI: {url}/; stop: sofare serve --stop)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Set up, run the pipeline through the DAGs on the embedded data, report."""
    from sofare import ingest, report, runtime, validation, warehouse
    from sofare.features import feature_spec

    cfg = load_config()
    started = time.monotonic()
    _print("== SOFARE demo: embedded real market data through the Airflow DAGs ==")
    for line in runtime.init(cfg, rebuild_features=True):  # the demo re-materialises every feature
        _print(f"✓ {line}")
    logfile = cfg.var_dir / "logs" / "demo.log"
    _print(f"\n[1/4] sofare_backfill {DEMO_START} .. {DEMO_END}, source sample (task logs: {logfile})")
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

    _print(f"\n[2/4] sofare_validate {DEMO_START} .. {DEMO_END}: Great Expectations on every loaded day")
    runtime.run_dag(cfg, "sofare_validate", conf={"start": DEMO_START, "end": DEMO_END}, logfile=logfile)
    for line in report.latest_validations(engine, *ingest.day_range(DEMO_START, DEMO_END)):
        _print(f"  {line}")
    _print(f"Data Docs: file://{validation.data_docs_index(cfg)}")

    _print(f"\n[3/4] sofare_train {DEMO_TRAIN[0]} .. {DEMO_TRAIN[1]} (validated days): a small study "
           f"({DEMO_TRIALS} Optuna trials, ≤ {DEMO_EPOCHS} epochs each), final fit, test evaluation, MLflow registry")
    runtime.run_dag(cfg, "sofare_train", logfile=logfile,
                    conf={"n_trials": DEMO_TRIALS, "max_epochs": DEMO_EPOCHS, "timeout": 1800,
                          "start": DEMO_TRAIN[0], "end": DEMO_TRAIN[1]})
    from sofare import pipeline

    _print(format_training(pipeline.registered_summary(cfg)))
    _print(f"MLflow: {cfg.mlflow_tracking_uri} (UI: .venv/bin/mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri})")

    url = _demo_serve(cfg, logfile, pipeline.registered_summary(cfg)["version"])
    _print(f"\ndemo finished in {time.monotonic() - started:.0f}s; run it again: same rows, same checksums, same metrics.")
    _print(f"The service keeps running on {url} (Swagger UI: {url}/). Try:\n"
           f"  curl -s -X POST {url}/predict_latest -H 'Content-Type: application/json' -d '{{\"symbol\": \"BTCUSDT\"}}'\n"
           f"  curl -s -X POST {url}/predict_latest -H 'Content-Type: application/json' -d '{{\"symbol\": \"ETHUSDT\"}}'   # a 400\n"
           "Stop it: .venv/bin/sofare serve --stop")
    return 0


def _free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def _demo_serve(cfg: Any, logfile: Any, version: str) -> str:
    """[4/4]: the promotion DAG, then a real `bentoml serve` and one live /predict."""
    import urllib.request

    from sofare import bento, registry, runtime

    _print(f"\n[4/4] sofare_promote version {version}: promotion gate, bentoml build, containerize; then serve")
    runtime.run_dag(cfg, "sofare_promote", conf={"version": version}, logfile=logfile)
    c = registry.client(cfg)
    tags = c.get_model_version(cfg.mlflow.model_name, version).tags
    _print(f"gate: {tags['promotion_verdict']}" + "".join(f"\n  {r}" for r in json.loads(tags["promotion_reasons"])))
    if tags["promotion_verdict"] == "rejected":
        _print("No version passed the gate, so nothing would be served in production. To show the serving path,\n"
               "the demo overrides the gate as an on-call engineer can (`sofare promote --override REASON`);\n"
               "the override and every failed check are recorded in the audit_log table and on the version.")
        runtime.run_dag(cfg, "sofare_promote", logfile=logfile,
                        conf={"version": version, "override_reason": "make demo: show the serving path, not a production promotion"})
        tags = c.get_model_version(cfg.mlflow.model_name, version).tags
    _print(f"bento: {tags['bento_tag']}; container: {tags['container']}")
    url = bento.serve_detached(cfg, tags["bento_tag"], _free_port(cfg.serving.port))
    with urllib.request.urlopen(urllib.request.Request(
            f"{url}/predict_latest", data=json.dumps({"symbol": cfg.market.symbol}).encode(), method="POST",
            headers={"Content-Type": "application/json"}), timeout=60) as response:
        answer = json.loads(response.read())
    _print(f"live POST {url}/predict_latest {{\"symbol\": \"{cfg.market.symbol}\"}} ->\n  {json.dumps(answer)}")
    return url


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

    p = sub.add_parser("validate", help="Great Expectations on [start, end] (inclusive days); exit 1 on failure")
    p.add_argument("--start", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--end", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--symbol", default=None)
    p.add_argument("--interval", default=None, choices=list(INTERVALS))
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="tune (Optuna), train, evaluate and register SofareM3 on validated data")
    p.add_argument("--trials", type=int, default=None, help="Optuna trials (default: training.n_trials)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per trial (default: training.max_epochs)")
    p.add_argument("--timeout", type=int, default=None, help="tuning seconds (default: training.timeout_seconds)")
    p.add_argument("--start", default=None, metavar="YYYY-MM-DD", help="training window (default: latest validated span)")
    p.add_argument("--end", default=None, metavar="YYYY-MM-DD")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("model-card", help="write the model card of a registered version from its MLflow run")
    p.add_argument("--version", default=None, help="default: the newest version")
    p.add_argument("--out", type=Path, default=None, help="default: var/reports/model_card.md")
    p.set_defaults(func=cmd_model_card)

    p = sub.add_parser("promote", help="the promotion gate on a version; exit 1 when rejected")
    p.add_argument("--version", default=None, help="default: the newest registered version")
    p.add_argument("--actor", default=os.environ.get("USER", "sofare"), help="recorded in the audit log")
    p.add_argument("--override", default=None, metavar="REASON",
                   help="promote even if the gate rejects it (recorded with this reason); for on-call use")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("build", help="build the BentoML bento of a version and containerize it (or keep the context)")
    p.add_argument("--version", default=None, help="default: the challenger, else the newest version")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="start (or --stop) a background `bentoml serve` of a version's bento")
    p.add_argument("--version", default=None, help="default: the challenger, else the newest version")
    p.add_argument("--port", type=int, default=None, help="default: serving.port")
    p.add_argument("--variant", default="stable", choices=["stable", "canary"])
    p.add_argument("--stop", action="store_true")
    p.set_defaults(func=cmd_serve)

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
