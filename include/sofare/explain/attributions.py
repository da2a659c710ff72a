"""Signed per-feature, per-time-step attributions of SofareM3's prediction: Captum's Integrated Gradients.

What is explained (`TARGET`): the log-odds of the served P(up), i.e. `scale * (logit_up - logit_down) + bias`
with the version's Platt calibration (`contracts.Calibration`; identity when uncalibrated). P(up) is the
sigmoid of exactly this number, so a positive attribution pushed the answer towards "up".

Baseline (`BASELINE`): the all-zeros input in scaled space, which is the training mean of every feature
(`ModelMeta.inputs` standardises with the training scaler). Integrated Gradients then satisfies completeness:
the attributions of one window sum to `output - baseline_output`; Captum's convergence delta is the
remaining gap of the numerical integral (`steps` Gauss-Legendre points), reported per window.

Two entry points:

- `attribute(network, micro, safe, macro, steps=...)`: the network (a `SofareM3`, or the TorchScript file
  exported for explanation, `training.export.RUNTIME_FILES["explain"]`: anything called as
  `network(micro, safe, macro) -> (logits [B, 2], ret [B])` that autograd can differentiate) and its scaled
  inputs ([B, lookback, n] float32 each) -> `Attributions` per modality.
- `explain(network, meta, raw, steps=...)`: raw feature windows [B, lookback, len(meta.columns)] (what
  `ServedModel.predict_windows` takes), scaled with the version's scaler, attributions named by column.

`Attributions` summarises one window as the HTTP answer reports it: `top(i, k)`, `by_modality(i)`,
`by_time_step(i)`; and all windows as arrays for global views (`feature_importance()`: mean |attribution|
per column). Time steps are offsets from the window's last bar: t = 0 is the bar the prediction is made at,
t = -1 the one before, down to -(lookback - 1).

Integrated Gradients has no randomness: the same window and network give the same attributions (it still runs
under a forked, seeded torch RNG, so nothing stochastic could leak in and the caller's RNG is untouched).
Only torch, captum and numpy are imported, inside the functions (cold imports); no training code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sofare.contracts import MODALITIES, Calibration, ModelMeta

if TYPE_CHECKING:
    import torch

METHOD = "integrated_gradients"
TARGET = "prob_up_logit"
BASELINE = "zeros in scaled space (the training mean of every feature)"
DEFAULT_STEPS = 32

Network = Callable[..., Any]  # network(micro, safe, macro) -> (logits [B, 2], ret [B]); differentiable


@dataclass(frozen=True)
class Contribution:
    """One input cell's share of a prediction: a feature at a time step (offset from the last bar)."""

    feature: str
    modality: str
    t: int
    attribution: float


@dataclass(frozen=True)
class Attributions:
    """Integrated Gradients of `TARGET` for B windows.

    `values[g]` is [B, lookback, n_g] for each modality g in `contracts.MODALITIES`, `names[g]` its n_g feature
    names. `output`, `baseline_output` and `convergence_delta` are [B]; for each window,
    `sum(values) == output - baseline_output - convergence_delta` up to float error (completeness)."""

    method: str
    target: str
    baseline: str
    steps: int
    values: dict[str, np.ndarray]
    names: dict[str, tuple[str, ...]]
    output: np.ndarray
    baseline_output: np.ndarray
    convergence_delta: np.ndarray

    @property
    def windows(self) -> int:
        return len(self.output)

    @property
    def lookback(self) -> int:
        return int(next(iter(self.values.values())).shape[1])

    def total(self) -> np.ndarray:
        """[B]: the sum of every attribution of each window."""
        return np.asarray(sum(v.sum(axis=(1, 2)) for v in self.values.values()), dtype=np.float64)

    def by_modality(self, i: int = 0) -> dict[str, float]:
        """Window i's attributions summed per modality (micro, safe, macro)."""
        return {g: float(self.values[g][i].sum()) for g in MODALITIES}

    def by_time_step(self, i: int = 0) -> list[dict[str, float | int]]:
        """Window i's attributions summed per time step, oldest first: [{t, attribution}], t = 0 the last bar."""
        per_step = sum(self.values[g][i].sum(axis=1) for g in MODALITIES)
        offset = self.lookback - 1
        return [{"t": step - offset, "attribution": float(a)} for step, a in enumerate(np.asarray(per_step))]

    def top(self, i: int = 0, k: int = 10) -> list[Contribution]:
        """Window i's k (feature, time step) cells with the largest |attribution|, largest first."""
        cells: list[Contribution] = []
        offset = self.lookback - 1
        for g in MODALITIES:
            block = self.values[g][i]
            if block.size == 0:
                continue
            flat = np.abs(block).ravel()
            take = min(k, flat.size)
            for index in np.argpartition(-flat, take - 1)[:take]:
                step, column = divmod(int(index), block.shape[1])
                cells.append(Contribution(self.names[g][column], g, step - offset, float(block[step, column])))
        cells.sort(key=lambda c: (-abs(c.attribution), c.modality, c.feature, c.t))
        return cells[:k]

    def feature_importance(self) -> dict[str, float]:
        """Mean over windows of |attribution summed over time steps| per feature (a global view), by name."""
        out: dict[str, float] = {}
        for g in MODALITIES:
            per_feature = np.abs(self.values[g].sum(axis=1)).mean(axis=0) if self.windows else []
            out.update({name: float(v) for name, v in zip(self.names[g], per_feature, strict=True)})
        return out

    def modality_importance(self) -> dict[str, float]:
        """Mean over windows of |attribution summed per modality| (a global view)."""
        return {g: float(np.abs(self.values[g].sum(axis=(1, 2))).mean()) if self.windows else 0.0 for g in MODALITIES}


def _target(network: Network, calibration: Calibration) -> Callable[..., torch.Tensor]:
    def forward(micro: torch.Tensor, safe: torch.Tensor, macro: torch.Tensor) -> torch.Tensor:
        logits = network(micro, safe, macro)[0]
        return calibration.scale * (logits[:, 1] - logits[:, 0]) + calibration.bias

    return forward


def attribute(
    network: Network,
    micro: np.ndarray | torch.Tensor,
    safe: np.ndarray | torch.Tensor,
    macro: np.ndarray | torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    calibration: Calibration | None = None,
    names: Mapping[str, Sequence[str]] | None = None,
    internal_batch_size: int | None = None,
    seed: int = 0,
) -> Attributions:
    """Integrated Gradients of the calibrated P(up) log-odds for the scaled inputs (each [B, lookback, n_g]),
    from the zero baseline, with `steps` integration points. `names[g]` names modality g's features (default
    `g0, g1, ...`). A modality of width 0 is fed as one zero column (as export does) and reports none.
    `internal_batch_size` bounds how many of the B * steps points run in one forward pass (memory)."""
    import torch
    from captum.attr import IntegratedGradients

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tensors = tuple(torch.as_tensor(x, dtype=torch.float32) for x in (micro, safe, macro))
    widths = {g: int(x.shape[2]) for g, x in zip(MODALITIES, tensors, strict=True)}
    fed = tuple(x if x.shape[2] else torch.zeros(*x.shape[:2], 1) for x in tensors)
    baselines = tuple(torch.zeros_like(x) for x in fed)
    forward = _target(network, calibration or Calibration())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        values, delta = IntegratedGradients(forward).attribute(
            fed,
            baselines=baselines,
            n_steps=steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        with torch.no_grad():
            output = forward(*fed)
            base = forward(*baselines)
    chosen = names or {}
    return Attributions(
        method=METHOD,
        target=TARGET,
        baseline=BASELINE,
        steps=steps,
        values={g: v.detach().numpy()[:, :, : widths[g]].astype(np.float64) for g, v in zip(MODALITIES, values)},
        names={g: tuple(chosen.get(g, [f"{g}{j}" for j in range(widths[g])])) for g in MODALITIES},
        output=output.numpy().astype(np.float64),
        baseline_output=base.numpy().astype(np.float64),
        convergence_delta=delta.detach().numpy().astype(np.float64),
    )


def explain(
    network: Network,
    meta: ModelMeta,
    raw: np.ndarray,
    *,
    steps: int = DEFAULT_STEPS,
    internal_batch_size: int | None = None,
    seed: int = 0,
) -> Attributions:
    """Attributions for raw feature windows [B, meta.lookback, len(meta.columns)] (the served model's input):
    scaled with the version's scaler, split by modality, explained with the version's calibration, named by
    `meta.columns`. Raises `errors.InputError` on a wrong shape (as `meta.inputs` does)."""
    micro, safe, macro = meta.inputs(raw)
    names = {g: tuple(meta.columns[j] for j in meta.groups[g]) for g in MODALITIES}
    return attribute(
        network,
        micro,
        safe,
        macro,
        steps=steps,
        calibration=meta.calibration,
        names=names,
        internal_batch_size=internal_batch_size,
        seed=seed,
    )
