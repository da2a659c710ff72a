"""Serving latency and throughput: a real `bentoml serve` on loopback, driven by an open-loop load generator
(`benchmarks/loadgen.py`, a process of its own) at fixed request rates, next to the in-process floor.

Setup (not timed): six months of real hourly data loaded and validated, one SofareM3 trained with the configured
search space (1 trial, 1 epoch: serving cost does not depend on how well it learnt), built into a bento. Requests
are real windows (feature warm-up + lookback candles) from the warehouse.

Measured, in this order: the in-process floor (msgspec decode, features, model, the whole /predict path) for ONNX
Runtime with 1 and 2 intra-op threads and for TorchScript; then one `bentoml serve` with the configured worker count
(`serving.workers`, set explicitly with SOFARE_SERVING__WORKERS): sequential /predict, /predict open loop at fixed
rates, its capacity (the highest rate with p99 <= 50 ms and no error), 2x that capacity (the bounded queue's 503s),
/predict_latest, /predict_batch, /livez under a batch loop, a 100 MB Content-Length; then the same bento with the
other worker count (1, or 2 when 1 is configured) for the comparison: sequential, 200 and 400 req/s, capacity,
256-window batches. Both runs count their worker processes in /proc. Latency counts from each request's *scheduled*
send time, so a backlog counts against it. Garbage collections in the workers are logged with wall-clock times and
counted against a run only when they overlap its load window; those before a worker's gc.freeze() are startup.

`SOFARE_BENCH_SCRATCH=DIR` keeps the trained model and bento in DIR and reuses them on the next run (development).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import loadgen
from benchmarks.common import machine, request_windows, scratch_home, write_section

SWEEP = (50, 100, 200, 400)  # /predict open loop, req/s, configured worker count
COMPARE_RATES = (200, 400)  # /predict open loop, req/s, both worker counts
SWEEP_SECONDS = 10
STEP_SECONDS = 6  # each capacity-search step
CAP_P99_MS = 50.0  # capacity: the highest rate with p99 <= this and no error (503 included)
LATEST_RATES = (100, 200)
BATCH_SIZES = (64, 256)
BATCH_CLIENTS = (1, 2, 4)
BATCH_SECONDS = 5
OVERSIZE = 100 * 1024 * 1024
KEEP_TOLERANCE = 1.5  # "answered requests keep their p99" at 2x capacity: within this factor of p99 at capacity
GOALS = {
    "p50_at_200": 5.0,
    "p99_at_200": 20.0,
    "batch_per_s": 2000.0,
    "latest_p99": 10.0,
    "http_overhead": 2.0,
    "p99_503": 10.0,
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(ms: list[float]) -> tuple[float, float, float]:
    return tuple(float(np.percentile(ms, q)) for q in (50, 95, 99)) if ms else (math.nan,) * 3


def _cpu_times() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def _steal(before: list[int]) -> float:
    """Share of CPU time the hypervisor gave to others since `before` (/proc/stat steal)."""
    delta = [a - b for a, b in zip(_cpu_times(), before, strict=False)]
    return delta[7] / sum(delta[:8]) if len(delta) > 7 and sum(delta[:8]) else math.nan


def _cpu_seconds(pids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system, all threads) of each process still running, from /proc."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


class Others:
    """CPU the machine spent on processes other than this benchmark's own (this process, its reaped load
    generators, the server it started and that server's workers), as a share of all cores since the start: busy
    time from /proc/stat (user + nice + system) less our own. A check that nothing else competed for the cores."""

    def __init__(self, server: Any = None) -> None:
        self.server = server
        self.pids = self._pids()
        self.stat, self.own, self.tree = _cpu_times(), os.times(), self._tree()

    def _pids(self) -> set[int]:
        if self.server is None:
            return set()
        from sofare.serving import bento

        return bento.process_tree(self.server.process.pid)

    def _tree(self) -> dict[int, float]:
        return _cpu_seconds(self.pids)

    def share(self) -> float:
        tick = os.sysconf("SC_CLK_TCK")
        delta = [a - b for a, b in zip(_cpu_times(), self.stat, strict=False)]
        own, tree = os.times(), self._tree()
        ours = sum(
            getattr(own, k) - getattr(self.own, k) for k in ("user", "system", "children_user", "children_system")
        )
        ours += sum(seconds - self.tree.get(pid, 0.0) for pid, seconds in tree.items())
        total = sum(delta[:8]) / tick
        return max(sum(delta[:3]) / tick - ours, 0.0) / total if total else math.nan


def _timed(fn: Any, args: list[Any]) -> list[float]:
    out = []
    for a in args:
        began = time.perf_counter()
        fn(a)
        out.append((time.perf_counter() - began) * 1000)
    return out


# --- setup --------------------------------------------------------------------------------------------------


def _setup(cfg: Any, scratch: Path) -> dict[str, Any]:
    from sofare import tasks
    from sofare.registry import versions

    cached = scratch / "bench-serving-setup.json"
    if cached.exists():
        return json.loads(cached.read_text())
    print("  loading, validating, training, building …", flush=True)
    tasks.backfill(cfg, ["sample"], "2024-01-01", "2024-06-30")
    tasks.validate_range(cfg, "2024-01-01", "2024-06-30")
    version = tasks.train(cfg, n_trials=1, max_epochs=1, start="2024-01-12", end="2024-06-30")["version"]
    built = tasks.build_bento(cfg, version)
    bundle_dir = versions.download(cfg, version)
    setup = {
        "version": version,
        "bento": built["bento"],
        "bundle_dir": str(bundle_dir),
        "lookback": json.loads((bundle_dir / "meta.json").read_text())["lookback"],
    }
    cached.write_text(json.dumps(setup))
    return setup


# --- in process ---------------------------------------------------------------------------------------------


def _floors(cfg: Any, setup: dict[str, Any], bodies: list[bytes]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The in-process costs of each runtime configuration, measured in interleaved rounds (so a machine that
    speeds up or slows down during the run affects every configuration alike); also the predictors."""
    from sofare.serving import predictor, schemas

    windows = [schemas.decode(b, schemas.Window) for b in bodies]
    batch = schemas.decode(json.dumps({"windows": [json.loads(b) for b in (bodies * 8)[:256]]}).encode(), schemas.Batch)
    local: dict[str, Any] = {}
    meta: dict[str, dict[str, Any]] = {}
    for runtime, threads in (("onnx", 1), ("onnx", 2), ("torch", None)):
        serving = cfg.serving.model_copy(update={"runtime": runtime, "model_threads": threads or 1})
        p = predictor.Predictor.from_directory(
            cfg.model_copy(update={"serving": serving}), Path(setup["bundle_dir"]), setup["version"]
        )
        p.context.refresh()
        p.context.managed = True  # as in the service: the refresher thread keeps it, no request reads the DB
        if runtime == "torch":
            import torch

            threads = torch.get_num_threads()
        name = f"{runtime}, {threads} thread{'s' if threads != 1 else ''}"
        local[name] = p
        meta[name] = {"runtime": runtime, "threads": threads}
    raw1 = local[next(iter(local))].prepare_all([windows[0]])[0].raw[None]
    raws = {n: np.repeat(raw1, n, axis=0) for n in BATCH_SIZES}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in local}
    decode = _timed(lambda b: schemas.decode(b, schemas.Window), bodies * 10)
    print(f"  in process: {', '.join(local)}, interleaved …", flush=True)
    for p in local.values():  # warm-up
        for _ in range(30):
            p.predict_raw(raw1)
        for raw in raws.values():
            p.predict_raw(raw)
    for _ in range(3):
        for name, p in local.items():
            t = times[name]

            def batch_path(b: Any, p: Any = p) -> None:
                prepared = p.prepare_all(b.windows, batch=True)
                p.predict_raw(np.stack([w.raw for w in prepared]))

            t.setdefault("model1", []).extend(_timed(p.predict_raw, [raw1] * 100))
            for n, raw in raws.items():
                t.setdefault(f"model{n}", []).extend(_timed(p.predict_raw, [raw] * 4))
            t.setdefault("features", []).extend(_timed(lambda w, p=p: p.prepare_all([w]), windows * 2))
            t.setdefault("whole", []).extend(
                _timed(lambda b, p=p: p.predict(schemas.decode(b, schemas.Window)), bodies * 2)
            )
            t.setdefault("batch", []).extend(_timed(batch_path, [batch]))
    floor = {
        name: {
            **meta[name],
            "model1": _pct(t["model1"]),
            "features": _pct(t["features"]),
            "decode": _pct(decode),
            "whole": _pct(t["whole"]),
            "model_n": {n: float(np.median(t[f"model{n}"])) for n in BATCH_SIZES},
            "batch_per_s": 256 / float(np.median(t["batch"])) * 1000,
        }
        for name, t in times.items()
    }
    return floor, local


# --- one `bentoml serve` ------------------------------------------------------------------------------------


def _tree(server: Any) -> dict[int, dict[str, Any]]:
    """pid -> {rss_mib, cmd, worker} of the server's processes (BentoML's arbiter and its workers)."""
    from sofare.serving import bento

    out = {}
    for pid in bento.process_tree(server.process.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rss = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)
        out[pid] = {"rss_mib": rss, "cmd": cmd[:160], "worker": "worker" in cmd and pid != server.process.pid}
    return out


def _workers(server: Any) -> tuple[int, float]:
    tree = _tree(server)
    workers = [p for p in tree.values() if p["worker"]]
    return len(workers), sum(p["rss_mib"] for p in workers)


def _wk(n: int | None) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


def _run_of(n: int) -> str:
    return f"{n}-worker run"


# Instrumentation only (never changes what the service does): a sitecustomize on the server's PYTHONPATH that, when
# SOFARE_BENCH_GC_LOG is set, logs each garbage collection of generation 2 or taking >= 10 ms (wall-clock end,
# generation, ms) and the moment the process calls gc.freeze() (the original is called unchanged), one file per
# process.
GC_HOOK = """import gc, os, time
_log = os.environ.get("SOFARE_BENCH_GC_LOG")
if _log:
    _began = [0.0]

    def _write(line):
        with open(f"{_log}-{os.getpid()}", "a") as f:
            f.write(line + "\\n")

    def _gc(phase, info):
        if phase == "start":
            _began[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _began[0]) * 1000
        if info["generation"] == 2 or ms >= 10:
            _write(f"{time.time():.3f} {info['generation']} {ms:.3f}")

    gc.callbacks.append(_gc)
    _freeze = gc.freeze

    def _logged_freeze():
        _freeze()
        _write(f"{time.time():.3f} freeze {gc.get_freeze_count()}")

    gc.freeze = _logged_freeze
"""
GC_LONG_MS = 10.0  # a collection this long or longer is a pause a request can notice


def _gc_env(scratch: Path, name: str) -> dict[str, str]:
    hook = scratch / "gc-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(GC_HOOK)
    for old in hook.glob(f"{name}-*"):
        old.unlink()
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "SOFARE_BENCH_GC_LOG": str(scratch / "gc-hook" / name)}


def _gc_log(prefix: str) -> dict[int, dict[str, Any]]:
    """pid -> {"rows": [(wall-clock end, generation, ms)], "frozen": wall-clock time of its gc.freeze() or None}."""
    out: dict[int, dict[str, Any]] = {}
    for file in Path(prefix).parent.glob(Path(prefix).name + "-*"):
        entry = out.setdefault(int(file.name.rsplit("-", 1)[1]), {"rows": [], "frozen": None})
        for line in file.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            if parts[1] == "freeze":
                entry["frozen"] = entry["frozen"] or float(parts[0])
            else:
                entry["rows"].append((float(parts[0]), int(parts[1]), float(parts[2])))
    return out


def _wait_frozen(prefix: str, workers: int, timeout: float = 20.0) -> int:
    """Wait until `workers` processes have called gc.freeze() (the end of the service's start); how many did."""
    deadline = time.monotonic() + timeout
    while True:
        frozen = sum(1 for e in _gc_log(prefix).values() if e["frozen"])
        if frozen >= workers or time.monotonic() > deadline:
            return frozen
        time.sleep(0.25)


def _overlaps(row: tuple[float, int, float], window: tuple[float, float]) -> bool:
    end, _, ms = row
    return end >= window[0] and end - ms / 1000 <= window[1]


def _gc_stats(rows: list[tuple[float, int, float]]) -> dict[str, Any]:
    full = sorted(ms for _, gen, ms in rows if gen == 2)
    long = [ms for _, _, ms in rows if ms >= GC_LONG_MS]
    return {
        "full": len(full),
        "full_p50": float(np.median(full)) if full else math.nan,
        "full_max": max(full, default=math.nan),
        "long": len(long),
        "long_max": max(long, default=math.nan),
        "max": max((ms for _, _, ms in rows), default=math.nan),
    }


class Served:
    """A running `bentoml serve`: load runs against it, each with the workers' CPU time per answer and its load
    window (wall clock), so the workers' logged garbage collections can be put in the run they fell in."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.url = server.url
        self.pids = {pid for pid, p in _tree(server).items() if p["worker"]}
        self.measured: list[dict[str, Any]] = []
        self.first_load: float | None = None

    def cpu(self) -> dict[int, float]:
        """CPU seconds (user + system, all threads) of each worker."""
        return _cpu_seconds(self.pids)

    def accept_queue(self) -> int | None:
        """Connections waiting in the kernel to be accepted (rx_queue of the listening socket(s) on the port)."""
        port = f":{int(self.url.rsplit(':', 1)[1]):04X}"
        total, found = 0, False
        try:
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(port) and fields[3] == "0A":
                    total += int(fields[4].split(":")[1], 16)
                    found = True
        except (OSError, IndexError, ValueError):
            pass
        return total if found else None

    def record(self, result: dict[str, Any], measured: bool = True) -> None:
        """Note a load run's window: the first load ends the start-up; measured runs get their GC attached."""
        start = result["window"][0]
        if start is not None and (self.first_load is None or start < self.first_load):
            self.first_load = start
        if measured:
            self.measured.append(result)

    def _run(self, job: dict[str, Any], keep_ms: bool = False, measured: bool = True, **label: Any) -> dict[str, Any]:
        before = self.cpu()
        queue: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                depth = self.accept_queue()
                if depth is not None:
                    queue.append(depth)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            raw = loadgen.run(self.url, [job])[0]
        finally:
            stop.set()
            sampler.join()
        result = {**label, **loadgen.summary(raw)}
        result["accept_queue"] = max(queue, default=None)
        if keep_ms:
            result["ms_all"] = [ms for ms, status in zip(raw["ms"], raw["status"], strict=True) if status == 200]
        used = [seconds - before.get(pid, 0.0) for pid, seconds in self.cpu().items()]
        result["cpu_ms"] = sum(used) * 1000 / max(result["ok"] + result["n503"], 1)
        result["cpu_split"] = [u / sum(used) if sum(used) else math.nan for u in sorted(used, reverse=True)]
        self.record(result, measured)
        return result

    def open(self, path: str, bodies: list[bytes] | None, rate: float, seconds: float, **extra: Any) -> dict[str, Any]:
        job = {"kind": "open", "path": path, "bodies": bodies, "rate": rate, "seconds": seconds, **extra}
        return self._run(job, rate=rate)

    def closed(
        self,
        path: str,
        bodies: list[bytes] | None,
        clients: int = 1,
        keep_ms: bool = False,
        measured: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        job = {"kind": "closed", "path": path, "bodies": bodies, "clients": clients, **extra}
        return self._run(job, keep_ms, measured, clients=clients)

    def gc(self, prefix: str) -> dict[str, Any]:
        """The workers' logged collections, split into start-up (before the worker's gc.freeze(), or before the
        first request for a worker that never froze), measured load (overlapping a measured run's window) and the
        rest (warm-ups, idle time between runs); each measured run gets the collections inside its window."""
        log = _gc_log(prefix)
        startup: list[tuple[float, int, float]] = []
        serving: list[tuple[float, int, float]] = []
        for pid in self.pids:
            entry = log.get(pid, {"rows": [], "frozen": None})
            cut = entry["frozen"] or self.first_load
            for row in entry["rows"]:
                (startup if cut is not None and row[0] <= cut else serving).append(row)
        for result in self.measured:
            result["gc"] = _gc_stats([row for row in serving if _overlaps(row, result["window"])])
        load = [row for row in serving if any(_overlaps(row, r["window"]) for r in self.measured)]
        other = [row for row in serving if row not in load]
        return {
            "startup": _gc_stats(startup),
            "load": _gc_stats(load),
            "other": _gc_stats(other),
            "workers": len(self.pids),
            "frozen": sum(1 for pid in self.pids if log.get(pid, {}).get("frozen")),
        }


def _passes(r: dict[str, Any]) -> bool:
    return r["errors"] == 0 and r["n503"] == 0 and r["ok"] > 0 and r["p99"] <= CAP_P99_MS


def _saturated(r: dict[str, Any]) -> bool:
    """Past what the workers can compute: they answer less than offered, or a backlog shows in the median."""
    return r["achieved"] < 0.95 * r["rate"] or r["p50"] > CAP_P99_MS or r["ok"] == 0


def _capacity(
    served: Served, body: list[bytes], known: dict[int, dict[str, Any]], start: int | None = None, max_steps: int = 6
) -> tuple[int | None, list[dict[str, Any]]]:
    """The highest rate that passes: upward in steps of 200 (or x1.25 past 1,000) from the best known pass,
    then bisection between the last pass and the first failure, to within ~10 %."""
    steps: list[dict[str, Any]] = []

    def measure(rate: int) -> dict[str, Any]:
        print(f"    capacity step {rate} req/s …", flush=True)
        r = served.open("/predict", body, rate, STEP_SECONDS)
        known[rate] = r
        steps.append(r)
        return r

    if start is not None and start not in known:
        measure(start)
    for _ in range(max_steps):
        passed = [k for k, r in known.items() if _passes(r)]
        low = max(passed, default=0)
        failed = [k for k, r in known.items() if not _passes(r) and k > low]
        high = min(failed, default=None)
        if high is None:
            rate = low + 200 if low < 1000 else int(low * 1.25 / 50) * 50
        elif high - low > max(25, 0.1 * low):
            rate = int(round((low + high) / 2 / 25) * 25)
            if rate in (low, high):
                break
        else:
            break
        measure(rate)
    passed = [k for k, r in known.items() if _passes(r)]
    return (max(passed) if passed else None), steps


def _oversized(url: str, tries: int = 20) -> dict[str, Any]:
    """POST /predict declaring a 100 MB body, headers only: time to the complete 413 answer."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {OVERSIZE}\r\n\r\n"
    ).encode()
    ms, statuses = [], []
    for _ in range(tries):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            began = time.perf_counter()
            s.sendall(head)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            header, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in header.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(rest) < length:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            ms.append((time.perf_counter() - began) * 1000)
            statuses.append(int(header.split(b" ")[1]) if header else 0)
    return {"p50": float(np.percentile(ms, 50)), "max": max(ms), "statuses": sorted(set(statuses)), "tries": tries}


def _sequential(served: Served, bodies: list[bytes], in_process: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sequential /predict and the same path in process (decode + Predictor.predict, the served configuration) in
    alternating blocks, so both see the machine in the same state: the HTTP overhead."""
    from sofare.serving import schemas

    http_ms: list[float] = []
    local_ms: list[float] = []
    cpu = 0.0
    for block in range(5):
        some = bodies[block::5] * 8
        r = served.closed("/predict", some, count=len(some), keep_ms=True)
        http_ms += r.pop("ms_all")
        cpu += r["cpu_ms"] / 5
        local_ms += _timed(lambda b: in_process.predict(schemas.decode(b, schemas.Window)), some)
    return (
        {"p50": float(np.median(http_ms)), "p99": float(np.percentile(http_ms, 99)), "cpu_ms": cpu, "n": len(http_ms)},
        {"p50": float(np.median(local_ms)), "p99": float(np.percentile(local_ms, 99))},
    )


def _serve(
    cfg: Any,
    setup: dict[str, Any],
    scratch: Path,
    workers: int,
    bodies: list[bytes],
    batch_bodies: dict[int, bytes],
    latest: bytes,
    in_process: Any,
    full: bool,
) -> dict[str, Any]:
    """One `bentoml serve` with SOFARE_SERVING__WORKERS=`workers`. `full`: everything the goals need; else the
    comparison only (sequential, 200 and 400 req/s, capacity, 256-window batches)."""
    from sofare.serving import bento

    label = _wk(workers)
    out: dict[str, Any] = {"workers_set": workers, "full": full}
    gc_env = _gc_env(scratch, f"w{workers}")
    log = gc_env["SOFARE_BENCH_GC_LOG"]
    began = time.monotonic()
    with bento.Server(cfg, setup["bento"], _port(), "stable", SOFARE_SERVING__WORKERS=str(workers), **gc_env) as server:
        out["frozen_at_start"] = _wait_frozen(log, workers)  # every worker started (readyz answers with the first)
        served = Served(server)
        others = Others(server)
        out["workers"], out["rss_idle"] = _workers(server)
        out["tree"] = [p["cmd"] for p in _tree(server).values()]
        print(
            f"  HTTP, SOFARE_SERVING__WORKERS={workers}: {out['workers']} worker process(es) counted in /proc, "
            f"{out['frozen_at_start']} past gc.freeze(), {time.monotonic() - began:.0f} s after the start …",
            flush=True,
        )
        if out["workers"] != workers and not full:
            return out
        served.closed("/predict", bodies, clients=2 * workers, seconds=3, measured=False)  # warm-up
        served.closed("/predict_batch", [batch_bodies[256]], clients=workers, count=2 * workers, measured=False)
        if full:
            served.closed("/predict_latest", [latest], count=50, measured=False)
        out["sequential"], out["in_process"] = _sequential(served, bodies, in_process)
        rates = SWEEP if full else COMPARE_RATES
        known: dict[int, dict[str, Any]] = {}
        for rate in rates:
            print(f"    /predict {rate} req/s for {SWEEP_SECONDS} s …", flush=True)
            known[rate] = served.open("/predict", bodies, rate, SWEEP_SECONDS)
        out["sweep"] = [known[r] for r in rates]
        out["capacity"], out["steps"] = _capacity(served, bodies, known, max_steps=6 if full else 4)
        capacity = out["capacity"]
        if full:
            saturated = [r for r in sorted(known.values(), key=lambda r: r["rate"]) if _saturated(r)]
            out["saturation"] = saturated[0] if saturated else None  # the lowest rate the workers fell behind at
            if capacity:
                print(f"    at capacity {capacity} and at 2x, {SWEEP_SECONDS} s each …", flush=True)
                out["at_capacity"] = served.open("/predict", bodies, capacity, SWEEP_SECONDS)
                out["overload"] = served.open("/predict", bodies, 2 * capacity, SWEEP_SECONDS)
            sat = out["saturation"]
            if sat and (not capacity or 2 * capacity < sat["achieved"]):
                # 2x capacity did not reach the throughput: shed load there too, at 2x what the workers compute
                rate = int(round(2 * sat["achieved"] / 50) * 50)
                print(f"    at 2x the saturated throughput, {rate} req/s …", flush=True)
                out["overload_saturated"] = served.open("/predict", bodies, rate, SWEEP_SECONDS)
            out["latest"] = []
            for rate in LATEST_RATES:
                print(f"    /predict_latest {rate} req/s …", flush=True)
                out["latest"].append(served.open("/predict_latest", [latest], rate, SWEEP_SECONDS))
        out["batch"] = []
        for n in BATCH_SIZES if full else (256,):
            for clients in BATCH_CLIENTS:  # the kernel hands each connection to one worker: more clients spread
                print(f"    /predict_batch {n} windows, {clients} client(s) …", flush=True)
                r = served.closed("/predict_batch", [batch_bodies[n]], clients, seconds=BATCH_SECONDS)
                r.update(windows=n, per_s=r["ok"] * n / r["elapsed"])  # the same dict: its GC is attached later
                out["batch"].append(r)
        if full:
            print("    /livez idle and under a 16-window batch loop …", flush=True)
            out["livez_idle"] = served.open("/livez", None, 50, 3)
            both = loadgen.run(
                served.url,
                [
                    {
                        "kind": "closed",
                        "path": "/predict_batch",
                        "bodies": [batch_bodies[16]],
                        "clients": 1,
                        "seconds": 6,
                    },
                    {"kind": "open", "path": "/livez", "bodies": None, "rate": 50, "seconds": 5, "delay": 0.5},
                ],
            )
            out["livez_busy"] = {**loadgen.summary(both[1]), "batch": loadgen.summary(both[0])}
            served.record(out["livez_busy"])
            served.record(out["livez_busy"]["batch"])
            print("    100 MB Content-Length …", flush=True)
            before = _workers(server)[1]
            out["oversized"] = _oversized(served.url)
            time.sleep(0.5)
            out["oversized"].update(rss_before=before, rss_after=_workers(server)[1])
        out["rss_end"] = _workers(server)[1]
        out["others_cpu"] = others.share()
        out["gc"] = served.gc(log)
    out["seconds"] = time.monotonic() - began
    print(f"  {label}: {out['seconds']:.0f} s", flush=True)
    return out


# --- the report ---------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _verdict(ok: bool | None, none: str = "not measured") -> str:
    return none if ok is None else ("**met**" if ok else "**MISSED**")


HEAD = (
    "| offered req/s | achieved req/s | 200 | 503 | other errors | p50 ms | p95 ms | p99 ms | 503 p99 ms "
    "| worker CPU ms/answer | generator lag p99 ms | connections | max accept queue "
    f"| GC in the run: full / ≥ {GC_LONG_MS:.0f} ms (longest ms) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)
KINDS = {"-1": "unanswered", "0": "connection error"}


def _bad(r: dict[str, Any]) -> str:
    """The refused and failed requests of a run, by kind."""
    parts = [f"{r['n503']} × 503"] if r["n503"] else []
    parts += [f"{n} × {KINDS.get(k, 'HTTP ' + k)}" for k, n in r["other"].items()]
    return ", ".join(parts) or "none"


def _errors(r: dict[str, Any]) -> str:
    if not r["errors"]:
        return "0"
    return f"{r['errors']} (" + ", ".join(f"{n} {KINDS.get(k, 'HTTP ' + k)}" for k, n in r["other"].items()) + ")"


def _gc_cell(r: dict[str, Any]) -> str:
    g = r.get("gc")
    if not g:
        return "—"
    return f"{g['full']} / {g['long']}" + (f" ({_f(g['max'])})" if g["full"] or g["long"] else "")


def _row(label: str, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {_f(r['achieved'], 0)} | {r['ok']} | {r['n503']} | {_errors(r)} | {_f(r['p50'])} | "
        f"{_f(r['p95'])} | {_f(r['p99'])} | {_f(r['p99_503'])} | {_f(r['cpu_ms'], 2)} | {_f(r['lag_p99'])} | "
        f"{r['connections']} | {r.get('accept_queue', '—')} | {_gc_cell(r)} |"
    )


def _batch_cell(b: dict[str, Any] | None) -> str:
    if b is None:
        return "—"
    return f"{b['per_s']:,.0f}" + (f" ({_bad(b)})" if b["n503"] + b["errors"] else "")


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    return f"{_f(r['p50'])} / {_f(r['p99'])}" + (f" ({_bad(r)})" if r["n503"] + r["errors"] else "")


def _at(run: dict[str, Any], rate: int) -> dict[str, Any] | None:
    return next((r for r in run.get("sweep", []) if r["rate"] == rate), None)


def _overload_rows(name: str, over: dict[str, Any], at_cap: dict[str, Any]) -> tuple[str, str]:
    """The two overload goals on one run: answered p99 kept (within KEEP_TOLERANCE of p99 at capacity) and the
    rest refused with 503 in < 10 ms. Nothing refused at all means nothing was shed: that goal is not exercised."""
    kept = over["ok"] > 0 and over["p99"] <= KEEP_TOLERANCE * at_cap["p99"]
    keep = (
        f"| {name}: the answered keep their p99 (within {KEEP_TOLERANCE}× of {at_cap['p99']:.1f} ms at capacity) "
        f"| {over['ok']} answered, p99 {over['p99']:.1f} ms ({over['p99'] / at_cap['p99']:.2f}×), "
        f"{over['achieved']:.0f} req/s achieved | {_verdict(kept)} |"
    )
    if over["n503"] == 0:
        shed = (
            f"| {name}: the rest get 503 in < {GOALS['p99_503']:.0f} ms | no 503 at all, {over['errors']} other "
            f"errors | not exercised (nothing shed) |"
        )
    else:
        ok = over["p99_503"] < GOALS["p99_503"] and over["errors"] == 0
        shed = (
            f"| {name}: the rest get 503 in < {GOALS['p99_503']:.0f} ms (p99 of the 503s) | {over['n503']} × 503, "
            f"p50 {over['p50_503']:.2f} ms, p99 {over['p99_503']:.2f} ms; {over['errors']} other errors | "
            f"{_verdict(ok)} |"
        )
    return keep, shed


def _measured_as_set(run: dict[str, Any]) -> bool:
    return run.get("workers") == run["workers_set"]


BUSY_OTHERS = 0.05  # other processes above this share of the machine's CPU: the figures are not from a quiet machine


def _contended(steal: dict[str, float], n: int, a: int) -> str:
    busy = [
        (name, steal[key])
        for name, key in (
            ("the in-process measurement", "others_floor"),
            (f"the {_run_of(n)}", "others_main"),
            (f"the {_run_of(a)}", "others_alt"),
        )
        if steal.get(key, 0) > BUSY_OTHERS
    ]
    if not busy:
        return ""
    return (
        " **Other processes competed for the cores during "
        + " and ".join(f"{name} ({share:.0%} of the machine)" for name, share in busy)
        + ": those figures are not from a quiet "
        "machine.**"
    )


def _why_workers(main: dict[str, Any], alt: dict[str, Any]) -> str:
    """The configured worker count against the other one, from this run's numbers: what speaks for it, what
    against, what measured alike (within this benchmark's noise bands)."""
    n, a = main["workers_set"], alt["workers_set"]
    head = f"*Workers.* The service runs {_wk(n)} (`serving.workers` = {n})"
    if not (_measured_as_set(main) and _measured_as_set(alt)):
        wrong = [r for r in (main, alt) if not _measured_as_set(r)]
        return (
            head
            + "; "
            + ", ".join(
                f"SOFARE_SERVING__WORKERS={r['workers_set']} started {r.get('workers')} worker process(es)"
                for r in wrong
            )
            + ", so this run cannot compare the two counts."
        )
    pros: list[str] = []
    cons: list[str] = []
    same: list[str] = []

    def judge(text: str, vn: float, va: float, higher: bool, band: float) -> None:
        ratio = vn / va if va else math.inf
        if ratio >= band if higher else ratio <= 1 / band:
            pros.append(text)
        elif ratio <= 1 / band if higher else ratio >= band:
            cons.append(text)
        else:
            same.append(text)

    cn, ca = main.get("capacity"), alt.get("capacity")
    if cn and ca:
        judge(f"capacity {cn:,} req/s ({_wk(a)}: {ca:,})", cn, ca, True, 1.15)
    elif cn or ca:
        (pros if cn else cons).append(f"capacity {_f(cn, 0)} req/s ({_wk(a)}: {_f(ca, 0)})")
    rn, ra = _at(main, 200), _at(alt, 200)
    if rn and ra:
        bad_n, bad_a = rn["n503"] + rn["errors"], ra["n503"] + ra["errors"]

        def p99(r: dict[str, Any], bad: int) -> str:
            return f"{_f(r['p99'])} ms" + (f" with {bad} errors/503" if bad else "")

        text = f"p99 at 200 req/s {p99(rn, bad_n)} ({_wk(a)}: {p99(ra, bad_a)})"
        if bool(bad_n) != bool(bad_a):
            (cons if bad_n else pros).append(text)
        else:
            judge(text, rn["p99"], ra["p99"], False, 1.25)
    bn = max((b for b in main["batch"] if b["windows"] == 256), key=lambda b: b["per_s"], default=None)
    ba = max((b for b in alt["batch"] if b["windows"] == 256), key=lambda b: b["per_s"], default=None)
    if bn and ba:
        judge(
            f"256-window batches {bn['per_s']:,.0f} windows/s ({_wk(a)}: {ba['per_s']:,.0f})",
            bn["per_s"],
            ba["per_s"],
            True,
            1.15,
        )
    sn, sa = main["sequential"]["p50"], alt["sequential"]["p50"]
    judge(f"sequential p50 {sn:.2f} ms ({_wk(a)}: {sa:.2f})", sn, sa, False, 1.15)
    memory = main["rss_end"] - alt["rss_end"]
    cost = (
        f"{_wk(n)} hold {memory:,.0f} MiB more resident memory after the run ({main['rss_end']:,.0f} against "
        f"{alt['rss_end']:,.0f} MiB)"
        if memory > 0
        else f"{_wk(n)} hold {-memory:,.0f} MiB less resident memory after the run"
    )
    alike = f"; alike within this benchmark's noise: {', '.join(same)}" if same else ""
    if pros and not cons:
        text = f"{head} because in this run {_wk(n)} measured better: {', '.join(pros)}{alike}. The cost: {cost}."
    elif cons and not pros:
        text = (
            f"{head}, but the numbers of this run argue against that: {_wk(n)} measured worse on "
            f"{', '.join(cons)}{alike}; {cost}."
        )
    elif pros and cons:
        text = (
            f"{head}; the numbers of this run are mixed: {_wk(n)} measured better on {', '.join(pros)} and "
            f"worse on {', '.join(cons)}{alike}; {cost}."
        )
    else:
        text = (
            f"{head}, but in this run {_wk(n)} and {_wk(a)} measured alike within this benchmark's noise "
            f"({', '.join(same)}), so these numbers do not argue for {n}; {cost}."
        )
    goal = GOALS["p99_at_200"]
    if rn and ra:

        def meets(r: dict[str, Any]) -> str:
            return "met" if r["p99"] <= goal and r["n503"] + r["errors"] == 0 else "missed"

        text += (
            f" The p99 ≤ {goal:.0f} ms goal at 200 req/s is {meets(rn)} with both."
            if meets(rn) == meets(ra)
            else f" The p99 ≤ {goal:.0f} ms goal at 200 req/s is {meets(rn)} with {_wk(n)}, {meets(ra)} with {_wk(a)}."
        )
    busy = [r for r in (main, alt) if r.get("others_cpu", 0) > BUSY_OTHERS]
    if busy:
        text += (
            " Caution: other processes used "
            + " and ".join(f"{r['others_cpu']:.0%} of the machine during the {_run_of(r['workers_set'])}" for r in busy)
            + ", so this comparison is not from a quiet machine."
        )
    multi = max((main, alt), key=lambda r: r["workers_set"])
    split = max(multi["batch"], key=lambda b: b["clients"])
    text += (
        f" A worker computes a batch on one thread and the kernel hands each connection to one worker (with "
        f"{split['clients']} clients the {multi['workers_set']} workers used "
        f"{' / '.join(f'{x:.0%}' for x in split['cpu_split'])} of their CPU); the load generator shares the "
        f"machine's {os.cpu_count()} cores with them. Resident memory per worker after the run: "
        + ", ".join(
            f"~{r['rss_end'] / r['workers']:,.0f} MiB with {_wk(r['workers'])}"
            for r in sorted((main, alt), key=lambda r: r["workers_set"])
        )
        + "."
    )
    return text


def _gc_finding(main: dict[str, Any], max_pending: int) -> str:
    """Garbage collection as a cause of the configured run's p99, only from collections inside the measured load
    windows; start-up collections (before gc.freeze()) are reported apart."""
    g, n = main["gc"], max(main["workers_set"], 1)
    load, start, other = g["load"], g["startup"], g["other"]
    runs = [
        *main["sweep"],
        *main["steps"],
        *(main[k] for k in ("at_capacity", "overload", "overload_saturated") if main.get(k)),
    ]
    hits = [r for r in runs if r.get("gc") and r["gc"]["long"]]
    if not load["full"] and not load["long"]:
        text = (
            f"*Garbage collection.* No collection, full or ≥ {GC_LONG_MS:.0f} ms, fell inside a measured load "
            f"window of the {_run_of(n)}, so garbage collection sets none of its p99 figures."
        )
    elif hits:
        worst = max(hits, key=lambda r: r["gc"]["long_max"])
        held = worst["rate"] / n * worst["gc"]["long_max"] / 1000
        quiet = [r for r in main["sweep"] if r.get("gc") and not r["gc"]["long"] and not _saturated(r)]
        text = (
            f"*Garbage collection.* During the measured load the {_run_of(n)} logged {load['full']} full "
            f"collections (max {_f(load['full_max'])} ms) and {load['long']} collections ≥ {GC_LONG_MS:.0f} ms "
            "of any generation. Each stops one worker's event loop, and the requests due to that worker wait: "
            + "; ".join(
                f"{r['rate']} req/s: p99 {_f(r['p99'])} ms with a {_f(r['gc']['long_max'], 0)} ms collection in the run"
                for r in sorted(hits, key=lambda r: r["rate"])
            )
            + (
                f" (at {worst['rate']} req/s a {worst['gc']['long_max']:.0f} ms pause holds ~{held:.0f} requests "
                "in one worker"
                + (f", past `serving.max_pending` ({max_pending}): the rest get 503" if held > max_pending else "")
                + ")"
            )
            + (
                "; unsaturated sweep runs without one: "
                + ", ".join(f"{r['rate']} req/s p99 {_f(r['p99'])} ms" for r in sorted(quiet, key=lambda r: r["rate"]))
                if quiet
                else ""
            )
            + "."
        )
    else:
        text = (
            f"*Garbage collection.* Inside the measured load windows of the {_run_of(n)} fell {load['full']} full "
            f"collections (longest {_f(load['full_max'], 2)} ms) and {load['long']} of any generation ≥ "
            f"{GC_LONG_MS:.0f} ms, none of those in a /predict open-loop run: garbage collection does not set the "
            "/predict p99 figures above."
        )
    if start["full"] or start["long"]:
        text += (
            f" At start-up, before gc.freeze(), the workers logged {start['full']} full collections (up to "
            f"{_f(start['full_max'], 0)} ms): before the first request, not serving pauses."
        )
    if g["frozen"] < g["workers"]:
        text += (
            f" Only {g['frozen']} of {g['workers']} workers logged gc.freeze(); for the others start-up counts "
            "up to the first request."
        )
    if other["full"] or other["long"]:
        text += (
            f" Outside the measured windows (warm-ups, idle time between runs): {other['full']} full, "
            f"{other['long']} ≥ {GC_LONG_MS:.0f} ms (longest {_f(other['max'], 0)} ms)."
        )
    return text


def _findings(
    floor: dict[str, Any], served: str, main: dict[str, Any], alt: dict[str, Any], max_pending: int
) -> list[str]:
    """Why the threads and workers are what they are, and what limited the service: from this run's numbers."""
    cores = os.cpu_count()
    lab = _wk(main["workers_set"])
    lines = []
    t1, t2 = floor.get("onnx, 1 thread"), floor.get("onnx, 2 threads")
    if t1 and t2:
        m1, m2 = t1["model1"][0], t2["model1"][0]
        single = "faster" if m2 < m1 * 0.95 else ("slower" if m2 > m1 * 1.05 else "no faster")
        b1, b2 = t1["model_n"][256], t2["model_n"][256]
        batch_ms = 256 / t1["batch_per_s"] * 1000
        lines.append(
            f"*Threads.* With 2 ONNX Runtime intra-op threads one window's forward pass takes {m2:.2f} ms against "
            f"{m1:.2f} ms with 1 ({single}). The model is {m1 / t1['whole'][0]:.0%} of the whole in-process /predict "
            f"path ({t1['whole'][0]:.2f} ms p50; decode {t1['decode'][0]:.2f} ms and features {t1['features'][0]:.2f} "
            f"ms are most of the rest). On 256 windows 2 threads take {b2:.1f} ms against {b1:.1f} ms "
            + (
                f"({b1 / b2:.2f}×), which moves a whole 256-window batch ({batch_ms:.0f} ms in process, features "
                f"included) by {(b1 - b2) / batch_ms:.0%} at most, while a second thread competes with the event loop "
                f"and the load for the same {cores} cores."
                if b2 < b1
                else f"with 1: slower there too in this run (the second thread competes for the same {cores} cores)."
            )
        )
        best = min(floor, key=lambda k: floor[k]["whole"][0])
        gap = floor[served]["whole"][0] / floor[best]["whole"][0] - 1
        lines.append(
            f"Fastest whole in-process path in this run: {best} ({floor[best]['whole'][0]:.2f} ms p50); the "
            f"service runs {served} (`serving.runtime`, `serving.model_threads`)"
            + (
                "."
                if best == served
                else f", {gap:.0%} slower in process" + (", within this machine's noise." if gap < 0.05 else ".")
            )
        )
    lines.append(_why_workers(main, alt))
    lines.append(_gc_finding(main, max_pending))
    sat = main.get("saturation")
    found = re.search(r"--backlog (\d+)", " ".join(main.get("tree", [])))
    backlog = found[1] if found else "?"
    if sat:
        shed = sat["n503"] / max(sat["sent"], 1)
        lines.append(
            f"*Saturation, {lab}.* At {sat['rate']} req/s offered the service answered {sat['achieved']:.0f} req/s "
            f"({_f(sat['cpu_ms'], 2)} ms of worker CPU per answer) with p50 {sat['p50']:.0f} ms and p99 "
            f"{sat['p99']:.0f} ms; {sat['n503']} requests ({shed:.1%}) got 503 and the generator had "
            f"{sat['connections']} connections open."
            + (
                f" Up to {sat['accept_queue']} connections (each with its request already sent) waited in the kernel's "
                f"accept queue of the listening socket (`bentoml serve` passes the workers --backlog {backlog}): the "
                "backlog grew where the gateway's in-flight count (`serving.max_pending`) cannot see it, so the bounded "
                "queue did not bound latency."
                if sat["p99"] > 1000 and shed < 0.05 and (sat.get("accept_queue") or 0) > max_pending
                else ""
            )
            + (
                " The backlog grew outside the gateway's in-flight count, so the bounded queue did not bound latency."
                if sat["p99"] > 1000 and shed < 0.05 and (sat.get("accept_queue") or 0) <= max_pending
                else ""
            )
        )
    extra = ("at_capacity", "overload", "overload_saturated")
    runs = [*main["sweep"], *main["steps"], *(main[k] for k in extra if k in main)]
    full = [r for r in runs if backlog.isdigit() and (r.get("accept_queue") or 0) >= int(backlog)]
    if full:
        r = max(full, key=lambda r: r["rate"])
        lost = r["other"].get("-1", 0)
        lines.append(
            f"*Listen backlog full, {lab}.* At {r['rate']} req/s offered the accept queue reached {r['accept_queue']} "
            f"(the backlog is {backlog}): the kernel then drops new connection attempts, the client's TCP retries them "
            f"a second or more later, and {lost} requests were still unanswered 10 s after the last one was due."
        )
    low = main["sweep"][0]
    seq = main["sequential"]
    if low["cpu_ms"] > 1.5 * seq["cpu_ms"]:
        lines.append(
            f"*Isolated requests cost more.* With {lab} at {low['rate']} req/s a request takes "
            f"{low['cpu_ms']:.2f} ms of worker CPU (p50 {low['p50']:.1f} ms) against {seq['cpu_ms']:.2f} ms "
            f"back to back (sequential p50 {seq['p50']:.2f} ms): the workers spend more per request when "
            "requests arrive one by one (cold caches and wake-ups, most likely; not measured further)."
        )
    return lines


def _report(
    setup: dict[str, Any],
    candles: int,
    floor: dict[str, Any],
    served: str,
    main: dict[str, Any],
    alt: dict[str, Any],
    steal: dict[str, float],
    max_pending: int,
) -> str:
    n, a = main["workers_set"], alt["workers_set"]
    lab = _wk(n)
    at200 = _at(main, 200)
    seq = main["sequential"]
    floor_p50 = main["in_process"]["p50"]
    overhead = seq["p50"] / floor_p50
    best_batch = max(main["batch"], key=lambda b: b["per_s"])
    latest_ok = all(r["errors"] == 0 and r["n503"] == 0 and r["p99"] <= GOALS["latest_p99"] for r in main["latest"])
    cap = main.get("capacity")
    at_cap, over, over_sat = main.get("at_capacity"), main.get("overload"), main.get("overload_saturated")
    big = main["oversized"]
    lag = max(r["lag_p99"] for r in main["sweep"])
    rss_growth = big["rss_after"] - big["rss_before"]
    cores = os.cpu_count()
    clean200 = at200["errors"] + at200["n503"] == 0
    counted = (
        ""
        if _measured_as_set(main)
        else f" **Note: SOFARE_SERVING__WORKERS={n} started {main.get('workers')} worker process(es) (counted in "
        "/proc), so the figures below are not for the configured count.**"
    )

    rows = [_row(f"{r['rate']}", r) for r in main["sweep"]]
    rows += [_row(f"{r['rate']} (capacity search)", r) for r in main["steps"]]
    if at_cap and over:
        rows += [_row(f"{cap} (capacity, again)", at_cap), _row(f"{over['rate']} (2× capacity)", over)]
    if over_sat:
        rows += [_row(f"{over_sat['rate']} (2× saturated throughput)", over_sat)]
    sat = main.get("saturation")
    capacity_text = (
        f"Capacity, {lab}: **{cap:,} req/s** (p99 ≤ {CAP_P99_MS:.0f} ms, no error or 503)."
        if cap
        else f"Capacity, {lab}: none of the rates tried kept p99 ≤ {CAP_P99_MS:.0f} ms without errors."
    )
    if at_cap and not _passes(at_cap):
        g = at_cap.get("gc") or {}
        why = (
            f"a {_f(g['long_max'], 0)} ms garbage collection fell inside that run"
            if g.get("long")
            else f"no collection ≥ {GC_LONG_MS:.0f} ms fell inside it: the rate itself sits at the edge of the "
            "criterion"
        )
        capacity_text += (
            f" The re-run at {cap} req/s did not pass (p99 {at_cap['p99']:.1f} ms, "
            f"{at_cap['n503']} × 503, {at_cap['errors']} other errors): {why}, so this capacity varies "
            "from run to run."
        )
    if sat:
        capacity_text += (
            f" Throughput: with {lab} the service first fell behind at {sat['rate']} req/s offered, "
            f"where it answered {sat['achieved']:.0f} req/s."
        )
    g = main["gc"]
    gl, gs, go = g["load"], g["startup"], g["other"]

    def longest(s: dict[str, Any], digits: int) -> str:
        return f" (longest {_f(s['full_max'], digits)} ms)" if s["full"] else ""

    gc_text = (
        f"Garbage collection in the worker processes of the {_run_of(n)} (the table's last column: "
        f"collections overlapping each run's load window): during the measured load {gl['full']} full "
        f"collections{longest(gl, 1)} and {gl['long']} of any generation ≥ {GC_LONG_MS:.0f} ms; at start-up, "
        f"before gc.freeze() ({g['frozen']} of {g['workers']} workers logged it), {gs['full']} full"
        f"{longest(gs, 0)}; during warm-ups and idle time between runs {go['full']} full and {go['long']} ≥ "
        f"{GC_LONG_MS:.0f} ms."
    )

    lines = [
        "## Serving",
        "",
        f"Machine: {machine()}.",
        (
            f"Model: SofareM3 from the configured search space (lookback {setup['lookback']}), served as `sofare build` "
            f"builds it (`bentoml serve` with {lab}, `serving.workers` = {n} as configured; the `Gateway` ASGI layer; "
            f"{served}); requests of {candles} real hourly candles (feature warm-up + lookback), safe-haven and macro "
            "rows from the service's in-memory context."
        ),
        "",
        (
            "Method: an open-loop generator (`benchmarks/loadgen.py`: asyncio + uvloop, raw HTTP/1.1 keep-alive "
            "connections, a new connection whenever none is idle) in a process of its own sends request *i* at "
            "start + *i*/rate whatever happened before; latency counts from that due time, so a backlog shows. Loopback; "
            f"the generator and the server share the machine's {cores} cores, so every figure includes the generator's "
            f"CPU (its own lateness in writing requests, p99 up to {lag:.1f} ms in the {n}-worker sweep, is part of the "
            f"latency). Requests rotate over 36 real windows. Capacity = the highest rate with p99 ≤ {CAP_P99_MS:.0f} ms "
            f"and no error or 503 ({STEP_SECONDS} s per search step, {SWEEP_SECONDS} s for the sweep). Closed loops "
            "(sequential, batches) send the next request when the answer came. Two servers of the same bento, each with "
            f"its worker count set by `SOFARE_SERVING__WORKERS`: {n} (configured; every goal below) and {a} (the "
            "comparison); worker processes counted in /proc. Worker CPU per answer is from /proc; garbage collections "
            "and each worker's gc.freeze() are logged with wall-clock times by a `gc.callbacks` hook this benchmark puts "
            "on the server's PYTHONPATH (instrumentation only), and a collection is counted against a run only when it "
            "overlaps that run's load window. CPU steal (time the hypervisor gave to others, /proc/stat): "
            f"{_f(steal['floor'] * 100)} % in process, {_f(steal['main'] * 100)} % during the {_run_of(n)}, "
            f"{_f(steal['alt'] * 100)} % during the {_run_of(a)}. CPU used by other processes on the machine (/proc/stat "
            "busy time less this benchmark's own processes, as a share of all cores): "
            f"{_f(steal['others_floor'] * 100)} % in process, {_f(steal['others_main'] * 100)} % during the {_run_of(n)}, "
            f"{_f(steal['others_alt'] * 100)} % during the {_run_of(a)}." + _contended(steal, n, a)
        ),
        "",
        (
            "**In process** (`Predictor`; decode = msgspec into `Window`; whole = decode + `Predictor.predict`; batch = "
            "`prepare_all` of 256 windows + one forward pass):"
        ),
        "",
        (
            "| runtime | decode p50 ms | features p50 / p99 ms | model, 1 window p50 / p99 ms "
            "| model, 64 / 256 windows ms | whole /predict p50 / p99 ms | batch of 256, windows/s |"
        ),
        "|---|---:|---|---|---|---|---:|",
        *[
            f"| {name}{' (served)' if name == served else ''} | {f['decode'][0]:.2f} | {f['features'][0]:.2f} / "
            f"{f['features'][2]:.2f} | {f['model1'][0]:.2f} / {f['model1'][2]:.2f} | {f['model_n'][64]:.1f} / "
            f"{f['model_n'][256]:.1f} | {f['whole'][0]:.2f} / {f['whole'][2]:.2f} | {f['batch_per_s']:,.0f} |"
            for name, f in floor.items()
        ],
        "",
        f"**HTTP `/predict`, {lab} (`serving.workers` = {n}, as configured), open loop.**{counted} Sequential, one "
        f"request at a time ({seq['n']} requests in 5 blocks, each followed by the same windows in process: decode + "
        f"`Predictor.predict`, {served}): HTTP p50 {seq['p50']:.2f} ms, p99 {seq['p99']:.2f} ms ({seq['cpu_ms']:.2f} "
        f"ms worker CPU per request); in process p50 {floor_p50:.2f} ms, p99 {main['in_process']['p99']:.2f} ms."
        + (
            f" The same in-process path measured {floor[served]['whole'][0]:.2f} ms p50 a few minutes earlier (table "
            "above): this machine's speed drifts within minutes, which is why the overhead is taken from alternating "
            "blocks."
            if floor_p50 > 1.3 * floor[served]["whole"][0]
            else ""
        ),
        "",
        HEAD,
        *rows,
        "",
        capacity_text,
        gc_text,
        "",
        f"**HTTP `/predict_latest`, {lab}** (answered from memory), open loop, {SWEEP_SECONDS} s:",
        "",
        HEAD,
        *[_row(f"{r['rate']}", r) for r in main["latest"]],
        "",
        (
            f"**HTTP `/predict_batch`, {lab}**, closed loop for {BATCH_SECONDS} s (each client sends its next batch when "
            "the answer came):"
        ),
        "",
        (
            "| windows per request | clients | answered | refused / failed | request p50 / p99 ms | windows/s "
            "| worker CPU ms/window |"
        ),
        "|---:|---:|---:|---:|---|---:|---:|",
        *[
            f"| {b['windows']} | {b['clients']} | {b['ok']} | {_bad(b) if b['errors'] + b['n503'] else 0} | "
            f"{_f(b['p50'])} / "
            f"{_f(b['p99'])} | {b['per_s']:,.0f} | {b['cpu_ms'] / b['windows']:.2f} |"
            for b in main["batch"]
        ],
        "",
        (
            f"**Probes and limits, {lab}.** `/livez` at 50 req/s: p99 {main['livez_idle']['p99']:.2f} ms idle, "
            f"{main['livez_busy']['p99']:.2f} ms (max {main['livez_busy']['max']:.1f} ms, {main['livez_busy']['errors']} "
            f"errors) while one client loops 16-window batches ({main['livez_busy']['batch']['ok']} batches, p50 "
            f"{main['livez_busy']['batch']['p50']:.1f} ms). A `POST /predict` declaring `Content-Length: {OVERSIZE:,}` "
            f"(100 MiB) and sending only its headers: status {', '.join(map(str, big['statuses']))} in {big['p50']:.2f} ms "
            f"p50, {big['max']:.2f} ms max over {big['tries']} tries; RSS of the workers {big['rss_before']:.1f} MiB "
            f"before, {big['rss_after']:.1f} MiB after ({rss_growth:+.1f} MiB)."
        ),
        "",
    ]
    if _measured_as_set(alt):
        runs = sorted((main, alt), key=lambda r: r["workers_set"])

        def head(r: dict[str, Any]) -> str:
            return _wk(r["workers_set"]) + (" (configured)" if r is main else "")

        def batch(r: dict[str, Any], clients: int) -> str:
            return _batch_cell(next((b for b in r["batch"] if b["windows"] == 256 and b["clients"] == clients), None))

        def split(r: dict[str, Any]) -> str:
            at400 = _at(r, 400)
            return " / ".join(f"{x:.0%}" for x in at400["cpu_split"]) if at400 and r["workers"] > 1 else "—"

        def gcs(s: dict[str, Any], digits: int = 1) -> str:
            return f"{s['full']}, {_f(s['full_max'], digits)}"

        def table_row(name: str, cell: Any) -> str:
            return f"| {name} | " + " | ".join(cell(r) for r in runs) + " |"

        lines += [
            (
                f"**{' vs '.join(_wk(r['workers_set']) for r in runs)}** (the same bento; each server's worker count set "
                "with `SOFARE_SERVING__WORKERS`, its worker processes counted in /proc):"
            ),
            "",
            "| | " + " | ".join(head(r) for r in runs) + " |",
            "|---|" + "---:|" * len(runs),
            table_row("worker processes counted", lambda r: str(r["workers"])),
            table_row(
                "RSS of the workers, idle / after the run, MiB", lambda r: f"{r['rss_idle']:,.0f} / {r['rss_end']:,.0f}"
            ),
            table_row(
                "sequential /predict p50 / p99 ms",
                lambda r: f"{r['sequential']['p50']:.2f} / {r['sequential']['p99']:.2f}",
            ),
            *[
                table_row(f"/predict p50 / p99 ms at {rate} req/s", lambda r, rate=rate: _cell(_at(r, rate)))
                for rate in COMPARE_RATES
            ],
            table_row(f"capacity req/s (p99 ≤ {CAP_P99_MS:.0f} ms, no error)", lambda r: _f(r.get("capacity"), 0)),
            *[
                table_row(
                    f"/predict_batch 256 windows, {c} client{'s' if c > 1 else ''}, windows/s",
                    lambda r, c=c: batch(r, c),
                )
                for c in BATCH_CLIENTS
            ],
            table_row("share of the CPU per worker at 400 req/s", split),
            table_row("full GCs during the measured load: count, longest ms", lambda r: gcs(r["gc"]["load"])),
            table_row(f"GCs ≥ {GC_LONG_MS:.0f} ms during the measured load", lambda r: str(r["gc"]["load"]["long"])),
            table_row(
                "full GCs at start-up (before gc.freeze()): count, longest ms", lambda r: gcs(r["gc"]["startup"], 0)
            ),
            "",
            f"{_wk(a)} capacity steps: "
            + (
                ", ".join(
                    f"{r['rate']} req/s p99 {_f(r['p99'])} ms"
                    + (f" ({r['n503']} × 503, {r['errors']} errors)" if r["n503"] or r["errors"] else "")
                    for r in alt["steps"]
                )
                or "none beyond 200 and 400 req/s"
            )
            + ".",
            "",
        ]
    else:
        lines += [
            (
                f"**{_wk(n)} vs {_wk(a)}**: `SOFARE_SERVING__WORKERS={a}` gave {alt.get('workers')} worker "
                "process(es) (counted in /proc), so the comparison was not measured."
            ),
            "",
        ]
    goal_rows = [
        (
            f"| `/predict` p50 ≤ {GOALS['p50_at_200']:.0f} ms at 200 req/s | {at200['p50']:.2f} ms "
            f"({at200['achieved']:.0f} req/s achieved, {at200['errors'] + at200['n503']} errors/503) | "
            f"{_verdict(at200['p50'] <= GOALS['p50_at_200'] and clean200)} |"
        ),
        (
            f"| `/predict` p99 ≤ {GOALS['p99_at_200']:.0f} ms at 200 req/s | {at200['p99']:.2f} ms | "
            f"{_verdict(at200['p99'] <= GOALS['p99_at_200'] and clean200)} |"
        ),
        (
            f"| `/predict_batch` ≥ {GOALS['batch_per_s']:,.0f} windows/s | {best_batch['per_s']:,.0f}/s "
            f"(best: {best_batch['windows']}-window requests, {best_batch['clients']} client(s)) | "
            f"{_verdict(best_batch['per_s'] >= GOALS['batch_per_s'])} |"
        ),
        f"| `/predict_latest` p99 ≤ {GOALS['latest_p99']:.0f} ms | "
        + ", ".join(
            f"{r['p99']:.2f} ms at {r['rate']} req/s"
            + (f" ({r['errors'] + r['n503']} errors/503)" if r["errors"] + r["n503"] else "")
            for r in main["latest"]
        )
        + f" | {_verdict(latest_ok)} |",
        (
            f"| HTTP overhead ≤ {GOALS['http_overhead']:.0f}× in process (sequential p50, decode included, "
            "interleaved) | "
            f"{seq['p50']:.2f} ms vs {floor_p50:.2f} ms = {overhead:.2f}× | "
            f"{_verdict(overhead <= GOALS['http_overhead'])} |"
        ),
    ]
    if at_cap and over:
        goal_rows += _overload_rows(f"at 2× capacity ({over['rate']} req/s)", over, at_cap)
    else:
        goal_rows += [
            (
                "| at 2× capacity: the answered keep their p99, the rest 503 in < 10 ms | no capacity found | "
                "not measured |"
            )
        ]
    if at_cap and over_sat:
        goal_rows += _overload_rows(f"at 2× the saturated throughput ({over_sat['rate']} req/s)", over_sat, at_cap)
    goal_rows.append(
        f"| oversized body: 413 before reading, no memory growth (< 5 MiB) | {', '.join(map(str, big['statuses']))} "
        f"in {big['p50']:.2f} ms p50 / {big['max']:.2f} ms max; RSS of the workers {rss_growth:+.1f} MiB | "
        f"{_verdict(big['statuses'] == [413] and rss_growth < 5)} |"
    )
    findings = [part for line in _findings(floor, served, main, alt, max_pending) for part in (line, "")]
    lines += [
        f"**Goals, {lab}** (`serving.workers` = {n}, as configured; every figure from the {_run_of(n)} above):",
        "",
        "| goal | measured | verdict |",
        "|---|---|---|",
        *goal_rows,
        "",
        *findings,
    ]
    return "\n\n".join(filter(None, "\n".join(lines).split("\n\n")))


def run() -> str:
    started = time.monotonic()
    with scratch_home("sofare-bench-serve-") as scratch:
        from sofare.config import load_config

        cfg = load_config()
        workers = cfg.serving.workers  # the configured count: every goal is measured with it
        other = 1 if workers != 1 else 2
        setup = _setup(cfg, scratch)
        print(f"  setup done at {time.monotonic() - started:.0f} s", flush=True)
        windows = request_windows(cfg)
        bodies = [json.dumps(w).encode() for w in windows]
        batch_bodies = {
            n: json.dumps({"windows": (windows * (n // len(windows) + 1))[:n]}).encode() for n in (16, *BATCH_SIZES)
        }
        latest = json.dumps({"symbol": cfg.market.symbol}).encode()
        print(
            f"  request bodies: /predict {len(bodies[0]) / 1024:.0f} KiB, /predict_batch 256 windows "
            f"{len(batch_bodies[256]) / 2**20:.1f} MiB",
            flush=True,
        )

        began, others = _cpu_times(), Others()
        floor, predictors = _floors(cfg, setup, bodies)
        steal = {"floor": _steal(began), "others_floor": others.share()}
        print(f"  in process done at {time.monotonic() - started:.0f} s", flush=True)
        served = next(
            name
            for name, f in floor.items()
            if f["runtime"] == cfg.serving.runtime
            and (f["runtime"] == "torch" or f["threads"] == cfg.serving.model_threads)
        )
        in_process = predictors[served]
        del predictors
        began = _cpu_times()
        main = _serve(cfg, setup, scratch, workers, bodies, batch_bodies, latest, in_process, full=True)
        steal["main"] = _steal(began)
        began = _cpu_times()
        alt = _serve(cfg, setup, scratch, other, bodies, batch_bodies, latest, in_process, full=False)
        steal["alt"] = _steal(began)
        main["steal"], alt["steal"] = steal["main"], steal["alt"]
        steal["others_main"], steal["others_alt"] = main.get("others_cpu", math.nan), alt.get("others_cpu", math.nan)
        print(
            f"  server processes: {_wk(workers)} {main['tree']}; {_wk(other)} {alt['tree']}; CPU steal {steal}; "
            f"total {time.monotonic() - started:.0f} s",
            flush=True,
        )
        if os.environ.get(
            "SOFARE_BENCH_SCRATCH"
        ):  # development: the raw results, to re-render the report without measuring again
            (scratch / "bench-serving-results.json").write_text(
                json.dumps(
                    {
                        "setup": setup,
                        "candles": len(windows[0]["candles"]),
                        "floor": floor,
                        "served": served,
                        "main": main,
                        "alt": alt,
                        "steal": steal,
                        "max_pending": cfg.serving.max_pending,
                    },
                    default=str,
                )
            )
    return _report(setup, len(windows[0]["candles"]), floor, served, main, alt, steal, cfg.serving.max_pending)


if __name__ == "__main__":
    write_section("serving", run())
