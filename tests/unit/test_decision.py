"""Calibration, the cost-aware decision policy and the paired bootstrap, on synthetic data whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sofare.contracts import Calibration, ModelMeta, Policy
from sofare.training import decision, evaluation


def _overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a true P(up) in [0.4, 0.6]; the 'model' reports the same ranking, 4x too far from 0.5
    and shifted up."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.4, 0.6, n)
    y = (rng.random(n) < true).astype(int)
    reported = 1 / (1 + np.exp(-(4 * decision.margin(true) + 0.3)))
    return reported, y


def test_platt_calibration_undoes_overconfidence_and_keeps_the_ranking():
    reported, y = _overconfident()
    c = decision.fit_calibration(reported, y, "platt", "validation")
    assert c.method == "platt" and c.scale == pytest.approx(0.25, abs=0.08) and c.bias < 0
    fixed = c.apply(decision.margin(reported))
    held_out, y2 = _overconfident(seed=1)
    fixed2 = c.apply(decision.margin(held_out))
    assert decision.brier(fixed2, y2) < decision.brier(held_out, y2) - 0.005
    assert decision.ece(fixed2, y2) < decision.ece(held_out, y2) / 3
    assert np.array_equal(np.argsort(fixed, kind="stable"), np.argsort(reported, kind="stable")), "monotone: AUC kept"


def test_calibration_none_or_too_little_data_is_the_identity():
    reported, y = _overconfident(40)
    for c in (decision.fit_calibration(reported, y, "none"), decision.fit_calibration(reported, y, "platt")):
        assert c.method == "none"
        np.testing.assert_allclose(c.apply(decision.margin(reported)), reported, atol=1e-6)


def test_model_meta_outputs_apply_the_calibration():
    logits = np.array([[0.0, 2.0], [1.0, 0.0]], dtype=np.float32)
    meta = ModelMeta.model_construct(
        calibration=Calibration(method="platt", scale=0.5, bias=0.1),
        scaler=type("S", (), {"ret_std": 1.0, "ret_mean": 0.0})(),
    )
    prob, _ = ModelMeta.outputs(meta, logits, np.zeros(2, dtype=np.float32))
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-(0.5 * np.array([2.0, -1.0]) + 0.1))), rtol=1e-9)
    plain = ModelMeta.model_construct(calibration=Calibration(), scaler=meta.scaler)
    softmax = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(ModelMeta.outputs(plain, logits, np.zeros(2))[0], softmax, rtol=1e-6)


def test_min_hold_keeps_a_position_and_costs_are_charged_per_change():
    longs = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    assert decision.positions(longs, 1).tolist() == [1, 0, 0, 0, 1, 1, 0, 0]
    assert decision.positions(longs, 3).tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    ret = np.full(8, 0.01)
    r, changes = decision.trade(decision.positions(longs, 1), ret, 12.0)
    assert changes.tolist() == [1, 1, 0, 0, 1, 0, 1, 0]
    assert r.sum() == pytest.approx(3 * 0.01 + 4 * math.log(1 - 12e-4))


def test_policy_results_count_turnover_fees_and_exposure():
    policy = Policy.make(0.55, 1, 10, 2)
    prob = np.array([0.6, 0.6, 0.4, 0.4, 0.6, 0.4] * 10)
    ret = np.array([0.01, 0.01, -0.01, -0.01, 0.01, -0.01] * 10)
    result, steps = decision.simulate(policy, prob, ret, 1, 8766)
    assert result.exposure == pytest.approx(0.5) and result.trades == 40 and result.decisions == 60
    assert result.fees_paid == pytest.approx(40 * 12e-4)
    assert result.turnover == pytest.approx(40 / (60 / 8766))
    assert result.total_return == pytest.approx(math.exp(steps[0].sum()) - 1)
    assert steps.shape == (3, 60)
    hold, _ = decision.buy_and_hold(ret, 1, 12, 8766)
    assert hold.exposure == 1 and hold.trades == 1


def test_horizon_decisions_do_not_overlap():
    prob, ret = np.full(12, 0.9), np.full(12, 0.01)
    result, steps = decision.simulate(Policy.make(0.5, 1, 0, 0), prob, ret, 4, 8766)
    assert result.decisions == 3 and steps.shape[1] == 3


def test_the_policy_is_chosen_by_after_cost_return_and_flat_wins_when_nothing_pays():
    rng = np.random.default_rng(3)
    n = 3000
    prob = rng.uniform(0.4, 0.7, n)
    informative = np.where(prob > 0.6, 0.004, -0.001) + rng.normal(0, 0.001, n)
    p = decision.choose(prob, informative, 1, [0.5, 0.55, 0.6, 0.65], [1, 3], 10, 2, "validation")
    assert p.threshold == 0.6 and p.chosen_on == "validation" and p.id.startswith("long>0.60")
    noise = rng.normal(0, 0.001, n)  # no information and costs to pay: stay out
    flat = decision.choose(prob, noise - 0.0005, 1, [0.5, 0.55, 0.6, 0.65], [1, 3], 10, 2, "validation")
    assert flat.threshold is None and flat.id.startswith("flat") and flat.signal(0.99) == "flat"
    assert not flat.longs(np.array([0.99])).any()


def test_meta_without_a_policy_falls_back_to_the_threshold():
    meta = ModelMeta.model_construct(policy=None, threshold=0.5)
    policy = ModelMeta.decision_policy(meta)
    assert policy.signal(0.51) == "long" and policy.signal(0.5) == "flat" and policy.id.startswith("long>0.50")


def test_paired_bootstrap_says_better_worse_or_no_difference_plainly():
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.integers(0, 2, n)
    good = evaluation.Predictions(np.clip(y * 0.3 + rng.uniform(0.2, 0.5, n), 0, 1), np.zeros(n))
    coin = evaluation.Predictions(rng.uniform(0, 1, n), np.zeros(n))
    coin2 = evaluation.Predictions(rng.uniform(0, 1, n), np.zeros(n))
    ret = np.zeros(n)
    better = evaluation.paired("roc_auc", y, ret, good, coin, 0.5, 300, 24, 0)
    assert better["verdict"] == "better" and better["difference"]["ci_low"] > 0 and better["share_not_better"] < 0.025
    worse = evaluation.paired("roc_auc", y, ret, coin, good, 0.5, 300, 24, 0)
    assert worse["verdict"] == "worse"
    same = evaluation.paired("roc_auc", y, ret, coin, coin2, 0.5, 300, 24, 0)
    assert same["verdict"] == "no significant difference"
    assert same["difference"]["ci_low"] < 0 < same["difference"]["ci_high"]
    assert evaluation.paired("brier", y, ret, good, coin, 0.5, 300, 24, 0)["verdict"] == "better", "lower Brier wins"


def test_gradient_boosted_baseline_learns_a_nonlinear_rule_a_linear_model_cannot():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6000, 4))
    y = (np.abs(x[:, 0]) > 0.8).astype(int)  # symmetric in x0: no linear direction
    ret = np.where(y == 1, 0.01, -0.01)
    tree = evaluation.gbm(x[:5000], y[:5000], ret[:5000], x[5000:], 0)
    line = evaluation.linear(x[:5000], y[:5000], ret[:5000], x[5000:], 0)
    auc = {
        name: evaluation.metric("roc_auc", y[5000:], ret[5000:], p, 0.5) for name, p in (("tree", tree), ("line", line))
    }
    assert auc["tree"] > 0.9 and auc["line"] < 0.6, auc
