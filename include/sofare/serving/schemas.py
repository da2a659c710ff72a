"""The wire contract of the prediction service: request bodies decoded straight from JSON bytes
(msgspec, one C pass, no object per field), and the one error every refused request gets.

Errors: `ClientError` and its subclasses carry an HTTP status, a stable `code`, a message and
`details` — each `{"field": "windows[3].candles[17].open_time", "problem": ...}`. `error_body` caps them
(at most `MAX_DETAILS` details, at most `MAX_ERROR_BYTES` bytes whatever the input) and counts what it
left out in `truncated`. `request_body` builds a real /predict body from the warehouse (tests,
benchmarks, the API document's example).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from sofare.config import interval_delta
from sofare.errors import InputError

if TYPE_CHECKING:
    from sofare.config import Config

FUTURE_TOLERANCE = timedelta(seconds=5)  # clock skew allowed for "the candle has closed"
EARLIEST = datetime(2009, 1, 1, tzinfo=UTC)  # no market data is older than Bitcoin's genesis block
LATEST = datetime(2100, 1, 1, tzinfo=UTC)  # dates beyond this are typos, not predictions
MAX_DETAILS = 20
MAX_ERROR_BYTES = 8192
MAX_CONTEXT_ROWS = 10_000  # safe-haven bars or macro observations in one window


class Problem(msgspec.Struct, frozen=True):
    field: str
    problem: str


class ClientError(InputError):
    """A request the service refuses; `status` and `code` say how, `details` say where."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        details: list[Problem] | None = None,
        truncated: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.truncated = truncated
        self.headers = headers or {}


class Malformed(ClientError):
    status, code = 400, "malformed_json"


class BadRequest(ClientError):
    """The body is JSON of the right shape but its content is invalid; the details name each field."""

    status, code = 422, "invalid_request"


class TooLarge(ClientError):
    """The body is over the size limit (refused before it is read)."""

    status, code = 413, "payload_too_large"


class TooMany(BadRequest):
    """More candles, windows or context rows than the caps allow (a 422 like any invalid content, so
    schema-driven clients see the `maxItems` of the API document enforced as a validation error)."""

    code = "too_many_items"


class UnsupportedMediaType(ClientError):
    status, code = 415, "unsupported_media_type"


class RouteNotFound(ClientError):
    status, code = 404, "not_found"


class MethodNotAllowed(ClientError):
    status, code = 405, "method_not_allowed"


class NoData(ClientError):
    """What was asked for exists nowhere (e.g. no candles of the symbol in the warehouse)."""

    status, code = 404, "no_data"


class Overloaded(ClientError):
    """Not the client's fault, but the same shape: the server is past capacity; retry later."""

    status, code = 503, "overloaded"


class Unavailable(ClientError):
    """A dependency (the warehouse) cannot be read now; retry later."""

    status, code = 503, "unavailable"


class NotExplainable(ClientError):
    """The served version was exported without the differentiable network /explain needs (before explain.ts)."""

    status, code = 501, "not_explainable"


class TimedOut(ClientError):
    """Not answered within the server's timeout (BentoML's `traffic.timeout`)."""

    status, code = 504, "timeout"


class Problems:
    """Collects what is wrong with a request, keeping the first `MAX_DETAILS` and counting the rest."""

    def __init__(self) -> None:
        self.items: list[Problem] = []
        self.truncated = 0

    def add(self, field: str, problem: str) -> None:
        if len(self.items) < MAX_DETAILS:
            self.items.append(Problem(field, problem))
        else:
            self.truncated += 1

    def add_each(self, indices: Any, field: Any, problem: Any) -> None:
        """One problem per index (`field(i)`, `problem(i)`); only as many are built as are kept."""
        indices = list(indices)
        room = max(MAX_DETAILS - len(self.items), 0)
        for i in indices[:room]:
            self.items.append(Problem(field(i), problem(i)))
        self.truncated += max(len(indices) - room, 0)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, kind: type[ClientError] = BadRequest) -> None:
        if self.items:
            first = self.items[0]
            more = len(self.items) - 1 + self.truncated
            message = f"{first.field}: {first.problem}" + (f" (and {more} more)" if more else "")
            raise kind(message, self.items, self.truncated)


def _clip(text: str, limit: int) -> str:
    text = text if text.isascii() else text.encode("ascii", "backslashreplace").decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_body(error: ClientError) -> bytes:
    """The one error shape, at most MAX_ERROR_BYTES whatever the input (long fields are clipped,
    details beyond the cap are counted in `truncated`)."""
    details = [{"field": _clip(p.field, 120), "problem": _clip(p.problem, 240)} for p in error.details[:MAX_DETAILS]]
    truncated = error.truncated + max(len(error.details) - MAX_DETAILS, 0)
    while True:
        body = json.dumps(
            {
                "error": {
                    "code": error.code,
                    "message": _clip(error.message, 600),
                    "details": details,
                    "truncated": truncated,
                }
            },
            ensure_ascii=True,
        ).encode()
        if len(body) <= MAX_ERROR_BYTES or not details:
            return body
        details.pop()
        truncated += 1


# --- the request bodies, as decoded ---

Price = Annotated[float, msgspec.Meta(gt=0)]
Volume = Annotated[float, msgspec.Meta(ge=0)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=20)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Decoded JSON holds no reference cycles, so request structs stay out of the cyclic garbage
    collector (300 candles a request would otherwise trigger a collection every few requests)."""


class Candle(_Strict):
    open_time: datetime
    open: Price
    high: Price
    low: Price
    close: Price
    volume: Volume


class SafeHavenBar(_Strict):
    ticker: Name
    date: date
    open: Price
    high: Price
    low: Price
    close: Price
    known_at: datetime
    volume: Volume | None = None


class MacroObservation(_Strict):
    series_id: Name
    observation_date: date
    known_at: datetime
    value: float


class Window(_Strict):
    """One self-contained prediction request: enough candles for the features' warm-up plus the
    model's lookback (oldest first); safe-haven bars and macro observations optional (else the
    warehouse's, as known at the window's close)."""

    symbol: Symbol
    interval: Annotated[str, msgspec.Meta(min_length=1, max_length=8)]
    candles: list[Candle]
    safe_haven: list[SafeHavenBar] | None = None
    macro: list[MacroObservation] | None = None


class Batch(_Strict):
    windows: list[Window]


PredictionId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}\Z")]  # \Z: no trailing newline (JSON Schema $)
Count = Annotated[int, msgspec.Meta(ge=1)]
WINDOW_FIELDS = ("symbol", "interval", "candles", "safe_haven", "macro")


class ExplainRequest(_Strict):
    """POST /explain: either a /predict window (symbol, interval, candles, optional safe_haven and macro) or the
    `prediction_id` of a logged prediction, never both; optional `top_k` and `steps` (capped by the config).
    Absent fields are UNSET, so an explicit null is refused as the API document says."""

    symbol: Symbol | msgspec.UnsetType = msgspec.UNSET
    interval: Annotated[str, msgspec.Meta(min_length=1, max_length=8)] | msgspec.UnsetType = msgspec.UNSET
    candles: list[Candle] | msgspec.UnsetType = msgspec.UNSET
    safe_haven: list[SafeHavenBar] | None | msgspec.UnsetType = msgspec.UNSET
    macro: list[MacroObservation] | None | msgspec.UnsetType = msgspec.UNSET
    prediction_id: PredictionId | msgspec.UnsetType = msgspec.UNSET
    top_k: Count | msgspec.UnsetType = msgspec.UNSET
    steps: Count | msgspec.UnsetType = msgspec.UNSET

    def window(self) -> Window | None:
        """The window to explain; None when the request names a logged prediction instead. A 422 naming the
        field when it mixes the two or leaves a window's required field out."""
        given = [f for f in WINDOW_FIELDS if getattr(self, f) is not msgspec.UNSET]
        if self.prediction_id is not msgspec.UNSET:
            if given:
                raise BadRequest(
                    f"{given[0]}: send a window or a prediction_id, not both",
                    [Problem(f, "not allowed with prediction_id") for f in given],
                )
            return None
        symbol, interval, candles = self.symbol, self.interval, self.candles
        if (
            isinstance(symbol, msgspec.UnsetType)
            or isinstance(interval, msgspec.UnsetType)
            or isinstance(candles, msgspec.UnsetType)
        ):
            missing = [f for f in WINDOW_FIELDS[:3] if getattr(self, f) is msgspec.UNSET]
            raise BadRequest(
                f"{missing[0]}: required (send a window as to /predict, or a prediction_id)",
                [Problem(f, "required (or send a prediction_id)") for f in missing],
            )
        return Window(
            symbol=symbol,
            interval=interval,
            candles=candles,
            safe_haven=None if isinstance(self.safe_haven, msgspec.UnsetType) else self.safe_haven,
            macro=None if isinstance(self.macro, msgspec.UnsetType) else self.macro,
        )


class LatestRequest(_Strict):
    symbol: Symbol


class Empty(_Strict):
    pass


_DECODERS: dict[type[msgspec.Struct], msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(kind) for kind in (Window, Batch, LatestRequest, Empty, ExplainRequest)
}
_AT = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"field `([^`]*)`")


def decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """`body` decoded as `kind`; a ClientError naming the field (JSON path) otherwise."""
    try:
        return _DECODERS[kind].decode(body)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        problem, path = (match["problem"], (match["path"] or "").lstrip(".")) if match else (str(exc), "")
        named = _FIELD.search(problem)
        if named and problem.startswith("Object missing"):
            path = f"{path}.{named[1]}" if path else named[1]
        raise BadRequest(f"{path or 'body'}: {problem}", [Problem(path or "body", problem)]) from None
    except msgspec.DecodeError as exc:
        message = str(exc)
        where = re.search(r"\(byte (\d+)\)", message)
        if where:  # show the bytes around the error: a NaN or a stray comma is found at a glance
            at = int(where[1])
            near = body[max(at - 40, 0) : at + 20].decode("utf-8", "replace")
            message += f" near {near!r}"
        raise Malformed(f"body: {message}", [Problem("body", message)]) from None
    except UnicodeDecodeError as exc:  # a string that is not UTF-8
        message = f"a string is not valid UTF-8 ({exc.reason})"
        raise Malformed(f"body: {message}", [Problem("body", message)]) from None


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def request_body(cfg: Config, last_open: datetime, candles: int | None = None, context: bool = False) -> dict[str, Any]:
    """A /predict body from the warehouse: the candles up to `last_open` (inclusive; default: as many as
    one window needs), optionally with the safe-haven bars and macro observations known at its close."""
    from sofare.data import warehouse

    symbol, interval = cfg.market.symbol, cfg.market.interval
    delta = interval_delta(interval)
    engine = warehouse.get_engine(cfg)
    with engine.connect() as conn:
        needed = cfg.features.warmup_bars + max(cfg.training.search_space.lookback) - 1
        frame = warehouse.read_candles_before(conn, symbol, interval, last_open + delta, candles or needed)
        body: dict[str, Any] = {
            "symbol": symbol,
            "interval": interval,
            "candles": [
                {
                    "open_time": r["open_time"].isoformat(),
                    **{k: float(r[k]) for k in ("open", "high", "low", "close", "volume")},
                }
                for r in frame.to_dict("records")
            ],
        }
        if context:
            first = frame["open_time"].iloc[0].to_pydatetime()
            known = last_open + delta + timedelta(microseconds=1)
            safe = warehouse.read_safe_haven(
                conn, (first - timedelta(days=cfg.features.daily_context_days)).date(), known
            )
            macro = warehouse.read_macro(conn, first - timedelta(days=cfg.features.macro_context_days), known)
            body["safe_haven"] = [
                {
                    "ticker": r["ticker"],
                    "date": str(r["date"]),
                    "known_at": r["known_at"].isoformat(),
                    **{k: (None if r[k] != r[k] else float(r[k])) for k in ("open", "high", "low", "close", "volume")},
                }
                for r in safe.to_dict("records")
            ]
            body["macro"] = [
                {
                    "series_id": r["series_id"],
                    "observation_date": str(r["observation_date"]),
                    "known_at": r["known_at"].isoformat(),
                    "value": float(r["value"]),
                }
                for r in macro.to_dict("records")
            ]
    return body
