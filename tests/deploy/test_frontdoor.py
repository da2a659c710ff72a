"""The canary front door against a real nginx on loopback, with two small Python HTTP servers as the variants.

Ports are all chosen by the OS; nothing asserts on durations: waits are bounded polls with generous limits.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sofare.deploy import frontdoor
from sofare.deploy.frontdoor import FrontDoor, FrontDoorError, Routing

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed: scripts/system-deps.sh installs it (Debian package nginx-light)"
)


class Upstream:
    """A stand-in serving process: answers GET and POST with {"variant": ...}, echoing what it received; can be
    switched to answer 503, or shut down (then connecting is refused)."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.status = 200
        self.hits = 0
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with upstream._lock:
                    upstream.hits += 1
                    status = upstream.status
                payload = {
                    "variant": upstream.variant,
                    "client_id": self.headers.get("X-Client-Id"),
                    "x_variant": self.headers.get("X-Variant"),
                    "received": json.loads(body) if body else None,
                }
                if status != 200:
                    payload = {"error": f"{upstream.variant} is unavailable"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name=f"upstream-{variant}", daemon=True
        )
        self._thread.start()
        self._closed = False

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(timeout=30)


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def served_by(self) -> str | None:
        return self.headers.get("X-Served-By")


def call(
    port: int,
    method: str = "GET",
    path: str = "/predict",
    *,
    client_id: str | None = None,
    variant: str | None = None,
    payload: object = None,
) -> Response:
    headers = {}
    if client_id is not None:
        headers["X-Client-Id"] = client_id
    if variant is not None:
        headers["X-Variant"] = variant
    body = None
    if payload is not None:
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served(port: int, client_id: str, variant: str | None = None) -> str:
    """The variant that answered, checking that X-Served-By and the body agree."""
    response = call(port, client_id=client_id, variant=variant)
    assert response.status == 200, response.body
    assert response.served_by == response.json()["variant"], (response.served_by, response.body)
    return response.json()["variant"]


@pytest.fixture
def stable() -> Iterator[Upstream]:
    server = Upstream("stable")
    yield server
    server.shutdown()


@pytest.fixture
def canary() -> Iterator[Upstream]:
    server = Upstream("canary")
    yield server
    server.shutdown()


@pytest.fixture
def door(tmp_path: Path) -> Iterator[FrontDoor]:
    front = FrontDoor(tmp_path / "nginx", nginx_bin=NGINX or "nginx")
    try:
        yield front
    finally:
        front.stop()


@pytest.fixture
def listen_port() -> int:
    return free_port()


def test_split_is_sticky_near_the_weight_and_overridable(
    door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int
) -> None:
    routing = Routing(stable_port=stable.port, canary_port=canary.port, canary_weight=0.5, listen_port=listen_port)
    door.apply(routing)
    assert door.running()
    assert door.current() == routing
    assert door.url == f"http://127.0.0.1:{listen_port}"

    variants = [served(listen_port, f"client-{i}") for i in range(400)]
    share = variants.count("canary") / len(variants)
    assert 0.40 <= share <= 0.60, share

    for client in ("client-7", "client-8", "someone-else"):
        assert len({served(listen_port, client) for _ in range(20)}) == 1

    for i in range(20):
        assert served(listen_port, f"client-{i}", variant="stable") == "stable"
        assert served(listen_port, f"client-{i}", variant="canary") == "canary"
    # Without X-Client-Id the client address decides: one address, one variant.
    assert len({call(listen_port).served_by for _ in range(10)}) == 1


def test_headers_pass_through_unchanged(door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int) -> None:
    door.apply(Routing(stable.port, canary.port, 0.5, listen_port))
    body = call(listen_port, client_id="abc-123", variant="canary").json()
    assert (body["client_id"], body["x_variant"]) == ("abc-123", "canary")
    assert call(listen_port, "GET", frontdoor.HEALTH_PATH).body == b"ok\n"


def test_weight_zero_one_and_no_canary(door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int) -> None:
    clients = [f"c{i}" for i in range(60)]
    door.apply(Routing(stable.port, canary.port, 0.0, listen_port))
    assert {served(listen_port, client) for client in clients} == {"stable"}
    # Weight 0 with a canary deployed: forcing still reaches it (a smoke test before any traffic shifts).
    assert served(listen_port, "c0", variant="canary") == "canary"

    door.apply(Routing(stable.port, canary.port, 1.0, listen_port))  # a reload: verified before apply returns
    assert {served(listen_port, client) for client in clients} == {"canary"}
    assert served(listen_port, "c0", variant="stable") == "stable"

    door.apply(Routing(stable.port, None, 0.7, listen_port))  # no canary deployed: the weight means nothing
    assert {served(listen_port, client) for client in clients} == {"stable"}
    assert served(listen_port, "c0", variant="canary") == "stable"
    assert canary.hits == 61


@pytest.mark.parametrize("weight", [1e-9, 0.00005, 0.123456, 0.99999])
def test_extreme_weights_render_valid_percentages(
    door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int, weight: float
) -> None:
    routing = Routing(stable.port, canary.port, weight, listen_port)
    text = frontdoor.render(routing, door.prefix_dir)
    percent = {1e-9: "0.01%", 0.00005: "0.01%", 0.123456: "12.35%", 0.99999: "99.99%"}[weight]
    assert f"{percent}  canary;" in text and "*  stable;" in text
    door.apply(routing)  # nginx -t accepts it
    assert served(listen_port, "x") in {"stable", "canary"}


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -0.1, 1.5])
def test_invalid_weights_raise_and_change_nothing(
    door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int, weight: float
) -> None:
    good = Routing(stable.port, canary.port, 0.0, listen_port)
    door.apply(good)
    before = (door.conf_path.read_bytes(), door.routing_path.read_bytes())
    with pytest.raises(ValueError, match="canary_weight"):
        door.apply(Routing(stable.port, canary.port, weight, listen_port))
    assert (door.conf_path.read_bytes(), door.routing_path.read_bytes()) == before
    assert door.current() == good
    assert served(listen_port, "c1") == "stable"


def test_canary_503_is_retried_on_stable(door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int) -> None:
    door.apply(Routing(stable.port, canary.port, 1.0, listen_port))
    canary.status = 503
    payload = {"symbol": "BTC-USD", "horizon": 24}
    for forced in (None, "canary"):
        response = call(listen_port, "POST", client_id="p1", variant=forced, payload=payload)
        assert response.status == 200, response.body
        assert response.served_by == "stable"
        assert response.json()["variant"] == "stable"
        assert response.json()["received"] == payload  # the POST body was replayed (non_idempotent)
    assert canary.hits == 2 and stable.hits == 2


def test_canary_down_is_retried_on_stable(
    door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int
) -> None:
    door.apply(Routing(stable.port, canary.port, 1.0, listen_port))
    assert served(listen_port, "d1") == "canary"
    canary.shutdown()
    for i in range(5):
        response = call(listen_port, "POST", client_id=f"d{i}", payload={"n": i})
        assert response.status == 200, response.body
        assert response.served_by == "stable"
        assert response.json()["received"] == {"n": i}


def test_config_failing_nginx_t_is_never_applied(
    door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = Routing(stable.port, canary.port, 0.0, listen_port)
    door.apply(good)
    before = (door.conf_path.read_bytes(), door.routing_path.read_bytes())
    monkeypatch.setattr(frontdoor, "render", lambda *args, **kwargs: "events {}\nhttp { no_such_directive on; }\n")
    with pytest.raises(FrontDoorError, match="no_such_directive"):
        door.apply(Routing(stable.port, canary.port, 1.0, listen_port))
    assert (door.conf_path.read_bytes(), door.routing_path.read_bytes()) == before
    assert not (door.prefix_dir / "nginx.conf.new").exists()
    assert door.current() == good
    assert door.running()
    assert {served(listen_port, f"c{i}") for i in range(30)} == {"stable"}


def test_reloads_under_load_drop_nothing(door: FrontDoor, stable: Upstream, canary: Upstream, listen_port: int) -> None:
    door.apply(Routing(stable.port, canary.port, 0.5, listen_port))
    done = threading.Event()
    statuses: list[int] = []
    errors: list[str] = []

    def load() -> None:
        i = 0
        while (i < 300 or not done.is_set()) and i < 100_000:
            try:
                response = call(listen_port, "POST", client_id=f"load-{i % 50}", payload={"i": i})
                statuses.append(response.status)
                if response.status == 200 and response.served_by != response.json()["variant"]:
                    errors.append(f"request {i}: X-Served-By {response.served_by} for {response.body!r}")
            except OSError as exc:
                errors.append(f"request {i}: {exc!r}")
            i += 1

    worker = threading.Thread(target=load, name="load", daemon=True)
    worker.start()
    try:
        for weight in (0.1, 0.9, 0.3, 1.0, 0.0):
            door.apply(Routing(stable.port, canary.port, weight, listen_port))
    finally:
        done.set()
        worker.join(timeout=600)
    assert not worker.is_alive()
    assert errors == []
    assert len(statuses) >= 300
    assert set(statuses) == {200}
    assert door.current() == Routing(stable.port, canary.port, 0.0, listen_port)


def test_stop_leaves_no_process_and_closes_the_port(door: FrontDoor, stable: Upstream, listen_port: int) -> None:
    door.apply(Routing(stable.port, None, 0.0, listen_port))
    master = door.pid()
    assert master is not None
    workers = frontdoor._children(master)
    assert workers
    door.stop()
    assert not door.running()
    assert not any(frontdoor._alive(pid) for pid in {master, *workers})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", listen_port), timeout=10).close()
    door.stop()  # idempotent
    door.start()  # and it comes back with the applied config
    assert served(listen_port, "again") == "stable"


def test_start_failure_applies_nothing(door: FrontDoor, stable: Upstream, listen_port: int) -> None:
    with socket.socket() as blocker:  # nginx -t does not bind: only starting tells the port is taken
        blocker.bind(("127.0.0.1", listen_port))
        blocker.listen()
        with pytest.raises(FrontDoorError, match="in use"):
            door.apply(Routing(stable.port, None, 0.0, listen_port))
    assert not door.running()
    assert door.current() is None
    assert not door.conf_path.exists()
