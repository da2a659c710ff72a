"""The production runtime, for real, on this machine: Airflow with the CeleryExecutor (Redis broker, 2 Celery
workers), PostgreSQL for Airflow's metadata and the warehouse, a scheduler, a dag-processor and the API server,
every one a process of its own on 127.0.0.1 and a port the OS picked. The tests drive it through the REST API (and
a browser), as a platform engineer would.

Before Airflow is asked for anything, the team's past is set up through the CLI, as `make demo` would leave it:
two months of embedded history loaded and validated, and version 1 trained, promoted and serving as the stable.
Every process is stopped at the end: by process group, then by a marker in the environment that every descendant
(task processes, `bentoml serve`, nginx) inherits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SMALL_TRAINING, processes_with_env

BIN = Path(sys.executable).parent
HISTORY = ("2024-01-01", "2024-02-29")  # loaded and validated through the CLI: the past
WEEK = ("2024-03-01", "2024-03-07")  # backfilled through Airflow: the week the e2e test brings in
BOUND_S = 600  # a bound for any one wait (a hung stack fails, it does not hang CI), not a goal


def free_port(pair: bool = False) -> int:
    """A port the OS picked on 127.0.0.1 (with `pair`, one whose next port is free too: the canary's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def marked(marker: str) -> list[int]:
    """Processes whose environment carries this stack's marker (everything it started, however deep)."""
    return processes_with_env("SOFARE_E2E_STACK", marker)


@dataclass
class Stack:
    """The running stack: its environment, its API and the processes it started."""

    root: Path
    env: dict[str, str]
    api: str
    marker: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    token: str = ""
    results: dict[str, Any] = field(default_factory=dict)  # what the pipeline fixture found, for the tests

    # --- processes ---------------------------------------------------------------------------------------------

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as out:
            self.processes[name] = subprocess.Popen(
                list(args),
                env={**self.env, **(env or {})},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{tail(self.log(name))}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`sofare ARGS` against this stack's warehouse, MLflow and var/ (a new process, like a user's shell)."""
        result = subprocess.run(
            [str(BIN / "sofare"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BOUND_S,
            check=False,
        )
        if check:
            assert result.returncode == 0, f"sofare {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def stop(self) -> None:
        self.cli("deploy", "--stop", check=False)  # the front door and every `bentoml serve` the DAGs started
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes.values()):
            time.sleep(0.5)
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        for pid in marked(self.marker):  # whatever a task started in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- the REST API ------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.api + path, method=method, headers=headers, data=None if body is None else json.dumps(body).encode()
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                raw = answer.read()
                return answer.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.request(method, path, body)
        assert 200 <= status < 300, f"{method} {path} -> {status}: {answer}"
        return answer

    def login(self) -> None:
        user, password = self.credentials()
        self.token = self.ok("POST", "/auth/token", {"username": user, "password": password})["access_token"]

    def credentials(self) -> tuple[str, str]:
        users = json.loads(
            (Path(self.env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated").read_text()
        )
        return next(iter(users.items()))

    def unpause(self, *dag_ids: str, paused: bool = False) -> None:
        for dag_id in dag_ids:
            self.ok("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self.ok("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=run_after&limit=100")["dag_runs"]

    def wait_run(self, dag_id: str, run_id: str | None = None, after: int = 0) -> dict[str, Any]:
        """The finished run `run_id` (or the first run of `dag_id` beyond the first `after`, e.g. one an asset
        event creates), which must have succeeded: a failure shows each task's state and the failed tasks' logs."""
        deadline = time.monotonic() + BOUND_S
        while True:
            self.check_alive()
            runs = [r for r in self.runs(dag_id) if run_id in (None, r["dag_run_id"])][after if run_id is None else 0 :]
            if runs and runs[0]["state"] in ("success", "failed"):
                run = runs[0]
                if run["state"] != "success":
                    raise AssertionError(
                        f"{dag_id} run {run['dag_run_id']} failed:\n{self.explain(dag_id, run['dag_run_id'])}"
                    )
                return run
            assert time.monotonic() < deadline, f"{dag_id}: no finished run within {BOUND_S} s: {runs[:1]}"
            time.sleep(1)

    def tasks(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        quoted = urllib.parse.quote(run_id, safe="")
        return self.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=100")["task_instances"]

    def explain(self, dag_id: str, run_id: str) -> str:
        quoted, lines = urllib.parse.quote(run_id, safe=""), []
        for ti in self.tasks(dag_id, run_id):
            lines.append(f"  {ti['task_id']}[{ti['map_index']}]: {ti['state']} on {ti.get('hostname')}")
            if ti["state"] in ("failed", "upstream_failed") and ti.get("try_number"):
                status, log = self.request(
                    "GET",
                    f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{ti['task_id']}/logs/"
                    f"{ti['try_number']}?map_index={ti['map_index']}",
                )
                lines.append(json.dumps(log)[-4000:] if status == 200 else f"(log: {status})")
        return "\n".join(lines)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_for(what: str, check, stack: Stack | None = None) -> Any:
    """Poll `check` until it returns something truthy (a bound, not a timing assumption)."""
    deadline = time.monotonic() + BOUND_S
    while True:
        if stack is not None:
            stack.check_alive()
        try:
            value = check()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError, KeyError, AssertionError):
            pass
        assert time.monotonic() < deadline, f"{what}: not within {BOUND_S} s"
        time.sleep(1)


@pytest.fixture(scope="package")  # stopped when the e2e tests are done, not idling through the other tiers
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("e2e")) as started:
        yield started


@contextmanager
def running_stack(root: Path) -> Iterator[Stack]:
    """Start the stack under `root`; stop all of it on the way out."""
    from sofare.data.pgserver import LocalPostgres

    postgres = LocalPostgres().start()
    redis_port, api_port = free_port(), free_port()
    airflow_db = postgres.create_database("airflow")
    warehouse = postgres.create_database("warehouse")
    marker = uuid.uuid4().hex
    env = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "SOFARE_E2E_STACK": marker,
        # Airflow: CeleryExecutor, Redis broker, PostgreSQL metadata and Celery results, API on 127.0.0.1
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_db.replace("+psycopg2", ""),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
        "AIRFLOW__API__SECRET_KEY": uuid.uuid4().hex,
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "3600",  # parsed at start; the DAG files do not change
        # the clock schedules start in 2099: runs here come from the REST API, the forms and asset events only (a
        # daily sofare_validate or weekly sofare_train of today would join the pipeline this test follows); the
        # manual and asset-triggered DAGs start at orchestration.UNSCHEDULED_START, so their form runs get tasks
        "SOFARE_INGEST__START_DATE": "'2099-01-01'",  # YAML: a string, not a date
        # SOFARE: the warehouse on PostgreSQL (the Airflow connection, as in production), a tiny training
        "AIRFLOW_CONN_SOFARE_WAREHOUSE": warehouse.replace("postgresql+psycopg2://", "postgresql://"),
        "SOFARE_PATHS__VAR": str(root / "var"),
        **SMALL_TRAINING,
        "SOFARE_TRAINING__N_TRIALS": "2",
        "SOFARE_TRAINING__MAX_EPOCHS": "1",  # 2 mapped tuning tasks, 1 trial each
        "SOFARE_SERVING__WORKERS": "1",
        "SOFARE_SERVING__PORT": str(free_port(pair=True)),
        "SOFARE_DEPLOY__FRONTDOOR_PORT": str(free_port()),
        # the canary analysis judges wiring here, not this busy machine's latency: one step, lenient thresholds,
        # and enough patience that a slow step is measured again instead of aborting
        "SOFARE_DEPLOY__STEPS": "[1.0]",
        "SOFARE_DEPLOY__INTERVAL_SECONDS": "5",
        "SOFARE_DEPLOY__MIN_REQUESTS": "5",
        "SOFARE_DEPLOY__MAX_P95_MS": "60000",
        "SOFARE_DEPLOY__LATENCY_FLOOR_MS": "60000",
        "SOFARE_DEPLOY__INCONCLUSIVE_LIMIT": "50",
    }
    stack = Stack(root=root, env=env, api=f"http://127.0.0.1:{api_port}", marker=marker)
    try:
        stack.start(
            "redis",
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(root),
        )
        stack.start("migrate", str(BIN / "airflow"), "db", "migrate")
        migrate = stack.processes.pop("migrate")  # it ends: not one of the services check_alive watches
        # the past, through the CLI, while Airflow migrates its database
        stack.cli("init", "--no-airflow")
        stack.cli("backfill", "--source", "sample", "--start", HISTORY[0], "--end", HISTORY[1])
        stack.cli("validate", "--start", HISTORY[0], "--end", HISTORY[1])
        assert migrate.wait(BOUND_S) == 0, tail(stack.log("migrate"))
        stack.start("api-server", str(BIN / "airflow"), "api-server")
        stack.start(
            "scheduler",
            str(BIN / "airflow"),
            "scheduler",
            env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())},
        )
        stack.start("dag-processor", str(BIN / "airflow"), "dag-processor")
        for n in (1, 2):
            stack.start(
                f"worker-{n}",
                str(BIN / "airflow"),
                "celery",
                "worker",
                "--celery-hostname",
                f"w{n}@e2e",
                env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())},
            )
        stack.cli("train", "--trials", "1", "--max-epochs", "1")
        stack.cli("promote", "--override", "e2e: the team's first champion, set up through the CLI")
        stack.cli("build")
        stack.cli("deploy")
        wait_for("the API server", lambda: stack.request("GET", "/api/v2/version")[0] == 200, stack)
        stack.login()
        wait_for(
            "the DAGs parsed", lambda: len(stack.ok("GET", "/api/v2/dags?dag_id_pattern=sofare_")["dags"]) == 8, stack
        )
        wait_for("2 Celery workers", lambda: _celery_workers(env) >= 2, stack)
        yield stack
    finally:
        stack.stop()
        postgres.stop()
        left = marked(marker)
        assert not left, f"processes of the stack still run: {left}"


def _celery_workers(env: dict[str, str]) -> int:
    """Workers answering a Celery ping through the broker."""
    result = subprocess.run(
        [
            str(BIN / "celery"),
            "--broker",
            env["AIRFLOW__CELERY__BROKER_URL"],
            "inspect",
            "ping",
            "--timeout",
            "5",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        return len(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return 0


class Traffic:
    """Clients calling the front door until stopped (the canary analysis needs requests to judge)."""

    def __init__(self, url: str, symbol: str) -> None:
        self.url, self.symbol, self.answers = url, symbol, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            request = urllib.request.Request(
                f"{self.url}/predict_latest",
                method="POST",
                data=json.dumps({"symbol": self.symbol}).encode(),
                headers={"Content-Type": "application/json", "X-Client-Id": f"c{n % 50}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    key = (answer.status, answer.headers.get("X-Served-By"))
            except urllib.error.HTTPError as error:
                key = (error.code, error.headers.get("X-Served-By"))
            except OSError:
                key = ("unreachable", None)
            self.answers[key] = self.answers.get(key, 0) + 1
            self._stop.wait(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


STAGES = ("sofare_backfill", "sofare_validate", "sofare_train", "sofare_promote", "sofare_deploy", "sofare_rollback")


def served(stack: Stack) -> dict[str, Any]:
    """What the front door answers on GET /model_info (and who answered)."""
    url = f"http://127.0.0.1:{stack.env['SOFARE_DEPLOY__FRONTDOOR_PORT']}/model_info"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"X-Client-Id": "e2e"}), timeout=30) as answer:
        info = json.loads(answer.read())
        return {
            "version": info["model_version"],
            "variant": info["variant"],
            "served_by": answer.headers.get("X-Served-By"),
        }


def task_states(stack: Stack, dag_id: str, run_id: str) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for ti in stack.tasks(dag_id, run_id):
        states.setdefault(ti["task_id"], []).append(ti["state"])
    return states


@pytest.fixture(scope="package")
def pipeline(stack: Stack) -> dict[str, Any]:
    """Run the whole pipeline once; the tests below assert on what it left."""
    if stack.results:
        return stack.results
    r = stack.results
    r["before"] = served(stack)
    stack.unpause(*STAGES)
    r["backfill"] = stack.wait_run(
        "sofare_backfill", stack.trigger("sofare_backfill", {"sources": ["sample"], "start": WEEK[0], "end": WEEK[1]})
    )
    r["validate"] = stack.wait_run("sofare_validate")  # its features asset event, not a trigger
    r["train"] = stack.wait_run("sofare_train")  # the validated-features event
    r["train_tasks"] = task_states(stack, "sofare_train", r["train"]["dag_run_id"])
    promote = stack.wait_run("sofare_promote")  # the model-candidate event
    r["gate"] = task_states(stack, "sofare_promote", promote["dag_run_id"])
    version = str(int(r["before"]["version"]) + 1)
    with Traffic(f"http://127.0.0.1:{stack.env['SOFARE_DEPLOY__FRONTDOOR_PORT']}", "BTCUSDT") as traffic:
        if r["gate"]["containerize"] != ["success"]:  # rejected: the on-call override, as the runbook says
            stack.wait_run(
                "sofare_promote",
                stack.trigger("sofare_promote", {"version": version, "override_reason": "e2e: exercise the rollout"}),
            )
        r["deploy"] = stack.wait_run("sofare_deploy")  # the bento event
    r["traffic"] = traffic.answers
    r["after_deploy"] = served(stack)
    r["rollback"] = stack.wait_run(
        "sofare_rollback",
        stack.trigger(
            "sofare_rollback", {"reason": "incident", "details": "e2e: the on-call way back", "target_version": None}
        ),
    )
    r["after_rollback"] = served(stack)
    r["version"] = version
    return r
