"""On-call rollback time, from trigger to verified, through the real parts: `bentoml serve` processes behind the
nginx front door on loopback, MLflow's `champion` alias, the warehouse's deployment_events and audit_log.

Setup (not timed): three months of real hourly data loaded and validated, one tiny SofareM3 trained (1 trial,
1 epoch, a small search space: rollback cost does not depend on the model) and registered a second time from the
same run as version 2, a bento built for each, Airflow's metadata database migrated. Scenarios, each repeated:

- A, from a live canary (`sofare rollback` / the task): v1 stable, v2 canary at 0.5; the rollback takes the canary
  off and stops it, no new process starts.
- B, to the previous champion: v2 promoted (a fresh stable process of v2); the rollback to v1 starts a new
  `bentoml serve` of v1, switches nginx to it, drains and stops the v2 process.
- C, from the Airflow form: `sofare_rollback` run in-process with `dag.test()` (DAG parsing and the task run
  included), target the version not serving, so a new process starts as in B.

"Task seconds" is what the rollback itself measures and logs (trigger to the last verifying request answered);
"wall clock" is measured around the whole call here and also covers the event, audit and alert writes.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from benchmarks.common import deployment_home, machine, write_section

if TYPE_CHECKING:
    from sofare.config import Config

GOAL_SECONDS = 60.0
REPEATS = {"A": 5, "B": 5, "C": 3}
WINDOW = ("2024-01-01", "2024-03-31")
TRAIN_WINDOW = ("2024-01-12", "2024-03-31")  # after the features' warm-up
LOG_LINE = re.compile(r"verified through \S+ in ([0-9.]+) s")


def _stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def _setup(cfg: Config, tasks: ModuleType) -> tuple[str, str]:
    """Data, version 1 trained and version 2 registered from the same run, a bento for each; Airflow's DB."""
    from sofare import runtime
    from sofare.registry import versions

    runtime.init(cfg)
    tasks.backfill(cfg, ["sample"], *WINDOW)
    tasks.validate_range(cfg, *WINDOW)
    v1 = versions.resolve(
        cfg, tasks.train(cfg, n_trials=1, max_epochs=1, start=TRAIN_WINDOW[0], end=TRAIN_WINDOW[1])["version"]
    )
    client = versions.client(cfg)
    v2 = client.create_model_version(cfg.mlflow.model_name, source=v1.source, run_id=v1.run_id)
    for key in ("semver", "feature_set_version", "data_window"):
        client.set_model_version_tag(cfg.mlflow.model_name, v2.version, key, v1.tags.get(key, "?"))
    for version in (str(v1.version), str(v2.version)):
        tasks.build_bento(cfg, version, actor="bench")
    return str(v1.version), str(v2.version)


def _timed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    result = call(*args, **kwargs)
    return time.perf_counter() - began, result


def _checked(result: dict[str, Any], target: str, decision: str) -> dict[str, Any]:
    expected = f"{target}/stable"
    if result["target"] != target or result["decision"] != decision or any(a != expected for a in result["verified"]):
        raise RuntimeError(f"rollback to {target} ended {result['decision']} answering {result['verified']}")
    return result


def _last_rollback(cfg: Config) -> dict[str, Any]:
    """The newest rollback's result as the task recorded it in audit_log."""
    import sqlalchemy as sa

    from sofare.data import warehouse

    audit = warehouse.audit_log
    query = sa.select(audit.c.details).where(audit.c.action == "rollback").order_by(audit.c.at.desc()).limit(1)
    with warehouse.get_engine(cfg).connect() as conn:
        return json.loads(conn.execute(query).scalar_one())


def run() -> str:
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": [], "C": []}
    starts: list[float] = []  # `sofare deploy` of a canary: a `bentoml serve` start plus a reload
    noop: dict[str, float] = {}
    left: list[int] = []
    with deployment_home("sofare-bench-deploy-", left) as scratch:
        from sofare import tasks
        from sofare.config import load_config
        from sofare.runtime import run_dag

        cfg = load_config()
        print("  loading, validating, training, building two versions, airflow db migrate …", flush=True)
        v1, v2 = _setup(cfg, tasks)
        tasks.deploy(cfg, v1, actor="bench")  # the first deployment: v1 stable and champion

        print(f"  A: rollback from a live canary × {REPEATS['A']} …", flush=True)
        for _ in range(REPEATS["A"]):
            starts.append(_timed(tasks.deploy, cfg, v2, 0.5, actor="bench")[0])
            wall, result = _timed(tasks.rollback, cfg, "incident", "bench", None, actor="bench")
            runs["A"].append({"task": _checked(result, v1, "done")["seconds"], "wall": wall})

        print(f"  B: rollback to the previous champion × {REPEATS['B']} …", flush=True)
        for _ in range(REPEATS["B"]):
            starts.append(_timed(tasks.deploy, cfg, v2, 0.5, actor="bench")[0])
            tasks.canary(cfg, "promote", actor="bench")
            wall, result = _timed(tasks.rollback, cfg, "bad-predictions", "bench", v1, actor="bench")
            runs["B"].append({"task": _checked(result, v1, "done")["seconds"], "wall": wall})

        print(f"  C: sofare_rollback from the Airflow form (dag.test) × {REPEATS['C']} …", flush=True)
        target = v1
        for n in range(REPEATS["C"]):
            target = v2 if target == v1 else v1
            logfile = scratch / f"sofare_rollback-{n}.log"
            conf = {"reason": "incident", "details": "bench", "target_version": target}
            wall = _timed(run_dag, cfg, "sofare_rollback", conf=conf, logfile=logfile)[0]
            logged = LOG_LINE.findall(logfile.read_text())
            runs["C"].append(
                {
                    "task": _checked(_last_rollback(cfg), target, "done")["seconds"],
                    "wall": wall,
                    "log": float(logged[-1]) if logged else float("nan"),
                }
            )

        print("  the same rollback a second time (a no-op), by the task and from the form …", flush=True)
        noop["task"], result = _timed(tasks.rollback, cfg, "incident", "bench: again", target, actor="bench")
        noop["task_seconds"] = _checked(result, target, "noop")["seconds"]
        logfile = scratch / "sofare_rollback-noop.log"
        conf = {"reason": "incident", "details": "bench: again", "target_version": target}
        noop["dag"] = _timed(run_dag, cfg, "sofare_rollback", conf=conf, logfile=logfile)[0]
        noop["dag_seconds"] = _checked(_last_rollback(cfg), target, "noop")["seconds"]
        verify_requests = cfg.deploy.verify_requests

    def verdict(seconds: float) -> str:
        return "**met**" if seconds <= GOAL_SECONDS else "**MISSED**"

    def row(label: str, values: list[float]) -> str:
        lo, mid, hi = _stats(values)
        return f"| {label} | {lo:.2f} | {mid:.2f} | {hi:.2f} | {verdict(hi)} |"

    head = ["| measured (s) | min | p50 | max | goal ≤ 60 s (on the max) |", "|---|---:|---:|---:|---|"]
    titles = {
        "A": "A, from a live canary (`sofare rollback`, the task; no new process)",
        "B": "B, to the previous champion (the task; a new `bentoml serve` starts)",
        "C": "C, from the Airflow form (`sofare_rollback` via `dag.test()`; a new `bentoml serve` starts)",
    }
    lines = [
        "## Rollback (deploy)",
        "",
        f"Machine: {machine()}. nginx, the `bentoml serve` processes and the benchmark share these cores.",
        (
            f"Each rollback is verified by {verify_requests} live `/model_info` requests through the front door "
            "(distinct client ids), all of which must be answered by the target as stable. Task seconds: the "
            "rollback's own clock, trigger to verified (what the DAG's task log shows); wall clock: around the "
            "whole call (plus the event, audit and alert writes; for C, DAG parsing and the task run)."
        ),
        "",
    ]
    for key, title in titles.items():
        tasks_s = [r["task"] for r in runs[key]]
        walls = [r["wall"] for r in runs[key]]
        lines += [
            f"**{title}**, {len(runs[key])} runs:",
            "",
            *head,
            row("task seconds, trigger → verified", tasks_s),
            row("wall clock around the call", walls),
            "",
        ]
        lines.append("Runs (task / wall s): " + ", ".join(f"{t:.2f} / {w:.2f}" for t, w in zip(tasks_s, walls)) + ".")
        if key == "C":
            logged = [r["log"] for r in runs[key]]
            lines.append(
                "The first run is this process's first `dag.test()` (Airflow's one-time set-up included). "
                'The task log\'s line ("verified through … in N s") read '
                + ", ".join("missing" if math.isnan(v) else f"{v:.1f} s" for v in logged)
                + "."
            )
        lines.append("")
    a_mid, b_mid = statistics.median(r["task"] for r in runs["A"]), statistics.median(r["task"] for r in runs["B"])
    lo, mid, hi = _stats(starts)
    lines += [
        (
            f"**Idempotent second run** (the target already serves: only verified): by the task {noop['task']:.2f} s "
            f"wall clock ({noop['task_seconds']:.2f} s its own clock); from the form {noop['dag']:.2f} s wall clock "
            f"({noop['dag_seconds']:.2f} s its own clock)."
        ),
        "",
        (
            f"What dominates: B's median ({b_mid:.2f} s) exceeds A's ({a_mid:.2f} s) by the start of a new "
            f"`bentoml serve` to `/readyz` (for reference, deploying a canary, a start plus an nginx reload, took "
            f"{lo:.2f} / {mid:.2f} / {hi:.2f} s min / p50 / max over {len(starts)} runs); A only reloads nginx, waits "
            "for the old workers and stops the canary. Both stop the replaced process before verifying. C adds "
            "`dag.test()`'s overhead (parsing the DAG file, creating the run, running the task in process) to B's work."
        ),
        "",
        f"Processes left after `sofare` stopped the deployment: {len(left) or 'none'}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    write_section("deploy", run())
