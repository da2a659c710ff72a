"""Windows, temporal splits and fitting for SofareM3 — leakage-free by construction.

- Rows come from `dataset.training_frame` (validated days only), ordered by open_time.
- Splits are contiguous in time (train, validation, test), with `purge` rows dropped at the end of
  each earlier part, so no target of one part is computed from prices of the next.
- A window of `lookback` rows ends at row t and predicts row t's target (the return from t's close
  to the close `horizon` bars later). It never crosses a split boundary or a gap in the candle grid,
  and its micro features are all present.
- Standardisation statistics come from the rows the model is fitted on, never from later rows.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from sofare.data.features import FeatureSpec
from sofare.errors import InputError

if TYPE_CHECKING:
    from sofare.config import Config
    from sofare.training.model import SofareM3


# --- splits ------------------------------------------------------------------------------------


def purge_rows(cfg: Config) -> int:
    """Rows dropped between parts: at least the longest lookback + the horizon."""
    needed = max(cfg.training.search_space.lookback) + cfg.features.horizon
    return max(cfg.training.purge_bars or 0, needed)


def temporal_split(n: int, train: float, validation: float, purge: int) -> dict[str, range]:
    """Row ranges of train, validation and test, in time order, `purge` rows apart."""
    b1, b2 = int(n * train), int(n * (train + validation))
    parts = {"train": range(b1 - purge), "validation": range(b1, b2 - purge), "test": range(b2, n)}
    for name, rows in parts.items():
        if len(rows) <= 0:
            raise InputError(f"not enough rows ({n}) for a {name} part after a purge of {purge} rows")
    return parts


def walk_forward_splits(
    n: int, folds: int, mode: str, validation: float, test: float, purge: int
) -> list[dict[str, range]]:
    """Folds whose test windows tile the last `folds * test` share of the rows, oldest first.

    expanding: every fold trains from row 0; sliding: the training part keeps the first fold's length.
    """
    test_len = int(n * test / folds) if folds else 0
    val_len = int(n * validation)
    out = []
    first_train_end = n - folds * test_len - val_len - 2 * purge
    for k in range(folds):
        test_start = n - (folds - k) * test_len
        val_start = test_start - purge - val_len
        train_end = val_start - purge
        train_start = 0 if mode == "expanding" else max(0, train_end - first_train_end)
        if train_end - train_start <= 0:
            raise InputError(f"not enough rows ({n}) for {folds} walk-forward folds")
        out.append(
            {
                "train": range(train_start, train_end),
                "validation": range(val_start, test_start - purge),
                "test": range(test_start, test_start + test_len),
            }
        )
    return out


# --- windows -------------------------------------------------------------------------------------


@dataclass
class Scaler:
    """Per-column standardisation fitted on training rows; NaN (a series not yet published) -> 0."""

    columns: list[str]
    mean: np.ndarray
    std: np.ndarray
    ret_mean: float
    ret_std: float

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: list[str], rows: np.ndarray) -> Scaler:
        values = frame[columns].to_numpy(dtype=np.float64)[rows]
        mean = np.nan_to_num(np.nanmean(values, axis=0)) if len(values) else np.zeros(len(columns))
        std = np.nan_to_num(np.nanstd(values, axis=0)) if len(values) else np.ones(len(columns))
        std[std < 1e-12] = 1.0
        ret = frame["target_return"].to_numpy(dtype=np.float64)[rows]
        ret = ret[np.isfinite(ret)]
        return cls(columns, mean, std, float(ret.mean()), float(ret.std() or 1.0))

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        values = (frame[self.columns].to_numpy(dtype=np.float64) - self.mean) / self.std
        return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "ret_mean": self.ret_mean,
            "ret_std": self.ret_std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scaler:
        return cls(list(d["columns"]), np.asarray(d["mean"]), np.asarray(d["std"]), d["ret_mean"], d["ret_std"])


def window_ends(
    frame: pd.DataFrame, spec: FeatureSpec, rows: range, lookback: int, delta: timedelta, need_target: bool = True
) -> np.ndarray:
    """Rows t in `rows` where a full, gap-free window [t-lookback+1, t] lies inside `rows`."""
    times = pd.to_datetime(frame["open_time"], utc=True).to_numpy()
    micro_ok = frame[list(spec.micro)].notna().all(axis=1).to_numpy()
    t = np.arange(rows.start + lookback - 1, rows.stop)
    if len(t) == 0:
        return t
    span_ok = (times[t] - times[t - lookback + 1]) == np.timedelta64(int(delta.total_seconds() * (lookback - 1)), "s")
    bad = np.concatenate([[0], np.cumsum(~micro_ok)])
    clean = (bad[t + 1] - bad[t - lookback + 1]) == 0
    ok = span_ok & clean
    if need_target:
        ok &= frame["target_return"].notna().to_numpy()[t]
    return t[ok]


@dataclass
class Windows:
    """Standardised feature matrix + the row index where each sample's window ends."""

    x: np.ndarray  # [rows, features], scaled
    ends: np.ndarray
    y_up: np.ndarray
    y_ret: np.ndarray  # standardised returns
    lookback: int
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> column indices
    _split: tuple[Any, list[np.ndarray]] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> int:
        return int(self.ends[i])

    def __getitems__(self, positions: list[int]) -> tuple[Any, ...]:
        return self.batch(self.ends[np.asarray(positions)])

    def batch(self, ends: np.ndarray) -> tuple[Any, ...]:
        """One batch, gathered at once: [len(ends), lookback, features] per modality, then the targets."""
        import torch

        idx = ends[:, None] + np.arange(-self.lookback + 1, 1)[None, :]
        parts = [torch.from_numpy(columns[idx]) for columns in self._modalities()]
        return (*parts, torch.from_numpy(self.y_up[ends]).long(), torch.from_numpy(self.y_ret[ends]))

    def _modalities(self) -> list[np.ndarray]:
        """x split once into one contiguous [rows, features] array per modality (micro, safe, macro), so a
        batch is one fancy-index per modality, without copying the other modalities' columns."""
        key = (id(self.x), self.x.shape)
        if self._split is None or self._split[0] != key:
            self._split = (key, [np.ascontiguousarray(self.x[:, self.groups[g]]) for g in ("micro", "safe", "macro")])
        return self._split[1]


def column_groups(spec: FeatureSpec) -> dict[str, np.ndarray]:
    columns = list(spec.columns)
    return {
        "micro": np.array([columns.index(c) for c in spec.micro]),
        "safe": np.array([columns.index(c) for c in spec.safe_haven]),
        "macro": np.array([columns.index(c) for c in spec.macro]),
    }


def make_windows(frame: pd.DataFrame, spec: FeatureSpec, scaler: Scaler, ends: np.ndarray, lookback: int) -> Windows:
    ret = frame["target_return"].to_numpy(dtype=np.float64)
    y_ret = ((np.nan_to_num(ret) - scaler.ret_mean) / scaler.ret_std).astype(np.float32)
    y_up = np.nan_to_num(frame["target_up"].to_numpy(dtype=np.float64)).astype(np.int64)
    return Windows(scaler.transform(frame), ends, y_up, y_ret, lookback, column_groups(spec))


# --- fitting -------------------------------------------------------------------------------------


def seed_everything(seed: int, threads: int) -> None:
    import logging
    import warnings

    import lightning as L
    import torch

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    torch.set_num_threads(threads)
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True)


def loader(windows: Windows, batch_size: int, shuffle: bool, seed: int) -> Any:
    import torch
    from torch.utils.data import DataLoader, Dataset

    generator = torch.Generator().manual_seed(seed)
    # Windows is a map-style dataset (__len__, __getitem__, __getitems__), all DataLoader uses, without torch's base
    dataset = cast("Dataset[Any]", windows)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=lambda b: b, num_workers=0
    )


class History:
    """Per-epoch losses (the learning curves), collected from Lightning's logged metrics."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def callback(self) -> Any:
        import lightning as L

        history = self

        class _Collect(L.Callback):
            def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
                row = {"epoch": trainer.current_epoch + 1}
                row.update(
                    {
                        k: float(v)
                        for k, v in trainer.callback_metrics.items()
                        if k in ("train_loss", "val_loss", "val_acc", "val_ce")
                    }
                )
                history.epochs.append(row)

        return _Collect()


@dataclass
class FitResult:
    model: SofareM3
    history: History
    best_epoch: int
    best_val_loss: float | None
    seconds: float


def fit(
    cfg: Config,
    spec: FeatureSpec,
    hyper: dict[str, Any],
    train: Windows,
    validation: Windows | None,
    max_epochs: int,
    seed: int,
    callbacks: list[Any] | None = None,
) -> FitResult:
    """Train SofareM3. With a validation set: early stopping, best weights restored; without: exactly
    `max_epochs` epochs (the final fit, using the epoch count tuning found best)."""
    import time

    import lightning as L

    from sofare.training.model import SofareM3

    seed_everything(seed, cfg.training.threads)
    t = cfg.training
    model = SofareM3(
        len(spec.micro), len(spec.safe_haven), len(spec.macro), hyper, t.loss_weight, t.huber_delta, t.warmup_fraction
    )
    history = History()
    cbs = [history.callback(), *(callbacks or [])]
    best = None
    with tempfile.TemporaryDirectory(prefix="sofare-fit-") as scratch:
        if validation is not None:
            best = L.pytorch.callbacks.ModelCheckpoint(
                dirpath=scratch, monitor="val_loss", mode="min", save_top_k=1, save_weights_only=True
            )
            cbs += [L.pytorch.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=t.patience), best]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=max_epochs,
            deterministic=True,
            gradient_clip_val=t.gradient_clip,
            callbacks=cbs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=validation is not None,
            default_root_dir=scratch,
            num_sanity_val_steps=0,
        )
        began = time.perf_counter()
        trainer.fit(
            model,
            loader(train, hyper["batch_size"], True, seed),
            loader(validation, 256, False, seed) if validation is not None else None,
        )
        seconds = time.perf_counter() - began
        best_epoch, best_loss = len(history.epochs), None
        if best is not None and best.best_model_path:
            import torch

            model.load_state_dict(torch.load(best.best_model_path, weights_only=True)["state_dict"])
            losses = [e.get("val_loss", math.inf) for e in history.epochs]
            best_epoch = int(np.argmin(losses)) + 1
            best_loss = float(min(losses))
    model.eval()
    return FitResult(model, history, best_epoch, best_loss, seconds)


def predict(model: SofareM3, windows: Windows, scaler: Scaler, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """prob_up and expected log return (unstandardised) for every window."""
    parts = (windows.batch(windows.ends[lo : lo + batch])[:3] for lo in range(0, len(windows), batch))
    return predict_inputs(model, parts, scaler)


def predict_inputs(
    model: SofareM3, batches: Iterable[tuple[Any, ...]], scaler: Scaler
) -> tuple[np.ndarray, np.ndarray]:
    """prob_up and expected log return (unstandardised) for batches of (micro, safe, macro) windows, tensors or
    arrays [windows, lookback, features] (the global view feeds shuffled copies of them)."""
    import torch

    model.eval()
    probs, rets = [], []
    with torch.no_grad():
        for micro, safe, macro in batches:
            logits, ret = model(*(torch.as_tensor(x) for x in (micro, safe, macro)))
            probs.append(torch.softmax(logits, -1)[:, 1].numpy())
            rets.append(ret.numpy() * scaler.ret_std + scaler.ret_mean)
    if not probs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(probs).astype(np.float64), np.concatenate(rets).astype(np.float64)
