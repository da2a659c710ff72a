"""sofare.explain.attributions on a tiny untrained SofareM3 (no training, a few seconds): completeness
(attributions sum to the output minus the baseline's, Captum's convergence delta small), a feature the model
provably ignores gets zero, the same window gives the same explanation, and the exported `explain.ts` (what
/explain serves) explains exactly as the network does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sofare.contracts import MODALITIES, Calibration, ModelMeta
from sofare.explain import attributions
from sofare.training import export
from sofare.training.model import SofareM3

LOOKBACK = 6
COLUMNS = ("close_ret", "gold", "rsi", "dff", "vix", "volume", "cpi")
GROUPS = {"micro": (0, 2, 5), "safe": (1, 4), "macro": (3, 6)}  # interleaved, as feature specs order them
HYPER = {
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "dropout": 0.1,
    "learning_rate": 1e-3,
    "batch_size": 8,
    "weight_decay": 0.0,
    "lookback": LOOKBACK,
}


def _meta() -> ModelMeta:
    rng = np.random.default_rng(1)
    return ModelMeta(
        architecture="SofareM3/1",
        hyper=HYPER,
        lookback=LOOKBACK,
        columns=COLUMNS,
        groups=GROUPS,
        n_inputs={g: len(c) for g, c in GROUPS.items()},
        loss={},
        scaler={
            "mean": tuple(rng.normal(0, 3, len(COLUMNS))),
            "std": tuple(rng.uniform(0.5, 2, len(COLUMNS))),
            "ret_mean": 0.0,
            "ret_std": 0.01,
        },
        feature_set_version="v1",
        symbol="BTCUSDT",
        interval="1h",
        horizon=1,
        warmup_bars=0,
        threshold=0.5,
        data_window={"start": "2024-01-01", "end": "2024-01-31"},
        calibration=Calibration(method="platt", scale=1.7, bias=-0.3),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the service runs explanations (explain.threads): on a shared 2-core machine torch's
    default pool oversubscribes and a 0.04 s explanation takes seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = SofareM3(3, 2, 2, HYPER).eval()
    meta = _meta()
    rng = np.random.default_rng(2)
    raw = np.asarray(meta.scaler.mean) + rng.normal(0, 2, (4, LOOKBACK, len(COLUMNS))) * np.asarray(meta.scaler.std)
    return model, meta, raw


def test_attributions_are_complete_for_the_served_probability(tiny):
    model, meta, raw = tiny
    got = attributions.explain(model, meta, raw, steps=64)
    assert (got.method, got.target, got.steps) == ("integrated_gradients", "prob_up_logit", 64)
    gap = got.output - got.baseline_output
    assert np.all(np.abs(gap) > 1e-3)  # the windows do move the output: completeness is not 0 == 0
    # Captum's delta is what the integral misses; small against the gap, and the attributions add up to the rest
    assert np.all(np.abs(got.convergence_delta) <= 0.02 * np.abs(gap) + 1e-4)
    np.testing.assert_allclose(got.total(), gap + got.convergence_delta, rtol=0, atol=1e-5)
    # the target is the log-odds of exactly the P(up) the service answers (calibration included)
    with torch.no_grad():
        logits, ret = model(*(torch.from_numpy(x) for x in meta.inputs(raw)))
    prob, _ = meta.outputs(logits.numpy(), ret.numpy())
    np.testing.assert_allclose(1 / (1 + np.exp(-got.output)), prob, atol=1e-6)
    # the baseline is the training mean (zeros once scaled)
    mean_window = np.broadcast_to(np.asarray(meta.scaler.mean), (1, LOOKBACK, len(COLUMNS)))
    at_mean = attributions.explain(model, meta, mean_window, steps=4)
    np.testing.assert_allclose(at_mean.output, got.baseline_output[:1], atol=1e-6)
    assert np.abs(at_mean.total()).max() == 0.0
    # more integration points, a smaller delta
    coarse = attributions.explain(model, meta, raw, steps=4)
    assert np.abs(coarse.convergence_delta).sum() > np.abs(got.convergence_delta).sum()


def test_a_feature_the_model_ignores_gets_zero(tiny):
    model, meta, raw = tiny
    planted = raw.copy()
    planted[:, :, 4] = meta.scaler.mean[4]  # "vix" held at its training mean: the baseline's own value
    blind = SofareM3(3, 2, 2, HYPER).eval()
    blind.load_state_dict(model.state_dict())
    with torch.no_grad():
        blind.micro.proj.weight[:, 1] = 0.0  # "rsi" (micro column 1) never reaches the network
    got = attributions.explain(blind, meta, planted, steps=32)
    rsi = got.values["micro"][:, :, 1]
    vix = got.values["safe"][:, :, 1]
    assert got.names["micro"][1] == "rsi" and got.names["safe"][1] == "vix"
    assert np.abs(rsi).max() == 0.0 and np.abs(vix).max() == 0.0
    others = np.abs(got.values["micro"][:, :, [0, 2]]).max()
    assert others > 1e-4  # the features it does read get attributions
    assert all(c.feature not in {"rsi", "vix"} for c in got.top(0, k=30) if c.attribution != 0.0)


def test_the_same_window_gives_the_same_explanation(tiny):
    model, meta, raw = tiny
    before = torch.get_rng_state()
    first = attributions.explain(model, meta, raw, steps=16)
    torch.manual_seed(123)  # a different global RNG state changes nothing
    second = attributions.explain(model, meta, raw, steps=16)
    for g in MODALITIES:
        np.testing.assert_array_equal(first.values[g], second.values[g])
    np.testing.assert_array_equal(first.convergence_delta, second.convergence_delta)
    assert first.top(1, 5) == second.top(1, 5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    attributions.explain(model, meta, raw, steps=4)
    assert torch.equal(torch.get_rng_state(), state) and not torch.equal(before, state)  # caller's RNG untouched


def test_summaries_add_up_and_name_columns(tiny):
    model, meta, raw = tiny
    got = attributions.explain(model, meta, raw, steps=16)
    assert got.names == {g: tuple(COLUMNS[j] for j in GROUPS[g]) for g in MODALITIES}
    for i in range(got.windows):
        total = got.total()[i]
        assert sum(got.by_modality(i).values()) == pytest.approx(total, abs=1e-9)
        steps = got.by_time_step(i)
        assert [s["t"] for s in steps] == list(range(-(LOOKBACK - 1), 1))
        assert sum(s["attribution"] for s in steps) == pytest.approx(total, abs=1e-9)
        top = got.top(i, k=5)
        assert len(top) == 5 and [abs(c.attribution) for c in top] == sorted(
            (abs(c.attribution) for c in top), reverse=True
        )
        everything = np.concatenate([np.abs(got.values[g][i]).ravel() for g in MODALITIES])
        assert abs(top[0].attribution) == everything.max()
        cell = top[0]
        g = cell.modality
        assert got.values[g][i][LOOKBACK - 1 + cell.t, got.names[g].index(cell.feature)] == cell.attribution
    assert set(got.feature_importance()) == set(COLUMNS) and set(got.modality_importance()) == set(MODALITIES)


def test_the_exported_explain_trace_explains_as_the_network(tiny, tmp_path):
    model, meta, raw = tiny
    export.export(model, meta, tmp_path)
    exported = ModelMeta.read(tmp_path)
    assert exported.runtime_files["explain"] == "explain.ts"
    traced = torch.jit.load(str(tmp_path / "explain.ts")).eval()
    served = attributions.explain(traced, exported, raw, steps=16)
    direct = attributions.explain(model, meta, raw, steps=16)
    for g in MODALITIES:
        np.testing.assert_allclose(served.values[g], direct.values[g], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(served.output, direct.output, atol=1e-5)


def test_tree_shap_explains_the_gbm_baseline_exactly():
    """The gbm baseline (fitted as training fits it) explained by SHAP's TreeExplainer: complete to float error, a
    feature held constant in training (never split on) gets exactly 0, the same rows give the same values."""
    from sofare.explain import tree
    from sofare.training import evaluation

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 5))
    x[:, 2] = 4.0  # planted: constant, so no tree can split on it
    up = (x[:, 0] - 0.7 * x[:, 1] + rng.normal(0, 0.5, len(x)) > 0).astype(int)
    clf, _ = evaluation.fit_gbm(x, up, x[:, 0] * 0.01, seed=0)
    names = ["close_ret", "rsi", "planted", "vix", "dff"]
    rows = rng.normal(size=(20, 5))
    rows[:, 2] = rng.normal(size=20)  # whatever it is at prediction time, the model ignores it
    got = tree.explain_gbm(clf, rows, names)
    assert (got.method, got.target) == ("tree_shap", "prob_up_logit")
    np.testing.assert_allclose(got.gap(), 0.0, atol=1e-9)
    p = clf.predict_proba(rows)[:, 1]
    np.testing.assert_allclose(1 / (1 + np.exp(-got.output)), p, atol=1e-9)  # the target is P(up)'s log-odds
    assert np.abs(got.values[:, 2]).max() == 0.0
    importance = got.feature_importance()
    assert importance["close_ret"] > importance["vix"] and importance["rsi"] > importance["dff"]
    assert got.top(0, 2)[0][0] in {"close_ret", "rsi"}
    again = tree.explain_gbm(clf, rows, names)
    np.testing.assert_array_equal(again.values, got.values)
