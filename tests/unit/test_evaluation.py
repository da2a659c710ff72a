"""Metrics agree with scikit-learn, CIs bracket the estimate, the backtest charges its fees, and
semver follows DESIGN §4."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as m

from sofare.registry.versions import next_semver
from sofare.training import evaluation


@pytest.fixture
def sample():
    rng = np.random.default_rng(1)
    y_ret = rng.normal(scale=0.01, size=500)
    y_up = (y_ret > 0).astype(int)
    prob = np.clip(0.5 + 20 * y_ret + rng.normal(scale=0.2, size=500), 0, 1)
    return y_up, y_ret, evaluation.Predictions(prob, 0.3 * y_ret + rng.normal(scale=0.01, size=500))


def test_metrics_match_scikit_learn(sample):
    from scipy.stats import spearmanr

    y_up, y_ret, p = sample
    pred = (p.prob_up > 0.5).astype(int)
    expected = {
        "accuracy": m.accuracy_score(y_up, pred),
        "precision": m.precision_score(y_up, pred),
        "recall": m.recall_score(y_up, pred),
        "f1": m.f1_score(y_up, pred),
        "roc_auc": m.roc_auc_score(y_up, p.prob_up),
        "mcc": m.matthews_corrcoef(y_up, pred),
        "mae": m.mean_absolute_error(y_ret, p.expected_return),
        "rmse": math.sqrt(m.mean_squared_error(y_ret, p.expected_return)),
        "r2": m.r2_score(y_ret, p.expected_return),
        "ic": spearmanr(p.expected_return, y_ret).statistic,
    }
    scores = evaluation.score(y_up, y_ret, p, 0.5, 200, 24, 0)
    for name, value in expected.items():
        assert scores[name]["value"] == pytest.approx(value, abs=1e-9), name
        assert scores[name]["ci_low"] <= scores[name]["value"] <= scores[name]["ci_high"], name


def test_bootstrap_is_seeded_and_uses_blocks():
    a = evaluation.block_indices(100, 10, 5, seed=3)
    assert np.array_equal(a, evaluation.block_indices(100, 10, 5, seed=3))
    assert a.shape == (5, 100)
    assert all(np.all(np.diff(row[:10]) == 1) for row in a), "each block is 10 consecutive rows"


def test_a_coin_flip_has_a_ci_around_one_half():
    rng = np.random.default_rng(2)
    y_ret = rng.normal(size=2000)
    scores = evaluation.score(
        (y_ret > 0).astype(int), y_ret, evaluation.Predictions(rng.random(2000), rng.normal(size=2000)), 0.5, 300, 24, 0
    )
    assert scores["accuracy"]["ci_low"] < 0.5 < scores["accuracy"]["ci_high"]
    assert scores["roc_auc"]["ci_low"] < 0.5 < scores["roc_auc"]["ci_high"]


def test_backtest_charges_fees_on_every_position_change():
    ret = np.log(np.array([1.01, 1.02, 0.99, 1.03]))
    bt = evaluation.backtest(np.array([0.9, 0.9, 0.1, 0.9]), ret, 1, 0.5, 10, 8766)
    fee = math.log(1 - 0.001)
    expected = ret[0] + ret[1] + ret[3] + 3 * fee  # in, out, in
    assert bt["trades"] == 3 and bt["exposure"] == 0.75
    assert bt["strategy"]["total_return"] == pytest.approx(math.exp(expected) - 1)
    assert bt["buy_and_hold"]["total_return"] == pytest.approx(math.exp(ret.sum() + fee) - 1)
    assert bt["strategy"]["max_drawdown"] < 0


def test_baselines():
    last = np.array([0.01, -0.02, 0.0])
    p = evaluation.persistence(last)
    assert p.prob_up.tolist() == [1.0, 0.0, 0.0] and p.expected_return.tolist() == last.tolist()
    maj = evaluation.majority(np.array([1, 1, 0]), np.array([0.01, 0.02, -0.01]), 2)
    assert maj.prob_up.tolist() == [2 / 3, 2 / 3] and maj.expected_return == pytest.approx([0.02 / 3] * 2)


def test_semver_rules():
    prev = {"semver": "1.2.3", "architecture": "A", "feature_set_version": "fs1", "test_roc_auc": "0.55"}
    assert next_semver(None, "A", "fs1", 0.5, "roc_auc") == "1.0.0"
    assert next_semver(prev, "B", "fs1", 0.5, "roc_auc") == "2.0.0"
    assert next_semver(prev, "A", "fs2", 0.5, "roc_auc") == "2.0.0"
    assert next_semver(prev, "A", "fs1", 0.61, "roc_auc") == "1.3.0"
    assert next_semver(prev, "A", "fs1", 0.59, "roc_auc") == "1.2.4"
