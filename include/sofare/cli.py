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

from sofare.config import INTERVALS, Config, load_config

log = logging.getLogger("sofare")
DEMO_START, DEMO_END = "2023-01-01", "2025-06-30"
DEMO_TRAIN = ("2025-01-01", "2025-06-30")  # six months: a small study takes minutes on 2 cores
DEMO_TRIALS, DEMO_EPOCHS = 4, 3


def _print(text: str = "") -> None:
    print(text, flush=True)


def cmd_init(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import runtime

    for line in runtime.init(cfg, rebuild_features=args.rebuild_features, airflow=not args.no_airflow):
        _print(f"✓ {line}")
    return 0


def cmd_airflow(cfg: Config, args: argparse.Namespace) -> int:
    """`airflow ARGS` on this project's Airflow: the venv's Airflow with the environment `sofare init` and `make
    airflow` use (AIRFLOW_HOME var/airflow, dags/, plugins/, no examples, the API on 127.0.0.1). The process becomes
    that `airflow` (exec): its output, exit status and signals are Airflow's."""
    from sofare import runtime

    env = runtime.airflow_process_environment(cfg)
    if args.airflow_args[:1] in (["standalone"], ["api-server"]):
        print(
            f"Airflow UI: http://{env['AIRFLOW__API__HOST']}:{env.get('AIRFLOW__API__PORT', '8080')} (log in as admin; "
            f"the password is in {env['AIRFLOW_HOME']}/simple_auth_manager_passwords.json.generated once the API "
            "server has started)",
            file=sys.stderr,
            flush=True,
        )
    command = runtime.airflow_command(args.airflow_args)
    os.execve(command[0], command, env)


def _progress(step: str, chunk: dict[str, Any], result: dict[str, Any]) -> None:
    if step == "load":
        gaps = f"  gaps: {len(result['gaps'])}" if result["gaps"] else ""
        _print(
            f"  {chunk['source']:<8} {chunk['modality']:<10} {chunk['start'][:10]} .. {chunk['end'][:10]}  "
            f"{result['rows']:>6} rows{gaps}"
        )
    else:
        _print(f"  features {chunk['start'][:10]} .. {chunk['end'][:10]}  {result['rows']:>6} rows")


def cmd_backfill(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks
    from sofare.data import report

    summary = tasks.backfill(cfg, [args.source], args.start, args.end, args.symbol, args.interval, _progress)
    _print()
    _print(report.format_status(summary["status"]))
    _print(
        f"\nloaded {summary['loaded_rows']} rows in {summary['intervals']} intervals; "
        f"gaps found: {len(summary['gaps_found'])}"
    )
    return 0


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks
    from sofare.data import report, warehouse
    from sofare.data.features import feature_spec

    status = tasks.status(cfg)
    status["deployment"] = tasks.deployment_status(cfg, champion=False)
    if args.checksum:
        status["checksums"] = report.table_checksums(warehouse.get_engine(cfg), feature_spec(cfg).columns)
    if args.json:
        _print(json.dumps(status, indent=2, default=str))
        return 0
    _print(report.format_status(status))
    for table, digest in status.get("checksums", {}).items():
        _print(f"checksum {table:<20} {digest}")
    _print("\n" + format_deployment(status["deployment"]))
    return 0


def cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks
    from sofare.validation import suites

    results = tasks.validate_range(cfg, args.start, args.end, args.symbol, args.interval)
    for result in results:
        _print(result.summary())
    _print(f"Data Docs: {suites.data_docs_index(cfg)}")
    failed = [
        f"{r.suite} ({len(r.failures)} expectation(s), {len(r.days_failed)} day(s))" for r in results if not r.success
    ]
    if failed:
        print(f"sofare validate: error: validation failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def format_training(registered: dict[str, Any]) -> str:
    """The registered version: the walk-forward evidence the gate decides on and the test window's metrics, each
    beside the baselines, and the decision policy after costs."""
    from sofare.contracts import PREDICTORS, RegisteredVersion

    r = RegisteredVersion.model_validate(registered)
    report = r.report
    where, evidence = report.evidence()
    primary = evidence["sofare_m3"][report.primary_metric]
    lines = [
        f"registered {r.model} version {r.version} (semver {r.semver}), MLflow run {r.run_id}; primary metric "
        f"{report.primary_metric} = {primary.value:.4f} [{primary.ci_low:.4f}, {primary.ci_high:.4f}] ({where})"
    ]

    def table(title: str, scores: dict[str, Any], metrics: list[str]) -> list[str]:
        names = [n for n in PREDICTORS if n in scores]
        return [
            f"{title:<12}" + "".join(f"{n:>13}" for n in names),
            *[f"{m:<12}" + "".join(f"{scores[n][m].value:>13.4f}" for n in names) for m in metrics],
        ]

    if report.wf is not None and report.wf.folds:
        lines += table(
            "walk-forward",
            report.wf.pooled,
            [m for m in ("accuracy", "roc_auc", "brier", "ic") if m in report.wf.pooled["sofare_m3"]],
        )
        lines += [
            f"  vs {p.baseline}: {p.verdict} ({p.difference.value:+.4f} [{p.difference.ci_low:+.4f}, "
            f"{p.difference.ci_high:+.4f}])"
            for p in report.wf.paired
        ]
    lines += table("test metric", report.scores, list(report.scores["sofare_m3"]))
    if report.policy is not None and report.policy_test is not None and report.policy_buy_and_hold is not None:
        t, h = report.policy_test, report.policy_buy_and_hold
        lines.append(
            f"policy {report.policy.id}: test window {t.total_return:+.2%} after costs ({t.trades} trades, "
            f"fees {t.fees_paid:.2%}), buy and hold {h.total_return:+.2%}"
        )
    lines.append(f"model card (95% CIs, walk-forward, policy, ablations): {r.model_card}")
    return "\n".join(lines)


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    _print(format_training(tasks.train(cfg, args.trials, args.timeout, args.max_epochs, args.start, args.end)))
    return 0


def cmd_model_card(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    card = tasks.model_card(cfg, args.version, args.out)
    _print(f"model card of {cfg.mlflow.model_name} version {card['version']}: {card['path']}")
    return 0


def cmd_promote(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks
    from sofare.contracts import Verdict

    verdict = Verdict.from_xcom(tasks.promote(cfg, args.version, actor=args.actor, override_reason=args.override))
    _print(verdict.summary() + f"\n  audit record: {verdict.audit_id}")
    if not verdict.promoted:
        print(f"sofare promote: error: version {verdict.version} rejected by the promotion gate", file=sys.stderr)
        return 1
    return 0


def cmd_build(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    built = tasks.build_bento(cfg, args.version)
    _print(f"bento {built['bento']} (model {built['model']}, {cfg.mlflow.model_name} version {built['version']})")
    result = tasks.containerize(cfg, built["version"], built["bento"])
    _print(result.get("message") or f"image {result['image']} built ({result['engine']})")
    return 0


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    if args.stop:
        _print("stopped" if tasks.stop_serving(cfg, args.variant) else f"no {args.variant} server running")
        return 0
    served = tasks.serve(cfg, args.version, args.port, args.variant)
    _print(
        f"serving {served['bento']} ({cfg.mlflow.model_name} version {served['version']}, {args.variant}) on "
        f"{served['url']} (Swagger UI: {served['url']}/; stop: sofare serve --stop)"
    )
    return 0


def format_deployment(status: dict[str, Any]) -> str:
    """Stable and canary versions, ports, weight and the front-door URL, in a few lines."""
    door = status["frontdoor"]
    champion = f"; champion: version {status['champion']}" if status["champion"] else ""
    lines = [f"front door: {door['url']} ({'running' if door['running'] else 'not running'}){champion}"]
    for role in ("stable", "canary"):
        b = status[role]
        if b is None:
            lines.append(f"  {role:<6}  none")
            continue
        share = status["canary_weight"] if role == "canary" else 1 - status["canary_weight"]
        lines.append(
            f"  {role:<6}  version {b['version']:<4} {b['bento']}  port {b['port']}  weight {share:.0%}  "
            f"{'running' if b['running'] else 'NOT RUNNING (pid ' + str(b['pid']) + ')'}"
        )
    return "\n".join(lines)


def cmd_deploy(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    if args.stop:
        tasks.stop_deployment(cfg)
        _print("stopped the front door and every serving process")
        return 0
    weight = None if args.canary_weight is None else _number(args.canary_weight, "--canary-weight")
    _print(format_deployment(tasks.deploy(cfg, args.version, weight, actor=args.actor)))
    return 0


def _number(text: str, option: str) -> float:
    from sofare.errors import InputError

    try:
        return float(text)
    except ValueError:
        raise InputError(f"{option} must be a number in [0, 1], got {text!r}") from None


def cmd_canary(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    status = tasks.canary(cfg, args.action, args.reason or "", actor=args.actor)
    _print(format_deployment(status))
    if args.action == "status":
        for event in status["history"]:
            _print(
                f"  {event['at']}  {event['action']:<8} {event['decision']:<8} stable {event['stable_version']} "
                f"canary {event['canary_version']} weight {event['canary_weight']:g}: {event['reason']}"
            )
    return 0


def cmd_rollback(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    result = tasks.rollback(cfg, args.reason, args.details or "", args.to, actor=args.actor)
    what = "already served: verified" if result["decision"] == "noop" else "rolled back and verified"
    _print(
        f"version {result['target']} {what} through {result['frontdoor']} in {result['seconds']:.1f}s "
        f"({len(result['verified'])} live requests); audit record {result['audit_id']}"
    )
    return 0


def format_monitor(run: dict[str, Any]) -> str:
    """One monitor run: outcomes, live quality per version/variant/window beside persistence, drift, decision."""
    from sofare.contracts import MonitorRun

    r = MonitorRun.model_validate(run)
    lines = [f"monitored {r.at}: outcomes filled {r.outcomes_filled}, pending {r.outcomes_pending}"]
    for q in r.quality:
        head = f"  version {q.model_version:<4} {q.variant:<6} {q.window:>4}  n={q.n:<4}"
        if q.status != "ok" or q.accuracy is None:
            lines.append(f"{head} insufficient (fewer than the minimum outcomes)")
            continue
        p = q.persistence_accuracy
        lines.append(
            f"{head} accuracy {q.accuracy.value:.1%} [{q.accuracy.ci_low:.1%}, {q.accuracy.ci_high:.1%}]  "
            f"persistence {p.value:.1%}  always-up {q.always_up_accuracy.value:.1%}  "
            f"Brier {q.brier.value:.3f}"
            if p and q.always_up_accuracy and q.brier
            else head
        )
    d = r.drift
    if d.status == "ok":
        lines.append(
            f"  drift (version {d.model_version}, {d.current_rows} served hours vs {d.reference_rows} reference): "
            f"{d.drifted_columns}/{d.columns} features ({d.share:.0%}); prediction drift "
            f"{'yes' if d.prediction_drifted else 'no'}; target drift {'yes' if d.target_drifted else 'no'}"
            + (f"; report var/{d.report}" if d.report else "")
        )
    else:
        lines.append(f"  drift: {d.status}: {d.message}")
    for s in r.service:
        rate = "n/a" if s.error_rate is None else f"{s.error_rate:.2%}"
        p95 = "n/a" if s.p95_ms is None else f"{s.p95_ms:.1f} ms"
        lines.append(f"  {s.variant:<6} version {s.model_version}: {s.requests:.0f} requests, 5xx {rate}, p95 {p95}")
    lines.append(f"severity {r.decision.severity}, action {r.decision.action}: {r.decision.reason}")
    return "\n".join(lines)


def cmd_monitor(cfg: Config, args: argparse.Namespace) -> int:
    from sofare import tasks

    if args.outcomes_only:
        _print(json.dumps(tasks.fill_outcomes(cfg, args.start, args.at)))
        return 0
    result = tasks.monitor(cfg, args.at, args.start, actor=args.actor, drift=True)
    _print(json.dumps(result["run"], indent=2) if args.json else format_monitor(result["run"]))
    return 0


def cmd_replay(cfg: Config, args: argparse.Namespace) -> int:
    from sofare.monitoring import replay

    speed = None
    if args.speed is not None:
        speed = float(args.speed) if args.speed.replace(".", "", 1).isdigit() else -1.0
        if not 0 < speed < float("inf"):
            print(
                f"sofare replay: error: --speed must be a positive number of hours per second, got {args.speed!r}",
                file=sys.stderr,
            )
            return 2
    if not args.verbose:  # one line per action; the per-hour INFO logs and numpy's NaN warnings only with -v
        import warnings

        logging.getLogger("sofare").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=RuntimeWarning)
    summary = replay.replay(
        cfg, args.start, args.end, speed, args.inject, progress=None if args.json else _print
    ).to_dict()
    if args.json:
        _print(json.dumps(summary, indent=2, default=str))
        return 0
    _print(f"\nreplayed {summary['hours']} hours {summary['start']} .. {summary['end']} in {summary['seconds']:.0f}s")
    _print(
        "predictions: "
        + (", ".join(f"{k}: {v}" for k, v in summary["predictions"].items()) or "none")
        + (f"; refused {summary['refused']}" if summary["refused"] else "")
    )
    for q in summary["quality"]:
        if q.get("accuracy"):
            a, p = q["accuracy"], q["persistence_accuracy"]
            _print(
                f"  version {q['model_version']} {q['variant']}: accuracy {a['value']:.1%} [{a['ci_low']:.1%}, "
                f"{a['ci_high']:.1%}] over {q['n']} hours; persistence {p['value']:.1%}; Brier {q['brier']['value']:.3f}"
            )
        else:
            _print(f"  version {q['model_version']} {q['variant']}: insufficient ({q['n']} hours with an outcome)")
    _print(f"drift events (medium or worse): {len(summary['drift_events'])}")
    _print(
        f"actions taken: {len(summary['actions'])}"
        + "".join(f"\n  {a['at']}  {a['action']} ({a['severity']}): {a['reason'][:160]}" for a in summary["actions"])
    )
    for note in summary["notes"]:
        _print(f"note: {note}")
    return 0


def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    """Set up, run the pipeline through the DAGs on the embedded data, report."""
    from sofare import runtime, tasks
    from sofare.data import ingest, report, warehouse
    from sofare.data.features import feature_spec
    from sofare.validation import suites

    started = time.monotonic()
    _print("== SOFARE demo: embedded real market data through the Airflow DAGs ==")
    for line in runtime.init(cfg, rebuild_features=True):  # the demo re-materialises every feature
        _print(f"✓ {line}")
    logfile = cfg.var_dir / "logs" / "demo.log"
    _print(f"\n[1/4] sofare_backfill {DEMO_START} .. {DEMO_END}, source sample (task logs: {logfile})")
    runtime.run_dag(
        cfg, "sofare_backfill", conf={"sources": ["sample"], "start": DEMO_START, "end": DEMO_END}, logfile=logfile
    )
    engine = warehouse.get_engine(cfg)
    status = tasks.status(cfg)
    _print(report.format_status(status))
    gaps = [(e["key"], g) for e in status["candles"] for g in e["gaps"]]
    _print(
        f"\ncandle gaps found: {len(gaps)}"
        + "".join(f"\n  {key}: {g['first_missing']} ({g['missing']} missing)" for key, g in gaps)
    )
    for table, digest in report.table_checksums(engine, feature_spec(cfg).columns).items():
        _print(f"checksum {table:<20} {digest}")

    _print(f"\n[2/4] sofare_validate {DEMO_START} .. {DEMO_END}: Great Expectations on every loaded day")
    runtime.run_dag(cfg, "sofare_validate", conf={"start": DEMO_START, "end": DEMO_END}, logfile=logfile)
    for line in report.latest_validations(engine, *ingest.day_range(DEMO_START, DEMO_END)):
        _print(f"  {line}")
    _print(f"Data Docs: file://{suites.data_docs_index(cfg)}")

    _print(
        f"\n[3/4] sofare_train {DEMO_TRAIN[0]} .. {DEMO_TRAIN[1]} (validated days): a small study "
        f"({DEMO_TRIALS} Optuna trials, ≤ {DEMO_EPOCHS} epochs each), final fit, test evaluation, MLflow registry"
    )
    runtime.run_dag(
        cfg,
        "sofare_train",
        logfile=logfile,
        conf={
            "n_trials": DEMO_TRIALS,
            "max_epochs": DEMO_EPOCHS,
            "timeout": 1800,
            "start": DEMO_TRAIN[0],
            "end": DEMO_TRAIN[1],
        },
    )
    registered = tasks.registered(cfg)
    _print(format_training(registered))
    _print(f"MLflow: {cfg.mlflow_tracking_uri} (UI: .venv/bin/mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri})")

    url = _demo_serve(cfg, logfile, registered["version"])
    _print(
        f"\ndemo finished in {time.monotonic() - started:.0f}s; run it again: same rows, same checksums, same metrics."
    )
    _print(
        f"The service keeps running behind the front door {url} (Swagger UI: {url}/). Try:\n"
        f"  curl -s -X POST {url}/predict_latest -H 'Content-Type: application/json' -d '{{\"symbol\": \"BTCUSDT\"}}'\n"
        f"  curl -s -X POST {url}/predict_latest -H 'Content-Type: application/json' -d '{{\"symbol\": \"ETHUSDT\"}}'   # a 422 naming the field\n"
        "  .venv/bin/sofare canary status      # what serves where; .venv/bin/sofare rollback --reason incident\n"
        "  .venv/bin/sofare replay --start 2025-06-23 --end 2025-06-29 --inject drift   # a week as if live: "
        "predictions, outcomes, drift, a retrain request (docs/runbook.md)\n"
        "Stop it: .venv/bin/sofare deploy --stop"
    )
    return 0


def _demo_serve(cfg: Config, logfile: Path, version: str) -> str:
    """[4/4]: the promotion DAG, then the version behind the nginx front door and one live prediction."""
    import urllib.request

    from sofare import runtime, tasks

    _print(f"\n[4/4] sofare_promote version {version}: promotion gate, bentoml build, containerize; then deploy")
    runtime.run_dag(cfg, "sofare_promote", conf={"version": version}, logfile=logfile)
    tags = tasks.version_tags(cfg, version)
    _print(f"gate: {tags['promotion_verdict']}" + "".join(f"\n  {r}" for r in json.loads(tags["promotion_reasons"])))
    if tags["promotion_verdict"] == "rejected":
        _print(
            "No version passed the gate, so nothing would be served in production. To show the serving path,\n"
            "the demo overrides the gate as an on-call engineer can (`sofare promote --override REASON`);\n"
            "the override and every failed check are recorded in the audit_log table and on the version."
        )
        runtime.run_dag(
            cfg,
            "sofare_promote",
            logfile=logfile,
            conf={
                "version": version,
                "override_reason": "make demo: show the serving path, not a production promotion",
            },
        )
        tags = tasks.version_tags(cfg, version)
    _print(f"bento: {tags['bento_tag']}; container: {tags['container']}")
    status = tasks.deploy(cfg, version, actor="make demo")  # nothing serving: stable; a demo already serving: canary
    _print(format_deployment(status))
    url = status["frontdoor"]["url"]
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{url}/predict_latest",
            data=json.dumps({"symbol": cfg.market.symbol}).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "X-Client-Id": "make-demo"},
        ),
        timeout=60,
    ) as response:
        answer = json.loads(response.read())
        served_by = response.headers.get("X-Served-By")
    _print(
        f'live POST {url}/predict_latest {{"symbol": "{cfg.market.symbol}"}} (answered by {served_by}) ->\n'
        f"  {json.dumps(answer)}"
    )
    return url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sofare", description="SOFARE: crypto price prediction MLOps")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create var/, the warehouse schema, Airflow's DB and connection")
    p.add_argument(
        "--rebuild-features", action="store_true", help="drop and rebuild a features table of another feature set"
    )
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
    p.add_argument(
        "--start", default=None, metavar="YYYY-MM-DD", help="training window (default: latest validated span)"
    )
    p.add_argument("--end", default=None, metavar="YYYY-MM-DD")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("model-card", help="write the model card of a registered version from its MLflow run")
    p.add_argument("--version", default=None, help="default: the newest version")
    p.add_argument("--out", type=Path, default=None, help="default: var/reports/model_card.md")
    p.set_defaults(func=cmd_model_card)

    p = sub.add_parser("promote", help="the promotion gate on a version; exit 1 when rejected")
    p.add_argument("--version", default=None, help="default: the newest registered version")
    p.add_argument("--actor", default=os.environ.get("USER", "sofare"), help="recorded in the audit log")
    p.add_argument(
        "--override",
        default=None,
        metavar="REASON",
        help="promote even if the gate rejects it (recorded with this reason); for on-call use",
    )
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

    actor = os.environ.get("USER", "sofare")
    p = sub.add_parser("deploy", help="deploy a version as canary behind the front door (or as stable when none runs)")
    p.add_argument("--version", default=None, help="default: the challenger")
    p.add_argument(
        "--canary-weight", default=None, metavar="W", help="share of clients in [0, 1] (default: deploy.canary_weight)"
    )
    p.add_argument("--actor", default=actor, help="recorded in the deployment events")
    p.add_argument("--stop", action="store_true", help="stop the front door and every serving process")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("canary", help="the live canary: status, promote (to stable and champion) or abort")
    p.add_argument("action", choices=["status", "promote", "abort"])
    p.add_argument("--reason", default=None, help="recorded with promote/abort")
    p.add_argument("--actor", default=actor)
    p.set_defaults(func=cmd_canary)

    p = sub.add_parser("rollback", help="serve the previous champion (or --to VERSION) again, verified")
    p.add_argument("--reason", required=True, metavar="R", help="incident | bad-predictions | latency | drift | other")
    p.add_argument("--details", default=None, help="what happened (recorded)")
    p.add_argument(
        "--to",
        default=None,
        metavar="VERSION",
        help="default: the stable when a canary is live, else the previous champion",
    )
    p.add_argument("--actor", default=actor)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("monitor", help="one monitor run: outcomes, live quality, drift, severity -> action")
    p.add_argument("--at", default=None, metavar="ISO", help="hour to monitor (UTC; default: this hour)")
    p.add_argument("--start", default=None, metavar="ISO", help="fill outcomes from (default: the longest window)")
    p.add_argument("--outcomes-only", action="store_true", help="only fill outcomes for predictions in (start, at]")
    p.add_argument("--json", action="store_true")
    p.add_argument("--actor", default=actor)
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("replay", help="walk stored history hour by hour as if live: ingest, predict, monitor, act")
    p.add_argument("--start", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--end", required=True, metavar="YYYY-MM-DD", help="inclusive")
    p.add_argument(
        "--speed", default=None, metavar="H", help="simulated hours per second at most (default: as fast as it goes)"
    )
    p.add_argument(
        "--inject",
        default=None,
        choices=["drift", "bad-canary"],
        help="a scenario that must end in the right action (drift: retrain requested; bad-canary: rolled back)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="the whole pipeline through the DAGs on the embedded data")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "airflow",
        add_help=False,  # `sofare airflow --help` is Airflow's help
        help="run `airflow ARGS` on this project's Airflow (var/airflow, dags/, plugins/), e.g. sofare airflow dags list",
    )
    p.add_argument("airflow_args", nargs=argparse.REMAINDER, metavar="ARGS")
    p.set_defaults(func=cmd_airflow)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as `sofare` reads it (argparse exits 2 on a bad one); everything after `sofare airflow`
    belongs to Airflow."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "airflow":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.airflow_args = [*extra, *args.airflow_args]  # REMAINDER leaves a leading option (--help) unclaimed
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[Config, argparse.Namespace], int] = args.func
    try:
        from sofare import runtime

        cfg = load_config()
        runtime.use_airflow_environment(cfg)
        return func(cfg, args)
    except KeyboardInterrupt:
        print(f"sofare {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            log.exception("failed")
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"sofare {args.command}: error: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
