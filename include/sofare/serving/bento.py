"""The BentoML bundle: import a registered version into the bento store, build the bento,
containerize it (or keep the build context when no container engine exists), serve it.

The bento store is var/bentoml (BENTOML_HOME); the bento tag is recorded on the model version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sofare.config import config_file
from sofare.contracts import META_FILE, ModelMeta, model_dir

if TYPE_CHECKING:
    from sofare.config import Config

BENTO_DIR = Path("bentos") / "sofare"


def environment(cfg: Config, **extra: str) -> dict[str, str]:
    """The environment for BentoML commands: the store under var/, the warehouse, no telemetry."""
    from sofare.data import warehouse

    env = {
        **os.environ,
        "BENTOML_HOME": str(cfg.var_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "SOFARE_WAREHOUSE__URL": warehouse.warehouse_url(cfg),
        "SOFARE_PATHS__VAR": str(cfg.var_dir),
    }
    env.update(extra)
    return env


def import_model(cfg: Config, directory: Path, labels: dict[str, str]) -> str:
    """Bring an exported model directory (meta.json + model files) into the bento store; its tag.

    Idempotent per `labels["model_version"]`. Runs in a child process: BentoML binds its store
    (BENTOML_HOME) once per process."""
    done = subprocess.run(
        [sys.executable, "-m", "sofare.serving.bento", "import-model", str(directory), json.dumps(labels)],
        capture_output=True,
        text=True,
        env=environment(cfg),
        cwd=cfg.root,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing {directory} into the bento store failed: {done.stderr.strip()[-1500:]}")
    return done.stdout.strip().splitlines()[-1]


def _import_model_here(name: str, directory: Path, labels: dict[str, str]) -> str:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.list(name)
    except NotFound:
        stored = []
    for model in stored:
        if model.info.labels.get("model_version") == labels.get("model_version"):
            return str(model.tag)
    meta = ModelMeta.read(model_dir(directory))
    with bentoml.models.create(
        name, labels=labels, metadata={"data_window": meta.data_window.label, "architecture": meta.architecture}
    ) as model:
        reference = [meta.reference_file] if meta.reference_file else []  # the drift reference travels along
        for file in (META_FILE, *meta.runtime_files.values(), *reference):
            shutil.copy2(model_dir(directory) / file, model.path_of(file))
    return str(model.tag)


def build(cfg: Config, model_tag: str) -> dict[str, str]:
    """`bentoml build` of bentos/sofare around one stored model; the bento tag.

    The bento is staged as BentoML expects a self-contained service: `service.py`, the `sofare`
    package and the config at the top of its source tree, so the service imports `sofare` as an
    ordinary package (no path edits) in the bento and in its container."""
    with tempfile.TemporaryDirectory(prefix="sofare-bento-") as scratch:
        stage = Path(scratch)
        shutil.copytree(
            cfg.root / "include" / "sofare", stage / "sofare", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        for file in ("service.py", "bentofile.yaml", "requirements.txt"):
            shutil.copy2(cfg.root / BENTO_DIR / file, stage / file)
        shutil.copy2(config_file(), stage / "sofare.yaml")
        (stage / "bento_model.txt").write_text(model_tag + "\n")  # pins the model: never "latest" in the store
        example = example_window(cfg)
        (stage / "bento_example.json").write_text(json.dumps(example) if example else "null")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bentoml",
                "build",
                "-f",
                str(stage / "bentofile.yaml"),
                str(stage),
                "--output",
                "tag",
            ],
            capture_output=True,
            text=True,
            env=environment(cfg),
            cwd=stage,
            check=False,
            timeout=600,
        )
    if done.returncode != 0:
        raise RuntimeError(f"bentoml build failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:").strip()
    return {"bento": tag, "model": model_tag, "path": str(bento_path(cfg, tag))}


def example_window(cfg: Config, candles: int = 300) -> dict[str, Any] | None:
    """The newest `candles` (at least one window's worth) of the warehouse as a /predict body: the API
    document's example, so Swagger's "Try it out" sends a real window. None when the warehouse has none."""
    from sofare.data import warehouse
    from sofare.serving.schemas import request_body

    needed = cfg.features.warmup_bars + max(cfg.training.search_space.lookback) - 1
    with warehouse.get_engine(cfg).connect() as conn:
        newest = warehouse.read_candles_before(conn, cfg.market.symbol, cfg.market.interval, datetime.now(UTC), 1)
    if newest.empty:
        return None
    return request_body(cfg, newest["open_time"].iloc[-1].to_pydatetime(), max(candles, needed))


def bento_path(cfg: Config, tag: str) -> Path:
    name, _, version = tag.partition(":")
    return cfg.var_dir / "bentoml" / "bentos" / name / version


def container_engine() -> tuple[bool, str]:
    """Whether a container engine answers (docker info), and what it said."""
    docker = shutil.which("docker")
    if docker is None:
        return False, "no docker client on PATH"
    try:
        done = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        return False, "docker info timed out"
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        return False, reason[-1] if reason else f"docker info exited {done.returncode}"
    return True, f"docker engine {done.stdout.strip()}"


def containerize(cfg: Config, tag: str) -> dict[str, Any]:
    """`bentoml containerize` when an engine exists; otherwise keep the build context (Dockerfile
    included) under var/containers/ and say plainly that no image was built, and why."""
    available, reason = container_engine()
    if available:
        done = subprocess.run(
            [sys.executable, "-m", "bentoml", "containerize", tag, "-t", tag],
            capture_output=True,
            text=True,
            env=environment(cfg),
            check=False,
            timeout=3600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bentoml containerize failed: {done.stderr.strip()[-1500:]}")
        return {"bento": tag, "image": tag, "built": True, "engine": reason}
    context = cfg.var_dir / "containers" / tag.replace(":", "-")
    if context.exists():
        shutil.rmtree(context)
    shutil.copytree(bento_path(cfg, tag), context)
    dockerfile = context / "env" / "docker" / "Dockerfile"
    if not dockerfile.exists():
        raise RuntimeError(f"bento {tag} has no Dockerfile at {dockerfile}")
    return {
        "bento": tag,
        "image": None,
        "built": False,
        "engine": reason,
        "context": str(context),
        "dockerfile": str(dockerfile),
        "message": f"no image built: no container engine ({reason}). Build context kept at {context}; "
        f"build it where an engine runs: docker build -f env/docker/Dockerfile -t {tag} .",
    }


def serving_home(cfg: Config, name: str) -> Path:
    """A BENTOML_HOME of one server's own that shares the store (bentos, models) by symlinks.

    `bentoml serve` keeps its Prometheus files in $BENTOML_HOME/prometheus_multiproc_dir and empties that
    folder when it starts: two servers on one home (stable and canary) would each export the other's series
    and wipe them on restart, and canary analysis would compare a mixture. Each server gets its own."""
    store = cfg.var_dir / "bentoml"
    home = cfg.var_dir / "run" / f"bentoml-{name}"
    home.mkdir(parents=True, exist_ok=True)
    for part in ("bentos", "models"):
        (store / part).mkdir(parents=True, exist_ok=True)
        link = home / part
        if link.is_symlink() and link.resolve() == (store / part).resolve():
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():  # e.g. a copied var/ whose links became folders
            shutil.rmtree(link)
        link.symlink_to(store / part, target_is_directory=True)
    return home


class Server:
    """A real `bentoml serve` process on 127.0.0.1 (tests, benchmarks, the demo)."""

    def __init__(self, cfg: Config, target: str, port: int, variant: str = "stable", **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = cfg.var_dir / "logs" / f"bentoml-{variant}-{port}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.log.open("w")
        env.setdefault("SOFARE_SERVING__LOG_FILE", str(cfg.var_dir / "logs" / f"service-{variant}-{port}.log"))
        env.setdefault("BENTOML_HOME", str(serving_home(cfg, f"{variant}-{port}")))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            env=environment(cfg, SOFARE_VARIANT=variant, **env),
            cwd=cfg.root,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"bentoml serve exited {self.process.returncode}; see {self.log}:\n" + self.log.read_text()[-3000:]
                )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"bentoml serve not ready after {timeout}s; see {self.log}")

    def stop(self) -> None:
        """Stop the server and its workers (which run in sessions of their own), then reap it."""
        stop_group(self.process.pid)
        self.process.poll()
        self._out.close()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(preferred: int) -> int:
    """`preferred` if it is free on 127.0.0.1, else one the OS picks."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def pid_file(cfg: Config, variant: str) -> Path:
    return cfg.var_dir / "run" / f"bentoml-{variant}.pid"


def serve_detached(cfg: Config, target: str, port: int, variant: str = "stable", timeout: float = 180) -> str:
    """Start `bentoml serve` that outlives this process (`sofare serve`); its URL."""
    stop_detached(cfg, variant)
    server = Server(cfg, target, port, variant)
    server.wait_ready(timeout)
    path = pid_file(cfg, variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{server.process.pid} {port} {target}\n")
    return server.url


def stop_detached(cfg: Config, variant: str = "stable") -> bool:
    path = pid_file(cfg, variant)
    if not path.exists():
        return False
    pid = int(path.read_text().split()[0])
    path.unlink()
    return stop_group(pid)


def _processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, process group) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def process_tree(pid: int) -> set[int]:
    """`pid`, its process group and every descendant that still runs. BentoML's workers start sessions of
    their own, so a process-group signal alone would leave them serving after their arbiter is gone."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own child, if it is one
    except ChildProcessError:
        pass
    table = _processes()
    family = {p for p, (_, _, group) in table.items() if group == pid} | {pid}
    grew = True
    while grew:
        children = {p for p, (_, parent, _) in table.items() if parent in family} - family
        family |= children
        grew = bool(children)
    return {p for p in family if p in table and table[p][0] not in "ZX"}


def group_alive(pgid: int) -> bool:
    """Whether the `bentoml serve` started as `pgid` (its group or any descendant) still runs."""
    return bool(process_tree(pgid))


def stop_group(pgid: int, timeout: float = 30.0) -> bool:
    """SIGTERM a `bentoml serve` (in-flight requests finish), SIGKILL whatever of its process tree is left after
    `timeout`. False when nothing of it was running."""
    import signal

    family = process_tree(pgid)
    if not family:
        return False
    for sig, share in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.25)):
        family |= process_tree(pgid)
        for target in sorted(family) if sig == signal.SIGKILL else [pgid]:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout * share
        while time.monotonic() < deadline:
            if not (process_tree(pgid) | {p for p in family if _running(p)}):
                return True
            time.sleep(0.1)
    return not (process_tree(pgid) | {p for p in family if _running(p)})


def _running(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


if __name__ == "__main__":  # `python -m sofare.serving.bento import-model DIR LABELS_JSON` (see import_model)
    from sofare.config import load_config

    if len(sys.argv) != 4 or sys.argv[1] != "import-model":
        sys.exit("usage: python -m sofare.serving.bento import-model DIRECTORY LABELS_JSON")
    print(_import_model_here(load_config().mlflow.model_name, Path(sys.argv[2]), json.loads(sys.argv[3])))
