"""From P(up) to a decision that survives costs: Platt calibration, reliability, and the long/flat policy.

Everything here is fitted or chosen on validation predictions only and then applied, unchanged, to later
hours (the test window, each walk-forward fold's test part, the served answers). Pure numpy/scipy.

The policy trades on non-overlapping decisions of `horizon` bars (every bar for horizon 1): long when the
calibrated P(up) is above a threshold, and once long, held for at least `min_hold` decisions; every position
change pays fee + slippage per side. Returns are log returns; the figures are after costs.
"""

from __future__ import annotations

import math

import numpy as np

from sofare.contracts import Calibration, Policy, PolicyResult, Reliability

EPS = 1e-7


def margin(prob_up: np.ndarray) -> np.ndarray:
    """The logit margin a probability came from (softmax of two logits = sigmoid of their difference)."""
    p = np.clip(np.asarray(prob_up, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_calibration(prob_up: np.ndarray, y_up: np.ndarray, method: str, fitted_on: str = "") -> Calibration:
    """Platt scaling (scale and bias on the logit margin) by maximum likelihood, with a weak pull towards the
    identity so a few hundred noisy hours cannot produce an extreme map. The scale stays positive (>= 0.01): the
    map never flattens or inverts the model's ranking, so ROC-AUC is the model's own. `method` "none": identity."""
    y = np.asarray(y_up, dtype=np.float64)
    if method == "none" or len(y) < 50 or y.min() == y.max():
        return Calibration(fitted_on=fitted_on)
    from scipy.optimize import minimize

    m = margin(prob_up)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        z = a * m + b
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
        nll = float(np.mean(np.logaddexp(0, z) - y * z))
        g = p - y
        prior = 1e-3 * ((a - 1) ** 2 + b**2)
        return nll + prior, np.array([np.mean(g * m) + 2e-3 * (a - 1), np.mean(g) + 2e-3 * b])

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0.01, 20.0), (-5.0, 5.0)])
    a, b = (float(v) for v in result.x)
    return Calibration(method="platt", scale=a, bias=b, fitted_on=fitted_on)


def brier(prob_up: np.ndarray, y_up: np.ndarray) -> float:
    return float(np.mean((np.asarray(prob_up, dtype=np.float64) - np.asarray(y_up, dtype=np.float64)) ** 2))


def _bins(prob_up: np.ndarray, y_up: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantile bins of P(up): mean prediction, observed up-rate and count per non-empty bin."""
    p = np.asarray(prob_up, dtype=np.float64)
    y = np.asarray(y_up, dtype=np.float64)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(index, minlength=max(len(edges) - 1, 1))
    keep = count > 0
    predicted = np.bincount(index, weights=p, minlength=len(count))[keep] / count[keep]
    observed = np.bincount(index, weights=y, minlength=len(count))[keep] / count[keep]
    return predicted, observed, count[keep]


def ece(prob_up: np.ndarray, y_up: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over quantile bins (count-weighted |mean prediction - up-rate|)."""
    if len(prob_up) == 0:
        return math.nan
    predicted, observed, count = _bins(prob_up, y_up, bins)
    return float(np.sum(count * np.abs(predicted - observed)) / np.sum(count))


def reliability(raw: np.ndarray, calibrated: np.ndarray, y_up: np.ndarray, bins: int = 10) -> Reliability:
    predicted, observed, count = _bins(calibrated, y_up, bins)
    return Reliability(
        predicted=tuple(float(v) for v in predicted),
        observed=tuple(float(v) for v in observed),
        count=tuple(int(c) for c in count),
        brier_raw=brier(raw, y_up),
        brier=brier(calibrated, y_up),
        ece_raw=ece(raw, y_up, bins),
        ece=ece(calibrated, y_up, bins),
    )


# --- the policy --------------------------------------------------------------------------------------


def decisions(n: int, horizon: int) -> slice:
    """Non-overlapping decisions: every `horizon`-th window (their targets do not overlap)."""
    return slice(None, None, max(int(horizon), 1))


def positions(longs: np.ndarray, min_hold: int) -> np.ndarray:
    """1 while long: enter when the entry rule says so, stay at least `min_hold` decisions, then follow the rule."""
    longs = np.asarray(longs, dtype=bool)
    if min_hold <= 1:
        return longs.astype(np.float64)
    out = np.zeros(len(longs))
    held = 0
    for i, want in enumerate(longs):
        if held and held < min_hold:
            out[i], held = 1.0, held + 1
        elif want:
            out[i], held = 1.0, (held + 1 if held else 1)
        else:
            held = 0
    return out


def trade(position: np.ndarray, ret: np.ndarray, cost_bps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-decision log return after costs, and the position changes (a final exit is not charged)."""
    changes = np.abs(np.diff(np.concatenate([[0.0], position])))
    cost = -math.log(1 - cost_bps / 1e4)
    return position * ret - changes * cost, changes


def summarise(
    r: np.ndarray, position: np.ndarray, changes: np.ndarray, cost_bps: float, decisions_per_year: float
) -> PolicyResult:
    n = len(r)
    if n == 0:
        return PolicyResult(
            total_return=0.0,
            sharpe=0.0,
            max_drawdown=0.0,
            exposure=0.0,
            trades=0,
            turnover=0.0,
            fees_paid=0.0,
            decisions=0,
        )
    equity = np.exp(np.cumsum(r))
    peak = np.maximum.accumulate(np.concatenate([[1.0], equity]))[1:]
    sd = float(np.std(r))
    years = n / decisions_per_year
    return PolicyResult(
        total_return=float(equity[-1] - 1),
        sharpe=float(np.mean(r) / sd * math.sqrt(decisions_per_year)) if sd > 0 else 0.0,
        max_drawdown=float(np.min(equity / peak - 1)),
        exposure=float(position.mean()),
        trades=int(changes.sum()),
        turnover=float(changes.sum() / years) if years > 0 else 0.0,
        fees_paid=float(changes.sum() * cost_bps / 1e4),
        decisions=n,
    )


def simulate(
    policy: Policy, prob_up: np.ndarray, ret: np.ndarray, horizon: int, bars_per_year: float
) -> tuple[PolicyResult, np.ndarray]:
    """The policy on windows in time order (`ret`: each window's realised `horizon`-bar log return): its
    figures and the per-decision returns (to pool folds)."""
    step = decisions(len(ret), horizon)
    position = positions(policy.longs(np.asarray(prob_up)[step]), policy.min_hold)
    cost = policy.fee_bps + policy.slippage_bps
    r, changes = trade(position, np.asarray(ret, dtype=np.float64)[step], cost)
    return summarise(r, position, changes, cost, bars_per_year / max(horizon, 1)), np.stack([r, position, changes])


def pooled(parts: list[np.ndarray], cost_bps: float, decisions_per_year: float) -> PolicyResult:
    """Figures of several simulations' decisions back to back (walk-forward folds, oldest first)."""
    if not parts:
        return summarise(np.zeros(0), np.zeros(0), np.zeros(0), cost_bps, decisions_per_year)
    r, position, changes = np.concatenate(parts, axis=1)
    return summarise(r, position, changes, cost_bps, decisions_per_year)


def buy_and_hold(
    ret: np.ndarray, horizon: int, cost_bps: float, bars_per_year: float
) -> tuple[PolicyResult, np.ndarray]:
    return simulate(Policy.make(-1.0, 1, cost_bps, 0.0, "buy and hold"), np.ones(len(ret)), ret, horizon, bars_per_year)


def choose(
    prob_up: np.ndarray,
    ret: np.ndarray,
    horizon: int,
    thresholds: list[float],
    holds: list[int],
    fee_bps: float,
    slippage_bps: float,
    chosen_on: str,
) -> Policy:
    """The policy with the highest after-cost log return on validation windows; staying flat (return 0) is a
    candidate, and wins unless something beats it. Ties go to fewer trades, then the higher threshold."""
    best, best_key = Policy.make(None, 1, fee_bps, slippage_bps, chosen_on), (0.0, 0, 0.0)
    step = decisions(len(ret), horizon)
    p, r = np.asarray(prob_up, dtype=np.float64)[step], np.asarray(ret, dtype=np.float64)[step]
    cost = fee_bps + slippage_bps
    for threshold in sorted(thresholds):
        for hold in sorted(holds):
            position = positions(p > threshold, hold)
            total, changes = trade(position, r, cost)
            key = (round(float(total.sum()), 12), -int(changes.sum()), threshold)
            if key > best_key:
                best, best_key = Policy.make(threshold, hold, fee_bps, slippage_bps, chosen_on), key
    return best
