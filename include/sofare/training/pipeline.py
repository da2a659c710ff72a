"""Training pipeline behind `sofare_train` and `sofare train`: plan → tune (Optuna, parallel workers
sharing one RDB study) → final fit on train+validation → test evaluation vs baselines → a `Trained`
model (exported files, `ModelMeta`, `EvaluationReport`) that `sofare.registry` registers.

Every step reads validated rows only (`dataset.training_frame`), is seeded, and records itself in
MLflow tracking: one parent run per training run, one child run per Optuna trial.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sofare.config import interval_delta
from sofare.contracts import (
    BASELINES,
    MODALITIES,
    PREDICTORS,
    Backtest,
    Calibration,
    DateWindow,
    EvaluationReport,
    Fold,
    MetricCI,
    ModelMeta,
    Paired,
    Policy,
    PolicyResult,
    Scaling,
    TrainingPlan,
    Trial,
    WalkForward,
)
from sofare.data import ingest, warehouse
from sofare.data.features import FeatureSpec, feature_spec
from sofare.errors import InputError
from sofare.training import dataset, decision, evaluation
from sofare.training.windows import (
    Scaler,
    Windows,
    column_groups,
    fit,
    make_windows,
    predict,
    predict_inputs,
    purge_rows,
    temporal_split,
    walk_forward_splits,
    window_ends,
)

if TYPE_CHECKING:
    import optuna

    from sofare.config import Config
    from sofare.explain.global_view import GlobalView
    from sofare.training.model import SofareM3

log = logging.getLogger(__name__)
BARS_PER_YEAR_1H = 365.25 * 24
IG_BATCH = 4096  # integration points per forward pass of the global view's Integrated Gradients (bounds memory)


@dataclass
class Data:
    """The validated feature rows of a training window, with its split."""

    frame: pd.DataFrame
    spec: FeatureSpec
    parts: dict[str, range]
    delta: timedelta

    def windows(
        self, rows: range, fit_rows: range, lookback: int, shuffle_seed: int | None = None
    ) -> tuple[Windows, Scaler]:
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

    def raw_windows(self, ends: np.ndarray, lookback: int) -> np.ndarray:
        """Unscaled feature windows [len(ends), lookback, features] ending at `ends`: what a server is sent."""
        raw = self.frame[list(self.spec.columns)].to_numpy(dtype=np.float32)
        return raw[ends[:, None] + np.arange(-lookback + 1, 1)[None, :]]


def load_data(cfg: Config, start: date | str, end: date | str) -> Data:
    engine = warehouse.get_engine(cfg)
    lo, hi = ingest.day_range(start, end)
    frame = dataset.training_frame(cfg, engine, lo, hi).sort_values("open_time").reset_index(drop=True)
    parts = temporal_split(len(frame), cfg.training.split.train, cfg.training.split.validation, purge_rows(cfg))
    return Data(frame, feature_spec(cfg), parts, interval_delta(cfg.market.interval))


def training_window(cfg: Config, start: str | None, end: str | None) -> DateWindow:
    """Params, else the config, else the latest span of days that passed every validation suite."""
    start, end = start or cfg.training.start, end or cfg.training.end
    if start and end:
        first, last = ingest.day_range(start, end)
        return DateWindow(start=first.date(), end=(last - timedelta(days=1)).date())
    with warehouse.get_engine(cfg).connect() as conn:
        first_day, last_day = dataset.validated_span(conn, cfg)
    return DateWindow(
        start=date.fromisoformat(start) if start else first_day, end=date.fromisoformat(end) if end else last_day
    )


# --- plan ------------------------------------------------------------------------------------------


def plan(
    cfg: Config,
    n_trials: int | None = None,
    timeout: int | None = None,
    max_epochs: int | None = None,
    start: str | None = None,
    end: str | None = None,
    run_name: str | None = None,
) -> TrainingPlan:
    """Fix the window (checking it is validated), create or resume the study, open the parent run."""
    from sofare.training import tracking, tuning

    window = training_window(cfg, start, end)
    data = load_data(cfg, window.start, window.end)  # raises UnvalidatedIntervalError naming any bad day
    spec = data.spec
    name = (
        f"{cfg.training.study_name}-{cfg.market.symbol}-{cfg.market.interval}-{window.start}-{window.end}-"
        f"{spec.version}-s{cfg.training.seed}"
    )
    study = tuning.create_study(cfg, name)
    run = tracking.client(cfg).create_run(
        tracking.experiment_id(cfg),
        run_name=run_name or f"train {window.label}",
        tags={
            "sofare.kind": "training",
            "study": name,
            "data_window": window.label,
            "feature_set_version": spec.version,
            "git_commit": tracking.git_commit(cfg),
        },
    )
    out = TrainingPlan(
        window=window,
        study=name,
        parent_run_id=run.info.run_id,
        rows=len(data.frame),
        parts={k: len(v) for k, v in data.parts.items()},
        n_trials=n_trials or cfg.training.n_trials,
        timeout=timeout or cfg.training.timeout_seconds,
        max_epochs=max_epochs or cfg.training.max_epochs,
        trials_done_before=tuning.finished_trials(study),
    )
    log.info("training plan: %s", out)
    return out


# --- tune ------------------------------------------------------------------------------------------


def objective(cfg: Config, data: Data, trial: optuna.trial.Trial, max_epochs: int, parent_run_id: str) -> float:
    """Fit one trial's parameters on train, early-stopped and pruned on validation loss."""
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from sofare.training import tracking, tuning

    hyper = tuning.suggest(cfg, trial)
    train, _ = data.windows(data.parts["train"], data.parts["train"], hyper["lookback"])
    val, _ = data.windows(data.parts["validation"], data.parts["train"], hyper["lookback"])
    c = tracking.client(cfg)
    run = c.create_run(
        c.get_run(parent_run_id).info.experiment_id,
        run_name=f"trial {trial.number}",
        tags={"mlflow.parentRunId": parent_run_id, "sofare.kind": "trial", "optuna.trial": str(trial.number)},
    )
    run_id = run.info.run_id
    for key, value in hyper.items():
        c.log_param(run_id, key, value)
    state = "FINISHED"
    try:
        result = fit(
            cfg,
            data.spec,
            hyper,
            train,
            val,
            max_epochs,
            cfg.training.seed,
            callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_loss")],
        )
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs", len(result.history.epochs))
        trial.set_user_attr("history", result.history.epochs)
        for row in result.history.epochs:
            for key, value in row.items():
                if key != "epoch":
                    c.log_metric(run_id, key, value, step=int(row["epoch"]))
        # fit() with validation windows checkpoints the best epoch (ModelCheckpoint saves even a NaN loss, as inf)
        assert result.best_val_loss is not None
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


def tune(cfg: Config, the_plan: TrainingPlan, worker: int) -> dict[str, Any]:
    """One worker's share: trials on the shared study until it holds n_trials finished ones."""
    from sofare.training import tuning

    data = load_data(cfg, the_plan.window.start, the_plan.window.end)
    study = tuning.load_study(cfg, the_plan.study, worker)
    began = time.monotonic()
    ran = tuning.optimize(
        study,
        lambda trial: objective(cfg, data, trial, the_plan.max_epochs, the_plan.parent_run_id),
        the_plan.n_trials,
        the_plan.timeout,
    )
    return {
        "worker": worker,
        "trials_run": ran,
        "finished": tuning.finished_trials(study),
        "seconds": round(time.monotonic() - began, 1),
    }


# --- fit and evaluation -------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """A model fitted on `fit_rows` (early-stopped, calibrated and given its policy on validation rows when
    there are some) and everything measured on the test rows (in memory)."""

    model: SofareM3
    scaler: Scaler
    history: list[dict[str, float]]
    scores: dict[str, dict[str, MetricCI]]
    backtest: dict[str, Any]
    train_windows: int
    test: Windows
    y_up: np.ndarray
    y_ret: np.ndarray
    times: pd.DatetimeIndex
    predictions: evaluation.Predictions  # SofareM3 on the test windows, calibrated
    fit_seconds: float
    raw_prob: np.ndarray  # SofareM3's P(up) before calibration
    calibration: Calibration  # the identity without validation rows
    policy: Policy  # the direction threshold without validation rows
    baselines: dict[str, evaluation.Predictions]  # on the test windows (none when evaluated without them)
    epochs: int = 0
    validation: dict[str, evaluation.Predictions] | None = None  # every predictor on the validation windows
    val_up: np.ndarray | None = None
    val_ret: np.ndarray | None = None


def _scores(
    cfg: Config,
    y_up: np.ndarray,
    y_ret: np.ndarray,
    p: evaluation.Predictions,
    names: tuple[str, ...] = evaluation.METRICS,
) -> dict[str, MetricCI]:
    e = cfg.evaluation
    raw = evaluation.score(
        y_up, y_ret, p, e.decision_threshold, e.bootstrap_samples, e.bootstrap_block_bars, cfg.training.seed, names
    )
    return {name: MetricCI.model_validate(s) for name, s in raw.items()}


def bars_per_year(data: Data) -> float:
    return BARS_PER_YEAR_1H * (timedelta(hours=1) / data.delta)


def _baselines(
    data: Data, scaler: Scaler, train: Windows, targets: list[np.ndarray], seed: int
) -> dict[str, list[evaluation.Predictions]]:
    """The baselines fitted on the model's training windows, predicting each array of window ends."""
    frame = data.frame
    train_up = train.y_up[train.ends]
    train_ret = frame["target_return"].to_numpy()[train.ends].astype(float)
    x_all = scaler.transform(frame)
    last = frame["log_ret_1"].to_numpy().astype(float)
    sizes = np.cumsum([0, *(len(t) for t in targets)])
    stacked = np.concatenate(targets) if targets else np.zeros(0, dtype=int)

    def split(p: evaluation.Predictions) -> list[evaluation.Predictions]:
        return [evaluation.Predictions(p.prob_up[a:b], p.expected_return[a:b]) for a, b in itertools.pairwise(sizes)]

    return {
        "persistence": [evaluation.persistence(last[t]) for t in targets],
        "majority": [evaluation.majority(train_up, train_ret, len(t)) for t in targets],
        "linear": split(evaluation.linear(x_all[train.ends], train_up, train_ret, x_all[stacked], seed)),
        "gbm": split(evaluation.gbm(x_all[train.ends], train_up, train_ret, x_all[stacked], seed)),
    }


def _ablate(windows: list[Windows], modalities: tuple[str, ...] | None) -> None:
    """Hide the other modalities from the model: their scaled inputs become 0 (the training mean)."""
    if modalities is None:
        return
    for w in windows:
        hidden = [i for g, idx in w.groups.items() if g not in modalities for i in idx]
        if hidden:
            w.x = w.x.copy()
            w.x[:, hidden] = 0.0


def evaluate(
    cfg: Config,
    data: Data,
    hyper: dict[str, Any],
    epochs: int,
    fit_rows: range,
    test_rows: range,
    shuffle_labels: bool = False,
    validation_rows: range | None = None,
    modalities: tuple[str, ...] | None = None,
    baselines: bool = True,
    full_scores: bool = True,
) -> Evaluation:
    """Fit on `fit_rows`, then score the model (and the baselines) on `test_rows`.

    With `validation_rows`: early-stopped on them (at most `epochs`), P(up) calibrated on them and the decision
    policy chosen on them. Without: exactly `epochs` epochs, uncalibrated, the direction threshold as policy.
    `modalities`: only these inputs reach the model (ablations)."""
    e = cfg.evaluation
    seed = cfg.training.seed
    lookback = hyper["lookback"]
    train, scaler = data.windows(fit_rows, fit_rows, lookback, shuffle_seed=seed if shuffle_labels else None)
    test, _ = data.windows(test_rows, fit_rows, lookback)
    val = data.windows(validation_rows, fit_rows, lookback)[0] if validation_rows is not None else None
    if len(test) == 0:
        raise InputError("the test window holds no complete window; widen the training window")
    if val is not None and len(val) == 0:
        raise InputError("the validation part holds no complete window; widen the training window")
    _ablate([w for w in (train, test, val) if w is not None], modalities)
    result = fit(cfg, data.spec, hyper, train, val, epochs, seed)
    frame = data.frame
    target_up, target_ret = frame["target_up"].to_numpy(), frame["target_return"].to_numpy()
    raw_prob, ret = predict(result.model, test, scaler)
    y_up, y_ret = target_up[test.ends].astype(int), target_ret[test.ends].astype(float)
    times = pd.to_datetime(frame["open_time"].to_numpy()[test.ends], utc=True)
    label = (
        f"{pd.Timestamp(frame['open_time'].iloc[(validation_rows or fit_rows).start]).date()}.."
        f"{pd.Timestamp(frame['open_time'].iloc[(validation_rows or fit_rows).stop - 1]).date()}"
    )
    others = (
        _baselines(data, scaler, train, [test.ends] + ([val.ends] if val is not None else []), seed)
        if baselines
        else {}
    )
    validation, val_up, val_ret = None, None, None
    if val is not None:
        val_prob, val_r = predict(result.model, val, scaler)
        val_up, val_ret = target_up[val.ends].astype(int), target_ret[val.ends].astype(float)
        calibration = decision.fit_calibration(val_prob, val_up, e.calibration, label)
        validation = {
            "sofare_m3": evaluation.Predictions(calibration.apply(decision.margin(val_prob)), val_r),
            **{name: p[1] for name, p in others.items()},
        }
        policy = decision.choose(
            validation["sofare_m3"].prob_up,
            val_ret,
            cfg.features.horizon,
            e.policy_thresholds,
            e.policy_min_hold,
            e.fee_bps,
            e.slippage_bps,
            label,
        )
    else:
        calibration = Calibration(fitted_on="no validation part: identity")
        policy = Policy.make(e.decision_threshold, 1, e.fee_bps, e.slippage_bps, "no validation part: the threshold")
    prob = calibration.apply(decision.margin(raw_prob))
    predictors = {"sofare_m3": evaluation.Predictions(prob, ret), **{name: p[0] for name, p in others.items()}}
    names = evaluation.METRICS if full_scores else (e.primary_metric,)
    scores = {name: _scores(cfg, y_up, y_ret, p, names) for name, p in predictors.items()}
    backtest = evaluation.backtest(
        prob, y_ret, cfg.features.horizon, e.decision_threshold, e.fee_bps, bars_per_year(data)
    )
    return Evaluation(
        result.model,
        scaler,
        result.history.epochs,
        scores,
        backtest,
        len(train),
        test,
        y_up,
        y_ret,
        times,
        predictors["sofare_m3"],
        result.seconds,
        epochs=result.best_epoch,
        raw_prob=raw_prob,
        calibration=calibration,
        policy=policy,
        baselines={k: v for k, v in predictors.items() if k != "sofare_m3"},
        validation=validation,
        val_up=val_up,
        val_ret=val_ret,
    )


def walk_forward_folds(
    cfg: Config,
    data: Data,
    hyper: dict[str, Any],
    max_epochs: int,
    modalities: tuple[str, ...] | None = None,
    baselines: bool = True,
) -> list[tuple[dict[str, range], Evaluation]]:
    """Every walk-forward fold fitted and scored (oldest first): retrained on the rows before its test part,
    early-stopped, calibrated and given a policy on its own validation part."""
    t = cfg.training
    out = []
    for parts in walk_forward_splits(
        len(data.frame),
        t.walk_forward.folds,
        t.walk_forward.mode,
        t.split.validation,
        t.walk_forward.test_share,
        purge_rows(cfg),
    ):
        out.append(
            (
                parts,
                evaluate(
                    cfg,
                    data,
                    hyper,
                    max_epochs,
                    parts["train"],
                    parts["test"],
                    validation_rows=parts["validation"],
                    modalities=modalities,
                    baselines=baselines,
                    full_scores=False,
                ),
            )
        )
    return out


def _pool(folds: list[Evaluation], key: str) -> evaluation.Predictions:
    parts = [f.predictions if key == "sofare_m3" else f.baselines[key] for f in folds]
    return evaluation.Predictions(
        np.concatenate([p.prob_up for p in parts]), np.concatenate([p.expected_return for p in parts])
    )


def _pooled_primary(cfg: Config, folds: list[Evaluation]) -> MetricCI:
    y_up = np.concatenate([f.y_up for f in folds])
    y_ret = np.concatenate([f.y_ret for f in folds])
    metric = cfg.evaluation.primary_metric
    return _scores(cfg, y_up, y_ret, _pool(folds, "sofare_m3"), (metric,))[metric]


def _policy_walk(cfg: Config, data: Data, folds: list[Evaluation], predictor: str) -> PolicyResult:
    """`predictor`'s policy, chosen on each fold's validation part (calibrated there), traded on its test part."""
    e = cfg.evaluation
    h, bars = cfg.features.horizon, bars_per_year(data)
    parts = []
    for f in folds:
        if predictor == "sofare_m3":
            policy, prob = f.policy, f.predictions.prob_up
        else:
            # walk-forward folds are always fitted with validation rows (walk_forward_folds)
            assert f.validation is not None and f.val_up is not None and f.val_ret is not None
            val = f.validation[predictor]
            calibration = decision.fit_calibration(val.prob_up, f.val_up, e.calibration)
            policy = decision.choose(
                calibration.apply(decision.margin(val.prob_up)),
                f.val_ret,
                h,
                e.policy_thresholds,
                e.policy_min_hold,
                e.fee_bps,
                e.slippage_bps,
                "",
            )
            prob = calibration.apply(decision.margin(f.baselines[predictor].prob_up))
        parts.append(decision.simulate(policy, prob, f.y_ret, h, bars)[1])
    return decision.pooled(parts, e.fee_bps + e.slippage_bps, bars / max(h, 1))


def walk_forward(
    cfg: Config,
    data: Data,
    hyper: dict[str, Any],
    max_epochs: int,
    runs: list[tuple[dict[str, range], Evaluation]] | None = None,
) -> WalkForward:
    """Walk-forward evidence: per-fold and pooled metrics with CIs for SofareM3 and every baseline, paired
    bootstraps, calibration, the policy after costs beside buy and hold and the best baseline's, and the
    modality ablations (`evaluation.ablations`). `runs`: the folds already fitted (`walk_forward_folds`)."""
    e = cfg.evaluation
    began = time.monotonic()
    metric = e.primary_metric
    runs = runs if runs is not None else walk_forward_folds(cfg, data, hyper, max_epochs)
    folds = [f for _, f in runs]
    times = data.frame["open_time"].to_numpy()
    y_up = np.concatenate([f.y_up for f in folds])
    y_ret = np.concatenate([f.y_ret for f in folds])
    pooled = {name: _scores(cfg, y_up, y_ret, _pool(folds, name)) for name in PREDICTORS}
    sign = -1 if metric in evaluation.LOWER_IS_BETTER else 1
    best = max(BASELINES, key=lambda b: sign * np.nan_to_num(pooled[b][metric].value, nan=-np.inf))
    paired = [
        Paired(
            baseline=b,
            **evaluation.paired(
                metric,
                y_up,
                y_ret,
                _pool(folds, "sofare_m3"),
                _pool(folds, b),
                e.decision_threshold,
                e.bootstrap_samples,
                e.bootstrap_block_bars,
                cfg.training.seed,
            ),
        )
        for b in BASELINES
    ]
    raw = np.concatenate([f.raw_prob for f in folds])
    reliability = decision.reliability(raw, _pool(folds, "sofare_m3").prob_up, y_up)
    h, bars = cfg.features.horizon, bars_per_year(data)
    hold = [decision.buy_and_hold(f.y_ret, h, e.fee_bps + e.slippage_bps, bars)[1] for f in folds]
    policy = {
        "sofare_m3": _policy_walk(cfg, data, folds, "sofare_m3"),
        f"best baseline: {best}": _policy_walk(cfg, data, folds, best),
        "buy_and_hold": decision.pooled(hold, e.fee_bps + e.slippage_bps, bars / max(h, 1)),
    }
    ablations: dict[str, MetricCI] = {}
    if e.ablations:
        for modalities in (("micro",), ("micro", "safe")):
            ablated = [f for _, f in walk_forward_folds(cfg, data, hyper, max_epochs, modalities, baselines=False)]
            ablations["+".join(modalities)] = _pooled_primary(cfg, ablated)
        ablations["micro+safe+macro"] = pooled["sofare_m3"][metric]
    out = []
    for k, (parts, f) in enumerate(runs):
        out.append(
            Fold(
                fold=k,
                test_start=str(pd.Timestamp(times[parts["test"].start])),
                test_end=str(pd.Timestamp(times[parts["test"].stop - 1])),
                score=f.scores["sofare_m3"][metric],
                train_rows=len(parts["train"]),
                test_windows=len(f.test),
                epochs=f.epochs,
                baselines={b: f.scores[b][metric] for b in BASELINES},
                calibration=f.calibration,
                policy=f.policy,
            )
        )
    return WalkForward(
        mode=cfg.training.walk_forward.mode,
        folds=out,
        pooled=pooled,
        paired=paired,
        reliability=reliability,
        policy=policy,
        best_baseline=best,
        ablations=ablations,
        seconds=round(time.monotonic() - began, 1),
    )


def _inputs(w: Windows, pick: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    micro, safe, macro = w.batch(w.ends[pick])[:3]
    return micro.numpy(), safe.numpy(), macro.numpy()


def global_view(cfg: Config, data: Data, final: Evaluation, folds: list[Evaluation]) -> GlobalView:
    """What the version relies on (`sofare.explain.global_view`): mean |attribution| of the final model on a
    sample of the test windows, permutation importance of each walk-forward fold's model on a sample of its test
    part (the primary metric on calibrated P(up), as the fold was scored)."""
    from sofare.explain import attributions
    from sofare.explain import global_view as gv

    began = time.monotonic()
    e, seed = cfg.evaluation, cfg.training.seed
    spec = data.spec
    names = (spec.micro, spec.safe_haven, spec.macro)
    drops = []
    for k, f in enumerate(folds):
        pick = gv.sample(len(f.test), e.global_view_windows)
        y_up, y_ret, calibration = f.y_up[pick], f.y_ret[pick], f.calibration or Calibration()

        def forward(x: gv.Inputs, f: Evaluation = f, calibration: Calibration = calibration) -> tuple[Any, Any]:
            prob, ret = predict_inputs(f.model, [x], f.scaler)
            return calibration.apply(decision.margin(prob)), ret

        def score(prob: np.ndarray, ret: np.ndarray, y_up: np.ndarray = y_up, y_ret: np.ndarray = y_ret) -> float:
            p = evaluation.Predictions(prob, ret)
            return evaluation.metric(e.primary_metric, y_up, y_ret, p, e.decision_threshold)

        drops.append(
            gv.permutation_drops(forward, score, _inputs(f.test, pick), names, e.global_view_repeats, seed + k)
        )
    pick = gv.sample(len(final.test), e.global_view_windows)
    found = attributions.attribute(
        final.model,
        *_inputs(final.test, pick),
        calibration=final.calibration,
        names=dict(zip(MODALITIES, names, strict=True)),
        internal_batch_size=IG_BATCH,
        seed=seed,
    )
    return gv.build(
        e.primary_metric,
        names,
        drops,
        (found.feature_importance(), found.modality_importance()),
        attribution_method=f"{found.method} of {found.target} from {found.baseline}, {found.steps} steps",
        attribution_windows=found.windows,
        permutation_windows=[len(gv.sample(len(f.test), e.global_view_windows)) for f in folds],
        permutation_repeats=e.global_view_repeats,
        test_window=f"{final.times[0]}..{final.times[-1]}",
        seed=seed,
        seconds=round(time.monotonic() - began, 1),
    )


@dataclass
class Trained:
    """The final model of a training run, exported, with its report: what the registry registers."""

    report: EvaluationReport
    meta: ModelMeta
    directory: Path  # exported files (training.export), a temporary directory the registry consumes
    example: np.ndarray  # one raw input window, for the registered model's signature
    run_id: str  # the training run's MLflow parent run


def model_meta(
    cfg: Config,
    data: Data,
    hyper: dict[str, Any],
    scaler: Scaler,
    window: DateWindow,
    calibration: Calibration | None = None,
    policy: Policy | None = None,
) -> ModelMeta:
    from sofare.training.model import ARCHITECTURE

    spec = data.spec
    return ModelMeta(
        architecture=ARCHITECTURE,
        hyper=hyper,
        lookback=int(hyper["lookback"]),
        columns=tuple(spec.columns),
        groups={g: tuple(int(i) for i in idx) for g, idx in column_groups(spec).items()},
        n_inputs={"micro": len(spec.micro), "safe": len(spec.safe_haven), "macro": len(spec.macro)},
        loss={
            "loss_weight": cfg.training.loss_weight,
            "huber_delta": cfg.training.huber_delta,
            "warmup_fraction": cfg.training.warmup_fraction,
        },
        scaler=Scaling(
            mean=tuple(scaler.mean.tolist()),
            std=tuple(scaler.std.tolist()),
            ret_mean=scaler.ret_mean,
            ret_std=scaler.ret_std,
        ),
        feature_set_version=spec.version,
        symbol=cfg.market.symbol,
        interval=cfg.market.interval,
        horizon=cfg.features.horizon,
        warmup_bars=cfg.features.warmup_bars,
        threshold=cfg.evaluation.decision_threshold,
        data_window=window,
        calibration=calibration or Calibration(),
        policy=policy,
    )


def finalize(cfg: Config, the_plan: TrainingPlan) -> Trained:
    """Best trial → final fit on train+validation → test evaluation → tracked in the parent run → exported.

    The export carries the drift reference sample (`reference.parquet`, `ModelMeta.reference_file`) that
    `sofare.monitoring.drift` compares served inputs with: the held-out test hours, evenly subsampled to at most
    `monitoring.reference_rows`, with the raw (unscaled) features at each window's last row, the final model's
    prob_up and the realised return. The test hours because they are the newest hours of the data window (the
    closest to what the version will serve) and the only ones whose prob_up is out of sample, as every served
    prob_up is: on the rows the model was fitted on, prob_up is in-sample (typically more confident), and
    prediction drift measured against it would flag overfitting, not a change in the world."""
    import mlflow

    from sofare.training import export, tracking, tuning
    from sofare.training.model import ARCHITECTURE

    window = the_plan.window
    data = load_data(cfg, window.start, window.end)
    study = tuning.load_study(cfg, the_plan.study, 0)
    best = tuning.best_trial(study)
    hyper = tuning.hyper_of(cfg, best.params)
    result = evaluate(
        cfg,
        data,
        hyper,
        the_plan.max_epochs,
        data.parts["train"],
        data.parts["test"],
        validation_rows=data.parts["validation"],
    )
    epochs = result.epochs
    e = cfg.evaluation
    ends = result.test.ends
    keep = np.unique(np.linspace(0, len(ends) - 1, min(len(ends), cfg.monitoring.reference_rows)).round().astype(int))
    rows = data.frame.iloc[ends[keep]]
    reference = rows[["open_time", *data.spec.columns]].reset_index(drop=True)
    reference["prob_up"] = np.asarray(result.predictions.prob_up, dtype=float)[keep]
    reference["realised_return"] = rows["target_return"].to_numpy(dtype=float)
    runs = walk_forward_folds(cfg, data, hyper, the_plan.max_epochs) if cfg.training.walk_forward.folds else []
    wf = walk_forward(cfg, data, hyper, the_plan.max_epochs, runs) if runs else None
    view = global_view(cfg, data, result, [f for _, f in runs]) if e.global_view else None
    spec = data.spec
    h, bars = cfg.features.horizon, bars_per_year(data)
    policy_test, policy_steps = decision.simulate(result.policy, result.predictions.prob_up, result.y_ret, h, bars)
    hold_test, hold_steps = decision.buy_and_hold(result.y_ret, h, e.fee_bps + e.slippage_bps, bars)
    report = EvaluationReport(
        data_window=window,
        test_start=str(result.times[0]),
        test_end=str(result.times[-1]),
        rows=the_plan.rows,
        parts=the_plan.parts,
        purge_rows=purge_rows(cfg),
        train_windows=result.train_windows,
        test_windows=len(result.test),
        epochs=epochs,
        hyper=hyper,
        best_trial=best.number,
        best_val_loss=tuning.objective_value(best),
        scores=result.scores,
        backtest=Backtest.model_validate({k: v for k, v in result.backtest.items() if not k.startswith("equity")}),
        wf=wf,
        calibration=result.calibration,
        reliability=decision.reliability(result.raw_prob, result.predictions.prob_up, result.y_up),
        policy=result.policy,
        policy_test=policy_test,
        policy_buy_and_hold=hold_test,
        primary_metric=e.primary_metric,
        fee_bps=e.fee_bps,
        trials=[Trial.model_validate(t) for t in tuning.trial_summary(study)],
        study_seconds=tuning.wall_seconds(study),
        seed=cfg.training.seed,
        architecture=ARCHITECTURE,
        feature_set_version=spec.version,
        symbol=cfg.market.symbol,
        interval=cfg.market.interval,
        horizon=cfg.features.horizon,
        threshold=e.decision_threshold,
        bootstrap_samples=e.bootstrap_samples,
        bootstrap_block_bars=e.bootstrap_block_bars,
    )
    run_id = the_plan.parent_run_id
    with (
        tracking.scoped(cfg),
        mlflow.start_run(run_id=run_id),
        tempfile.TemporaryDirectory(prefix="sofare-plots-") as scratch,
    ):
        mlflow.log_params(
            {
                **{f"hp_{k}": v for k, v in hyper.items()},
                "epochs": epochs,
                "seed": cfg.training.seed,
                "data_window": window.label,
                "test_window": report.test_window,
                "feature_set_version": spec.version,
                "architecture": ARCHITECTURE,
            }
        )
        for name, scores in result.scores.items():
            prefix = "test" if name == "sofare_m3" else f"baseline_{name}"
            for m, s in scores.items():
                mlflow.log_metrics(
                    {f"{prefix}_{m}": s.value, f"{prefix}_{m}_ci_low": s.ci_low, f"{prefix}_{m}_ci_high": s.ci_high}
                )
        for side in ("strategy", "buy_and_hold"):
            mlflow.log_metrics({f"backtest_{side}_{k}": v for k, v in result.backtest[side].items()})
        mlflow.log_params({"policy_id": result.policy.id, "calibration": result.calibration.method})
        mlflow.log_metrics(
            {
                "calibration_scale": result.calibration.scale,
                "calibration_bias": result.calibration.bias,
                **{f"policy_test_{k}": v for k, v in policy_test.model_dump().items()},
            }
        )
        if wf is not None:
            mlflow.log_metrics(tracking.walk_forward_metrics(wf))
        for row in result.history:
            mlflow.log_metric("final_train_loss", row["train_loss"], step=int(row["epoch"]))
        for path in evaluation.plots(
            Path(scratch),
            best.user_attrs.get("history") or [],
            result.y_up,
            result.predictions,
            e.decision_threshold,
            result.backtest,
            result.times,
        ):
            mlflow.log_artifact(str(path), artifact_path="plots")
        for path in evaluation.evidence_plots(
            Path(scratch),
            wf,
            result.raw_prob,
            result.predictions.prob_up,
            result.y_up,
            policy_steps,
            hold_steps,
            result.times,
            h,
        ):
            mlflow.log_artifact(str(path), artifact_path="plots")
        mlflow.log_dict(report.model_dump(mode="json"), "evaluation.json")
        if view is not None:
            from sofare.explain import global_view as gv

            mlflow.log_dict(view.model_dump(mode="json"), gv.ARTIFACT)
            mlflow.log_artifact(str(gv.plot(view, Path(scratch) / gv.PLOT)), artifact_path="plots")
    meta = model_meta(cfg, data, hyper, result.scaler, window, result.calibration, result.policy)
    directory = export.export(result.model, meta, Path(tempfile.mkdtemp(prefix="sofare-model-")), reference)
    example = data.raw_windows(result.test.ends[-1:], meta.lookback)
    return Trained(report, ModelMeta.read(directory), directory, example, run_id)


def test_set(cfg: Config, report: EvaluationReport, lookback: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw feature windows ending on a report's test rows (with `lookback` bars), and their targets: what
    the promotion gate re-scores a champion on, so both are judged on the very same hours."""
    data = load_data(cfg, report.data_window.start, report.data_window.end)
    ends = window_ends(data.frame, data.spec, data.parts["test"], lookback, data.delta)
    return (
        data.raw_windows(ends, lookback),
        data.frame["target_up"].to_numpy()[ends].astype(int),
        data.frame["target_return"].to_numpy()[ends].astype(float),
    )
