"""The service's HTTP layer: one ASGI middleware, `Gateway`, in front of every route.

BentoML 1.4 hosts it (`bentoml serve`, the bento, `/livez` `/readyz`, process management) but its
own request path parses a body into one pydantic object per candle before any check runs, answers
4xx in two shapes, labels metrics by raw path and has no body limit. So the gateway answers the API
itself, in this order, before any parsing:

1. route and method (404/405, one metrics label for every unknown path),
2. `Content-Type: application/json` (415) and the body size (413 from `Content-Length`, or while
   streaming, with `Connection: close` so the rest is never read),
3. admission: a bounded queue (`serving.max_pending` /predict requests waiting, `max_pending_batches`
   batches, `explain_max_pending` explanations; and `explain_slots` computing on the machine); beyond it a
   fast 503 with `Retry-After` instead of an unbounded backlog,
4. the body decoded straight into structs (msgspec), checked, answered.

Every refusal has the one error shape (`schemas.error_body`) and is logged at INFO in one line.
`/predict` computes on the event loop (a window is ~1 ms of CPU: a thread hop and the GIL would cost
more than they save), one request at a time from the queue with a loop iteration between any two (see
`_compute`); `/predict_latest` is answered from memory at once; `/predict_batch` runs on one worker thread
so probes stay live; `/explain` (tens to hundreds of ms of gradients) on another, its own, at low priority.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sofare.serving.schemas import (
    Batch,
    ClientError,
    Empty,
    LatestRequest,
    MethodNotAllowed,
    Overloaded,
    Problem,
    RouteNotFound,
    TimedOut,
    TooLarge,
    UnsupportedMediaType,
    Window,
    decode,
    error_body,
)

log = logging.getLogger("sofare.serving.http")
JSON = b"application/json"
PROBES = ("/livez", "/readyz", "/healthz")  # BentoML's own, passed through
OTHER = "other"  # the one metrics label of every unknown path
STATIC_FILES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-light-32x32.png": "image/png",
}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


class Gateway:
    """ASGI middleware answering the SOFARE API; see the module docstring.

    `resolve()` returns the application (`sofare.serving.app.App`) once the service instance exists
    (before that every API request is a 503 "starting"); `observe(endpoint, status, seconds)` records
    each request; `metrics()` renders /metrics."""

    def __init__(
        self,
        app: Any,
        resolve: Callable[[], Any],
        observe: Callable[[str, int, float], None],
        metrics: Callable[[], tuple[bytes, str]],
        static_dir: str | None = None,
    ) -> None:
        self.app = app
        self.resolve = resolve
        self.observe = observe
        self.metrics = metrics
        self.static_dir = Path(static_dir) if static_dir else None
        self._api: Any = None
        self.queue: deque[tuple[Callable[[], bytes], asyncio.Future[bytes]]] = deque()
        self.consumer: asyncio.Task[None] | None = None
        self.batches = 0  # /predict_batch requests admitted and not answered
        self._routes = self.routes()  # built once, not per request
        self.batch_pool = ThreadPoolExecutor(1, thread_name_prefix="sofare-batch")
        self.explains = 0  # /explain requests admitted and not answered
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="sofare-explain")

    @property
    def api(self) -> Any:
        if self._api is None:
            try:
                self._api = self.resolve()
            except Exception:  # noqa: BLE001 - the service is still starting
                raise Overloaded(
                    "the service is starting",
                    [Problem("service", "starting; retry shortly")],
                    headers={"Retry-After": "1"},
                ) from None
        return self._api

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, started = scope["path"], time.perf_counter()
        if path in PROBES:
            status = await self._pass(scope, receive, send)
            self.observe(path, status, time.perf_counter() - started)
            return
        routes = self._routes
        endpoint = path if path in routes else ("/static_content" if path.startswith("/static_content/") else OTHER)
        try:
            response = await self._handle(scope, receive, path, routes)
        except ClientError as exc:
            response = self._refusal(scope, exc)
        except Exception:
            log.exception("%s %s failed", scope["method"], path)
            response = Response(
                500,
                b'{"error": {"code": "internal", "message": "internal error; the server log '
                b'has the details", "details": [], "truncated": 0}}',
            )
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", response.content_type),
                    (b"content-length", str(len(response.body)).encode()),
                    *response.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.body})
        self.observe(endpoint, response.status, time.perf_counter() - started)

    def routes(self) -> dict[str, tuple[tuple[str, ...], Callable[..., Awaitable[Response]] | None]]:
        """path -> (methods, handler); a handler None reads no body."""
        return {
            "/predict": (("POST",), self._predict),
            "/predict_batch": (("POST",), self._predict_batch),
            "/predict_latest": (("POST",), self._predict_latest),
            "/explain": (("POST",), self._explain),
            "/model_info": (("GET", "POST"), self._model_info),
            "/docs.json": (("GET",), None),
            "/": (("GET",), None),
            "/metrics": (("GET",), None),
        }

    async def _handle(self, scope: dict[str, Any], receive: Any, path: str, routes: dict[str, Any]) -> Response:
        if path.startswith("/static_content/") and self.static_dir is not None:
            return self._static(scope, path.removeprefix("/static_content/"))
        if path not in routes:
            raise RouteNotFound(
                f"path: no route {path[:100]!r}", [Problem("path", f"no route {path[:100]!r}; see /docs.json")]
            )
        methods, handler = routes[path]
        if scope["method"] not in methods:
            raise MethodNotAllowed(
                f"method: {scope['method']} is not allowed on {path}",
                [Problem("method", f"use {' or '.join(methods)}")],
                headers={"Allow": ", ".join(methods)},
            )
        if path == "/metrics":
            body, content_type = self.metrics()
            return Response(200, body, content_type.encode())
        api = self.api
        if path == "/docs.json":
            return Response(200, api.openapi)
        if path == "/":
            return Response(200, api.index, b"text/html; charset=utf-8")
        if scope["method"] == "GET":
            return await handler(api, b"")
        headers = dict(scope["headers"])
        limit = api.limits[path]
        _check_content_type(headers.get(b"content-type"), optional=path == "/model_info")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise TooLarge(
                f"body: {int(length)} bytes, at most {limit} accepted",
                [Problem("body", f"{int(length)} bytes; at most {limit} accepted on {path}")],
                headers={"Connection": "close"},
            )
        if path == "/model_info":
            return await handler(api, await _read(receive, limit))
        refusal = self._admit(path, api)
        body = await _read(receive, limit)
        if refusal is not None:  # answered after the body is read: a client still sending would get a reset
            raise refusal
        return await handler(api, body)

    def _admit(self, path: str, api: Any) -> Overloaded | None:
        """A 503 when the work already waiting is at its bound (decided before the body is read, so the
        body is only drained, never decoded)."""
        waiting, bound = (
            (len(self.queue), api.max_pending)
            if path == "/predict"
            else (self.batches, api.max_pending_batches)
            if path == "/predict_batch"
            else (self.explains, api.explainer.max_pending)
            if path == "/explain"
            else (0, 1)
        )
        if waiting < bound:
            return None
        return Overloaded(
            f"server: {waiting} requests waiting on {path}; retry shortly",
            [Problem("server", "at capacity")],
            headers={"Retry-After": "1"},
        )

    async def _compute(self, work: Callable[[], bytes]) -> bytes:
        """Run `work` on the event loop in arrival order, one at a time, the loop serving I/O between any two:
        so every request that has arrived is in `queue` (or refused) while one computes, and the wait of an
        admitted one is bounded by serving.max_pending computations. (Computing each request in its own
        task would let the backlog hide in the loop's own queues, unbounded and unseen.)"""
        if len(self.queue) >= self.api.max_pending:
            raise Overloaded(
                f"server: {len(self.queue)} requests waiting; retry shortly",
                [Problem("server", "at capacity")],
                headers={"Retry-After": "1"},
            )
        future = asyncio.get_running_loop().create_future()
        self.queue.append((work, future))
        if self.consumer is None or self.consumer.done():
            self.consumer = asyncio.get_running_loop().create_task(self._consume())
        return await future

    async def _consume(self) -> None:
        while self.queue:
            work, future = self.queue.popleft()
            if not future.done():
                try:
                    future.set_result(work())
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                    future.set_exception(exc)
            await asyncio.sleep(0)  # one loop iteration: accept, read, refuse or enqueue what arrived

    async def _predict(self, api: Any, body: bytes) -> Response:
        return Response(200, await self._compute(lambda: api.predict(decode(body, Window), "predict")))

    async def _predict_batch(self, api: Any, body: bytes) -> Response:
        self.batches += 1
        try:
            batch = decode(body, Batch)
            loop = asyncio.get_running_loop()
            return Response(200, await loop.run_in_executor(self.batch_pool, api.predict_batch, batch))
        finally:
            self.batches -= 1

    async def _explain(self, api: Any, body: bytes) -> Response:
        """Decoded, checked and explained on the explain thread, admitted again here (others may have been admitted
        while this body was read): at most `explain_max_pending` in flight per worker. The computation itself also
        needs a machine-wide slot (`explainer.Slots`), taken on the thread once the window is checked."""
        if self.explains >= api.explainer.max_pending:
            raise Overloaded(
                f"server: {self.explains} explanations in flight; retry shortly",
                [Problem("server", "at capacity for /explain")],
                headers={"Retry-After": "1"},
            )
        self.explains += 1
        try:
            loop = asyncio.get_running_loop()
            return Response(200, await loop.run_in_executor(self.explain_pool, api.explain, body))
        finally:
            self.explains -= 1

    async def _predict_latest(self, api: Any, body: bytes) -> Response:
        return Response(200, api.predict_latest(decode(body, LatestRequest)))

    async def _model_info(self, api: Any, body: bytes) -> Response:
        if body.strip():
            decode(body, Empty)
        return Response(200, api.model_info())

    def _static(self, scope: dict[str, Any], name: str) -> Response:
        if scope["method"] != "GET":
            raise MethodNotAllowed("method: only GET", [Problem("method", "use GET")], headers={"Allow": "GET"})
        if name not in STATIC_FILES or self.static_dir is None:
            raise RouteNotFound(f"path: no static file {name[:100]!r}", [Problem("path", "no such file")])
        return Response(
            200,
            (self.static_dir / name).read_bytes(),
            STATIC_FILES[name].encode(),
            ((b"cache-control", b"max-age=3600"),),
        )

    def _refusal(self, scope: dict[str, Any], exc: ClientError) -> Response:
        # one line whatever the client sent: newlines, control and non-ASCII characters escaped
        log.info(
            "%d %s %s %s: %s",
            exc.status,
            exc.code,
            scope["method"],
            _printable(scope["path"][:100]),
            _printable(exc.message[:300]),
        )
        headers = tuple((k.lower().encode(), v.encode()) for k, v in exc.headers.items())
        return Response(exc.status, error_body(exc), headers=headers)

    async def _pass(self, scope: dict[str, Any], receive: Any, send: Any) -> int:
        status = 500

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, capture)
        return status


async def timeout_middleware_call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """BentoML 1.4's `TimeoutMiddleware.__call__` with two fixes; `bentos/sofare/service.py` installs it.

    Upstream schedules a timer per request and never cancels it, so every request's timer, future and
    context (its OpenTelemetry span among it) stay alive for the whole timeout: ~20 objects a request, at
    400 req/s and a 30 s timeout some 200,000 objects, and full garbage collections of 100+ ms stopping the
    event loop (measured on the served worker). Here the timer is cancelled when the request ends, and a
    timeout answers 504 in the service's error shape instead of upstream's own."""
    if scope["type"] not in ("http", "websocket"):
        await self.app(scope, receive, send)
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: dict[str, Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    work = asyncio.ensure_future(self.app(scope, receive, _send))
    try:
        await waiter
    except TimeoutError:  # asyncio.TimeoutError is TimeoutError since Python 3.11
        if work.cancel():
            body = error_body(
                TimedOut(f"server: not answered within {self.timeout:g} s", [Problem("server", "timed out")])
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 504,
                    "headers": [(b"content-type", JSON), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
    else:
        await work
    finally:
        timer.cancel()


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


def _check_content_type(value: bytes | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    media, _, params = (value or b"").partition(b";")
    charset = params.strip().lower()
    if media.strip().lower() != JSON or (
        charset and charset.replace(b" ", b"") not in (b"charset=utf-8", b"charset=utf8")
    ):
        shown = (value or b"(none)").decode("latin-1")[:80]
        raise UnsupportedMediaType(
            f"Content-Type: {shown!r}; send application/json",
            [Problem("Content-Type", f"{shown!r} is not application/json (UTF-8)")],
        )


async def _read(receive: Callable[[], Awaitable[dict[str, Any]]], limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (never buffered past it)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientError("body: the client disconnected", [Problem("body", "client disconnected")])
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(
                f"body: more than {limit} bytes",
                [Problem("body", f"more than {limit} bytes")],
                headers={"Connection": "close"},
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
