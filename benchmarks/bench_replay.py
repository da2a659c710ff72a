"""Replay speed: 30 days (720 hours) walked as if live through the real parts -- the ingest function on the
embedded data, `bentoml serve` behind the nginx front door for every prediction, outcomes, live quality with
bootstrap CIs, Evidently drift, severity -> action -- all on this machine's cores.

Setup (not timed): four months of real hourly data loaded, January .. March validated, one tiny SofareM3 trained
on it (1 trial, 1 epoch, the tests' small search space: replay cost hardly depends on the model), built and
deployed as the stable. Then `sofare replay --start 2024-04-01 --end 2024-04-30`, timed end to end and per step.
"""

from __future__ import annotations

import os
import time

from benchmarks.common import deployment_home, machine

GOAL_SECONDS = 600.0
DATA = ("2024-01-01", "2024-04-30")
TRAIN = ("2024-01-12", "2024-03-31")
REPLAY = ("2024-04-01", "2024-04-30")


def run() -> str:
    with deployment_home("sofare-bench-replay-"):
        from sofare import runtime, tasks
        from sofare.config import load_config
        from sofare.monitoring import replay

        cfg = load_config()
        print("  loading four months, validating, training and deploying a tiny model …", flush=True)
        runtime.init(cfg, airflow=False)
        tasks.backfill(cfg, ["sample"], *DATA)
        tasks.validate_range(cfg, DATA[0], TRAIN[1])
        version = tasks.train(cfg, n_trials=1, max_epochs=1, start=TRAIN[0], end=TRAIN[1])["version"]
        tasks.build_bento(cfg, version, actor="bench")
        tasks.deploy(cfg, version, actor="bench")
        print(f"  replaying {REPLAY[0]} .. {REPLAY[1]} …", flush=True)
        began = time.perf_counter()
        summary = replay.replay(cfg, *REPLAY).to_dict()
        wall = time.perf_counter() - began
        cores = len(os.sched_getaffinity(0))
        workers = cfg.serving.workers

    hours = summary["hours"]
    verdict = "**met**" if wall <= GOAL_SECONDS else "**MISSED**"
    steps = summary["timings"]
    lines = [
        "## Replay (monitoring)",
        "",
        f"Machine: {machine()}; {cores} cores shared by the replay, nginx and the `bentoml serve` stable "
        f"({workers} workers).",
        "",
        f"`sofare replay --start {REPLAY[0]} --end {REPLAY[1]}`: {hours} hours, each ingested (the ingest "
        "function on the embedded data), predicted through the front door, monitored (outcomes, live quality "
        "with 500-sample bootstrap CIs per window, Evidently drift of the served inputs over 7 days, severity "
        "-> action) and acted on; the Evidently HTML is written every 24 hours.",
        "",
        "| measured | value | goal |",
        "|---|---:|---|",
        f"| {hours} hours, end to end | {wall:.0f} s ({wall / max(hours, 1) * 1000:.0f} ms per hour) | "
        f"≤ 600 s: {verdict} |",
    ]
    for step in ("ingest", "predict", "monitor", "act"):
        if step in steps:
            lines.append(
                f"| of which {step} | {steps[step]:.0f} s ({steps[step] / max(hours, 1) * 1000:.0f} ms per hour) | |"
            )
    lines += [
        "",
        f"Predictions: {summary['predictions']}; refused: {summary['refused']}; actions taken: "
        f"{len(summary['actions'])} ({', '.join(sorted({a['action'] for a in summary['actions']})) or 'none'}); "
        f"drift events (medium or worse): {len(summary['drift_events'])}.",
    ]
    for q in summary["quality"]:
        if q.get("accuracy"):
            a, p = q["accuracy"], q["persistence_accuracy"]
            lines.append(
                f"Live accuracy of the tiny model over the month: {a['value']:.1%} [{a['ci_low']:.1%}, "
                f"{a['ci_high']:.1%}] on {q['n']} hours, persistence {p['value']:.1%} (a 1-epoch model: "
                "the figure shows the loop works, not a good model)."
            )
    return "\n".join(lines)
