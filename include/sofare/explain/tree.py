"""SHAP's TreeExplainer for the gradient-boosted baseline (`training.evaluation.gbm`, fitted by `fit_gbm`).

The baseline reads one row per window (the features at the window's last bar), so its attributions are per
feature, not per time step. What is explained: the classifier's raw output, the log-odds of P(up) (scikit-learn's
`decision_function`), from TreeExplainer's expected value over the training rows the trees were grown on (path-
dependent: no background sample needed). Exact: each row's attributions sum to `output - expected_value` to float
error, which `TreeAttributions.gap()` reports. shap is a cold import: inside the function only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "tree_shap"
TARGET = "prob_up_logit"


@dataclass(frozen=True)
class TreeAttributions:
    """SHAP values [B, F] of the classifier's log-odds, named by `names`; `output` [B], `expected_value` scalar."""

    method: str
    target: str
    names: tuple[str, ...]
    values: np.ndarray
    output: np.ndarray
    expected_value: float

    def gap(self) -> np.ndarray:
        """[B]: sum of attributions - (output - expected_value); zero to float error (TreeSHAP is exact)."""
        return self.values.sum(axis=1) - (self.output - self.expected_value)

    def top(self, i: int = 0, k: int = 10) -> list[tuple[str, float]]:
        """Row i's k features with the largest |attribution|, largest first."""
        order = sorted(range(len(self.names)), key=lambda j: (-abs(self.values[i, j]), self.names[j]))
        return [(self.names[j], float(self.values[i, j])) for j in order[:k]]

    def feature_importance(self) -> dict[str, float]:
        """Mean |attribution| per feature over the rows (a global view)."""
        mean = np.abs(self.values).mean(axis=0) if len(self.values) else np.zeros(len(self.names))
        return {name: float(v) for name, v in zip(self.names, mean, strict=True)}


def explain_gbm(classifier: Any, x: np.ndarray, names: Sequence[str]) -> TreeAttributions:
    """TreeSHAP attributions of a fitted `HistGradientBoostingClassifier` (the `gbm` baseline's direction model)
    for rows `x` [B, F] named by `names`. Deterministic: the same rows and trees give the same values."""
    import shap

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"expected rows of {len(names)} features, got shape {x.shape}")
    explainer = shap.TreeExplainer(classifier)
    values = np.asarray(explainer.shap_values(x), dtype=np.float64)
    if values.ndim == 3:  # a per-class layout: the positive class
        values = values[..., 1] if values.shape[-1] == 2 else values[1]
    expected = float(np.ravel(explainer.expected_value)[-1])
    return TreeAttributions(
        method=METHOD,
        target=TARGET,
        names=tuple(names),
        values=values,
        output=np.asarray(classifier.decision_function(x), dtype=np.float64),
        expected_value=expected,
    )
