"""The global view (`sofare.explain.global_view`) on synthetic windows with a planted answer: permutation
importance finds the informative feature and gives a constant exactly nothing, the agreement between the two views
is computed (and a disagreement is said), and the model card renders the section from it."""

from __future__ import annotations

import numpy as np
import pytest

from sofare.explain import global_view as gv
from sofare.registry import model_card
from sofare.training import evaluation

N, LOOKBACK = 400, 6
NAMES = (("signal", "constant", "noise"), ("safe_noise", "safe_constant"), ("macro_constant",))
MISLED = (  # attributions that put their weight on safe-haven noise
    {"safe_noise": 9.0, "noise": 1.0, "signal": 0.1, "constant": 0.0, "safe_constant": 0.0, "macro_constant": 0.0},
    {"micro": 1.1, "safe": 9.0, "macro": 0.0},
)


def _windows(seed: int = 7) -> tuple[gv.Inputs, np.ndarray]:
    """micro: an informative feature (its last bar decides the direction), a constant and noise; safe haven: noise
    and a constant; macro: a constant. Scaled-input shaped: [windows, lookback, features]."""
    rng = np.random.default_rng(seed)
    micro = rng.normal(size=(N, LOOKBACK, 3)).astype(np.float32)
    micro[:, :, 1] = 0.7
    safe = rng.normal(size=(N, LOOKBACK, 2)).astype(np.float32)
    safe[:, :, 1] = -1.0
    macro = np.full((N, LOOKBACK, 1), 0.3, dtype=np.float32)
    y_up = (micro[:, -1, 0] + 0.5 * rng.normal(size=N) > 0).astype(int)
    return (micro, safe, macro), y_up


def _predict(x: gv.Inputs) -> tuple[np.ndarray, np.ndarray]:
    """A 'model' that uses every input: strongly the signal, a little the noise and the constants."""
    micro, safe, macro = x
    z = (
        3 * micro[:, -1, 0]
        + 0.4 * micro[:, -1, 2]
        + 0.4 * safe[:, -1, 0]
        + micro[:, 0, 1]
        + safe[:, 0, 1]
        + macro[:, 0, 0]
    )
    return 1 / (1 + np.exp(-z)), 0.001 * z


def _drops(seed: int, repeats: int = 3) -> tuple[float, dict[str, list[float]], dict[str, list[float]]]:
    inputs, y_up = _windows()

    def score(prob: np.ndarray, ret: np.ndarray) -> float:
        return evaluation.metric("roc_auc", y_up, ret, evaluation.Predictions(prob, ret), 0.5)

    return gv.permutation_drops(_predict, score, inputs, NAMES, repeats, seed)


def test_permutation_ranks_the_planted_feature_first_and_a_constant_at_zero():
    folds = [_drops(seed) for seed in (0, 1)]  # two "folds": two seeds
    view = gv.build("roc_auc", NAMES, folds)
    ranked = sorted(view.features, key=lambda f: -(f.permutation or 0.0))
    assert ranked[0].name == "signal" and ranked[0].permutation > 0.2
    assert all(len(f.permutation_folds) == 2 for f in view.features) and view.permutation_folds == 2
    for f in view.features:
        if f.name != "signal":
            assert abs(f.permutation) < ranked[0].permutation / 5, f
    constants = [f for f in view.features if "constant" in f.name]
    assert constants and all(f.permutation == 0.0 and f.permutation_sd == 0.0 for f in constants), (
        "shuffling a constant changes no input"
    )
    assert view.modality("micro").carries_signal and not view.modality("macro").carries_signal
    assert view.modality("macro").permutation == 0.0
    assert 0.5 < folds[0][0] == folds[1][0] < 1.0, "the unshuffled score does not depend on the seed"
    assert _drops(0) == folds[0], "seeded: the same shuffles, the same drops"
    assert _drops(2) != folds[0]


def test_the_two_views_agreement_is_computed_and_a_disagreement_is_said():
    folds = [_drops(0)]
    agreeing = (
        {"signal": 5.0, "noise": 0.6, "safe_noise": 0.5, "constant": 0.0, "safe_constant": 0.0, "macro_constant": 0.0},
        {"micro": 5.6, "safe": 0.5, "macro": 0.0},
    )
    view = gv.build("roc_auc", NAMES, folds, agreeing, attribution_method="ig", attribution_windows=N)
    a = view.agreement
    assert a is not None and a.same_top_modality and a.top_modality_permutation == "micro"
    assert a.top_features_attribution[0] == a.top_features_permutation[0] == "signal"
    assert a.spearman is not None and a.spearman > 0.4 and a.features == 6
    assert view.modality("micro").attribution_share == pytest.approx(5.6 / 6.1)
    said = gv.findings(view, "ROC-AUC")
    assert "By permutation, the signal is carried by **micro**" in said[0]
    assert "The two views agree on the top modality: micro." in said

    # attributions that put their weight on safe-haven noise: the views disagree, and the findings say where
    view = gv.build("roc_auc", NAMES, folds, MISLED, attribution_method="ig", attribution_windows=N)
    a = view.agreement
    assert a is not None and not a.same_top_modality
    assert (a.top_modality_attribution, a.top_modality_permutation) == ("safe", "micro")
    said = gv.findings(view, "ROC-AUC")
    assert (
        "The two views **disagree** on the top modality: attributions put the most weight on safe haven, "
        "shuffling micro costs the most ROC-AUC." in said
    )
    assert a.spearman is not None and a.spearman < 0.5
    assert "safe_noise" in a.disagree and any(s.startswith("In one view's top 3") and "safe_noise" in s for s in said)
    safe = view.modality("safe")
    assert safe.permutation <= 0 < safe.attribution_share, "the planted case: sensitivity without skill"
    assert (
        f"Safe haven draws {safe.attribution_share:.0%} of the attribution, yet shuffling it did not lower ROC-AUC on "
        f"average ({safe.permutation:+.4f}): the model is sensitive to it without measurable skill from it." in said
    )


def test_no_permutation_signal_is_said_plainly():
    """Folds whose targets have nothing to do with the inputs (each fold its own windows, as walk-forward folds
    are): no modality's shuffle lowers the metric consistently."""
    folds = []
    for k in range(4):
        inputs, _ = _windows(seed=100 + k)
        unrelated = np.random.default_rng(k).integers(0, 2, size=N)

        def score(prob: np.ndarray, ret: np.ndarray, y: np.ndarray = unrelated) -> float:
            return evaluation.metric("roc_auc", y, ret, evaluation.Predictions(prob, ret), 0.5)

        folds.append(gv.permutation_drops(_predict, score, inputs, NAMES, 3, k))
    view = gv.build("roc_auc", NAMES, folds)
    assert not any(m.carries_signal for m in view.modalities), [m.permutation_folds for m in view.modalities]
    largest = max(view.modalities, key=lambda m: m.permutation)
    assert largest.permutation > 0 and largest.positive_folds < 4, "chance drops, not in every fold"
    best, k = f"{gv.MODALITY_NAMES[largest.name]}'s {largest.permutation:+.4f}", largest.positive_folds
    assert gv.findings(view, "ROC-AUC") == [
        "By permutation, no modality carries a measurable signal: shuffling none of them lowered ROC-AUC in all "
        f"4 folds by more than twice the standard error (the largest mean drop, {best}, came in {k} of 4 folds)."
    ]
    assert view.agreement is None, "no attributions: nothing to agree with"


def test_the_model_card_section_says_which_modalities_carry_the_signal(tmp_path):
    folds = [_drops(0), _drops(1)]
    view = gv.build(
        "roc_auc",
        NAMES,
        folds,
        MISLED,
        attribution_method="integrated_gradients",
        attribution_windows=N,
        permutation_windows=[N, N],
        permutation_repeats=3,
        test_window="2024-03-01..2024-03-31",
    )
    section = "\n".join(model_card.global_view_section(view))
    assert section.startswith("## What the model relies on (global view)")
    assert "| micro | 3 | 10.9% |" in section and section.count("| yes |") == 1, section
    assert "- By permutation, the signal is carried by **micro**" in section
    assert "- The two views **disagree** on the top modality" in section
    assert "| signal | micro |" in section and "nan" not in section.lower()
    assert "![global view](model_card_plots/global_view.png)" in section
    assert gv.plot(view, tmp_path / gv.PLOT).stat().st_size > 10_000
    missing = "\n".join(model_card.global_view_section(None))
    assert "Not computed for this version" in missing
