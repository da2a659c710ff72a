"""Live quality by model version and variant over rolling windows, beside persistence and always-up on the
very same hours, with moving-block bootstrap 95% intervals (hourly outcomes are autocorrelated).

An hour predicted many times (every client calling /predict_latest gets the same window) counts once, with
its mean prob_up: counting it per request would shrink the intervals without adding evidence. Fewer than
`monitoring.min_outcomes` hours with an outcome is "insufficient": no number is reported then.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypedDict, cast

import numpy as np
import pandas as pd
import sqlalchemy as sa

from sofare.contracts import LiveQuality, LiveScore
from sofare.data import warehouse as wh
from sofare.training.evaluation import Predictions, block_indices, metric

if TYPE_CHECKING:
    from sofare.config import Config

COIN_BRIER = 0.25  # a constant prob_up of 0.5


def hours(conn: sa.Connection, cfg: Config, start: datetime, end: datetime) -> pd.DataFrame:
    """One row per (model_version, variant, as_of) in (start, end] for the configured market: mean prob_up,
    and the outcome when known (NaN while pending)."""
    p, o = wh.predictions, wh.prediction_outcomes
    frame = wh.query_frame(
        conn,
        sa.select(
            p.c.model_version,
            p.c.variant,
            p.c.as_of,
            p.c.prob_up,
            o.c.realised_up,
            o.c.realised_return,
            o.c.last_return,
        )
        .select_from(p.outerjoin(o, o.c.prediction_id == p.c.prediction_id))
        .where(
            p.c.symbol == cfg.market.symbol, p.c.interval == cfg.market.interval, p.c.as_of > start, p.c.as_of <= end
        ),
    )
    if frame.empty:
        return frame
    for column in ("realised_up", "realised_return", "last_return"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return (
        frame.groupby(["model_version", "variant", "as_of"], as_index=False)
        .agg(
            prob_up=("prob_up", "mean"),
            n_predictions=("prob_up", "size"),
            realised_up=("realised_up", "first"),
            realised_return=("realised_return", "first"),
            last_return=("last_return", "first"),
        )
        .sort_values(["model_version", "variant", "as_of"])
    )


def _brier(prob: np.ndarray, up: np.ndarray) -> float:
    return float(np.mean((prob - up) ** 2))


def ece(prob: np.ndarray, up: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean prob - up rate| per equal-width bin, weighted by the bin's share."""
    index = np.minimum((prob * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(index):
        inside = index == b
        total += inside.mean() * abs(prob[inside].mean() - up[inside].mean())
    return float(total)


class Scores(TypedDict):
    """What `scores` gives: LiveQuality's metric fields (None: not computable on these hours)."""

    accuracy: LiveScore | None
    roc_auc: LiveScore | None
    brier: LiveScore | None
    persistence_accuracy: LiveScore | None
    always_up_accuracy: LiveScore | None
    vs_persistence: LiveScore | None
    vs_coin_brier: LiveScore | None
    ece: float


class _Window(TypedDict):
    """The LiveQuality fields of one (version, variant, window), whatever its status."""

    model_version: str
    variant: str
    window: str
    start: str
    end: str
    n: int
    pending: int


def scores(prob: np.ndarray, up: np.ndarray, last_return: np.ndarray, samples: int, block: int, seed: int) -> Scores:
    """Model, persistence and always-up on the same hours; differences paired on the same resamples."""
    up = up.astype(int)
    persistence_up = (np.nan_to_num(last_return, nan=0.0) > 0).astype(float)  # unknown last bar: "down", as training
    zeros = np.zeros(len(up))

    def statistics(i: np.ndarray) -> np.ndarray:
        y, pr, pe = up[i], prob[i], persistence_up[i]
        accuracy = metric("accuracy", y, zeros[i], Predictions(pr, zeros[i]), 0.5)
        persistence = metric("accuracy", y, zeros[i], Predictions(pe, zeros[i]), 0.5)
        brier = _brier(pr, y)
        return np.array(
            [
                accuracy,
                metric("roc_auc", y, zeros[i], Predictions(pr, zeros[i]), 0.5),
                brier,
                persistence,
                float(y.mean()),
                accuracy - persistence,
                brier - COIN_BRIER,
            ]
        )

    names = (
        "accuracy",
        "roc_auc",
        "brier",
        "persistence_accuracy",
        "always_up_accuracy",
        "vs_persistence",
        "vs_coin_brier",
    )
    point = statistics(np.arange(len(up)))
    draws = np.array([statistics(i) for i in block_indices(len(up), block, samples, seed)])
    out: dict[str, LiveScore | None] = {}
    for k, name in enumerate(names):
        column = draws[:, k][np.isfinite(draws[:, k])]
        if not np.isfinite(point[k]) or not len(column):
            out[name] = None  # e.g. ROC-AUC when every hour went the same way
            continue
        low, high = np.percentile(column, [2.5, 97.5])
        out[name] = LiveScore(value=float(point[k]), ci_low=float(low), ci_high=float(high))
    # the loop above filled every interval key of Scores (`names`), ece is the last one
    return cast(Scores, {**out, "ece": ece(prob, up.astype(float))})


def live_quality(conn: sa.Connection, cfg: Config, at: datetime) -> list[LiveQuality]:
    """Every (model_version, variant) predicted in each configured window ending at `at`."""
    m = cfg.monitoring
    out = []
    for window, length in sorted(m.windows.items(), key=lambda kv: kv[1]):
        start = at - timedelta(hours=length)
        frame = hours(conn, cfg, start, at)
        if frame.empty:
            continue
        for (version, variant), group in frame.groupby(["model_version", "variant"], sort=True):
            known = group[group["realised_up"].notna()]
            common: _Window = {
                "model_version": str(version),
                "variant": str(variant),
                "window": window,
                "start": start.isoformat(),
                "end": at.isoformat(),
                "n": len(known),
                "pending": len(group) - len(known),
            }
            if len(known) < m.min_outcomes:
                out.append(LiveQuality(status="insufficient", **common))
                continue
            found = scores(
                known["prob_up"].to_numpy(float),
                known["realised_up"].to_numpy(float),
                known["last_return"].to_numpy(float),
                m.bootstrap_samples,
                m.bootstrap_block_bars,
                cfg.training.seed,
            )
            out.append(LiveQuality(status="ok", **common, **found))
    return out
