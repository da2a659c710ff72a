"""Prediction outcomes: what the market did after each logged prediction.

An outcome is written once the candle closing at `as_of + horizon` bars is in the warehouse *and* known by
the monitored hour (`known_by`): a replay of history never reads the future. Until then the prediction is
pending, never guessed or forward-filled. Filling is idempotent (only missing outcomes are computed; the
write is an upsert by prediction_id) and backfillable by interval.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from sofare.config import interval_delta
from sofare.data import warehouse as wh

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from sofare.config import Config

log = logging.getLogger(__name__)


def _unfilled(conn: sa.Connection, start: datetime | None, end: datetime | None) -> pd.DataFrame:
    p, o = wh.predictions, wh.prediction_outcomes
    query = (
        sa.select(p.c.prediction_id, p.c.symbol, p.c.interval, p.c.as_of, p.c.horizon, p.c.prob_up)
        .select_from(p.outerjoin(o, o.c.prediction_id == p.c.prediction_id))
        .where(o.c.prediction_id.is_(None))
    )
    if start is not None:
        query = query.where(p.c.as_of > start)
    if end is not None:
        query = query.where(p.c.as_of <= end)
    return wh.query_frame(conn, query)


def _closes(conn: sa.Connection, symbol: str, interval: str, first: datetime, last: datetime) -> pd.Series:
    """Close by candle close time (open_time + interval) for candles opening in [first, last]."""
    c = wh.candles
    frame = wh.query_frame(
        conn,
        sa.select(c.c.open_time, c.c.close).where(
            c.c.symbol == symbol, c.c.interval == interval, c.c.open_time >= first, c.c.open_time <= last
        ),
    )
    if frame.empty:
        return pd.Series(dtype=float)
    closes = pd.to_datetime(frame["open_time"], utc=True) + interval_delta(interval)
    return pd.Series(frame["close"].to_numpy(dtype=float), index=closes)


def compute(pending: pd.DataFrame, closes: pd.Series, delta: Any, known_by: datetime) -> pd.DataFrame:
    """Outcomes of `pending` predictions (one symbol and interval) from closes indexed by close time; only
    those whose target close time is <= `known_by` and present. Pure: the tests call it directly."""
    as_of = pd.to_datetime(pending["as_of"], utc=True)
    target_time = as_of + pd.to_timedelta(pending["horizon"].astype(int).to_numpy() * delta.total_seconds(), unit="s")
    base = closes.reindex(as_of).to_numpy()
    previous = closes.reindex(as_of - delta).to_numpy()
    target = closes.reindex(target_time).to_numpy()
    ok = np.isfinite(base) & np.isfinite(target) & (target_time <= pd.Timestamp(known_by)).to_numpy()
    if not ok.any():
        return pd.DataFrame()
    realised = np.log(target[ok] / base[ok])
    up = (realised > 0).astype(int)
    predicted_up = pending["prob_up"].to_numpy(dtype=float)[ok] > 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        last = np.log(base[ok] / previous[ok])
    return pd.DataFrame(
        {
            "prediction_id": pending["prediction_id"].to_numpy()[ok],
            "as_of": as_of[ok],
            "target_time": target_time[ok],
            "base_close": base[ok],
            "target_close": target[ok],
            "realised_return": realised,
            "realised_up": up,
            "correct": predicted_up == up.astype(bool),
            "last_return": np.where(np.isfinite(last), last, np.nan),
            "filled_at": pd.Timestamp.now(tz="UTC"),
        }
    )


def fill(
    cfg: Config,
    engine: Engine,
    start: datetime | None = None,
    end: datetime | None = None,
    known_by: datetime | None = None,
) -> dict[str, Any]:
    """Fill the missing outcomes of predictions with as_of in (start, end] (None: unbounded) from candles that
    closed by `known_by` (default: now). Returns how many were filled and how many stay pending."""
    known_by = known_by or datetime.now(UTC)
    filled: set[str] = set()
    with wh.transaction(engine) as conn:
        todo = _unfilled(conn, start, end)
        for (symbol, interval), group in todo.groupby(["symbol", "interval"], sort=False):
            delta = interval_delta(interval)
            as_of = pd.to_datetime(group["as_of"], utc=True)
            first = (as_of.min() - 2 * delta).to_pydatetime()
            last = (as_of.max() + (int(group["horizon"].max()) - 1) * delta).to_pydatetime()
            rows = compute(group, _closes(conn, symbol, interval, first, last), delta, known_by)
            if not rows.empty:
                wh.upsert(conn, wh.prediction_outcomes, rows)
                filled.update(rows["prediction_id"])
    waiting = todo[~todo["prediction_id"].isin(filled)] if len(todo) else todo
    oldest = pd.to_datetime(waiting["as_of"], utc=True).min().isoformat() if len(waiting) else None
    log.info("outcomes: %d filled, %d pending (known by %s)", len(filled), len(waiting), known_by.isoformat())
    return {"filled": len(filled), "pending": len(waiting), "oldest_pending": oldest, "known_by": known_by.isoformat()}
