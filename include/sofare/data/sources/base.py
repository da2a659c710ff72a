"""One interface for every market-data source, its errors, and retries with exponential back-off.

A source returns *raw* rows in canonical columns; the ingest layer validates them and computes when
each row became visible. Live adapters turn their client library's failures into three kinds:
RateLimitedError and TransientSourceError are retried with back-off, anything else is final.
"""

from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, ClassVar, TypeVar

from sofare.errors import InputError, PermanentError, TransientError

if TYPE_CHECKING:
    import pandas as pd

    from sofare.config import Config, HttpConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# Canonical raw columns per modality (what every source returns).
CANDLE_COLUMNS = ("open_time", "open", "high", "low", "close", "volume", "quote_volume", "trade_count")
SAFE_HAVEN_COLUMNS = ("ticker", "date", "open", "high", "low", "close", "volume")
MACRO_COLUMNS = ("series_id", "observation_date", "value", "realtime_start")


class SourceError(PermanentError):
    """A source could not deliver the requested data (it rejected the request, needs a key, has no
    such series); the message says which and why. Retrying asks the same question again."""


class MalformedDataError(SourceError):
    """The source answered, but with data that does not have the expected shape or values."""


class TransientSourceError(TransientError):
    """A failure worth retrying: timeouts, dropped connections, 5xx answers (not a SourceError: Airflow
    retries it with back-off)."""


class RateLimitedError(TransientSourceError):
    """The source asked us to slow down (HTTP 429/418); wait `retry_after` seconds if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class FetchRequest:
    """What to fetch: one modality over the half-open UTC interval [start, end)."""

    modality: str
    start: datetime
    end: datetime
    symbol: str = ""
    interval: str = ""
    tickers: tuple[str, ...] = field(default_factory=tuple)
    series: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise InputError("FetchRequest start and end must be timezone-aware (UTC)")
        if self.end <= self.start:
            raise InputError(f"empty interval: start {self.start} is not before end {self.end}")


def trading_dates(start: datetime, end: datetime) -> tuple[date, date]:
    """Dates [first, last) that belong to the UTC interval [start, end): those whose midnight it holds."""

    def ceil_day(moment: datetime) -> date:
        return (moment.astimezone(UTC) + timedelta(days=1) - timedelta(microseconds=1)).date()

    return ceil_day(start), ceil_day(end)


class Source(ABC):
    """A market-data source. `fetch` dispatches to the modality it provides."""

    name: ClassVar[str]
    modalities: ClassVar[frozenset[str]]

    def __init__(self, cfg: Config, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.sleep = sleep

    def fetch(self, request: FetchRequest) -> pd.DataFrame:
        if request.modality not in self.modalities:
            raise SourceError(
                f"source {self.name!r} does not provide {request.modality!r} "
                f"(it provides {', '.join(sorted(self.modalities))})"
            )
        return self._fetch(request)

    @abstractmethod
    def _fetch(self, request: FetchRequest) -> pd.DataFrame: ...

    def with_retries(self, what: str, call: Callable[[], T]) -> T:
        return with_retries(what, call, self.cfg.sources.http, self.sleep)


def backoff_delay(attempt: int, http: HttpConfig) -> float:
    """Exponential back-off with full jitter: uniform in [0, base * 2**attempt], capped."""
    ceiling = min(http.backoff_max_seconds, http.backoff_base_seconds * (2**attempt))
    return random.uniform(ceiling / 2, ceiling)


def with_retries(what: str, call: Callable[[], T], http: HttpConfig, sleep: Callable[[float], None]) -> T:
    """Run `call`, retrying transient failures up to http.max_attempts times with back-off."""
    for attempt in range(http.max_attempts):
        try:
            return call()
        except TransientSourceError as exc:
            if attempt == http.max_attempts - 1:
                raise TransientSourceError(f"{what}: gave up after {http.max_attempts} attempts: {exc}") from exc
            delay = backoff_delay(attempt, http)
            if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
                delay = min(max(delay, exc.retry_after), http.backoff_max_seconds)
            log.warning("%s: attempt %d failed (%s); retrying in %.2fs", what, attempt + 1, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def frame(columns: tuple[str, ...], rows: list[tuple] | list[list]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(rows, columns=list(columns))
