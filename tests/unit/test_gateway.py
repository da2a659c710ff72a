"""The HTTP gateway in process (no model, no server): the order of its refusals, admission, limits and
metric labels, each decided before the application sees a byte."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace
from typing import Any, ClassVar

from sofare.serving.explainer import Slots
from sofare.serving.http import Gateway
from sofare.serving.schemas import MAX_ERROR_BYTES, BadRequest, Problems, error_body


class Stub:
    max_pending = 2
    max_pending_batches = 1
    limits: ClassVar[dict[str, int]] = {
        "/predict": 1000,
        "/predict_batch": 1000,
        "/predict_latest": 1000,
        "/model_info": 1000,
        "/explain": 1000,
    }
    openapi = b"{}"
    index = b"<html></html>"

    def __init__(self) -> None:
        self.explainer = SimpleNamespace(max_pending=2)
        self.calls = 0
        self.explaining = threading.Event()  # set by the first explanation that runs
        self.release = threading.Event()  # explanations block until the test sets it
        self.explained = 0

    def explain(self, body: bytes) -> bytes:
        self.explaining.set()
        assert self.release.wait(60), "the test never released the explanation"
        self.explained += 1
        return b'{"explained": true}'

    def predict(self, window: Any, endpoint: str) -> bytes:
        self.calls += 1
        return b'{"ok": true}'

    def model_info(self) -> bytes:
        return b"{}"


async def call(
    gateway: Gateway,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []
    parts = chunks if chunks is not None else [body]
    headers = {
        "content-type": "application/json",
        **({} if chunks is not None else {"content-length": str(len(body))}),
        **(headers or {}),
    }

    async def receive() -> dict[str, Any]:
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items() if v is not None],
    }
    await gateway(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def run(gateway: Gateway, *args: Any, **kwargs: Any) -> tuple[int, dict[bytes, bytes], bytes]:
    return asyncio.run(call(gateway, *args, **kwargs))


def gateway(stub: Stub | None = None, observed: list | None = None) -> Gateway:
    stub = stub or Stub()

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("only probes reach BentoML")

    return Gateway(
        inner,
        resolve=lambda: stub,
        observe=lambda endpoint, status, seconds: (observed if observed is not None else []).append((endpoint, status)),
        metrics=lambda: (b"m 1\n", "text/plain"),
    )


def window() -> bytes:
    return json.dumps({"symbol": "BTCUSDT", "interval": "1h", "candles": []}).encode()


def test_past_max_pending_waiting_requests_get_a_fast_503_with_retry_after():
    """Ten requests arrive together: two wait in the bounded queue (max_pending 2) and are answered in
    order, the other eight are refused at once without being computed; then the queue admits again."""
    stub = Stub()
    g = gateway(stub)

    async def burst(n: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        return await asyncio.gather(*(call(g, "POST", "/predict", window()) for _ in range(n)))

    answers = asyncio.run(burst(10))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 2 and statuses.count(503) == 8 and stub.calls == 2
    refused = next(a for a in answers if a[0] == 503)
    assert refused[1][b"retry-after"] == b"1" and json.loads(refused[2])["error"]["code"] == "overloaded"
    assert not g.queue and run(g, "POST", "/predict", window())[0] == 200 and stub.calls == 3


def test_batches_in_flight_are_bounded():
    stub = Stub()
    g = gateway(stub)
    g.batches = stub.max_pending_batches
    status, headers, _ = run(g, "POST", "/predict_batch", b'{"windows": []}')
    assert status == 503 and headers[b"retry-after"] == b"1"


def test_size_is_refused_from_the_header_or_while_streaming():
    g = gateway()
    status, headers, body = run(g, "POST", "/predict", b"x" * 10, headers={"content-length": "5000"})
    assert status == 413 and headers[b"connection"] == b"close"
    status, _, body = run(g, "POST", "/predict", chunks=[b"[" * 600, b"1" * 600, b"never read"])
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"


def test_routes_methods_and_media_types():
    observed: list = []
    g = gateway(observed=observed)
    assert run(g, "GET", "/wp-admin")[0] == 404
    assert run(g, "GET", "/predict")[0] == 405
    assert run(g, "POST", "/predict", window(), headers={"content-type": "text/plain"})[0] == 415
    assert run(g, "POST", "/predict", b"{", headers={})[0] == 400
    assert (
        run(g, "GET", "/model_info")[0] == 200
        and run(g, "POST", "/model_info", b"", headers={"content-type": None})[0] == 200
    )
    assert [e for e, _ in observed] == ["other", "/predict", "/predict", "/predict", "/model_info", "/model_info"]


def test_a_starting_service_answers_503_and_a_bug_answers_a_plain_500():
    def starting() -> Any:
        raise RuntimeError("service isn't instantiated yet")

    g = gateway()
    g.resolve = starting
    status, headers, _ = run(g, "POST", "/predict", window())
    assert status == 503 and headers[b"retry-after"] == b"1"

    class Broken(Stub):
        def predict(self, window: Any, endpoint: str) -> bytes:
            raise ZeroDivisionError("a bug")

    status, _, body = run(gateway(Broken()), "POST", "/predict", window())
    assert status == 500 and b"a bug" not in body and json.loads(body)["error"]["code"] == "internal"


def test_the_error_body_is_capped_whatever_the_problems():
    problems = Problems()
    for i in range(5000):
        problems.add(f"candles[{i}].open_time" + "x" * 5000, "\udcff" * 3000 + "é" * 3000)
    try:
        problems.raise_if_any()
    except BadRequest as exc:
        body = error_body(exc)
    error = json.loads(body)["error"]
    assert (
        len(body) <= MAX_ERROR_BYTES
        and len(error["details"]) <= 20
        and error["truncated"] == 5000 - len(error["details"])
    )


class _Timeout:
    """The parts of BentoML's TimeoutMiddleware that its __call__ uses."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    def _set_timer_out(self, waiter: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_exception(asyncio.TimeoutError)


def test_the_timeout_middleware_releases_each_request_when_it_ends():
    """Upstream leaves one live timer per request for the whole timeout (holding the request's future and
    context); after 200 requests none may be left scheduled."""
    from sofare.serving.http import timeout_middleware_call

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def many() -> int:
        middleware = _Timeout(app, timeout=3600)

        async def send(message: Any) -> None:
            pass

        for _ in range(200):
            await timeout_middleware_call(middleware, {"type": "http"}, None, send)
        return sum(not handle.cancelled() for handle in asyncio.get_running_loop()._scheduled)

    assert asyncio.run(many()) == 0


def test_a_timed_out_request_gets_a_504_in_the_error_shape():
    from sofare.serving.http import timeout_middleware_call

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    async def once() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await timeout_middleware_call(_Timeout(slow, timeout=0.01), {"type": "http"}, None, send)
        return sent

    sent = asyncio.run(once())
    assert sent[0]["status"] == 504 and json.loads(sent[1]["body"])["error"]["code"] == "timeout"


def test_explanations_run_off_the_event_loop_and_past_their_bound_get_a_fast_503():
    """Five /explain requests arrive while explanations block: two are admitted (explain_max_pending 2), three get
    a 503 with Retry-After at once; /predict is answered meanwhile (the loop is free), and once released both
    admitted explanations answer and the bound admits again."""
    stub = Stub()
    g = gateway(stub)

    async def scenario() -> tuple[list[int], int, bytes]:
        explains = [asyncio.ensure_future(call(g, "POST", "/explain", window())) for _ in range(5)]
        # only refusals can finish while the admitted two block; polled, never timed
        while not stub.explaining.is_set() or sum(t.done() for t in explains) < 3:
            await asyncio.sleep(0.01)
        refused = [t.result() for t in explains if t.done()]
        assert len(refused) == 3 and all(a[0] == 503 and a[1][b"retry-after"] == b"1" for a in refused)
        assert g.explains == 2
        predicted = await call(g, "POST", "/predict", window())
        assert stub.explained == 0  # /predict answered while both explanations still block
        stub.release.set()
        answers = [await t for t in explains]
        return [a[0] for a in answers], predicted[0], answers[-1][2]

    statuses, predicted, _ = asyncio.run(scenario())
    assert predicted == 200 and sorted(statuses) == [200, 200, 503, 503, 503] and stub.explained == 2
    assert g.explains == 0
    stub.release.set()
    status, _, body = run(g, "POST", "/explain", window())
    assert status == 200 and json.loads(body) == {"explained": True}


def test_explain_slots_are_shared_by_every_process_using_the_folder(tmp_path):
    """Two Slots on one folder stand for two workers (flock excludes other open descriptions, as other processes):
    one slot on the machine is one explanation at a time, whichever worker takes it."""
    worker_a, worker_b = Slots(tmp_path, 1), Slots(tmp_path, 1)
    assert worker_a.take() == 0
    assert worker_b.take() is None and worker_a.take() is None
    worker_a.give(0)
    assert worker_b.take() == 0 and worker_a.take() is None
    worker_b.give(0)
    assert Slots(tmp_path, 2).take() == 0
