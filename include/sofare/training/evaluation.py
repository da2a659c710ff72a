"""Honest evaluation on the held-out test window: metrics with moving-block bootstrap 95% CIs, the
same metrics for naive baselines, and a cost-aware long/flat backtest against buy and hold.

Hourly returns are autocorrelated in volatility, so CIs resample blocks of consecutive test rows
(`evaluation.bootstrap_block_bars`) rather than single rows; the seed makes them reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CLASSIFICATION = ("accuracy", "precision", "recall", "f1", "roc_auc", "mcc", "brier")
LOWER_IS_BETTER = ("brier", "mae", "rmse")
REGRESSION = ("mae", "rmse", "r2", "ic")
METRICS = CLASSIFICATION + REGRESSION


@dataclass
class Predictions:
    """Outputs of one predictor on the test rows: P(up) and the expected log return."""

    prob_up: np.ndarray
    expected_return: np.ndarray


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def metric(name: str, y_up: np.ndarray, y_ret: np.ndarray, p: Predictions, threshold: float) -> float:
    """One metric in plain numpy (the bootstrap calls this thousands of times)."""
    if name in ("accuracy", "precision", "recall", "f1", "mcc"):
        pred = p.prob_up > threshold
        actual = y_up.astype(bool)
        tp, fp = float(np.sum(pred & actual)), float(np.sum(pred & ~actual))
        fn, tn = float(np.sum(~pred & actual)), float(np.sum(~pred & ~actual))
        if name == "accuracy":
            return (tp + tn) / max(len(y_up), 1)
        if name == "precision":
            return tp / (tp + fp) if tp + fp else 0.0
        if name == "recall":
            return tp / (tp + fn) if tp + fn else 0.0
        if name == "f1":
            return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / denominator if denominator else 0.0
    if name == "roc_auc":  # Mann-Whitney U / (n_pos * n_neg), ties counted half
        positives = int(np.sum(y_up))
        negatives = len(y_up) - positives
        if positives == 0 or negatives == 0:
            return math.nan
        ranks = _ranks(p.prob_up)
        return float((np.sum(ranks[y_up == 1]) - positives * (positives + 1) / 2) / (positives * negatives))
    if name == "brier":
        return float(np.mean((p.prob_up - y_up) ** 2))
    if name == "mae":
        return float(np.mean(np.abs(y_ret - p.expected_return)))
    if name == "rmse":
        return float(np.sqrt(np.mean((y_ret - p.expected_return) ** 2)))
    if name == "r2":
        total = float(np.sum((y_ret - y_ret.mean()) ** 2))
        return 1 - float(np.sum((y_ret - p.expected_return) ** 2)) / total if total else math.nan
    if name == "ic":  # Spearman rank correlation of predicted and realised returns; 0 for a constant prediction
        if np.ptp(p.expected_return) == 0 or np.ptp(y_ret) == 0:
            return 0.0
        return float(np.corrcoef(_ranks(p.expected_return), _ranks(y_ret))[0, 1])
    raise ValueError(f"unknown metric {name!r}")


def block_indices(n: int, block: int, samples: int, seed: int) -> np.ndarray:
    """Moving-block bootstrap: `samples` index sets of length n made of random blocks of `block` rows."""
    rng = np.random.default_rng(seed)
    block = max(1, min(block, n))
    per = math.ceil(n / block)
    starts = rng.integers(0, n - block + 1, size=(samples, per))
    return (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(samples, -1)[:, :n]


def score(
    y_up: np.ndarray,
    y_ret: np.ndarray,
    p: Predictions,
    threshold: float,
    samples: int,
    block: int,
    seed: int,
    names: tuple[str, ...] = METRICS,
) -> dict[str, dict[str, float]]:
    """Every metric (or `names`) as {value, ci_low, ci_high} (percentile CI over the block bootstrap)."""
    out = {}
    index = block_indices(len(y_up), block, samples, seed)
    for name in names:
        value = metric(name, y_up, y_ret, p, threshold)
        draws = np.array(
            [metric(name, y_up[i], y_ret[i], Predictions(p.prob_up[i], p.expected_return[i]), threshold) for i in index]
        )
        draws = draws[np.isfinite(draws)]
        low, high = np.percentile(draws, [2.5, 97.5]) if len(draws) else (math.nan, math.nan)
        out[name] = {"value": value, "ci_low": float(low), "ci_high": float(high)}
    return out


def paired(
    name: str,
    y_up: np.ndarray,
    y_ret: np.ndarray,
    mine: Predictions,
    theirs: Predictions,
    threshold: float,
    samples: int,
    block: int,
    seed: int,
) -> dict[str, Any]:
    """`mine` minus `theirs` on the same rows, with a paired moving-block bootstrap (the same resampled hours
    for both): the difference with its 95% CI, the share of draws where `mine` is not better, and a verdict."""
    sign = -1.0 if name in LOWER_IS_BETTER else 1.0
    diff = metric(name, y_up, y_ret, mine, threshold) - metric(name, y_up, y_ret, theirs, threshold)
    draws = []
    for i in block_indices(len(y_up), block, samples, seed):
        a = metric(name, y_up[i], y_ret[i], Predictions(mine.prob_up[i], mine.expected_return[i]), threshold)
        b = metric(name, y_up[i], y_ret[i], Predictions(theirs.prob_up[i], theirs.expected_return[i]), threshold)
        draws.append(a - b)
    d = np.asarray(draws)
    d = d[np.isfinite(d)]
    if not len(d):
        return {
            "difference": {"value": diff, "ci_low": math.nan, "ci_high": math.nan},
            "share_not_better": math.nan,
            "verdict": "no significant difference",
        }
    low, high = np.percentile(d, [2.5, 97.5])
    better = sign * d > 0
    verdict = (
        "better"
        if (sign > 0 and low > 0) or (sign < 0 and high < 0)
        else "worse"
        if (sign > 0 and high < 0) or (sign < 0 and low > 0)
        else "no significant difference"
    )
    return {
        "difference": {"value": float(diff), "ci_low": float(low), "ci_high": float(high)},
        "share_not_better": float(1 - better.mean()),
        "verdict": verdict,
    }


# --- baselines -------------------------------------------------------------------------------------


def persistence(last_return: np.ndarray) -> Predictions:
    """Tomorrow looks like today: the sign (and size) of the last bar's return."""
    return Predictions((last_return > 0).astype(float), last_return.astype(float))


def majority(train_up: np.ndarray, train_ret: np.ndarray, n: int) -> Predictions:
    """The training part's majority class (its up-rate as probability) and its mean return."""
    rate = float(np.mean(train_up))
    prob = rate if rate != 0.5 else 0.5
    return Predictions(np.full(n, prob), np.full(n, float(np.mean(train_ret))))


def linear(
    train_x: np.ndarray, train_up: np.ndarray, train_ret: np.ndarray, test_x: np.ndarray, seed: int
) -> Predictions:
    """Logistic regression (direction) and ridge regression (return) on the same features at the
    window's last row, fitted on the same rows as the model."""
    from sklearn.linear_model import LogisticRegression, Ridge

    clf = LogisticRegression(C=0.1, max_iter=2000, random_state=seed).fit(train_x, train_up)
    reg = Ridge(alpha=10.0).fit(train_x, train_ret)
    return Predictions(clf.predict_proba(test_x)[:, 1], reg.predict(test_x))


def gbm(train_x: np.ndarray, train_up: np.ndarray, train_ret: np.ndarray, test_x: np.ndarray, seed: int) -> Predictions:
    """Gradient-boosted trees (scikit-learn's HistGradientBoosting, LightGBM's algorithm) on the same features
    at the window's last row, fitted on the same rows as the model: shallow, strongly regularised, a fixed
    number of rounds (no early stopping on later rows), seeded."""
    clf, reg = fit_gbm(train_x, train_up, train_ret, seed)
    return Predictions(clf.predict_proba(test_x)[:, 1], reg.predict(test_x))


def fit_gbm(train_x: np.ndarray, train_up: np.ndarray, train_ret: np.ndarray, seed: int) -> tuple[Any, Any]:
    """The `gbm` baseline's fitted (direction classifier, return regressor); `sofare.explain.tree` explains them."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    common = {
        "learning_rate": 0.05,
        "max_iter": 150,
        "max_leaf_nodes": 15,
        "min_samples_leaf": 100,
        "l2_regularization": 1.0,
        "early_stopping": False,
        "random_state": seed,
    }
    clf = HistGradientBoostingClassifier(**common).fit(train_x, train_up)
    reg = HistGradientBoostingRegressor(**common).fit(train_x, train_ret)
    return clf, reg


# --- backtest --------------------------------------------------------------------------------------


def backtest(
    prob_up: np.ndarray, realised: np.ndarray, horizon: int, threshold: float, fee_bps: float, bars_per_year: float
) -> dict[str, Any]:
    """Long/flat on non-overlapping horizons: long when prob_up > threshold, paying fee_bps per side
    on every position change. Log returns; Sharpe annualised; buy and hold over the same rows. The same
    simulation as the decision policy's (`training.decision`), with the direction threshold as the rule."""
    from sofare.contracts import Policy
    from sofare.training import decision

    strategy, steps = decision.simulate(
        Policy.make(threshold, 1, fee_bps, 0.0), prob_up, realised, horizon, bars_per_year
    )
    hold, hold_steps = decision.buy_and_hold(realised, horizon, fee_bps, bars_per_year)

    def side(r: Any) -> dict[str, float]:
        return {"total_return": r.total_return, "sharpe": r.sharpe, "max_drawdown": r.max_drawdown}

    return {
        "strategy": side(strategy),
        "buy_and_hold": side(hold),
        "trades": strategy.trades,
        "exposure": strategy.exposure,
        "equity": np.exp(np.cumsum(steps[0])).tolist(),
        "equity_buy_and_hold": np.exp(np.cumsum(hold_steps[0])).tolist(),
    }


# --- plots -----------------------------------------------------------------------------------------


def _figures(directory: Any) -> tuple[Any, list[Any], Any]:
    """pyplot (headless), the list of files written, and `save(fig, name)` that writes a PNG into `directory`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Any] = []

    def save(fig: Any, name: str) -> None:
        path = directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    return plt, files, save


def plots(
    directory: Any,
    history: list[dict[str, float]],
    y_up: np.ndarray,
    p: Predictions,
    threshold: float,
    bt: dict[str, Any],
    times: Any,
) -> list[Any]:
    """Learning curves, confusion matrix, calibration and equity curve as PNG files."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import confusion_matrix

    plt, files, save = _figures(directory)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="loss", title="Learning curves (tuning fit)")
    ax.legend()
    save(fig, "learning_curves.png")

    fig, ax = plt.subplots(figsize=(4, 4))
    cm = confusion_matrix(y_up, (p.prob_up > threshold).astype(int), labels=[0, 1])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["down", "up"],
        yticklabels=["down", "up"],
        xlabel="predicted",
        ylabel="actual",
        title="Confusion matrix (test)",
    )
    save(fig, "confusion_matrix.png")

    fig, ax = plt.subplots(figsize=(4, 4))
    frac, mean = calibration_curve(y_up, np.clip(p.prob_up, 0, 1), n_bins=10, strategy="quantile")
    ax.plot([0, 1], [0, 1], "k--", label="perfect")
    ax.plot(mean, frac, marker="o", label="SofareM3")
    ax.set(xlabel="predicted P(up)", ylabel="observed up-rate", title="Calibration (test)")
    ax.legend()
    save(fig, "calibration.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    step = max(1, len(times) // max(len(bt["equity"]), 1))
    x = list(times)[::step][: len(bt["equity"])]
    ax.plot(x, bt["equity"], label="SofareM3 long/flat (after fees)")
    ax.plot(x, bt["equity_buy_and_hold"], label="buy and hold")
    ax.set(ylabel="equity (start = 1)", title="Backtest on the test window")
    ax.legend()
    fig.autofmt_xdate()
    save(fig, "equity_curve.png")
    return files


def evidence_plots(
    directory: Any,
    wf: Any,
    raw_prob: np.ndarray,
    prob: np.ndarray,
    y_up: np.ndarray,
    policy_steps: np.ndarray,
    hold_steps: np.ndarray,
    times: Any,
    horizon: int,
) -> list[Any]:
    """Walk-forward per fold (with CIs, beside the baselines) and the ablations, reliability before and after
    calibration, and the decision policy's equity after costs against buy and hold (test window)."""
    from sofare.training import decision

    plt, files, save = _figures(directory)

    if wf is not None and wf.folds:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
        ax = axes[0]
        names = ["sofare_m3", *wf.folds[0].baselines]
        for j, name in enumerate(names):
            scores = [f.score if name == "sofare_m3" else f.baselines[name] for f in wf.folds]
            x = np.arange(len(scores)) + (j - len(names) / 2) * 0.12
            values = np.array([s.value for s in scores])
            err = np.array([[s.value - s.ci_low for s in scores], [s.ci_high - s.value for s in scores]])
            ax.errorbar(
                x,
                values,
                yerr=np.clip(np.nan_to_num(err), 0, None),
                fmt="o" if name == "sofare_m3" else ".",
                capsize=2,
                label=name,
            )
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(
            xticks=range(len(wf.folds)),
            xticklabels=[f.test_start[:10] for f in wf.folds],
            xlabel="fold (test start)",
            ylabel="primary metric [95% CI]",
            title="Walk-forward folds",
        )
        ax.legend(fontsize=7)
        ax = axes[1]
        labels = list(wf.ablations)
        if labels:
            ablated = [wf.ablations[k].value for k in labels]
            spread = [
                [wf.ablations[k].value - wf.ablations[k].ci_low for k in labels],
                [wf.ablations[k].ci_high - wf.ablations[k].value for k in labels],
            ]
            ax.errorbar(range(len(labels)), ablated, yerr=np.clip(np.nan_to_num(spread), 0, None), fmt="o", capsize=3)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set(xticks=range(len(labels)), xticklabels=labels, title="Ablations (pooled walk-forward)")
        save(fig, "walk_forward.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for label, p in (("raw", raw_prob), ("calibrated", prob)):
        predicted, observed, _ = decision._bins(p, y_up, 10)
        ax.plot(predicted, observed, marker="o", label=f"{label} (Brier {decision.brier(p, y_up):.4f})")
    lo = float(min(np.min(raw_prob), np.min(prob), 0.4))
    hi = float(max(np.max(raw_prob), np.max(prob), 0.6))
    ax.set(
        xlim=(lo, hi),
        ylim=(lo, hi),
        xlabel="predicted P(up)",
        ylabel="observed up-rate",
        title="Reliability (test window)",
    )
    ax.legend(fontsize=8)
    save(fig, "reliability.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(times)[:: max(int(horizon), 1)][: policy_steps.shape[1]]
    ax.plot(steps, np.exp(np.cumsum(policy_steps[0])), label="SofareM3 policy (after fees + slippage)")
    ax.plot(steps, np.exp(np.cumsum(hold_steps[0])), label="buy and hold")
    ax.set(ylabel="equity (start = 1)", title="Decision policy on the test window")
    ax.legend()
    fig.autofmt_xdate()
    save(fig, "policy_equity.png")
    return files
