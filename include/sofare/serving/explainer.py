"""POST /explain in the service: a checked window (or a logged prediction's window rebuilt from the warehouse)
-> the prediction plus Captum Integrated Gradients attributions (`sofare.explain.attributions`).

Nothing here runs for /predict. The differentiable network (`explain.ts`, exported beside the served ONNX and
TorchScript files: the inference trace holds fused kernels without a derivative) is loaded on the first
/explain only, with torch and captum (~2.5 s of imports, measured in docs/benchmarks.md), so the service's start
and /predict are unchanged. Explanations run on the gateway's one explain thread (`http.Gateway`), never on
the event loop; their cost is capped before any work by `serving.explain_*` (steps, top_k; one window per
request), each excess a 422 naming the field. A checked window then needs one of `serving.explain_slots` slots
to compute (`Slots`: lock files every worker of every server sharing var/run takes from; none free: a 503 at
once), on a thread at `serving.explain_nice` so the CPU serves /predict's event loops first.

What is explained: the log-odds of the answer's `prob_up` (the calibrated margin of the classification head),
from the zero baseline in scaled space (the training mean of every feature). The attributions sum to
`output - baseline_output` up to `convergence_delta` (Captum's): both are in the answer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import sqlalchemy as sa

from sofare.data import warehouse
from sofare.serving.predictor import _from_warehouse
from sofare.serving.schemas import (
    BadRequest,
    ExplainRequest,
    NoData,
    NotExplainable,
    Overloaded,
    Problem,
    TooMany,
    utc,
)

if TYPE_CHECKING:
    from sofare.explain.attributions import Attributions
    from sofare.serving.predictor import Predictor

log = logging.getLogger(__name__)


class Slots:
    """`n` explanation slots shared by every process on this machine that uses `folder`: one lock file each,
    taken with a non-blocking flock (released by the kernel if a worker dies). The workers of both serving
    variants compute on the same cores, so they share one bound. A folder that cannot be written leaves the
    bound per process (logged once)."""

    def __init__(self, folder: Path, n: int) -> None:
        self.folder = folder
        self.n = n
        self._fds: dict[int, int | None] = {}
        self._mine: set[int] = set()  # flock does not exclude the descriptor that holds it: taken in this process
        self._lock = threading.Lock()

    def _fd(self, i: int) -> int | None:
        if i not in self._fds:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._fds[i] = os.open(self.folder / f"explain-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                log.warning("explain slots are per process: %s", exc)
                self._fds[i] = None
        return self._fds[i]

    def take(self) -> int | None:
        """A free slot's number, or None when all `n` are busy (on this machine)."""
        with self._lock:
            for i in range(self.n):
                if i in self._mine:
                    continue
                fd = self._fd(i)
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                self._mine.add(i)
                return i
        return None

    def give(self, i: int) -> None:
        with self._lock:
            fd = self._fds.get(i)
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._mine.discard(i)


@dataclass(frozen=True)
class Costs:
    steps: int
    top_k: int


class Explainer:
    """The served version's differentiable network, loaded on first use, and the /explain answer."""

    def __init__(self, predictor: Predictor) -> None:
        s = predictor.cfg.serving
        self.predictor = predictor
        self.steps, self.max_steps = s.explain_steps, s.explain_max_steps
        self.top_k, self.max_top_k = s.explain_top_k, s.explain_max_top_k
        self.threads = s.explain_threads
        self.nice = s.explain_nice
        self.max_pending = s.explain_max_pending
        self.slots = Slots(predictor.cfg.var_dir / "run" / "explain-slots", s.explain_slots)
        self._niced: set[int] = set()
        self._network: Any = None
        self._lock = threading.Lock()
        self.load_seconds: float | None = None  # how long the first /explain spent loading (model_info says)

    # --- cost caps, before any work ---

    def costs(self, request: ExplainRequest) -> Costs:
        steps = self.steps if isinstance(request.steps, msgspec.UnsetType) else request.steps
        top_k = self.top_k if isinstance(request.top_k, msgspec.UnsetType) else request.top_k
        for field, value, cap in (("steps", steps, self.max_steps), ("top_k", top_k, self.max_top_k)):
            if value > cap:
                raise TooMany(f"{field}: {value} asked, at most {cap} accepted", [Problem(field, f"at most {cap}")])
        return Costs(steps, top_k)

    def lower_priority(self) -> None:
        """Give the calling thread (the gateway's explain thread) nice `explain_nice`, once: on Linux a thread has
        its own nice value, so the event loop keeps the default and wins the CPU when both want it."""
        tid = threading.get_native_id()
        if tid in self._niced or not sys.platform.startswith("linux") or not self.nice:
            return
        self._niced.add(tid)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), self.nice))
        except OSError as exc:
            log.warning("the explain thread keeps its priority: %s", exc)

    # --- the network, lazily ---

    def network(self) -> Any:
        """The TorchScript network traced with autograd (explain.ts); loaded once, on the first /explain."""
        with self._lock:
            if self._network is None:
                started = time.perf_counter()
                path = self._file()
                import torch

                torch.set_num_threads(self.threads)  # this worker's torch pool: the explain thread's only
                network = torch.jit.load(str(path))
                network.eval()
                from captum.attr import IntegratedGradients  # noqa: F401 - its import cost paid here, once

                self._network = network
                self.load_seconds = time.perf_counter() - started
            return self._network

    def _file(self) -> Path:
        p = self.predictor
        name = p.meta.runtime_files.get("explain")
        directory = p.model.directory
        if name is None or directory is None or not (directory / name).is_file():
            raise NotExplainable(
                f"model: version {p.version} was exported without the differentiable network /explain needs "
                "(explain.ts); versions exported since then have it",
                [Problem("model", f"version {p.version} has no explain.ts")],
            )
        return directory / name

    def attribute(self, raw: np.ndarray, steps: int) -> Attributions:
        from sofare.explain import attributions

        return attributions.explain(self.network(), self.predictor.meta, raw, steps=steps)

    # --- the answer ---

    def answer(self, request: ExplainRequest, started: float) -> dict[str, Any]:
        """The /explain answer: the prediction as /predict answers it (prob_up from the served runtime) plus
        `explanation`. A logged prediction keeps its prediction_id; an explained window gets a fresh one (an
        explanation is a diagnostic: it is not written to the prediction log)."""
        p = self.predictor
        costs = self.costs(request)
        window = request.window()
        logged = None
        if window is None:
            logged = self.logged(str(request.prediction_id))
            window = p.window_at(logged["symbol"], utc(logged["as_of"]))
        (prepared,) = p.prepare_all([window])
        if logged is not None:
            self._check_rebuilt(logged, prepared.raw[-1])
        slot = self.slots.take()
        if slot is None:
            raise Overloaded(
                f"server: all {self.slots.n} explanation slots of this machine are busy; retry shortly",
                [Problem("server", "at capacity for /explain")],
                headers={"Retry-After": "1"},
            )
        try:
            found = self.attribute(prepared.raw[None], costs.steps)
        finally:
            self.slots.give(slot)
        prob, ret = p.predict_raw(prepared.raw[None])
        answer = p.answer(prepared.as_of, prob[0], ret[0], started)
        if logged is not None:
            answer["prediction_id"] = logged["prediction_id"]
        answer["explanation"] = {
            "method": found.method,
            "target": found.target,
            "baseline": found.baseline,
            "steps": found.steps,
            "output": float(found.output[0]),
            "baseline_output": float(found.baseline_output[0]),
            "convergence_delta": float(found.convergence_delta[0]),
            "top": [
                {"feature": c.feature, "modality": c.modality, "t": c.t, "attribution": c.attribution}
                for c in found.top(0, costs.top_k)
            ],
            "by_modality": found.by_modality(0),
            "by_time_step": found.by_time_step(0),
        }
        answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return answer

    # --- a logged prediction's window ---

    def logged(self, prediction_id: str) -> dict[str, Any]:
        """The `predictions` row (with its `prediction_inputs` features, if any) of `prediction_id`; 404 if
        none, 422 if another model version made it."""
        p = self.predictor
        row = _from_warehouse(lambda: read_logged(p.cfg, prediction_id))
        if row is None:
            raise NoData(
                f"prediction_id: {prediction_id} is not in the prediction log (unknown, or not written yet: "
                "rows are written within a second)",
                [Problem("prediction_id", "not in the prediction log")],
            )
        if row["model_version"] != p.version:
            raise BadRequest(
                f"prediction_id: made by model version {row['model_version']} ({row['variant']}); this server "
                f"serves version {p.version}: ask the server that made it (X-Variant: {row['variant']})",
                [Problem("prediction_id", f"made by model version {row['model_version']}, not {p.version}")],
            )
        return row

    def _check_rebuilt(self, logged: dict[str, Any], features: np.ndarray) -> None:
        """The rebuilt window must give the features that were served (the request may have carried its own
        candles or context rows, which the warehouse does not hold)."""
        if logged.get("features") is None:
            return
        served = np.array([np.nan if v is None else v for v in json.loads(logged["features"])], dtype=np.float64)
        if served.shape != features.shape or not np.allclose(
            served, features.astype(np.float64), rtol=1e-6, atol=1e-9, equal_nan=True
        ):
            raise BadRequest(
                "prediction_id: its window cannot be rebuilt from the warehouse (the warehouse's window at "
                f"{logged['as_of']} gives other features than were served: the request carried its own candles or "
                "context rows); send that window to /explain instead",
                [Problem("prediction_id", "window not rebuildable from the warehouse")],
            )


def read_logged(cfg: Any, prediction_id: str) -> dict[str, Any] | None:
    """One `predictions` row joined with its `prediction_inputs` features (None when absent)."""
    pr, pi = warehouse.predictions, warehouse.prediction_inputs
    query = (
        sa.select(
            pr.c.prediction_id,
            pr.c.model_version,
            pr.c.variant,
            pr.c.symbol,
            pr.c.interval,
            pr.c.as_of,
            pr.c.prob_up,
            pi.c.features,
        )
        .select_from(pr.outerjoin(pi, pi.c.prediction_id == pr.c.prediction_id))
        .where(pr.c.prediction_id == prediction_id)
    )
    with warehouse.get_engine(cfg).connect() as conn:
        row = conn.execute(query).mappings().first()
    return None if row is None else dict(row)
