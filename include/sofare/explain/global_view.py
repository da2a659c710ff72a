"""The global view of what a SofareM3 version relies on, per feature and per modality (micro, safe haven,
macro), from two independent angles, computed during training and logged with the version
(`global_view.json` + `global_view.png` in its MLflow run):

- **attributions**: Integrated Gradients of the calibrated P(up) log-odds (`explain.attributions`) of the final
  model on a capped, evenly spaced sample of the held-out test windows; per feature the mean over windows of
  |its attributions summed over the window's time steps| (per modality likewise): what the network's output is
  sensitive to;
- **permutation importance**: on every walk-forward fold's own model and test part, one feature's values (its
  whole lookback history) are shuffled across the fold's test windows, or a whole modality's features with one
  shuffle, and the drop of the primary metric is measured, `repeats` times with seeded shuffles: what the
  model's skill depends on.

The two can disagree (a large gradient on an input that carries no skill, or correlated features sharing one
signal), so the view computes where they do (rank correlation, top modality, features ranked high by one and
low by the other) instead of asserting agreement. Pure numpy + pydantic: the caller supplies the model's
forward pass and the metric (`sofare.training.pipeline` does), so this module imports no stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sofare.contracts import MODALITIES

ARTIFACT = "global_view.json"  # in the version's training run
PLOT = "global_view.png"  # beside it
MODALITY_NAMES = {"micro": "micro", "safe": "safe haven", "macro": "macro"}
TOP_K = 5  # "top" features when listing disagreements
SENSITIVE_SHARE = 0.1  # a modality with this share of the attribution but no permutation drop is called out
Inputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # scaled micro, safe, macro windows: [windows, lookback, features]
Predict = Callable[[Inputs], tuple[np.ndarray, np.ndarray]]  # -> (P(up), expected return) per window
Score = Callable[[np.ndarray, np.ndarray], float]  # (P(up), expected return) -> the primary metric, higher is better


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Importance(_View):
    """One feature's (or one modality's) importance by both views; None where a view was not computed."""

    name: str
    modality: str
    attribution: float | None = None  # mean over windows of |attribution summed over the window's time steps|
    attribution_share: float | None = None  # of the total over every feature (a modality: over the modalities)
    permutation: float | None = None  # mean drop of the primary metric when shuffled, over folds x repeats
    permutation_sd: float | None = None  # standard deviation of those drops
    permutation_folds: list[float] = Field(default_factory=list)  # mean drop per fold (over its repeats)

    @property
    def positive_folds(self) -> int:
        return sum(d > 0 for d in self.permutation_folds)

    @property
    def carries_signal(self) -> bool:
        """By permutation: shuffling it lowered the metric in every fold, and the mean of the fold means exceeds twice
        their standard error (so one lucky fold cannot carry it)."""
        folds = np.asarray(self.permutation_folds, dtype=float)
        if not len(folds) or (folds <= 0).any():
            return False
        return len(folds) == 1 or folds.mean() > 2 * folds.std(ddof=1) / math.sqrt(len(folds))


class Agreement(_View):
    """Where the two views agree and where they do not, computed."""

    spearman: float | None  # rank correlation of the features' attribution and permutation importance
    features: int  # features ranked by both
    top_modality_attribution: str
    top_modality_permutation: str
    top_k: int  # TOP_K, or half the features when there are fewer than 2 * TOP_K
    top_features_attribution: list[str]  # top_k by each view
    top_features_permutation: list[str]
    disagree: list[str]  # in one view's top_k but in the other view's bottom half

    @property
    def same_top_modality(self) -> bool:
        return self.top_modality_attribution == self.top_modality_permutation


class GlobalView(_View):
    metric: str  # the primary metric the permutation drops are measured in
    attribution_method: str | None = None  # None: attributions were not computed
    attribution_windows: int = 0  # test windows sampled (evenly) for the attributions
    test_window: str = ""
    permutation_folds: int = 0
    permutation_windows: list[int] = Field(default_factory=list)  # test windows sampled per fold
    permutation_repeats: int = 0
    fold_scores: list[float] = Field(default_factory=list)  # each fold's metric on its sample, unshuffled
    seed: int = 0
    features: list[Importance]
    modalities: list[Importance]
    agreement: Agreement | None = None
    seconds: float = 0.0

    def modality(self, name: str) -> Importance:
        return next(m for m in self.modalities if m.name == name)


# --- the two views ---------------------------------------------------------------------------------------


def sample(n: int, cap: int) -> np.ndarray:
    """At most `cap` of n positions, evenly spaced over the whole span (deterministic; the test window's regimes
    stay represented)."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(int))


def permutation_drops(
    predict: Predict,
    score: Score,
    inputs: Inputs,
    names: Sequence[Sequence[str]],
    repeats: int,
    seed: int,
) -> tuple[float, dict[str, list[float]], dict[str, list[float]]]:
    """One fold: the unshuffled score, then for every feature and every modality the score drops, one per repeat.

    A feature's whole lookback history moves with its window (x[perm, :, f] → window i gets window perm[i]'s
    values of f), so only its link to the target is broken, not its time structure; a modality is shuffled with
    one permutation for all its features, keeping their joint distribution."""
    rng = np.random.default_rng(seed)
    n = len(inputs[0])
    base = score(*predict(inputs))
    features: dict[str, list[float]] = {}
    modalities: dict[str, list[float]] = {}
    work = [x.copy() for x in inputs]

    def drop(m: int, columns: list[int], perm: np.ndarray) -> float:
        work[m][:, :, columns] = inputs[m][perm][:, :, columns]
        try:
            return base - score(*predict((work[0], work[1], work[2])))
        finally:
            work[m][:, :, columns] = inputs[m][:, :, columns]

    for m, modality in enumerate(MODALITIES):
        for f, name in enumerate(names[m]):
            features[name] = [drop(m, [f], rng.permutation(n)) for _ in range(repeats)]
        every = list(range(len(names[m])))
        modalities[modality] = [drop(m, every, rng.permutation(n)) for _ in range(repeats)] if every else []
    return base, features, modalities


def _stats(folds: list[list[float]]) -> tuple[float | None, float | None, list[float]]:
    draws = [d for fold in folds for d in fold]
    if not draws:
        return None, None, []
    return float(np.mean(draws)), float(np.std(draws)), [float(np.mean(f)) for f in folds if f]


def build(
    metric: str,
    names: Sequence[Sequence[str]],
    folds: list[tuple[float, dict[str, list[float]], dict[str, list[float]]]],
    attribution: tuple[dict[str, float], dict[str, float]] | None = None,
    **about: Any,
) -> GlobalView:
    """The view from each fold's `permutation_drops` and the test window's mean |attribution| per feature and per
    modality (`explain.attributions.Attributions.feature_importance()`, `.modality_importance()`); either may be
    missing (empty `folds`, None), then the agreement is None."""
    per_feature, per_modality = attribution or ({}, {})
    total_f, total_m = sum(per_feature.values()), sum(per_modality.values())

    def importance(name: str, modality: str, drops: list[list[float]], a: float | None, total: float) -> Importance:
        mean, sd, per_fold = _stats(drops)
        share = a / total if a is not None and total > 0 else None
        return Importance(
            name=name,
            modality=modality,
            attribution=a,
            attribution_share=share,
            permutation=mean,
            permutation_sd=sd,
            permutation_folds=per_fold,
        )

    features: list[Importance] = []
    modalities: list[Importance] = []
    for m, modality in enumerate(MODALITIES):
        for name in names[m]:
            drops = [fold[1].get(name, []) for fold in folds]
            features.append(importance(name, modality, drops, per_feature.get(name), total_f))
        drops = [fold[2].get(modality, []) for fold in folds]
        modalities.append(importance(modality, modality, drops, per_modality.get(modality), total_m))
    return GlobalView(
        metric=metric,
        fold_scores=[float(fold[0]) for fold in folds],
        permutation_folds=len(folds),
        features=features,
        modalities=modalities,
        agreement=agreement(features, modalities),
        **about,
    )


def _ranks(values: np.ndarray) -> np.ndarray:
    """Rank 0 = the most important; ties share their mean rank."""
    from scipy.stats import rankdata

    return rankdata(-values) - 1


def agreement(features: list[Importance], modalities: list[Importance]) -> Agreement | None:
    both = [f for f in features if f.attribution is not None and f.permutation is not None]
    if not both:
        return None
    attr = np.array([f.attribution for f in both], dtype=float)
    perm = np.array([f.permutation for f in both], dtype=float)
    ra, rp = _ranks(attr), _ranks(perm)
    varies = np.ptp(ra) > 0 and np.ptp(rp) > 0
    rho = float(np.corrcoef(ra, rp)[0, 1]) if varies else None
    k, half = min(TOP_K, max(1, len(both) // 2)), len(both) / 2
    disagree = [f.name for f, a, p in zip(both, ra, rp, strict=True) if (a < k and p >= half) or (p < k and a >= half)]
    by_attr = max(modalities, key=lambda m: m.attribution or 0.0)
    by_perm = max(modalities, key=lambda m: -math.inf if m.permutation is None else m.permutation)
    return Agreement(
        spearman=rho,
        features=len(both),
        top_k=k,
        top_modality_attribution=by_attr.name,
        top_modality_permutation=by_perm.name,
        top_features_attribution=[both[i].name for i in np.argsort(ra, kind="stable")[:k]],
        top_features_permutation=[both[i].name for i in np.argsort(rp, kind="stable")[:k]],
        disagree=disagree,
    )


# --- reading it ------------------------------------------------------------------------------------------


def _strength(rho: float) -> str:
    return "strong" if abs(rho) >= 0.7 else "moderate" if abs(rho) >= 0.4 else "weak"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def findings(view: GlobalView, metric_name: str | None = None) -> list[str]:
    """The view in sentences, every one computed from it: which modalities carry the signal, and where the two
    views disagree (what the model card and the plugin page print)."""
    out = []
    metric = metric_name or view.metric
    if view.permutation_folds:
        n = view.permutation_folds
        carrying = [MODALITY_NAMES[m.name] for m in view.modalities if m.carries_signal]
        rest = [MODALITY_NAMES[m.name] for m in view.modalities if not m.carries_signal]
        if not carrying:
            best = max(view.modalities, key=lambda m: -math.inf if m.permutation is None else m.permutation)
            out.append(
                f"By permutation, no modality carries a measurable signal: shuffling none of them lowered {metric} "
                f"in all {n} folds by more than twice the standard error"
                + (
                    f" (the largest mean drop, {MODALITY_NAMES[best.name]}'s {best.permutation:+.4f}, came in "
                    f"{best.positive_folds} of {n} folds)."
                    if best.permutation is not None and best.permutation > 0
                    else "; shuffling any of them lowered it by nothing on average."
                )
            )
        else:
            out.append(
                f"By permutation, the signal is carried by **{_join(carrying)}**: shuffling "
                f"{'it' if len(carrying) == 1 else 'each'} lowered {metric} in all {n} folds, by more than twice the"
                " standard error" + (f"; shuffling {_join(rest)} did not." if rest else ".")
            )
    if view.attribution_method:
        ranked = sorted(view.modalities, key=lambda m: -(m.attribution_share or 0.0))
        out.append(
            f"By attributions, {MODALITY_NAMES[ranked[0].name]} draws the largest share of mean |attribution| "
            f"({', '.join(f'{MODALITY_NAMES[m.name]} {m.attribution_share or 0.0:.0%}' for m in ranked)})."
        )
        idle = [
            m
            for m in ranked
            if (m.attribution_share or 0.0) >= SENSITIVE_SHARE and m.permutation is not None and m.permutation <= 0
        ]
        if idle:
            out.append(
                f"{_join([MODALITY_NAMES[m.name] for m in idle]).capitalize()} "
                f"draw{'s' if len(idle) == 1 else ''} "
                f"{_join([f'{m.attribution_share or 0.0:.0%}' for m in idle])} of the attribution, yet shuffling "
                f"{'it' if len(idle) == 1 else 'them'} did not lower {metric} on average "
                f"({', '.join(f'{m.permutation or 0.0:+.4f}' for m in idle)}): the model is sensitive to "
                f"{'it' if len(idle) == 1 else 'them'} without measurable skill from {'it' if len(idle) == 1 else 'them'}."
            )
    a = view.agreement
    if a is not None:
        top_a, top_p = MODALITY_NAMES[a.top_modality_attribution], MODALITY_NAMES[a.top_modality_permutation]
        if a.same_top_modality:
            out.append(f"The two views agree on the top modality: {top_a}.")
        else:
            out.append(
                f"The two views **disagree** on the top modality: attributions put the most weight on {top_a}, "
                f"shuffling {top_p} costs the most {metric}."
            )
        if a.spearman is not None:
            relation = "agreement" if a.spearman >= 0 else "inverse relation"
            out.append(
                f"Feature ranks: Spearman ρ = {a.spearman:+.2f} over {a.features} features "
                f"({_strength(a.spearman)} {relation})."
            )
        if a.disagree:
            out.append(f"In one view's top {a.top_k} but in the other's bottom half: {', '.join(a.disagree)}.")
        else:
            out.append(f"No feature is in one view's top {a.top_k} and in the other's bottom half.")
    return out


# --- the picture ---------------------------------------------------------------------------------------------


def plot(view: GlobalView, path: Path, top: int = 15) -> Path:
    """Per modality (attribution share; permutation drop ± sd) and the `top` features by either view."""
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend or figure registry

    colors = {"micro": "#1f77b4", "safe": "#ff7f0e", "macro": "#2ca02c"}
    fig = Figure(figsize=(15, 5.5))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 2.2]})
    labels = [MODALITY_NAMES[m.name] for m in view.modalities]
    ax = axes[0]
    ax.bar(
        labels, [m.attribution_share or 0.0 for m in view.modalities], color=[colors[m.name] for m in view.modalities]
    )
    ax.set_title("mean |attribution| share (test window)" if view.attribution_method else "attributions: not computed")
    ax.set_ylabel("share")
    ax = axes[1]
    ax.bar(
        labels,
        [m.permutation or 0.0 for m in view.modalities],
        yerr=[m.permutation_sd or 0.0 for m in view.modalities],
        color=[colors[m.name] for m in view.modalities],
        capsize=4,
    )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title(f"permutation: drop of {view.metric} ({view.permutation_folds} folds)")
    ax = axes[2]
    order = sorted(
        view.features,
        key=lambda f: -max((f.attribution_share or 0.0) / _max_share(view), (f.permutation or 0.0) / _max_perm(view)),
    )[:top][::-1]
    y = np.arange(len(order))
    ax.barh(y + 0.2, [(f.attribution_share or 0.0) / _max_share(view) for f in order], 0.4, label="attribution")
    ax.barh(
        y - 0.2,
        [(f.permutation or 0.0) / _max_perm(view) for f in order],
        0.4,
        xerr=[(f.permutation_sd or 0.0) / _max_perm(view) for f in order],
        label="permutation drop",
        capsize=2,
    )
    ax.set_yticks(y, [f"{f.name} ({MODALITY_NAMES[f.modality]})" for f in order], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_title(f"top {len(order)} features, each view scaled to its largest")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _max_share(view: GlobalView) -> float:
    return max((f.attribution_share or 0.0 for f in view.features), default=0.0) or 1.0


def _max_perm(view: GlobalView) -> float:
    return max((abs(f.permutation or 0.0) for f in view.features), default=0.0) or 1.0
