"""The BentoML bundle: import a registered version into the bento store, build the bento,
containerize it (or keep the build context when no container engine exists), serve it.

The bento store is var/bentoml (BENTOML_HOME); the bento tag is recorded on the model version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sofare.config import Config

BENTOFILE = Path("bentos") / "sofare" / "bentofile.yaml"


def environment(cfg: Config, **extra: str) -> dict[str, str]:
    """The environment for BentoML commands: the store under var/, the warehouse, no telemetry."""
    from sofare import warehouse

    env = {**os.environ, "BENTOML_HOME": str(cfg.var_dir / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "SOFARE_WAREHOUSE__URL": warehouse.warehouse_url(cfg), "SOFARE_PATHS__VAR": str(cfg.var_dir)}
    env.update(extra)
    return env


def import_model(cfg: Config, version: str) -> str:
    """Bring a registry version into the bento store (idempotent per version); its tag.

    Runs in a child process: BentoML binds its store (BENTOML_HOME) once per process."""
    done = subprocess.run([sys.executable, "-m", "sofare.bento", "import-model", str(version)], capture_output=True,
                          text=True, env=environment(cfg), cwd=cfg.root, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"importing {cfg.mlflow.model_name} version {version} into the bento store failed: "
                           f"{done.stderr.strip()[-1500:]}")
    return done.stdout.strip().splitlines()[-1]


def _import_model_here(cfg: Config, version: str) -> str:
    import bentoml
    from bentoml.exceptions import NotFound

    from sofare import registry

    registry.setup(cfg)
    mv = registry.client(cfg).get_model_version(cfg.mlflow.model_name, version)
    try:
        stored = bentoml.models.list(cfg.mlflow.model_name)
    except NotFound:
        stored = []
    for model in stored:
        if model.info.labels.get("model_version") == str(version):
            return str(model.tag)
    model = bentoml.mlflow.import_model(
        cfg.mlflow.model_name, f"models:/{cfg.mlflow.model_name}/{version}",
        labels={"model_version": str(version), "semver": mv.tags.get("semver", "?"),
                "feature_set_version": mv.tags.get("feature_set_version", "?")},
        metadata={"mlflow_run_id": mv.run_id or "", "data_window": mv.tags.get("data_window", "")},
    )
    return str(model.tag)


def build(cfg: Config, version: str) -> dict[str, Any]:
    """`bentoml build` of bentos/sofare for one model version; the bento tag, recorded on the version."""
    from sofare import registry

    model_tag = import_model(cfg, version)
    env = environment(cfg, SOFARE_BENTO_MODEL=model_tag)
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", str(cfg.root / BENTOFILE), str(cfg.root), "--output", "tag"],
        capture_output=True, text=True, env=env, cwd=cfg.root, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bentoml build failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:").strip()
    c = registry.client(cfg)
    c.set_model_version_tag(cfg.mlflow.model_name, version, "bento_tag", tag)
    c.set_model_version_tag(cfg.mlflow.model_name, version, "bento_model", model_tag)
    return {"bento": tag, "model": model_tag, "version": str(version), "path": str(bento_path(cfg, tag))}


def bento_path(cfg: Config, tag: str) -> Path:
    name, _, version = tag.partition(":")
    return cfg.var_dir / "bentoml" / "bentos" / name / version


def container_engine() -> tuple[bool, str]:
    """Whether a container engine answers (docker info), and what it said."""
    docker = shutil.which("docker")
    if docker is None:
        return False, "no docker client on PATH"
    try:
        done = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=20, check=False)
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
        done = subprocess.run([sys.executable, "-m", "bentoml", "containerize", tag, "-t", tag],
                              capture_output=True, text=True, env=environment(cfg), check=False, timeout=3600)
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
    return {"bento": tag, "image": None, "built": False, "engine": reason, "context": str(context),
            "dockerfile": str(dockerfile),
            "message": f"no image built: no container engine ({reason}). Build context kept at {context}; "
                       f"build it where an engine runs: docker build -f env/docker/Dockerfile -t {tag} ."}


class Server:
    """A real `bentoml serve` process on 127.0.0.1 (tests, benchmarks, the demo)."""

    def __init__(self, cfg: Config, target: str, port: int, variant: str = "stable", **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = cfg.var_dir / "logs" / f"bentoml-{variant}-{port}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            env=environment(cfg, SOFARE_VARIANT=variant, **env), cwd=cfg.root, stdout=self._out,
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited {self.process.returncode}; see {self.log}:\n"
                                   + self.log.read_text()[-3000:])
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
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._out.close()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # `python -m sofare.bento import-model VERSION` (see import_model)
    from sofare.config import load_config

    if len(sys.argv) != 3 or sys.argv[1] != "import-model":
        sys.exit("usage: python -m sofare.bento import-model VERSION")
    print(_import_model_here(load_config(), sys.argv[2]))


def pid_file(cfg: Config, variant: str) -> Path:
    return cfg.var_dir / "run" / f"bentoml-{variant}.pid"


def serve_detached(cfg: Config, target: str, port: int, variant: str = "stable", timeout: float = 180) -> str:
    """Start `bentoml serve` that outlives this process (the demo leaves it running); its URL."""
    stop_detached(cfg, variant)
    server = Server(cfg, target, port, variant)
    server.wait_ready(timeout)
    path = pid_file(cfg, variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{server.process.pid} {port} {target}\n")
    return server.url


def stop_detached(cfg: Config, variant: str = "stable") -> bool:
    import signal

    path = pid_file(cfg, variant)
    if not path.exists():
        return False
    pid = int(path.read_text().split()[0])
    path.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(100):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return True
