"""Request schemas of the prediction service and the one error a bad request raises.

`BadRequest` (the service answers 400) carries a message naming the field. `request_body` builds a
real /predict body from the warehouse (tests, benchmarks, the API document's example).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sofare.config import interval_delta
from sofare.data import warehouse
from sofare.errors import InputError

if TYPE_CHECKING:
    from sofare.config import Config

UTC = timezone.utc
FUTURE_TOLERANCE = timedelta(seconds=5)  # clock skew allowed for "the candle has closed"


class BadRequest(InputError):
    """The request is invalid; the message names the field."""


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UTCTime = Annotated[datetime, AfterValidator(_utc)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class Candle(_Strict):
    open_time: UTCTime
    open: Positive
    high: Positive
    low: Positive
    close: Positive
    volume: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SafeHavenBar(_Strict):
    ticker: str
    date: date
    open: Positive
    high: Positive
    low: Positive
    close: Positive
    volume: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    known_at: UTCTime


class MacroObservation(_Strict):
    series_id: str
    observation_date: date
    known_at: UTCTime
    value: Finite


class Window(_Strict):
    """One self-contained prediction request: enough candles for the features' warm-up plus the
    model's lookback; safe-haven bars and macro observations optional (else read from the warehouse)."""

    symbol: str = Field(min_length=1, max_length=20)
    interval: str
    candles: list[Candle] = Field(min_length=1)
    safe_haven: list[SafeHavenBar] | None = None
    macro: list[MacroObservation] | None = None


class LatestRequest(_Strict):
    symbol: str = Field(min_length=1, max_length=20)


class Batch(_Strict):
    windows: list[Window] = Field(min_length=1)


def request_body(cfg: Config, last_open: datetime, candles: int | None = None, context: bool = False) -> dict[str, Any]:
    """A /predict body from the warehouse: the candles up to `last_open` (inclusive; default: as many as
    one window needs), optionally with the safe-haven bars and macro observations known at its close."""
    symbol, interval = cfg.market.symbol, cfg.market.interval
    delta = interval_delta(interval)
    engine = warehouse.get_engine(cfg)
    with engine.connect() as conn:
        needed = cfg.features.warmup_bars + max(cfg.training.search_space.lookback) - 1
        frame = warehouse.read_candles_before(conn, symbol, interval, last_open + delta, candles or needed)
        body: dict[str, Any] = {"symbol": symbol, "interval": interval, "candles": [
            {"open_time": r["open_time"].isoformat(), **{k: float(r[k]) for k in ("open", "high", "low", "close", "volume")}}
            for r in frame.to_dict("records")]}
        if context:
            first = frame["open_time"].iloc[0].to_pydatetime()
            known = last_open + delta + timedelta(microseconds=1)
            safe = warehouse.read_safe_haven(conn, (first - timedelta(days=cfg.features.daily_context_days)).date(), known)
            macro = warehouse.read_macro(conn, first - timedelta(days=cfg.features.macro_context_days), known)
            body["safe_haven"] = [{"ticker": r["ticker"], "date": str(r["date"]), "known_at": r["known_at"].isoformat(),
                                   **{k: (None if r[k] != r[k] else float(r[k])) for k in ("open", "high", "low", "close", "volume")}}
                                  for r in safe.to_dict("records")]
            body["macro"] = [{"series_id": r["series_id"], "observation_date": str(r["observation_date"]),
                              "known_at": r["known_at"].isoformat(), "value": float(r["value"])}
                             for r in macro.to_dict("records")]
    return body
