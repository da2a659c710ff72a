"""SofareM3 itself: shapes, causality (rows after t never change a prediction at or before t),
determinism, and the shuffled-label leakage check on real data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sofare.data.features import feature_spec
from sofare.training import evaluation, pipeline
from sofare.training.model import SofareM3, head_multiple
from sofare.training.windows import predict, seed_everything

TRAIN_WINDOW = ("2024-01-12", "2024-03-31")

HYPER = {
    "hidden_size": 64,
    "num_layers": 1,
    "num_heads": 6,
    "dropout": 0.1,
    "learning_rate": 3e-3,
    "batch_size": 64,
    "weight_decay": 1e-4,
    "lookback": 24,
}


def test_head_multiple_makes_every_width_divisible():
    assert head_multiple(64, 6) == 66 and head_multiple(96, 8) == 96


def test_forward_shapes_for_widths_the_heads_do_not_divide(train_cfg):
    spec = feature_spec(train_cfg)
    model = SofareM3(len(spec.micro), len(spec.safe_haven), len(spec.macro), HYPER)
    logits, ret = model(
        torch.zeros(5, 24, len(spec.micro)),
        torch.zeros(5, 24, len(spec.safe_haven)),
        torch.zeros(5, 24, len(spec.macro)),
    )
    assert logits.shape == (5, 2) and ret.shape == (5,)


def test_rows_after_t_change_no_prediction_at_or_before_t(train_cfg):
    data = pipeline.load_data(train_cfg, *TRAIN_WINDOW)
    rows = range(len(data.frame))
    seed_everything(0, 1)
    spec = data.spec
    model = SofareM3(len(spec.micro), len(spec.safe_haven), len(spec.macro), HYPER).eval()
    windows, scaler = data.windows(rows, data.parts["train"], 24)
    prob, ret = predict(model, windows, scaler)
    test_ends = windows.ends[windows.ends >= data.parts["test"].start]
    t = int(test_ends[len(test_ends) // 2])  # after every fitted row: the scaler cannot see the change
    perturbed = data.frame.copy()
    columns = list(spec.columns)
    perturbed.loc[t + 1 :, columns] = perturbed.loc[t + 1 :, columns] * 3 + 7
    later = perturbed.index > t
    perturbed.loc[later, "target_return"] = perturbed.loc[later, "target_return"] * -2
    data2 = pipeline.Data(perturbed, spec, data.parts, data.delta)
    windows2, scaler2 = data2.windows(rows, data.parts["train"], 24)
    prob2, ret2 = predict(model, windows2, scaler2)
    np.testing.assert_array_equal(windows.ends, windows2.ends)
    before = windows.ends <= t
    assert before.sum() > 1000
    np.testing.assert_array_equal(prob[before], prob2[before])
    np.testing.assert_array_equal(ret[before], ret2[before])
    assert not np.array_equal(prob[~before], prob2[~before]), "the perturbation does reach later predictions"


def test_same_seed_same_metrics(train_cfg):
    data = pipeline.load_data(train_cfg, *TRAIN_WINDOW)
    fit_rows = range(data.parts["validation"].stop)
    a = pipeline.evaluate(train_cfg, data, HYPER, 2, fit_rows, data.parts["test"])
    b = pipeline.evaluate(train_cfg, data, HYPER, 2, fit_rows, data.parts["test"])
    assert a.scores == b.scores
    assert a.backtest["strategy"] == b.backtest["strategy"]


def _balanced_accuracy_ci(cfg, data, shuffle: bool, seeds: tuple[int, ...]) -> dict[str, float]:
    """Accuracy [95% CI] of the mean P(up) of models fitted with `seeds`, taken at the median
    prediction (the ensemble says "up" for half the windows): a predictor without information then
    scores 50% whatever the test window's up-rate, and averaging seeds removes the luck of one fit."""
    fit_rows = range(data.parts["validation"].stop)
    runs = []
    for seed in seeds:
        cfg_seed = cfg.model_copy(update={"training": cfg.training.model_copy(update={"seed": seed})})
        runs.append(pipeline.evaluate(cfg_seed, data, HYPER, 3, fit_rows, data.parts["test"], shuffle_labels=shuffle))
    prob = np.mean([r.predictions.prob_up for r in runs], axis=0)
    p = evaluation.Predictions(prob, np.mean([r.predictions.expected_return for r in runs], axis=0))
    scores = evaluation.score(runs[0].y_up, runs[0].y_ret, p, float(np.median(prob)), 500, 24, 0)
    return {"accuracy": scores["accuracy"], "roc_auc": scores["roc_auc"]}


def test_shuffled_labels_give_chance_accuracy(train_cfg):
    """Trained on permuted labels, the model must not beat (or lose to) a coin flip on the test
    window: if it did, information would be reaching it from somewhere other than the labels."""
    data = pipeline.load_data(train_cfg, "2023-10-12", "2024-06-30")  # a test window of five weeks
    scores = _balanced_accuracy_ci(train_cfg, data, True, (1, 2, 3))
    for name in ("accuracy", "roc_auc"):
        assert scores[name]["ci_low"] <= 0.5 <= scores[name]["ci_high"], (name, scores[name])


def test_the_shuffle_check_catches_a_leak(train_cfg):
    """The same check on data with a planted leak (a feature that is the target) fails loudly."""
    data = pipeline.load_data(train_cfg, "2023-10-12", "2024-06-30")
    leaky = data.frame.copy()
    leaky["hour_sin"] = leaky["target_up"].fillna(0.5) * 2 - 1
    scores = _balanced_accuracy_ci(train_cfg, pipeline.Data(leaky, data.spec, data.parts, data.delta), False, (1,))
    assert scores["accuracy"]["ci_low"] > 0.6, scores


@pytest.mark.parametrize("missing", ["2024-02-10"])
def test_an_unvalidated_day_in_the_window_is_refused_by_name(train_cfg, missing):
    import sqlalchemy as sa

    from sofare.data import warehouse
    from sofare.validation import suites

    engine = warehouse.get_engine(train_cfg)
    with engine.begin() as conn:
        v = warehouse.validated_days
        conn.execute(sa.delete(v).where(v.c.day == pd.Timestamp(missing).date(), v.c.suite == "features"))
    with pytest.raises(suites.UnvalidatedIntervalError, match=f"features .* not validated: {missing}"):
        pipeline.load_data(train_cfg, *TRAIN_WINDOW)
