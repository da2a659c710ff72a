"""Datasets for training: features and targets read from the warehouse, validated days only."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sofare.data import warehouse
from sofare.data.features import feature_spec
from sofare.validation import suites

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Engine

    from sofare.config import Config


def training_frame(
    cfg: Config,
    engine: Engine,
    start: datetime,
    end: datetime,
    symbol: str | None = None,
    interval: str | None = None,
) -> pd.DataFrame:
    """Feature rows of [start, end); UnvalidatedIntervalError names any day not validated by every suite."""
    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    with engine.connect() as conn:
        suites.require_validated(conn, cfg, start, end, symbol, interval)
        return warehouse.read_features(
            conn, warehouse.features_table(feature_spec(cfg).columns), symbol, interval, start, end
        )


def validated_span(conn: Any, cfg: Config, symbol: str | None = None, interval: str | None = None) -> tuple[date, date]:
    """The latest run of consecutive days that passed every suite (the default training window)."""
    import sqlalchemy as sa

    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    v = warehouse.validated_days
    passed: set[date] | None = None
    for suite in suites.SUITES:
        days = {
            row.day
            for row in conn.execute(
                sa.select(v.c.day).where(
                    v.c.suite == suite, v.c.scope == warehouse.scope_of(suite, symbol, interval), v.c.status == "passed"
                )
            )
        }
        passed = days if passed is None else passed & days
    if not passed:
        raise suites.UnvalidatedIntervalError(
            f"no day of {symbol} {interval} passed every validation suite; run `sofare validate` first"
        )
    last = max(passed)
    first = last
    while first - timedelta(days=1) in passed:
        first -= timedelta(days=1)
    return first, last
