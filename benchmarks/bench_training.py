"""Training cost on the 2.5 years of real hourly data (2023-01-11 .. 2025-06-30), on this machine's CPUs.

1. Seconds per epoch (training on the ~15k training windows + the validation pass, as every tuning trial
   runs it) with the default hyper-parameters (`model.Hyper`), median of a few epochs, on the configured
   `training.threads` and, for comparison, on the other thread count.
2. The 20-trial Optuna study on the full window as `sofare_train` runs it: `pipeline.plan`, then
   `training.workers` parallel `pipeline.tune` workers (separate processes, one shared RDB study), the
   configured pruner, search space and `max_epochs`. Wall time from the first worker's start to the
   last one's end.

"Epochs pruned" (the goal's share) = the epochs pruned trials did not run, out of the study's epoch
budget (trials x max_epochs): what pruning alone cut. Early stopping's cut is reported beside it, not
counted. With SOFARE_BENCH_BASELINE=1 the same study (same sampler seeds, workers, data) also runs
without a pruner, for the epochs pruning saved relative to it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine

FULL = ("2023-01-11", "2025-06-30")  # the 2.5 years after the features' warm-up
WINDOW = ("2023-01-01", "2025-06-30")
TRIALS = int(os.environ.get("SOFARE_BENCH_TRIALS", "20"))
EPOCHS_TIMED = int(os.environ.get("SOFARE_BENCH_EPOCHS", "4"))
BASELINE = os.environ.get("SOFARE_BENCH_BASELINE") == "1"
GOAL_EPOCH_S = 10.0
GOAL_MINUTES = 15.0
GOAL_PRUNED = 0.40


def _load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())


def epoch_seconds(threads: int, n: int = EPOCHS_TIMED) -> dict:
    """Per-epoch seconds (train + validation) of the default hyper-parameters on the full window."""
    import lightning as L

    from sofare.config import load_config
    from sofare.training import pipeline
    from sofare.training.model import Hyper
    from sofare.training.windows import fit

    cfg = load_config()
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"threads": threads})})
    data = pipeline.load_data(cfg, *FULL)
    hyper = Hyper().to_dict()
    train, _ = data.windows(data.parts["train"], data.parts["train"], hyper["lookback"])
    val, _ = data.windows(data.parts["validation"], data.parts["train"], hyper["lookback"])
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_epoch_start(self, *_: object) -> None:
            self.began = time.perf_counter()

        def on_train_epoch_end(self, *_: object) -> None:  # after the epoch's validation pass
            times.append(time.perf_counter() - self.began)

    fit(cfg, data.spec, hyper, train, val, n, cfg.training.seed, callbacks=[Clock()])
    return {
        "threads": threads,
        "epochs": times,
        "median": statistics.median(times),
        "train": len(train),
        "validation": len(val),
        "rows": len(data.frame),
        "hyper": hyper,
    }


def worker_main(plan_file: str, worker: int) -> None:
    """One `pipeline.tune` worker in its own process, as a mapped Airflow task runs it."""
    from sofare.config import load_config
    from sofare.contracts import TrainingPlan
    from sofare.training import pipeline

    plan = TrainingPlan.model_validate_json(Path(plan_file).read_text())
    print(json.dumps(pipeline.tune(load_config(), plan, worker)), flush=True)


def study(scratch: Path, pruner: str) -> dict:
    """The 20-trial study on the full window with `training.workers` parallel worker processes."""
    import optuna

    from sofare.config import load_config
    from sofare.training import pipeline, tuning

    os.environ.update({"SOFARE_TRAINING__PRUNER": pruner, "SOFARE_TRAINING__STUDY_NAME": f"bench-{pruner}"})
    try:
        cfg = load_config()
        t = cfg.training
        plan = pipeline.plan(cfg, TRIALS, 24 * 3600, t.max_epochs, *FULL, run_name=f"benchmark ({pruner})")
        plan_file = scratch / f"plan-{pruner}.json"
        plan_file.write_text(plan.model_dump_json())
        began = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from benchmarks.bench_training import worker_main; "
                    f"worker_main({str(plan_file)!r}, {w})",
                ],
                cwd=ROOT,
                env=os.environ.copy(),
            )
            for w in range(t.workers)
        ]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - began
        if any(codes):
            raise RuntimeError(f"a tuning worker failed: exit codes {codes}")
        trials = optuna.load_study(study_name=plan.study, storage=tuning.storage(cfg)).get_trials(deepcopy=False)
    finally:
        os.environ.pop("SOFARE_TRAINING__PRUNER", None)
        os.environ.pop("SOFARE_TRAINING__STUDY_NAME", None)
    budget = len(trials) * t.max_epochs
    epochs = [int(tr.user_attrs.get("epochs") or len(tr.intermediate_values)) for tr in trials]
    pruned = [e for tr, e in zip(trials, epochs) if tr.state == optuna.trial.TrialState.PRUNED]
    complete = [e for tr, e in zip(trials, epochs) if tr.state == optuna.trial.TrialState.COMPLETE]
    seconds = [(tr.datetime_complete - tr.datetime_start).total_seconds() for tr in trials if tr.datetime_complete]
    return {
        "pruner": pruner,
        "wall": wall,
        "trials": len(trials),
        "complete": len(complete),
        "pruned": len(pruned),
        "failed": len(trials) - len(complete) - len(pruned),
        "epochs": sum(epochs),
        "budget": budget,
        "pruned_share": sum(t.max_epochs - e for e in pruned) / max(budget, 1),
        "early_stop_share": sum(t.max_epochs - e for e in complete) / max(budget, 1),
        "trial_s": statistics.median(seconds) if seconds else 0.0,
        "epoch_s": sum(seconds) / max(sum(epochs), 1),
        "best": min((tr.value for tr in trials if tr.value is not None), default=float("nan")),
        "workers": t.workers,
        "threads": t.threads,
        "max_epochs": t.max_epochs,
        "patience": t.patience,
        "rows": plan.rows,
        "load_after": _load(),
    }


def run() -> str:
    scratch = Path(tempfile.mkdtemp(prefix="sofare-bench-train-"))
    saved = {k: os.environ.get(k) for k in ("SOFARE_WAREHOUSE__URL", "SOFARE_PATHS__VAR")}
    os.environ.update(
        {"SOFARE_WAREHOUSE__URL": f"sqlite:///{scratch / 'warehouse.db'}", "SOFARE_PATHS__VAR": str(scratch / "var")}
    )
    try:
        from sofare import tasks
        from sofare.config import load_config

        cfg = load_config()
        load_before = _load()
        print(f"  {load_before}; loading and validating 2.5 years of hourly data …", flush=True)
        tasks.backfill(cfg, ["sample"], *WINDOW)
        tasks.validate_range(cfg, *WINDOW)
        epochs = {}
        other = 2 if cfg.training.threads == 1 else 1
        for threads, n in ((cfg.training.threads, EPOCHS_TIMED), (other, 2)):  # the other count: for comparison
            print(f"  {n} epochs, default hyper-parameters, {threads} thread(s) …", flush=True)
            epochs[threads] = epoch_seconds(threads, n)
            print(f"    {[round(x, 2) for x in epochs[threads]['epochs']]} s", flush=True)
        studies = []
        for pruner in (cfg.training.pruner, "none") if BASELINE else (cfg.training.pruner,):
            print(f"  {TRIALS} trials, pruner {pruner}, {cfg.training.workers} workers …", flush=True)
            studies.append(study(scratch, pruner))
            print(f"    {studies[-1]}", flush=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(scratch, ignore_errors=True)
    return report(cfg, epochs, studies, load_before)


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(cfg, epochs: dict, studies: list[dict], load_before: str) -> str:
    t = cfg.training
    mine = epochs[t.threads]
    main = studies[0]
    h = mine["hyper"]
    minutes = main["wall"] / 60
    lines = [
        "## Tuning and training",
        "",
        f"Machine: {machine()}; no GPU; {load_before} before the run, {main['load_after']} after it.",
        *(
            [
                "**The machine was shared** with other jobs (a CI run, tests) during this run — see the load averages; "
                "the times below are slower than on an idle machine."
            ]
            if float(load_before.split()[2]) > 0.7
            else []
        ),
        f"Full window {FULL[0]} .. {FULL[1]}: {mine['rows']:,} hourly rows, {mine['train']:,} training and "
        f"{mine['validation']:,} validation windows.",
        "",
        "**One epoch** (training pass + validation pass, as in every trial) with the default hyper-parameters "
        f"(hidden {h['hidden_size']}, {h['num_layers']} layers, {h['num_heads']} heads, lookback {h['lookback']}, "
        f"batch {h['batch_size']}), median of the epochs timed:",
        "",
        "| torch threads | epochs (s) | median s per epoch |",
        "|---:|---|---:|",
    ]
    for threads, r in epochs.items():
        mark = " (configured)" if threads == t.threads else ""
        lines.append(f"| {threads}{mark} | {', '.join(f'{x:.1f}' for x in r['epochs'])} | {r['median']:.1f} |")
    lines += [
        "",
        f"- One epoch ≤ {GOAL_EPOCH_S:.0f} s: **{mine['median']:.1f} s** on {t.threads} thread(s) — "
        f"**{_mark(mine['median'] <= GOAL_EPOCH_S)}**.",
        "",
        f"**{TRIALS} trials** on the full window: `pipeline.plan` then {main['workers']} parallel `pipeline.tune` worker "
        f"processes sharing the RDB study (as `sofare_train` maps them), {main['threads']} torch thread(s) each, "
        f"max_epochs {main['max_epochs']}, patience {main['patience']}, search space from include/config/sofare.yaml.",
        "",
        "| pruner | trials | complete | pruned | epochs run | epoch budget | pruned share | early-stop share | "
        "median trial s | s per epoch | best val loss | wall min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in studies:
        lines.append(
            f"| {r['pruner']} | {r['trials']} | {r['complete']} | {r['pruned']} | {r['epochs']} | {r['budget']} | "
            f"{r['pruned_share']:.0%} | {r['early_stop_share']:.0%} | {r['trial_s']:.0f} | {r['epoch_s']:.1f} | "
            f"{r['best']:.4f} | {r['wall'] / 60:.1f} |"
        )
    lines += [
        "",
        "*Pruned share* = epochs that pruned trials did not run (max_epochs − epochs run, summed over pruned trials) "
        "out of the epoch budget (trials × max_epochs). *Early-stop share*: the same for completed trials that early "
        "stopping ended before max_epochs (not counted as pruned).",
    ]
    if len(studies) > 1:
        saved = 1 - main["epochs"] / max(studies[1]["epochs"], 1)
        lines.append(
            f"Relative to the same study without a pruner: **{saved:.0%}** fewer epochs run "
            "(parallel workers make the two studies' trial sequences differ beyond the seeded start)."
        )
    else:
        lines.append("The same study without a pruner was not run (SOFARE_BENCH_BASELINE=1 runs it).")
    ok = minutes <= GOAL_MINUTES and main["pruned_share"] >= GOAL_PRUNED and main["failed"] == 0
    lines += [
        "",
        f"- {TRIALS} trials ≤ {GOAL_MINUTES:.0f} min with ≥ {GOAL_PRUNED:.0%} of epochs pruned: **{minutes:.1f} min**, "
        f"**{main['pruned_share']:.0%}** pruned — **{_mark(ok and TRIALS >= 20)}**.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    from benchmarks.common import write_section

    write_section("training", run())
