"""An open-loop HTTP/1.1 load generator on asyncio (uvloop when importable), run in a process of its own.

Open loop: request i is due at `start + i / rate` whatever happened to the earlier ones, and its latency
counts from that due time, so a server that falls behind sees its backlog in the percentiles (a closed
loop would quietly slow down with it: coordinated omission). Each request goes out on an idle persistent
keep-alive connection, or on a new one when none is idle: the generator never waits for a connection.
Requests are prebuilt bytes; a response is read by its status line and `Content-Length` (or chunks), and a
`Connection: close` from the server (its 503 and 413 answers send one) retires the connection. A kept-alive
connection the server closed while it was idle is skipped, or, when that shows only on use (no byte of an
answer), the request is sent once more on a new connection, as HTTP clients do.

A closed loop is here too (`clients` connections, each sending its next request when the last answer
came): for sequential latency and for throughput of large requests.

From Python: `run(url, [job, ...])` starts `python benchmarks/loadgen.py SPEC OUT` and runs the jobs
concurrently in that process (one event loop), then returns one result per job; `summary(result)` gives
the percentiles. A job is a dict:

    {"kind": "open", "path": "/predict", "bodies": [bytes, ...], "rate": 200, "seconds": 10}
    {"kind": "closed", "path": "/predict_batch", "bodies": [bytes], "clients": 2, "seconds": 5}  # or "count"
    optional: "method" (POST with bodies, else GET), "timeout" (s after the last request is due), "warm"
    (connections opened before the start), "delay" (s before the job starts)

Each result: {"ms": [...], "status": [...], "lag_ms": [...], "elapsed": s, "connections": n, "t0": wall, "t1": wall}
(t0 .. t1: the load's window in `time.time()` seconds, from the first request due to the last answer or timeout, to
line it up with events logged by the server); status 0 is a
connection error (or, closed loop, a timeout), -1 a request still unanswered `timeout` seconds after the last one
was due; `lag_ms` is how late the generator itself started each request (a generator that cannot keep up shows
here, not as server latency; connecting is not part of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

now = time.perf_counter


def request_bytes(
    host: str,
    path: str,
    body: bytes | None = None,
    method: str | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    method = method or ("POST" if body is not None else "GET")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one request, read its whole response: (status, whether the connection may be reused)."""
    try:
        writer.write(request)
        if len(request) > 65536:
            await writer.drain()
        line = await reader.readline()
    except ConnectionResetError as exc:
        raise StaleConnection(str(exc)) from None
    if not line:
        raise StaleConnection("connection closed before a response")
    version, status = line.split(b" ", 2)[:2]
    length, chunked, keep = None, False, version == b"HTTP/1.1"
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n"):
            break
        if not header:
            raise ConnectionError("connection closed in the headers")
        name, _, value = header.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            keep = value != b"close" if keep else value == b"keep-alive"
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        keep = False
    return int(status), keep


class StaleConnection(ConnectionError):
    """A kept-alive connection the server had closed: no byte of a response came."""


def _idle(
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """The most recently used idle connection the server has not closed, or None."""
    while idle:
        reader, writer = idle.pop()
        if not reader.at_eof() and not writer.is_closing():
            return reader, writer
        _close(writer)
    return None


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):  # already gone
        writer.close()


async def open_loop(
    host: str, port: int, requests: list[bytes], rate: float, seconds: float, timeout: float = 10.0, warm: int = 4
) -> dict[str, Any]:
    total = max(int(rate * seconds), 1)
    ms = [math.nan] * total
    status = [0] * total
    lag = [math.nan] * total
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0
    finished = 0.0
    for _ in range(warm):
        idle.append(await asyncio.open_connection(host, port))
        opened += 1

    async def one(i: int, due: float) -> None:
        nonlocal opened, finished
        lag[i] = (now() - due) * 1000  # the generator's own lateness (a slow connect is the server's, not counted)
        conn = _idle(idle)
        keep = False
        try:
            if conn is None:
                opened += 1
                conn = await asyncio.open_connection(host, port)
                status[i], keep = await exchange(*conn, requests[i % len(requests)])
            else:
                try:
                    status[i], keep = await exchange(*conn, requests[i % len(requests)])
                except StaleConnection:  # the server closed it while idle: once more on a new one, as clients do
                    _close(conn[1])
                    opened += 1
                    conn = await asyncio.open_connection(host, port)
                    status[i], keep = await exchange(*conn, requests[i % len(requests)])
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status[i] = 0
        finished = now()
        ms[i] = (finished - due) * 1000
        if conn is not None:
            if keep:
                idle.append(conn)
            else:
                _close(conn[1])

    tasks = []
    start = now() + 0.05
    t0 = time.time() + (start - now())
    for i in range(total):
        due = start + i / rate
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    ended = now()
    for i, t in enumerate(tasks):  # unanswered at the timeout: status -1, latency up to now
        if t in pending:
            ms[i], status[i] = (ended - (start + i / rate)) * 1000, -1
    for _, writer in idle:
        _close(writer)
    elapsed = (ended if pending else finished) - start
    return {
        "ms": ms,
        "status": status,
        "lag_ms": lag,
        "elapsed": elapsed,
        "connections": opened,
        "offered": rate,
        "seconds": seconds,
        "t0": t0,
        "t1": time.time(),
    }


async def closed_loop(
    host: str,
    port: int,
    requests: list[bytes],
    clients: int = 1,
    seconds: float | None = None,
    count: int | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    ms: list[float] = []
    status: list[int] = []
    opened = 0
    start = now()
    t0 = time.time()
    end = start + seconds if seconds is not None else math.inf
    per_client = math.ceil(count / clients) if count is not None else None

    async def client(k: int) -> None:
        nonlocal opened
        conn = None
        sent = 0
        while now() < end and (per_client is None or sent < per_client):
            began = now()
            request = requests[(k + sent * clients) % len(requests)]
            try:
                if conn is None:
                    opened += 1
                    conn = await asyncio.open_connection(host, port)
                    code, keep = await asyncio.wait_for(exchange(*conn, request), timeout)
                else:
                    try:
                        code, keep = await asyncio.wait_for(exchange(*conn, request), timeout)
                    except StaleConnection:
                        _close(conn[1])
                        opened += 1
                        conn = await asyncio.open_connection(host, port)
                        code, keep = await asyncio.wait_for(exchange(*conn, request), timeout)
            except (TimeoutError, OSError, EOFError, ValueError, asyncio.IncompleteReadError):
                code, keep = 0, False
            ms.append((now() - began) * 1000)
            status.append(code)
            sent += 1
            if not keep and conn is not None:
                _close(conn[1])
                conn = None
        if conn is not None:
            _close(conn[1])

    await asyncio.gather(*(client(k) for k in range(clients)))
    return {
        "ms": ms,
        "status": status,
        "lag_ms": [],
        "elapsed": now() - start,
        "connections": opened,
        "clients": clients,
        "t0": t0,
        "t1": time.time(),
    }


async def _jobs(host: str, port: int, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async def job(spec: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(spec.get("delay", 0))
        bodies = [Path(f).read_bytes() for f in spec["bodies"]] if spec.get("bodies") else [None]
        requests = [request_bytes(f"{host}:{port}", spec["path"], b, spec.get("method")) for b in bodies]
        if spec["kind"] == "open":
            return await open_loop(
                host, port, requests, spec["rate"], spec["seconds"], spec.get("timeout", 10.0), spec.get("warm", 4)
            )
        return await closed_loop(
            host,
            port,
            requests,
            spec.get("clients", 1),
            spec.get("seconds"),
            spec.get("count"),
            spec.get("timeout", 120.0),
        )

    return list(await asyncio.gather(*(job(s) for s in jobs)))


def main(spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
        loop_name = "asyncio"
    else:
        runner = uvloop.run
        loop_name = "uvloop"
    results = runner(_jobs(spec["host"], spec["port"], spec["jobs"]))
    for r in results:
        r["loop"] = loop_name
    Path(out_file).write_text(json.dumps(results))


def run(url: str, jobs: list[dict[str, Any]], limit: float | None = None) -> list[dict[str, Any]]:
    """Run `jobs` against `url` (http://host:port) concurrently in a separate process; one result each."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    with tempfile.TemporaryDirectory(prefix="sofare-loadgen-") as scratch:
        folder = Path(scratch)
        written: dict[int, str] = {}
        specs = []
        for spec in jobs:
            files = []
            for body in spec.get("bodies") or []:
                if id(body) not in written:
                    written[id(body)] = str(folder / f"body-{len(written)}")
                    Path(written[id(body)]).write_bytes(body)
                files.append(written[id(body)])
            specs.append({**spec, "bodies": files})
        (folder / "spec.json").write_text(json.dumps({"host": host, "port": int(port), "jobs": specs}))
        longest = max(s.get("delay", 0) + s.get("seconds", 60) + s.get("timeout", 10) for s in jobs)
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(folder / "spec.json"), str(folder / "out.json")],
            capture_output=True,
            text=True,
            timeout=limit or longest + 120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"load generator exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return json.loads((folder / "out.json").read_text())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Percentiles of the 200s, the 503s counted (and their p99), everything else counted as errors."""
    pairs = list(zip(result["ms"], result["status"], strict=True))
    ok = [ms for ms, s in pairs if s == 200]
    busy = [ms for ms, s in pairs if s == 503]
    others: dict[str, int] = {}
    for _, s in pairs:
        if s not in (200, 503):
            others[str(s)] = others.get(str(s), 0) + 1
    lag = [x for x in result.get("lag_ms", []) if not math.isnan(x)]
    return {
        "sent": len(pairs),
        "ok": len(ok),
        "n503": len(busy),
        "errors": sum(others.values()),
        "other": others,
        "p50": percentile(ok, 50),
        "p95": percentile(ok, 95),
        "p99": percentile(ok, 99),
        "max": max(ok, default=math.nan),
        "p99_503": percentile(busy, 99),
        "p50_503": percentile(busy, 50),
        "achieved": len(ok) / result["elapsed"] if result["elapsed"] > 0 else math.nan,
        "offered": result.get("offered"),
        "lag_p99": percentile(lag, 99),
        "connections": result["connections"],
        "elapsed": result["elapsed"],
        "window": (result.get("t0"), result.get("t1")),
    }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
