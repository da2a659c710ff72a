"""A local stand-in for the internet: Binance, Yahoo Finance and FRED on 127.0.0.1.

It answers in each real API's wire format (Binance kline arrays with string numbers and weight
headers; Yahoo v8 chart JSON plus the cookie/crumb dance; FRED/ALFRED observations XML with realtime
periods clipped to the query window) from the embedded real data, and can inject the failures the
adapters must survive: HTTP 429 with Retry-After, 5xx, timeouts, empty and malformed pages.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import quoteattr
from zoneinfo import ZoneInfo

import pandas as pd

from sofare.config import Config
from sofare.data.visibility import macro_known_at


@dataclass
class Fault:
    """What to do instead of a normal answer: status (+body/headers), timeout, empty, malformed."""

    kind: str
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def status(code: int, body: bytes = b"", **headers: str) -> Fault:
    return Fault("status", status=code, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})


def timeout(seconds: float) -> Fault:
    return Fault("timeout", seconds=seconds)


def empty() -> Fault:
    return Fault("empty")


def malformed(body: bytes) -> Fault:
    return Fault("malformed", body=body)


class MarketAPI:
    """`with MarketAPI(cfg) as api:` -> api.url; api.fail('binance', status(429, Retry_After='1'))."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.revisions: dict[tuple[str, date], list[tuple[date, float]]] = {}
        self.weight_used = 0
        self._candles = self._load_candles(cfg.sample_dir / "binance")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> MarketAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, route: str, *faults: Fault) -> None:
        """The next data requests to `route` (binance|yahoo|fred) get these faults, in order."""
        self.faults[route].extend(faults)

    def revise(self, series_id: str, observation_date: date, released: date, value: float) -> None:
        """Add a later vintage of one FRED observation (ALFRED keeps both)."""
        self.revisions.setdefault((series_id, observation_date), []).append((released, value))

    def data_requests(self, route: str) -> int:
        marker = {"binance": "/api/v3/klines", "yahoo": "/v8/finance/chart/", "fred": "/fred/series/observations"}[
            route
        ]
        return sum(1 for path, query in self.requests if marker in path and "range" not in query)

    # -- data -------------------------------------------------------------------------------------
    @staticmethod
    def _load_candles(directory: Path) -> dict[str, pd.DataFrame]:
        frames = {}
        for path in directory.glob("*.csv.gz"):
            frame = pd.read_csv(path)
            frame["open_ms"] = pd.to_datetime(frame["timestamp"], utc=True).astype("int64") // 10**6
            for (symbol, interval), part in frame.groupby(["symbol", "interval"]):
                frames[f"{symbol}:{interval}"] = part.sort_values("open_ms").reset_index(drop=True)
        return frames

    def klines(self, query: dict[str, list[str]]) -> list[list[Any]]:
        symbol, interval = query["symbol"][0], query["interval"][0]
        frame = self._candles.get(f"{symbol}:{interval}")
        if frame is None:
            return []
        start = int(query.get("startTime", ["0"])[0])
        end = int(query.get("endTime", [str(2**62)])[0])
        limit = min(int(query.get("limit", ["500"])[0]), 1000)
        step = int(pd.Timedelta(interval.replace("m", "min")).total_seconds() * 1000)
        rows = frame[(frame["open_ms"] >= start) & (frame["open_ms"] <= end)].head(limit)
        return [
            [
                int(r.open_ms),
                f"{r.open:.8f}",
                f"{r.high:.8f}",
                f"{r.low:.8f}",
                f"{r.close:.8f}",
                f"{r.volume:.8f}",
                int(r.open_ms) + step - 1,
                f"{r.quote_volume:.8f}",
                int(r.trade_count),
                "0.00000000",
                "0.00000000",
                "0",
            ]
            for r in rows.itertuples()
        ]

    def chart(self, ticker: str, query: dict[str, list[str]]) -> dict[str, Any]:
        path = self.cfg.sample_dir / "yahoo" / f"{ticker}.csv.gz"
        tz = ZoneInfo("America/New_York")
        meta = {
            "currency": "USD",
            "symbol": ticker,
            "exchangeName": "NYB",
            "fullExchangeName": "NY Board",
            "instrumentType": "FUTURE" if ticker.endswith("=F") else "INDEX",
            "firstTradeDate": 946857600,
            "regularMarketTime": 1751313600,
            "gmtoffset": -14400,
            "timezone": "EDT",
            "exchangeTimezoneName": "America/New_York",
            "dataGranularity": "1d",
            "range": "",
            "validRanges": ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"],
        }
        if not path.exists():
            return {
                "chart": {
                    "result": None,
                    "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"},
                }
            }
        bars = pd.read_csv(path, compression="gzip")
        bars["day"] = pd.to_datetime(bars["date"])
        if "range" in query:
            bars = bars.tail(1)
        else:
            lo = pd.Timestamp(int(query["period1"][0]), unit="s", tz="UTC").tz_convert(tz).tz_localize(None).normalize()
            hi = pd.Timestamp(int(query["period2"][0]), unit="s", tz="UTC").tz_convert(tz).tz_localize(None).normalize()
            bars = bars[(bars["day"] >= lo) & (bars["day"] < hi)]
        if bars.empty:
            result = {"meta": meta, "indicators": {"quote": [{}], "adjclose": [{}]}}
            return {"chart": {"result": [result], "error": None}}
        opening = (
            timedelta(hours=0) if ticker.endswith("=F") or ticker.startswith("DX") else timedelta(hours=9, minutes=30)
        )
        stamps = [int((d.to_pydatetime() + opening).replace(tzinfo=tz).timestamp()) for d in bars["day"]]
        quote = {k: [float(x) for x in bars[k]] for k in ("open", "high", "low", "close")}
        quote["volume"] = [int(x) for x in bars["volume"].fillna(0)]
        result = {
            "meta": meta,
            "timestamp": stamps,
            "indicators": {"quote": [quote], "adjclose": [{"adjclose": quote["close"]}]},
        }
        return {"chart": {"result": [result], "error": None}}

    def _vintages(self, series_id: str) -> list[tuple[date, date, date, float]]:
        """(observation_date, released, valid_until, value) for every vintage of a series."""
        path = self.cfg.sample_dir / "fred" / f"{series_id}.csv.gz"
        raw = pd.read_csv(path).dropna()
        obs = pd.to_datetime(raw["observation_date"])
        released = macro_known_at(self.cfg, series_id, obs, pd.Series(pd.NaT, index=obs.index)) - pd.Timedelta(days=1)
        out = []
        for d, first, value in zip(obs.dt.date, released.dt.date, raw[series_id]):
            chain = sorted([(first, float(value))] + self.revisions.get((series_id, d), []))
            for i, (rel, val) in enumerate(chain):
                until = chain[i + 1][0] - timedelta(days=1) if i + 1 < len(chain) else date(9999, 12, 31)
                out.append((d, rel, until, val))
        return out

    def observations(self, query: dict[str, list[str]]) -> tuple[int, str]:
        series_id = query.get("series_id", [""])[0]
        if not (self.cfg.sample_dir / "fred" / f"{series_id}.csv.gz").exists():
            return (
                400,
                '<?xml version="1.0" encoding="utf-8" ?>\n<error code="400" message="Bad Request.  The series does not exist."/>',
            )
        rs = date.fromisoformat(query.get("realtime_start", [str(date.today())])[0])
        re_ = date.fromisoformat(query.get("realtime_end", [str(date.today())])[0])
        rows = [
            (max(rel, rs), min(until, re_), d, val)
            for d, rel, until, val in self._vintages(series_id)
            if rel <= re_ and until >= rs
        ]
        rows.sort(key=lambda r: (r[2], r[0]))
        body = "".join(
            f'  <observation realtime_start="{a}" realtime_end="{b}" date="{d}" value="{v:g}"/>\n'
            for a, b, d, v in rows
        )
        head = (
            f'<?xml version="1.0" encoding="utf-8" ?>\n<observations realtime_start={quoteattr(str(rs))} '
            f'realtime_end={quoteattr(str(re_))} observation_start="1776-07-04" observation_end="9999-12-31" '
            f'units="lin" output_type="1" file_type="xml" order_by="observation_date" sort_order="asc" '
            f'count="{len(rows)}" offset="0" limit="100000">\n'
        )
        return 200, head + body + "</observations>\n"

    # -- HTTP -------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                return

            def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _fault(self, route: str, empty_body: bytes, ctype: str) -> bool:
                if not api.faults[route]:
                    return False
                fault = api.faults[route].popleft()
                if fault.kind == "timeout":
                    time.sleep(fault.seconds)
                    try:
                        self._send(503, b"too late", "text/plain")
                    except OSError:
                        pass
                elif fault.kind == "empty":
                    self._send(200, empty_body, ctype)
                elif fault.kind == "malformed":
                    self._send(200, fault.body, ctype)
                else:
                    self._send(fault.status, fault.body, ctype, fault.headers)
                return True

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                api.requests.append((parts.path, query))
                if parts.path == "/api/v3/klines":
                    api.weight_used += 2
                    if not self._fault("binance", b"[]", "application/json"):
                        body = json.dumps(api.klines(query)).encode()
                        self._send(200, body, "application/json", {"x-mbx-used-weight-1m": str(api.weight_used)})
                elif parts.path.startswith("/v8/finance/chart/"):
                    ticker = unquote(parts.path.rsplit("/", 1)[1])
                    empty_chart = json.dumps(api.chart(ticker, {"period1": ["0"], "period2": ["0"]})).encode()
                    if "range" in query or not self._fault("yahoo", empty_chart, "application/json"):
                        self._send(200, json.dumps(api.chart(ticker, query)).encode(), "application/json")
                elif parts.path == "/v1/test/getcrumb":
                    self._send(200, b"sofare-test-crumb", "text/plain")
                elif parts.path == "/fred/series/observations":
                    empty_xml = b'<?xml version="1.0" encoding="utf-8" ?>\n<observations count="0"></observations>'
                    if not self._fault("fred", empty_xml, "text/xml"):
                        code, body = api.observations(query)
                        self._send(code, body.encode(), "text/xml")
                elif parts.path == "/":
                    self._send(200, b"<html>ok</html>", "text/html", {"Set-Cookie": "A3=sofare; Path=/"})
                else:
                    self._send(404, b"not found", "text/plain")

        return Handler
