"""POST /explain: its own latency, and what it does to /predict under load, on a real `bentoml serve`.

Setup (not timed) is the serving benchmark's (`bench_serving._setup`: six months of real hourly data, one SofareM3
trained with 1 trial and 1 epoch, built into a bento; `SOFARE_BENCH_SCRATCH=DIR` reuses it). Requests are real
windows from the warehouse, the same as the serving benchmark's.

Measured, in this order:
1. in process: the cost of importing torch and captum (a fresh interpreter) and of one explanation of one window at
   8, 32 (the default) and 128 (the cap) Integrated Gradients steps, on one torch thread (`serving.explain_threads`);
2. one `bentoml serve` (the configured workers): the first /explain of each worker (it loads explain.ts, torch and
   captum: `explainer_load_seconds` in /model_info), then /explain alone, one client after another (closed loop);
3. /predict open loop at 100 req/s, alone and with one client sending /explain back to back, alternated A B A B so a
   machine that slows down during the run affects both alike; then with four explain clients per worker (past
   `serving.explain_slots`, the machine's explanations at once: /explain's 503s, /predict's p99).
Latency counts from each request's scheduled send time (open loop), so a backlog counts against it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import loadgen
from benchmarks.bench_serving import Others, Served, _cpu_times, _port, _setup, _steal
from benchmarks.common import machine, request_windows, scratch_home, write_section

RATE = 100  # /predict req/s
SECONDS = 15  # each /predict run
ROUNDS = 2  # A B alternations
SEQUENTIAL = 40  # /explain requests, one after another
STEPS = (8, 32, 128)


def _in_process(cfg: Any, setup: dict[str, Any], bodies: list[bytes]) -> dict[str, Any]:
    from sofare.serving import predictor, schemas

    probe = "import time; t = time.perf_counter(); import torch; import captum.attr; print(time.perf_counter() - t)"
    imports = [
        float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
        for _ in range(3)
    ]
    p = predictor.Predictor.from_directory(cfg, Path(setup["bundle_dir"]), setup["version"])
    p.context.refresh()
    p.context.managed = True
    from sofare.serving.explainer import Explainer

    explainer = Explainer(p)
    began = time.perf_counter()
    explainer.network()
    load = time.perf_counter() - began
    raws = [p.prepare_all([schemas.decode(b, schemas.Window)])[0].raw[None] for b in bodies[:10]]
    explainer.attribute(raws[0], 32)  # warm-up (TorchScript's first runs profile the graph)
    explainer.attribute(raws[0], 32)
    out: dict[str, Any] = {"import_s": float(np.median(imports)), "load_s": load, "steps": {}}
    for steps in STEPS:
        ms = []
        for raw in raws * 2:
            t = time.perf_counter()
            found = explainer.attribute(raw, steps)
            ms.append((time.perf_counter() - t) * 1000)
        gap = np.abs(found.output - found.baseline_output)
        out["steps"][steps] = {
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "delta": float(np.abs(found.convergence_delta)[0]),
            "gap": float(gap[0]),
        }
    return out


def _info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/model_info", timeout=30) as response:
        return json.loads(response.read())


def _warm(url: str, body: bytes, workers: int, tries: int = 40) -> tuple[list[float], dict[int, float]]:
    """Sequential /explain requests on fresh connections until every worker reports `explainer_load_seconds`:
    (each request's ms, {worker pid: load seconds})."""
    ms: list[float] = []
    loaded: dict[int, float] = {}
    for _ in range(tries):
        request = urllib.request.Request(
            url + "/explain", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
        ms.append((time.perf_counter() - began) * 1000)
        for _ in range(4 * workers):
            info = _info(url)
            if info.get("explainer_load_seconds") is not None:
                loaded[info["prediction_log"]["worker"]] = round(info["explainer_load_seconds"], 3)
        if len(loaded) >= workers:
            break
    return ms, loaded


def _serve(cfg: Any, setup: dict[str, Any], bodies: list[bytes], explain: list[bytes]) -> dict[str, Any]:
    from sofare.serving import bento

    out: dict[str, Any] = {"workers": cfg.serving.workers}
    with bento.Server(cfg, setup["bento"], _port(), "stable") as server:
        served = Served(server)
        others = Others(server)
        # the first /explain of each worker loads the network: one request at a time, each on a new connection (the
        # kernel hands it to a worker), until /model_info shows every worker loaded; their latencies are the cold figure
        out["cold_ms"], loaded = _warm(server.url, explain[0], cfg.serving.workers)
        out["load_seconds"] = sorted(loaded.values())
        served.closed("/predict", bodies, clients=2, seconds=3, measured=False)  # warm-up
        served.closed("/explain", explain, clients=1, count=6, measured=False)
        print(f"    /explain alone, {SEQUENTIAL} one after another …", flush=True)
        out["alone"] = served.closed("/explain", explain, clients=1, count=SEQUENTIAL)
        out["predict"], out["mixed"], out["mixed_explain"] = [], [], []
        for i in range(ROUNDS):
            print(f"    round {i + 1}: /predict {RATE} req/s alone, then with /explain back to back …", flush=True)
            out["predict"].append(served.open("/predict", bodies, RATE, SECONDS))
            both = loadgen.run(
                server.url,
                [
                    {"kind": "open", "path": "/predict", "bodies": bodies, "rate": RATE, "seconds": SECONDS},
                    {"kind": "closed", "path": "/explain", "bodies": explain, "clients": 1, "seconds": SECONDS},
                ],
            )
            out["mixed"].append(loadgen.summary(both[0]))
            out["mixed_explain"].append(loadgen.summary(both[1]))
        clients = 4 * cfg.serving.workers * cfg.serving.explain_slots
        print(f"    /predict {RATE} req/s with {clients} /explain clients (past the admission bound) …", flush=True)
        both = loadgen.run(
            server.url,
            [
                {"kind": "open", "path": "/predict", "bodies": bodies, "rate": RATE, "seconds": SECONDS},
                {"kind": "closed", "path": "/explain", "bodies": explain, "clients": clients, "seconds": SECONDS},
            ],
        )
        out["flood"] = loadgen.summary(both[0])
        out["flood_explain"] = {**loadgen.summary(both[1]), "clients": clients}
        out["others_cpu"] = others.share()
    return out


def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _row(label: str, r: dict[str, Any]) -> str:
    errors = r["errors"] + r.get("n503", 0)
    return (
        f"| {label} | {r['sent']} | {r['ok']} | {r.get('n503', 0)} | {r['errors']} | {_f(r['p50'])} | {_f(r['p99'])} "
        f"| {_f(r['max'])} | {'none' if errors == 0 else errors} |"
    )


def _report(setup: dict[str, Any], local: dict[str, Any], run: dict[str, Any], steal: float, cfg: Any) -> str:
    s = cfg.serving
    lines = [
        "## POST /explain (Integrated Gradients)",
        "",
        f"Machine: {machine()}. **2 cores, shared**: the other helpers' work ran beside it (CPU used by other "
        f"processes during the HTTP runs: {_f(100 * run['others_cpu'], 0)} % of both cores; hypervisor steal "
        f"{_f(100 * steal, 1)} %). Model version {setup['version']} (lookback {setup['lookback']}), bento "
        f"`{setup['bento']}`, {run['workers']} workers, `explain_threads` {s.explain_threads}, "
        f"`explain_max_pending` {s.explain_max_pending}, `explain_slots` {s.explain_slots}, `explain_nice` "
        f"{s.explain_nice}. Produced by `python benchmarks/run.py explain`.",
        "",
        "What is explained: the log-odds of the answered `prob_up`, from the training-mean baseline "
        "(docs/architecture.md). Cost of one window's explanation in process (one torch thread; `delta` is "
        "Captum's convergence delta of the last window, `gap` its output minus baseline output):",
        "",
        "| steps | p50 ms | p99 ms | delta | gap |",
        "|---|---|---|---|---|",
        *(
            f"| {k}{' (default)' if k == s.explain_steps else ''}{' (cap)' if k == s.explain_max_steps else ''} "
            f"| {_f(v['p50'])} | {_f(v['p99'])} | {v['delta']:.2e} | {v['gap']:.3f} |"
            for k, v in local["steps"].items()
        ),
        "",
        f"The first /explain of a worker loads what /predict never needs: importing torch and captum takes "
        f"{_f(local['import_s'], 2)} s in a fresh interpreter (median of 3); loading explain.ts with them in "
        f"process took {_f(local['load_s'], 2)} s; the served workers reported `explainer_load_seconds` "
        f"{', '.join(_f(v, 2) for v in run['load_seconds']) or '—'}; the first /explain requests, one at a time until "
        f"every worker had loaded, took {', '.join(_f(x, 0) for x in run['cold_ms'])} ms. Nothing of it happens until "
        "an /explain arrives.",
        "",
        "| run | sent | 200 | 503 | other errors | p50 ms | p99 ms | max ms | misses |",
        "|---|---|---|---|---|---|---|---|---|",
        _row(f"/explain alone, {SEQUENTIAL} sequential (default steps)", run["alone"]),
        *(_row(f"/predict {RATE} req/s alone, round {i + 1}", r) for i, r in enumerate(run["predict"])),
        *(
            row
            for i, (p, e) in enumerate(zip(run["mixed"], run["mixed_explain"], strict=True))
            for row in (
                _row(f"/predict {RATE} req/s + 1 /explain client, round {i + 1}", p),
                _row("… its /explain (closed loop)", e),
            )
        ),
        _row(f"/predict {RATE} req/s + {run['flood_explain']['clients']} /explain clients", run["flood"]),
        _row("… its /explain (past the admission bound)", run["flood_explain"]),
        "",
    ]
    alone = [r["p99"] for r in run["predict"]]
    mixed = [r["p99"] for r in run["mixed"]]
    lines += [
        f"/predict p99 at {RATE} req/s: alone {', '.join(_f(x) for x in alone)} ms; with explanations running "
        f"{', '.join(_f(x) for x in mixed)} ms; with /explain flooded past its bound {_f(run['flood']['p99'])} ms "
        f"(its 503s answered at p99 {_f(run['flood_explain']['p99_503'])} ms). An explanation computes on its worker's "
        f"explain thread (nice {s.explain_nice}), at most {s.explain_slots} at once on the machine, while the event "
        "loops answer /predict; on 2 cores they still share the CPU (and the GIL between torch calls), which is what "
        "the difference shows.",
    ]
    return "\n".join(lines)


def run() -> str:
    with scratch_home("sofare-bench-explain-") as scratch:
        from sofare.config import load_config

        cfg = load_config()
        setup = _setup(cfg, scratch)
        windows = request_windows(cfg)
        bodies = [json.dumps(w).encode() for w in windows]
        explain = bodies[:8]
        print("  in process …", flush=True)
        local = _in_process(cfg, setup, bodies)
        print("  HTTP …", flush=True)
        began = _cpu_times()
        served = _serve(cfg, setup, bodies, explain)
        steal = _steal(began)
        if os.environ.get("SOFARE_BENCH_SCRATCH"):
            (scratch / "bench-explain-results.json").write_text(
                json.dumps({"local": local, "run": served}, default=str)
            )
    return _report(setup, local, served, steal, cfg)


if __name__ == "__main__":
    write_section("explain", run())
