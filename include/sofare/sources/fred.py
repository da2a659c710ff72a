"""The `fred` source: macro series with their realtime (vintage) dates, through fredapi.

Each observation comes with the date FRED first served that value (ALFRED realtime_start), so the
warehouse keeps every vintage and the as-of join sees only what was known at the time. fredapi reads
with urllib and folds HTTP errors into ValueError; the adapter installs an opener that enforces the
timeout and remembers each answer's status, so failures are classified rather than guessed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.error import URLError

from sofare.sources.base import (
    MACRO_COLUMNS,
    FetchRequest,
    MalformedDataError,
    RateLimitedError,
    Source,
    SourceError,
    TransientSourceError,
)

if TYPE_CHECKING:
    import pandas as pd

    from sofare.config import Config

log = logging.getLogger(__name__)
_last = threading.local()


class _StatusRecorder(urllib.request.BaseHandler):
    """Remembers the HTTP status of the last answer (runs before urllib raises HTTPError)."""

    handler_order = 100

    def http_response(self, request: Any, response: Any) -> Any:
        _last.status = response.status
        return response

    https_response = http_response


class _Timeouts(urllib.request.HTTPHandler):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def http_open(self, req: Any) -> Any:
        req.timeout = self.seconds
        return super().http_open(req)


class _TimeoutsTLS(urllib.request.HTTPSHandler):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def https_open(self, req: Any) -> Any:
        req.timeout = self.seconds
        return super().https_open(req)


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
        from fredapi import Fred

        seconds = cfg.sources.http.timeout_seconds
        urllib.request.install_opener(
            urllib.request.build_opener(_StatusRecorder(), _Timeouts(seconds), _TimeoutsTLS(seconds))
        )
        self.fred = Fred(api_key=_api_key(cfg))
        self.fred.root_url = cfg.sources.fred.base_url.rstrip("/") + "/fred"

    @staticmethod
    def _classify(series_id: str, exc: Exception) -> SourceError:
        status = getattr(_last, "status", None)
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
        _last.status = None
        try:
            return self.fred.get_series_all_releases(series_id, realtime_start=first, realtime_end=last)
        except Exception as exc:  # noqa: BLE001 - classified, never swallowed
            raise self._classify(series_id, exc) from exc

    def _fetch(self, request: FetchRequest) -> pd.DataFrame:
        import pandas as pd

        # Values visible in [start, end) were first served on [start-1d, end-1d). FRED clips realtime
        # periods to the query window, so ask from one day earlier and drop rows clipped to it.
        query_start = request.start.astimezone(timezone.utc).date() - timedelta(days=2)
        query_end = (request.end.astimezone(timezone.utc) - timedelta(microseconds=1)).date() - timedelta(days=1)
        parts = []
        for series_id in request.series:
            raw = self.with_retries(
                f"FRED {series_id}", lambda s=series_id: self._releases(s, str(query_start), str(query_end))
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
