"""Training pipeline behind `sofare_train` and `sofare train`: plan → tune (Optuna, parallel workers
sharing one RDB study) → final fit on train+validation → test evaluation vs baselines → registry.

Every step reads validated rows only (`dataset.training_frame`), is seeded, and records itself in
MLflow: one parent run per training run, one child run per Optuna trial.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sofare import dataset, evaluation, ingest, warehouse
from sofare.config import interval_delta
from sofare.features import FeatureSpec, feature_spec
from sofare.training import Scaler, Windows, fit, make_windows, predict, purge_rows, temporal_split, walk_forward_splits, window_ends

if TYPE_CHECKING:
    import optuna

    from sofare.config import Config

log = logging.getLogger(__name__)
BARS_PER_YEAR_1H = 365.25 * 24


@dataclass
class Data:
    """The validated feature rows of a training window, with its split."""

    frame: pd.DataFrame
    spec: FeatureSpec
    parts: dict[str, range]
    delta: timedelta

    def windows(self, rows: range, fit_rows: range, lookback: int, shuffle_seed: int | None = None) -> tuple[Windows, Scaler]:
        """Windows ending in `rows`, scaled with statistics of `fit_rows` (the rows being fitted on)."""
        scaler = Scaler.fit(self.frame, list(self.spec.columns), np.arange(fit_rows.start, fit_rows.stop))
        ends = window_ends(self.frame, self.spec, rows, lookback, self.delta)
        w = make_windows(self.frame, self.spec, scaler, ends, lookback)
        if shuffle_seed is not None:  # the leakage check: labels permuted among the fitted rows only
            rng = np.random.default_rng(shuffle_seed)
            perm = rng.permutation(ends)
            w.y_up = w.y_up.copy()
            w.y_ret = w.y_ret.copy()
            w.y_up[ends], w.y_ret[ends] = w.y_up[perm], w.y_ret[perm]
        return w, scaler


def load_data(cfg: Config, start: str, end: str) -> Data:
    engine = warehouse.get_engine(cfg)
    lo, hi = ingest.day_range(start, end)
    frame = dataset.training_frame(cfg, engine, lo, hi).sort_values("open_time").reset_index(drop=True)
    parts = temporal_split(len(frame), cfg.training.split.train, cfg.training.split.validation, purge_rows(cfg))
    return Data(frame, feature_spec(cfg), parts, interval_delta(cfg.market.interval))


def training_window(cfg: Config, start: str | None, end: str | None) -> tuple[str, str]:
    """Params, else the config, else the latest span of days that passed every validation suite."""
    start, end = start or cfg.training.start, end or cfg.training.end
    if start and end:
        ingest.day_range(start, end)
        return start, end
    with warehouse.get_engine(cfg).connect() as conn:
        first, last = dataset.validated_span(conn, cfg)
    return start or str(first), end or str(last)


# --- plan ------------------------------------------------------------------------------------------


def plan(cfg: Config, n_trials: int | None = None, timeout: int | None = None, max_epochs: int | None = None,
         start: str | None = None, end: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Fix the window (checking it is validated), create or resume the study, open the parent run."""
    from sofare import registry, tuning

    start, end = training_window(cfg, start, end)
    data = load_data(cfg, start, end)  # raises UnvalidatedIntervalError naming any bad day
    spec = data.spec
    name = f"{cfg.training.study_name}-{cfg.market.symbol}-{cfg.market.interval}-{start}-{end}-{spec.version}-s{cfg.training.seed}"
    study = tuning.create_study(cfg, name)
    experiment = registry.setup(cfg)
    import mlflow

    run = mlflow.MlflowClient().create_run(experiment, run_name=run_name or f"train {start}..{end}", tags={
        "sofare.kind": "training", "study": name, "data_window": f"{start}..{end}",
        "feature_set_version": spec.version, "git_commit": registry.git_commit(cfg)})
    sizes = {k: len(v) for k, v in data.parts.items()}
    out = {"start": start, "end": end, "study": name, "parent_run_id": run.info.run_id, "rows": len(data.frame),
           "parts": sizes, "n_trials": n_trials or cfg.training.n_trials,
           "timeout": timeout or cfg.training.timeout_seconds, "max_epochs": max_epochs or cfg.training.max_epochs,
           "trials_done_before": tuning.finished_trials(study)}
    log.info("training plan: %s", out)
    return out


# --- tune ------------------------------------------------------------------------------------------


def objective(cfg: Config, data: Data, trial: optuna.trial.Trial, max_epochs: int, parent_run_id: str) -> float:
    """Fit one trial's parameters on train, early-stopped and pruned on validation loss."""
    import mlflow
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from sofare import tuning

    hyper = tuning.suggest(cfg, trial)
    train, _ = data.windows(data.parts["train"], data.parts["train"], hyper["lookback"])
    val, _ = data.windows(data.parts["validation"], data.parts["train"], hyper["lookback"])
    c = mlflow.MlflowClient()
    run = c.create_run(c.get_run(parent_run_id).info.experiment_id, run_name=f"trial {trial.number}",
                       tags={"mlflow.parentRunId": parent_run_id, "sofare.kind": "trial", "optuna.trial": str(trial.number)})
    run_id = run.info.run_id
    for key, value in hyper.items():
        c.log_param(run_id, key, value)
    state = "FINISHED"
    try:
        result = fit(cfg, data.spec, hyper, train, val, max_epochs, cfg.training.seed,
                     callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_loss")])
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs", len(result.history.epochs))
        trial.set_user_attr("history", result.history.epochs)
        for row in result.history.epochs:
            for key, value in row.items():
                if key != "epoch":
                    c.log_metric(run_id, key, value, step=int(row["epoch"]))
        c.log_metric(run_id, "best_val_loss", result.best_val_loss)
        c.log_metric(run_id, "fit_seconds", result.seconds)
        return float(result.best_val_loss)
    except optuna.TrialPruned:
        epochs = len(trial.storage.get_trial(trial._trial_id).intermediate_values)
        trial.set_user_attr("epochs", epochs)
        c.set_tag(run_id, "optuna.state", "PRUNED")
        c.log_metric(run_id, "epochs", epochs)
        state = "KILLED"
        raise
    except BaseException:
        state = "FAILED"
        raise
    finally:
        c.set_terminated(run_id, state)


def tune(cfg: Config, the_plan: dict[str, Any], worker: int) -> dict[str, Any]:
    """One worker's share: trials on the shared study until it holds n_trials finished ones."""
    from sofare import registry, tuning

    registry.setup(cfg)
    data = load_data(cfg, the_plan["start"], the_plan["end"])
    study = tuning.load_study(cfg, the_plan["study"], worker)
    began = time.monotonic()
    ran = tuning.optimize(study, lambda trial: objective(cfg, data, trial, the_plan["max_epochs"], the_plan["parent_run_id"]),
                          the_plan["n_trials"], the_plan["timeout"])
    return {"worker": worker, "trials_run": ran, "finished": tuning.finished_trials(study),
            "seconds": round(time.monotonic() - began, 1)}


# --- final fit, evaluation, registration ------------------------------------------------------------


def evaluate(cfg: Config, data: Data, hyper: dict[str, Any], epochs: int, fit_rows: range, test_rows: range,
             shuffle_labels: bool = False) -> dict[str, Any]:
    """Fit on `fit_rows` for `epochs` epochs, then score the model and the baselines on `test_rows`."""
    e = cfg.evaluation
    seed = cfg.training.seed
    train, scaler = data.windows(fit_rows, fit_rows, hyper["lookback"], shuffle_seed=seed if shuffle_labels else None)
    test, _ = data.windows(test_rows, fit_rows, hyper["lookback"])
    if len(test) == 0:
        raise ValueError("the test window holds no complete window; widen the training window")
    result = fit(cfg, data.spec, hyper, train, None, epochs, seed)
    prob, ret = predict(result.model, test, scaler)
    frame = data.frame
    y_up = frame["target_up"].to_numpy()[test.ends].astype(int)
    y_ret = frame["target_return"].to_numpy()[test.ends].astype(float)
    train_up = train.y_up[train.ends]
    train_ret = frame["target_return"].to_numpy()[train.ends].astype(float)
    x_all = scaler.transform(frame)
    predictors = {
        "sofare_m3": evaluation.Predictions(prob, ret),
        "persistence": evaluation.persistence(frame["log_ret_1"].to_numpy()[test.ends].astype(float)),
        "majority": evaluation.majority(train_up, train_ret, len(test)),
        "linear": evaluation.linear(x_all[train.ends], train_up, train_ret, x_all[test.ends], seed),
    }
    scores = {name: evaluation.score(y_up, y_ret, p, e.decision_threshold, e.bootstrap_samples, e.bootstrap_block_bars, seed)
              for name, p in predictors.items()}
    bars = BARS_PER_YEAR_1H * (timedelta(hours=1) / data.delta)
    backtest = evaluation.backtest(prob, y_ret, cfg.features.horizon, e.decision_threshold, e.fee_bps, bars)
    times = pd.to_datetime(frame["open_time"].to_numpy()[test.ends], utc=True)
    return {"model": result.model, "scaler": scaler, "history": result.history.epochs, "scores": scores,
            "backtest": backtest, "test_windows": len(test), "train_windows": len(train),
            "test_start": str(times[0]), "test_end": str(times[-1]), "y_up": y_up, "y_ret": y_ret, "times": times,
            "predictions": predictors["sofare_m3"],
            "example": test, "fit_seconds": result.seconds}


def walk_forward(cfg: Config, data: Data, hyper: dict[str, Any], max_epochs: int) -> list[dict[str, Any]]:
    """Primary metric per walk-forward fold (early-stopped on each fold's validation part)."""
    t = cfg.training
    metric = cfg.evaluation.primary_metric
    out = []
    for k, parts in enumerate(walk_forward_splits(len(data.frame), t.walk_forward.folds, t.walk_forward.mode,
                                                  t.split.validation, t.split.test, purge_rows(cfg))):
        train, scaler = data.windows(parts["train"], parts["train"], hyper["lookback"])
        val, _ = data.windows(parts["validation"], parts["train"], hyper["lookback"])
        test, _ = data.windows(parts["test"], parts["train"], hyper["lookback"])
        result = fit(cfg, data.spec, hyper, train, val, max_epochs, t.seed)
        prob, ret = predict(result.model, test, scaler)
        y_up = data.frame["target_up"].to_numpy()[test.ends].astype(int)
        y_ret = data.frame["target_return"].to_numpy()[test.ends].astype(float)
        e = cfg.evaluation
        s = evaluation.score(y_up, y_ret, evaluation.Predictions(prob, ret), e.decision_threshold, e.bootstrap_samples,
                             e.bootstrap_block_bars, t.seed)
        times = data.frame["open_time"].to_numpy()
        out.append({"fold": k, "test_start": str(pd.Timestamp(times[parts["test"].start])),
                    "test_end": str(pd.Timestamp(times[parts["test"].stop - 1])), metric: s[metric]})
    return out


def finalize(cfg: Config, the_plan: dict[str, Any]) -> dict[str, Any]:
    """Best trial → final fit on train+validation → test evaluation → MLflow run + registered version."""
    import mlflow

    from sofare import model_card, registry, tuning
    from sofare.model import ARCHITECTURE

    registry.setup(cfg)
    data = load_data(cfg, the_plan["start"], the_plan["end"])
    study = tuning.load_study(cfg, the_plan["study"], 0)
    best = tuning.best_trial(study)
    hyper = tuning.hyper_of(cfg, best.params)
    epochs = int(best.user_attrs.get("best_epoch", the_plan["max_epochs"]))
    fit_rows = range(0, data.parts["validation"].stop)
    result = evaluate(cfg, data, hyper, epochs, fit_rows, data.parts["test"])
    folds = walk_forward(cfg, data, hyper, the_plan["max_epochs"]) if cfg.training.walk_forward.folds else []
    metric = cfg.evaluation.primary_metric
    primary = result["scores"]["sofare_m3"][metric]["value"]
    spec = data.spec
    meta = {
        "architecture": ARCHITECTURE, "hyper": hyper, "columns": list(spec.columns),
        "groups": {"micro": list(range(len(spec.micro))),
                   "safe": list(range(len(spec.micro), len(spec.micro) + len(spec.safe_haven))),
                   "macro": list(range(len(spec.micro) + len(spec.safe_haven), len(spec.columns)))},
        "n_inputs": {"micro": len(spec.micro), "safe": len(spec.safe_haven), "macro": len(spec.macro)},
        "loss": {"loss_weight": cfg.training.loss_weight, "huber_delta": cfg.training.huber_delta,
                 "warmup_fraction": cfg.training.warmup_fraction},
        "scaler": result["scaler"].to_dict(), "feature_set_version": spec.version, "symbol": cfg.market.symbol,
        "interval": cfg.market.interval, "horizon": cfg.features.horizon, "warmup_bars": cfg.features.warmup_bars,
    }
    report = {
        "data_window": f"{the_plan['start']}..{the_plan['end']}", "rows": the_plan["rows"], "parts": the_plan["parts"],
        "purge_rows": purge_rows(cfg), "test_window": f"{result['test_start']}..{result['test_end']}",
        "train_windows": result["train_windows"], "test_windows": result["test_windows"], "epochs": epochs,
        "hyper": hyper, "best_trial": best.number, "best_val_loss": best.value, "scores": result["scores"],
        "backtest": {k: v for k, v in result["backtest"].items() if not k.startswith("equity")},
        "walk_forward": folds, "primary_metric": metric, "fee_bps": cfg.evaluation.fee_bps,
        "trials": tuning.trial_summary(study), "seed": cfg.training.seed, "architecture": ARCHITECTURE,
        "feature_set_version": spec.version, "symbol": cfg.market.symbol, "interval": cfg.market.interval,
        "horizon": cfg.features.horizon, "threshold": cfg.evaluation.decision_threshold,
        "bootstrap": {"samples": cfg.evaluation.bootstrap_samples, "block_bars": cfg.evaluation.bootstrap_block_bars},
    }
    run_id = the_plan["parent_run_id"]
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="sofare-model-") as scratch:
        mlflow.log_params({**{f"hp_{k}": v for k, v in hyper.items()}, "epochs": epochs, "seed": cfg.training.seed,
                           "data_window": report["data_window"], "test_window": report["test_window"],
                           "feature_set_version": spec.version, "architecture": ARCHITECTURE})
        for name, scores in result["scores"].items():
            prefix = "test" if name == "sofare_m3" else f"baseline_{name}"
            for m, s in scores.items():
                mlflow.log_metrics({f"{prefix}_{m}": s["value"], f"{prefix}_{m}_ci_low": s["ci_low"],
                                    f"{prefix}_{m}_ci_high": s["ci_high"]})
        for side in ("strategy", "buy_and_hold"):
            mlflow.log_metrics({f"backtest_{side}_{k}": v for k, v in result["backtest"][side].items()})
        for row in result["history"]:
            mlflow.log_metric("final_train_loss", row["train_loss"], step=int(row["epoch"]))
        best_history = best.user_attrs.get("history") or []
        plots_dir = Path(scratch) / "plots"
        plots_dir.mkdir()
        for path in evaluation.plots(plots_dir, best_history, result["y_up"], result["predictions"],
                                     cfg.evaluation.decision_threshold, result["backtest"], result["times"]):
            mlflow.log_artifact(str(path), artifact_path="plots")
        mlflow.log_dict(report, "evaluation.json")
        bundle = registry.save_bundle(Path(scratch) / "bundle", result["model"], meta)
        example = result["example"]
        raw = data.frame[list(spec.columns)].to_numpy(dtype=np.float32)
        window = raw[example.ends[-1] - hyper["lookback"] + 1: example.ends[-1] + 1][None]
        info = registry.log_model(cfg, bundle, window)
        version = str(info.registered_model_version)
        previous = registry.latest_version_tags(cfg, below=int(version))
        semver = registry.next_semver(previous, ARCHITECTURE, spec.version, primary, metric)
        tags = {"semver": semver, "architecture": ARCHITECTURE, "data_window": report["data_window"],
                "test_window": report["test_window"], "feature_set_version": spec.version,
                "git_commit": registry.git_commit(cfg), "primary_metric": metric, "training_run_id": run_id,
                **{f"test_{m}": f"{s['value']:.4f}" for m, s in result["scores"]["sofare_m3"].items()}}
        c = mlflow.MlflowClient()
        for key, value in tags.items():
            c.set_model_version_tag(cfg.mlflow.model_name, version, key, value)
        mlflow.set_tags({"semver": semver, "model_version": version})
    card = model_card.write(cfg, version)
    mlflow.log_artifact(str(card), run_id=run_id)
    out = registered_summary(cfg, version)
    log.info("registered %s version %s (%s): test %s = %.4f", out["model"], version, semver, metric, primary)
    return out


def registered_summary(cfg: Config, version: str | None = None) -> dict[str, Any]:
    """A registered version (default: the newest) with its test metrics and the baselines', from MLflow."""
    from sofare import evaluation, registry

    c = registry.client(cfg)
    versions = c.search_model_versions(f"name = '{cfg.mlflow.model_name}'")
    if not versions:
        raise LookupError(f"no registered {cfg.mlflow.model_name} version; run `sofare train` first")
    mv = next((v for v in versions if str(v.version) == str(version)), None) if version else \
        max(versions, key=lambda v: int(v.version))
    if mv is None:
        raise LookupError(f"{cfg.mlflow.model_name} has no version {version}")
    metrics = c.get_run(mv.run_id).data.metrics
    prefixes = {"sofare_m3": "test", "persistence": "baseline_persistence", "majority": "baseline_majority",
                "linear": "baseline_linear"}
    scores = {name: {m: metrics.get(f"{prefix}_{m}", float("nan")) for m in evaluation.METRICS}
              for name, prefix in prefixes.items()}
    metric = mv.tags.get("primary_metric", cfg.evaluation.primary_metric)
    return {"model": cfg.mlflow.model_name, "version": str(mv.version), "semver": mv.tags.get("semver", "?"),
            "run_id": mv.run_id, "primary_metric": metric, "primary": scores["sofare_m3"][metric],
            "model_card": str(cfg.var_dir / "reports" / "model_card.md"), "scores": scores}
