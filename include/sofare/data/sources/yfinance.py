"""The `yfinance` source: daily safe-haven bars through yfinance.

yfinance hides many failures behind "no price data found", so the adapter watches the HTTP answers
itself (through the session it hands to yfinance) and classifies every failure: rate limits and
server errors are retried, an answer without bars is a genuinely empty range, anything else is
malformed. `sources.yfinance.base_url` sends every *.yahoo.com request to another host (recorded
responses on 127.0.0.1 in tests).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sofare.data.sources.base import (
    SAFE_HAVEN_COLUMNS,
    FetchRequest,
    MalformedDataError,
    RateLimitedError,
    Source,
    SourceError,
    TransientSourceError,
    trading_dates,
)

if TYPE_CHECKING:
    import pandas as pd

    from sofare.config import Config

log = logging.getLogger(__name__)
_TRANSIENT = {"Timeout", "ConnectTimeout", "ReadTimeout", "ConnectionError", "ChunkedEncodingError", "IncompleteRead"}


def _session_class() -> type:
    from curl_cffi import requests as curl_requests

    class YahooSession(curl_requests.Session):
        """A browser-like session that can redirect Yahoo hosts and remembers the last chart answer."""

        def __init__(self, base_url: str | None) -> None:
            super().__init__(impersonate="chrome")
            self.base_url = base_url.rstrip("/") if base_url else None
            self.last_chart: tuple[int, bytes] | None = None

        def request(self, method: Any, url: str, *args: Any, **kwargs: Any) -> Any:
            parts = urlsplit(url)
            if self.base_url and (parts.hostname or "").endswith("yahoo.com"):
                url = self.base_url + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            response = super().request(method, url, *args, **kwargs)
            if "/v8/finance/chart/" in parts.path:
                self.last_chart = (response.status_code, response.content)
            return response

    return YahooSession


class YfinanceSource(Source):
    name = "yfinance"
    modalities = frozenset({"safe_haven"})

    def __init__(self, cfg: Config, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(cfg, sleep)
        import yfinance as yf

        cache = cfg.var_dir / "cache" / "yfinance"
        cache.mkdir(parents=True, exist_ok=True)
        yf.set_tz_cache_location(str(cache))
        yf.config.debug.hide_exceptions = False  # we classify failures ourselves
        self.session = _session_class()(cfg.sources.yfinance.base_url)

    def _classify(self, ticker: str, exc: Exception) -> Exception | None:
        """The SourceError an exception means, or None when Yahoo answered 'no bars in range'."""
        from yfinance.exceptions import YFRateLimitError

        if isinstance(exc, YFRateLimitError):
            return RateLimitedError(f"Yahoo rate limit for {ticker}")
        if type(exc).__name__ in _TRANSIENT:
            return TransientSourceError(f"Yahoo request for {ticker} failed: {type(exc).__name__}")
        if self.session.last_chart is None:
            return SourceError(f"Yahoo request for {ticker} failed before any chart answer: {exc}")
        status, body = self.session.last_chart
        if status == 429:
            return RateLimitedError(f"Yahoo rate limit for {ticker} (HTTP 429)")
        if status >= 500:
            return TransientSourceError(f"Yahoo server error for {ticker} (HTTP {status})")
        try:
            chart = json.loads(body)["chart"]
        except (ValueError, KeyError, TypeError):
            return MalformedDataError(
                f"Yahoo chart answer for {ticker} (HTTP {status}) is not chart JSON: {body[:120]!r}"
            )
        if chart.get("error"):
            return SourceError(f"Yahoo refused {ticker}: {chart['error'].get('description', chart['error'])}")
        try:
            result = chart["result"][0]
            empty = not result.get("timestamp") and not any(result["indicators"]["quote"][0].values())
        except (KeyError, IndexError, TypeError, AttributeError):
            return MalformedDataError(f"Yahoo chart answer for {ticker} lacks result/indicators: {body[:120]!r}")
        if empty and status == 200:
            return None
        return MalformedDataError(f"Yahoo chart answer for {ticker} could not be read ({type(exc).__name__}: {exc})")

    def _history(self, ticker: str, first: date, last: date) -> pd.DataFrame:
        import pandas as pd
        import yfinance as yf
        from yfinance.data import YfData

        YfData.cache_get.cache_clear()  # never replay a cached failed answer on a retry
        self.session.last_chart = None
        try:
            bars = yf.Ticker(ticker, session=self.session).history(
                start=first,
                end=last,
                interval="1d",
                auto_adjust=False,
                actions=False,
                repair=False,
                timeout=self.cfg.sources.http.timeout_seconds,
            )
        except Exception as exc:
            error = self._classify(ticker, exc)
            if error is not None:
                raise error from exc
            return pd.DataFrame(columns=list(SAFE_HAVEN_COLUMNS))
        missing = {"Open", "High", "Low", "Close"} - set(bars.columns)
        if missing:
            raise MalformedDataError(f"Yahoo bars for {ticker} lack columns {sorted(missing)}")
        return pd.DataFrame(
            {
                "ticker": ticker,
                "date": [stamp.date() for stamp in bars.index],
                "open": bars["Open"].to_numpy(float),
                "high": bars["High"].to_numpy(float),
                "low": bars["Low"].to_numpy(float),
                "close": bars["Close"].to_numpy(float),
                "volume": bars["Volume"].to_numpy(float) if "Volume" in bars else float("nan"),
            }
        )

    def _fetch(self, request: FetchRequest) -> pd.DataFrame:
        import pandas as pd

        first, last = trading_dates(request.start, request.end)
        if first >= last:
            return pd.DataFrame(columns=list(SAFE_HAVEN_COLUMNS))
        parts = [
            self.with_retries(f"Yahoo daily bars {ticker}", functools.partial(self._history, ticker, first, last))
            for ticker in request.tickers
        ]
        parts = [p for p in parts if not p.empty]
        if not parts:
            return pd.DataFrame(columns=list(SAFE_HAVEN_COLUMNS))
        return pd.concat(parts, ignore_index=True)
