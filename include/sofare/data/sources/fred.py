"""The `fred` source: macro series with their realtime (vintage) dates, through fredapi.

Each observation comes with the date FRED first served that value (ALFRED realtime_start), so the
warehouse keeps every vintage and the as-of join sees only what was known at the time. fredapi reads
with urllib and folds HTTP errors into ValueError; the adapter gives it an opener of its own that sets
the timeout per call and keeps each answer's status, so failures are classified rather than guessed
(and nothing process-wide changes).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, timedelta
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError

from sofare.data.sources.base import (
    MACRO_COLUMNS,
    FetchRequest,
    MalformedDataError,
    RateLimitedError,
    Source,
    SourceError,
    TransientSourceError,
)
from sofare.errors import SofareError

if TYPE_CHECKING:
    import pandas as pd

    from sofare.config import Config

log = logging.getLogger(__name__)


def _fred_client(api_key: str, root_url: str, timeout: float) -> Any:
    """fredapi with this adapter's HTTP: a timeout on every call and the answer's HTTP status kept, through
    an opener of its own. (fredapi reads through urllib's process-wide opener, with no timeout, and folds
    HTTP errors into ValueError; installing an opener would change every other caller in the process.)"""
    from fredapi import Fred

    class _Fred(Fred):
        def __init__(self) -> None:
            super().__init__(api_key=api_key)
            self.root_url = root_url
            self.status: int | None = None
            self._opener = urllib.request.build_opener()

        def _Fred__fetch_data(self, url: str) -> ET.Element:  # overrides fredapi's private fetch (name-mangled)
            self.status = None
            try:
                with self._opener.open(url + "&api_key=" + self.api_key, timeout=timeout) as response:
                    self.status = response.status
                    return ET.fromstring(response.read())
            except HTTPError as exc:
                self.status = exc.code
                body = exc.read()
                try:
                    message = ET.fromstring(body).get("message")
                except ET.ParseError:
                    message = body[:200].decode(errors="replace")
                raise ValueError(message) from None

    return _Fred()


def _api_key(cfg: Config) -> str:
    key = os.environ.get(cfg.sources.fred.api_key_env)
    if key:
        return key
    try:
        from airflow.sdk import BaseHook

        key = BaseHook.get_connection(cfg.sources.fred.conn_id).password
    except Exception:  # noqa: BLE001 - no Airflow connection is a configuration problem, said below
        key = None
    if not key:
        raise SourceError(
            f"FRED needs an API key: set ${cfg.sources.fred.api_key_env} or the password of "
            f"Airflow connection {cfg.sources.fred.conn_id!r}"
        )
    return key


class FredSource(Source):
    name = "fred"
    modalities = frozenset({"macro"})

    def __init__(self, cfg: Config, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(cfg, sleep)
        self.fred = _fred_client(
            _api_key(cfg), cfg.sources.fred.base_url.rstrip("/") + "/fred", cfg.sources.http.timeout_seconds
        )

    def _classify(self, series_id: str, exc: Exception) -> SofareError:
        status = self.fred.status
        if isinstance(exc, (URLError, TimeoutError, ConnectionError)) and status is None:
            return TransientSourceError(f"FRED request for {series_id} failed: {exc}")
        if status == 429:
            return RateLimitedError(f"FRED rate limit for {series_id} (HTTP 429)")
        if status is not None and status >= 500:
            return TransientSourceError(f"FRED server error for {series_id} (HTTP {status})")
        if status is not None and status >= 400:
            return SourceError(f"FRED rejected {series_id} (HTTP {status}): {exc}")
        if isinstance(exc, (ET.ParseError, ValueError, KeyError, TypeError)):
            return MalformedDataError(f"FRED answer for {series_id} could not be read: {exc}")
        return TransientSourceError(f"FRED request for {series_id} failed: {type(exc).__name__}: {exc}")

    def _releases(self, series_id: str, first: str, last: str) -> pd.DataFrame:
        self.fred.status = None
        try:
            return self.fred.get_series_all_releases(series_id, realtime_start=first, realtime_end=last)
        except Exception as exc:
            raise self._classify(series_id, exc) from exc

    def _fetch(self, request: FetchRequest) -> pd.DataFrame:
        import pandas as pd

        # Values visible in [start, end) were first served on [start-1d, end-1d). FRED clips realtime
        # periods to the query window, so ask from one day earlier and drop rows clipped to it.
        query_start = request.start.astimezone(UTC).date() - timedelta(days=2)
        query_end = (request.end.astimezone(UTC) - timedelta(microseconds=1)).date() - timedelta(days=1)
        parts = []
        for series_id in request.series:
            raw = self.with_retries(
                f"FRED {series_id}", functools.partial(self._releases, series_id, str(query_start), str(query_end))
            )
            if raw.empty:
                continue
            missing = {"realtime_start", "date", "value"} - set(raw.columns)
            if missing:
                raise MalformedDataError(f"FRED answer for {series_id} lacks {sorted(missing)}")
            obs = pd.DataFrame(
                {
                    "series_id": series_id,
                    "observation_date": pd.to_datetime(raw["date"]).dt.date,
                    "value": pd.to_numeric(raw["value"], errors="coerce"),
                    "realtime_start": pd.to_datetime(raw["realtime_start"]),
                }
            )
            clipped = obs["realtime_start"].dt.date == query_start
            parts.append(obs[~clipped & obs["value"].notna()])
        if not parts:
            return pd.DataFrame(columns=list(MACRO_COLUMNS))
        return pd.concat(parts, ignore_index=True)
