"""The `binance` source: spot klines through python-binance, paged, rate-limited and retried."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sofare.config import interval_delta
from sofare.data.sources.base import (
    CANDLE_COLUMNS,
    FetchRequest,
    MalformedDataError,
    RateLimitedError,
    Source,
    SourceError,
    TransientSourceError,
    frame,
)

if TYPE_CHECKING:
    import pandas as pd

    from sofare.config import Config

log = logging.getLogger(__name__)
_NUMERIC_FIELDS = {1: "open", 2: "high", 3: "low", 4: "close", 5: "volume", 7: "quote_volume"}


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def parse_kline(row: Any, where: str) -> tuple:
    """One kline array -> canonical tuple; MalformedDataError names the field that is wrong."""
    if not isinstance(row, list) or len(row) < 9:
        raise MalformedDataError(f"{where}: expected a kline array of at least 9 fields, got {row!r:.120}")
    open_time = row[0]
    if not isinstance(open_time, int) or isinstance(open_time, bool):
        raise MalformedDataError(f"{where}: open_time must be integer milliseconds, got {open_time!r}")
    values: dict[str, float] = {}
    for index, name in _NUMERIC_FIELDS.items():
        try:
            value = float(row[index])
        except (TypeError, ValueError):
            raise MalformedDataError(f"{where}: field {name!r} is not a number: {row[index]!r}") from None
        if not math.isfinite(value):
            raise MalformedDataError(f"{where}: field {name!r} is not finite: {row[index]!r}")
        values[name] = value
    trades = row[8]
    if not isinstance(trades, int) or isinstance(trades, bool):
        raise MalformedDataError(f"{where}: field 'trade_count' must be an integer, got {trades!r}")
    return (
        open_time,
        values["open"],
        values["high"],
        values["low"],
        values["close"],
        values["volume"],
        values["quote_volume"],
        trades,
    )


class BinanceSource(Source):
    name = "binance"
    modalities = frozenset({"candles"})

    def __init__(self, cfg: Config, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(cfg, sleep)
        from binance.client import Client

        timeout = cfg.sources.http.timeout_seconds
        self.client = Client(ping=False, requests_params={"timeout": timeout})
        self.client.API_URL = cfg.sources.binance.base_url.rstrip("/") + "/api"

    def _call_klines(self, **params: Any) -> list:
        from binance.exceptions import BinanceAPIException, BinanceRequestException
        from requests import exceptions as rexc

        try:
            page = self.client.get_klines(**params)
        except BinanceAPIException as exc:
            if exc.status_code in (418, 429):
                retry_after = exc.response.headers.get("Retry-After") if exc.response is not None else None
                raise RateLimitedError(
                    f"Binance rate limit (HTTP {exc.status_code})", float(retry_after) if retry_after else None
                ) from exc
            if exc.status_code >= 500:
                raise TransientSourceError(f"Binance server error HTTP {exc.status_code}") from exc
            raise SourceError(
                f"Binance rejected the request (HTTP {exc.status_code}, code {exc.code}): {exc.message}"
            ) from exc
        except BinanceRequestException as exc:
            raise MalformedDataError(f"Binance answered with a body that is not JSON: {exc.message:.200}") from exc
        except (rexc.Timeout, rexc.ConnectionError) as exc:
            raise TransientSourceError(f"Binance request failed: {type(exc).__name__}") from exc
        self._respect_weight()
        return page

    def _respect_weight(self) -> None:
        """Pause until the next minute when Binance says we used ~all of this minute's weight."""
        response = getattr(self.client, "response", None)
        used = response.headers.get("x-mbx-used-weight-1m") if response is not None else None
        limit = self.cfg.sources.binance.weight_limit_per_minute
        if used is not None and used.isdigit() and int(used) >= 0.9 * limit:
            wait = 61 - datetime.now().second
            log.warning("Binance request weight %s of %d used this minute; pausing %ds", used, limit, wait)
            self.sleep(wait)

    def _fetch(self, request: FetchRequest) -> pd.DataFrame:
        step = int(interval_delta(request.interval).total_seconds() * 1000)
        cursor, end = _ms(request.start), _ms(request.end)
        limit = self.cfg.sources.binance.page_limit
        rows: list[tuple] = []
        page_no = 0
        while cursor < end:
            page_no += 1
            params = {
                "symbol": request.symbol,
                "interval": request.interval,
                "startTime": cursor,
                "endTime": end - 1,
                "limit": limit,
            }
            where = f"Binance klines {request.symbol} {request.interval} page {page_no}"
            page = self.with_retries(where, functools.partial(self._call_klines, **params))
            if not isinstance(page, list):
                raise MalformedDataError(f"{where}: expected a JSON array, got {type(page).__name__}")
            if not page:
                break
            parsed = [parse_kline(row, f"{where} row {i}") for i, row in enumerate(page)]
            last_open = parsed[-1][0]
            if last_open < cursor:
                raise MalformedDataError(f"{where}: rows go backwards in time (last open {last_open} < {cursor})")
            rows.extend(parsed)
            if len(page) < limit:
                break
            cursor = last_open + step
        import pandas as pd

        out = frame(CANDLE_COLUMNS, rows)
        out["open_time"] = pd.to_datetime(out["open_time"].astype("int64"), unit="ms", utc=True)
        log.info("Binance: %d %s %s klines in %d pages", len(out), request.symbol, request.interval, page_no)
        return out
