"""The canary front door: one nginx on loopback that splits traffic between the stable and the canary service.

Why nginx and not a Python proxy: sticky splitting (`split_clients`), retrying a failed canary request on stable
(`proxy_next_upstream` with stable as the canary upstream's `backup`) and configuration changes that drop nothing
(a reload lets old workers finish their requests) are all built in and battle-tested.

nginx runs unprivileged from a folder of ours (config, pid, logs and temp files all under `prefix_dir`, normally
var/nginx) and listens on 127.0.0.1 only. A weight change renders a new config, checks it with `nginx -t`, swaps it
in atomically and reloads; a config that fails the check is never applied. A reload is verified, not assumed: the
health endpoint names the config its worker runs (`X-Routing`), and `apply` returns once that is the new one and
every old worker has stopped accepting connections.

Pure stdlib on purpose: the front door is operated from Airflow tasks and the CLI, which must not pay for (or depend
on) the ML stack.
"""

from __future__ import annotations

import fcntl
import grp
import hashlib
import http.client
import json
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
CONF_NAME = "nginx.conf"
ROUTING_NAME = "routing.json"
HEALTH_PATH = "/frontdoor/healthz"
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
_ROUTING_HEADER = re.compile(r'add_header X-Routing "([0-9a-f]+)"')
_UNSAFE_PATH = re.compile(r'["\'$;{}\\\s#]')
_POLL_INTERVAL_S = 0.05


class FrontDoorError(RuntimeError):
    """nginx refused a config, failed to start or to take a reload; the message carries nginx's own words."""


@dataclass(frozen=True)
class Routing:
    """Where the front door sends traffic: `canary_weight` of the clients (sticky) go to the canary.

    `canary_port=None` (no canary deployed) or `canary_weight=0` sends everything to stable; a request with
    `X-Variant: canary` still reaches a deployed canary at weight 0 (a smoke test before any traffic shifts).
    """

    stable_port: int
    canary_port: int | None
    canary_weight: float
    listen_port: int

    def __post_init__(self) -> None:
        weight = self.canary_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"canary_weight must be a number in [0, 1], got {weight!r}")
        if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"canary_weight must be in [0, 1], got {weight!r}")
        object.__setattr__(self, "canary_weight", float(weight))  # 1 and 1.0 compare, print and store alike
        ports = {"stable_port": self.stable_port, "listen_port": self.listen_port}
        if self.canary_port is not None:
            ports["canary_port"] = self.canary_port
        for name, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"{name} must be a TCP port (1..65535), got {port!r}")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"stable, canary and listen ports must differ, got {ports}")

    @property
    def canary_live(self) -> bool:
        """Whether any traffic can reach a canary (deployed and a weight above 0)."""
        return self.canary_port is not None and self.canary_weight > 0


def _split_lines(weight: float) -> list[str]:
    """`split_clients` entries: nginx takes percentages with at most 2 decimals, rejects 0% and a total above 100%.

    A positive weight never rounds to 0% (it becomes 0.01%) and a weight below 1 never rounds to 100% (it becomes
    99.99%), so "some canary" and "some stable" stay true; 0 and 1 need no percentage at all, just `*`.
    """
    if weight <= 0:
        return ["*  stable;"]
    if weight >= 1:
        return ["*  canary;"]
    percent = min(max(round(weight * 100, 2), 0.01), 99.99)
    return [f"{percent:.2f}%  canary;", "*  stable;"]


def render(routing: Routing, prefix_dir: Path, *, user: str | None = None) -> str:
    """The nginx config for `routing`, with every file nginx writes under `prefix_dir`.

    `user` ("name group") is only meaningful when nginx starts as root: the workers then switch to that account
    (nginx's default, nobody, could not reach a private prefix). The config carries a routing id (a hash of the
    rest of it) that the health endpoint returns as `X-Routing`, so a reload can be verified.
    """
    prefix = Path(prefix_dir).absolute()
    if _UNSAFE_PATH.search(str(prefix)):
        raise ValueError(f"the front door's prefix_dir must not contain quotes, '$', ';', braces or spaces: {prefix}")
    split = _split_lines(routing.canary_weight if routing.canary_live else 0)
    values = {
        "PREFIX": str(prefix),
        "USER_DIRECTIVE": f"user {user};" if user else "# user: not set (nginx not started as root, or no account)",
        "ROUTING_SUMMARY": json.dumps(asdict(routing), sort_keys=True),
        "SPLIT_LINES": "\n".join(f"        {line}" for line in split),
        "FORCED_CANARY": "canary" if routing.canary_port is not None else "stable",
        "CANARY_UPSTREAM": "sofare_canary" if routing.canary_port is not None else "sofare_stable",
        "STABLE_PORT": str(routing.stable_port),
        "SERVED_BY_CANARY": (f'        "~:{routing.canary_port}$"  canary;' if routing.canary_port is not None else ""),
        "CANARY_UPSTREAM_BLOCK": (
            "    upstream sofare_canary {\n"
            f"        server 127.0.0.1:{routing.canary_port} max_fails=0;\n"
            f"        server 127.0.0.1:{routing.stable_port} max_fails=0 backup;\n"
            "    }"
            if routing.canary_port is not None
            else "    # no canary deployed"
        ),
        "LISTEN_PORT": str(routing.listen_port),
        "ROUTING_ID": "@@ROUTING_ID@@",  # filled in below, from the hash of everything else
    }
    template = TEMPLATE.read_text()
    unknown = set(_PLACEHOLDER.findall(template)) - values.keys()
    if unknown:
        raise ValueError(f"{TEMPLATE.name} has placeholders render does not fill: {sorted(unknown)}")
    text = _PLACEHOLDER.sub(lambda match: values[match[1]], template)
    routing_id = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text.replace("@@ROUTING_ID@@", routing_id)


def _write_synced(path: Path, data: str) -> None:
    with open(path, "w") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _atomic_write(path: Path, data: str) -> None:
    """Write beside `path`, then rename over it: a reader (or nginx) sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_synced(tmp, data)
    os.replace(tmp, path)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, an exited child nobody reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not Path("/proc/self").exists():  # no /proc: trust the signal
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in "ZX"


def _is_nginx_master(pid: int) -> bool:
    """Whether `pid` is a living nginx master, not a stale pid file's number reused by another process."""
    if not _alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: master")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False


def _children(pid: int) -> set[int]:
    """Living child processes of `pid` (nginx's workers), from /proc; empty where there is no /proc."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[1] == pid and stat[0] not in "ZX":
            found.add(int(entry.name))
    return found


def _accepting(pid: int) -> bool:
    """Whether an nginx worker still accepts connections: one told to quit retitles itself "is shutting down" and
    closes its listening sockets in the same step."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return _alive(pid) and b"shutting down" not in title


def _owner_user(path: Path) -> str | None:
    """The owner of `path` as "name group", for nginx's `user` directive; None when the account has no name."""
    info = path.stat()
    try:
        return f"{pwd.getpwuid(info.st_uid).pw_name} {grp.getgrgid(info.st_gid).gr_name}"
    except KeyError:
        return None


class FrontDoor:
    """The nginx under `prefix_dir`: `apply(Routing(...))` starts it or changes its routing without dropping a
    request; `stop()` shuts it down gracefully. State lives on disk (pid file, nginx.conf, routing.json), so any
    process (an Airflow task, the CLI) can operate the same front door."""

    def __init__(self, prefix_dir: Path, nginx_bin: str | None = None) -> None:
        """`nginx_bin` defaults to `nginx` on PATH, else /usr/sbin/nginx (looked up here, not at import)."""
        self.prefix_dir = Path(prefix_dir).absolute()
        self.nginx_bin = nginx_bin or shutil.which("nginx") or "/usr/sbin/nginx"
        self.conf_path = self.prefix_dir / CONF_NAME
        self.routing_path = self.prefix_dir / ROUTING_NAME
        self.pid_path = self.prefix_dir / "nginx.pid"
        self.error_log = self.prefix_dir / "error.log"
        self.access_log = self.prefix_dir / "access.log"

    # -- reading state ---------------------------------------------------------------------------------------------

    def current(self) -> Routing | None:
        """The routing of the last successful `apply` (None before the first)."""
        try:
            return Routing(**json.loads(self.routing_path.read_text()))
        except FileNotFoundError:
            return None

    @property
    def url(self) -> str:
        """Where clients reach the front door."""
        routing = self.current()
        if routing is None:
            raise FrontDoorError(f"the front door under {self.prefix_dir} has no routing yet: apply one first")
        return f"http://127.0.0.1:{routing.listen_port}"

    def pid(self) -> int | None:
        """The nginx master's pid, when it runs."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_nginx_master(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    # -- changing state --------------------------------------------------------------------------------------------

    def apply(self, routing: Routing, timeout: float = 60.0) -> None:
        """Route traffic as `routing` says: check the new config with `nginx -t`, swap it in atomically, then reload
        (old workers finish their requests) or start nginx. A config nginx rejects is never applied: FrontDoorError,
        and the running config and routing.json stay as they were."""
        self._make_dirs()
        user = _owner_user(self.prefix_dir) if os.geteuid() == 0 else None
        text = render(routing, self.prefix_dir, user=user)
        with exclusive(self.prefix_dir / "apply.lock"):  # two Airflow tasks may both shift traffic
            candidate = self.prefix_dir / f"{CONF_NAME}.new"
            _write_synced(candidate, text)
            try:
                self._nginx("-t", "-q", conf=candidate, what="nginx -t rejected the front door config")
            except FrontDoorError:
                candidate.unlink(missing_ok=True)
                raise
            previous = (self._read(self.conf_path), self._read(self.routing_path))
            os.replace(candidate, self.conf_path)
            _atomic_write(self.routing_path, json.dumps(asdict(routing), sort_keys=True) + "\n")
            try:
                if self.running():
                    self._reload(_routing_id(text), routing.listen_port, timeout)
                else:
                    self.start(timeout=timeout)
            except FrontDoorError:  # e.g. the listen port is taken: nginx -t does not bind, so only this tells
                self._restore(previous)
                raise

    def start(self, timeout: float = 60.0) -> None:
        """Start nginx with the applied config and wait until it answers (no-op when it already runs)."""
        if self.running():
            return
        if not self.conf_path.exists():
            raise FrontDoorError(f"no front door config under {self.prefix_dir}: apply a routing first")
        self._make_dirs()
        self._nginx(conf=self.conf_path, what="nginx failed to start")
        self.wait_ready(timeout, routing_id=_routing_id(self.conf_path.read_text()))

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown (`quit`: in-flight requests finish); a fast stop, then a kill, if that takes too long."""
        pid = self.pid()
        if pid is None:
            return
        workers = _children(pid)
        for sig, share in ((signal.SIGQUIT, 0.8), (signal.SIGTERM, 0.15), (signal.SIGKILL, 0.05)):
            # A killed master cannot take its workers down, nor remove its pid file: done here then.
            for target in (pid, *workers) if sig == signal.SIGKILL else (pid,):
                try:
                    os.kill(target, sig)
                except ProcessLookupError:
                    pass
            if _poll(lambda: not any(_alive(target) for target in (pid, *workers)), timeout * share):
                break
        else:
            raise FrontDoorError(f"nginx (pid {pid}) did not stop; {self._error_tail()}")
        self.pid_path.unlink(missing_ok=True)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until the workers of earlier configs have finished their in-flight requests and exited: after
        this, a backend that the current routing no longer names can be stopped without dropping a request."""
        pid = self.pid()
        if pid is not None and not _poll(lambda: all(_accepting(w) for w in _children(pid)), timeout):
            raise FrontDoorError(f"old nginx workers still finishing requests after {timeout:g}s")

    def wait_ready(self, timeout: float = 30.0, routing_id: str | None = None) -> None:
        """Poll the health endpoint until it answers 200 (with `X-Routing: routing_id`, when given)."""
        routing = self.current()
        if routing is None:
            raise FrontDoorError(f"the front door under {self.prefix_dir} has no routing yet: apply one first")
        if not _poll(lambda: self._healthy(routing.listen_port, routing_id), timeout):
            raise FrontDoorError(
                f"the front door did not become ready on port {routing.listen_port} within {timeout:g}s"
                f" (routing {routing_id or 'any'}); {self._error_tail()}"
            )

    # -- internals -------------------------------------------------------------------------------------------------

    def _reload(self, routing_id: str | None, listen_port: int, timeout: float) -> None:
        """SIGHUP (what `nginx -s reload` sends), then wait until a worker answers with the new routing id and
        every old worker has stopped accepting connections, so no new request reaches the old routing."""
        pid = self.pid()
        if pid is None:
            raise FrontDoorError("nginx stopped during a reload")
        old_workers = _children(pid)
        os.kill(pid, signal.SIGHUP)

        def reloaded() -> bool:
            return self._healthy(listen_port, routing_id) and not any(_accepting(worker) for worker in old_workers)

        if not _poll(reloaded, timeout):
            raise FrontDoorError(f"nginx did not take the new config within {timeout:g}s; {self._error_tail()}")

    def _restore(self, previous: tuple[str | None, str | None]) -> None:
        """Put the last good config and routing back after a failed reload, and reload nginx onto them."""
        for path, data in zip((self.conf_path, self.routing_path), previous, strict=True):
            if data is None:
                path.unlink(missing_ok=True)
            else:
                _atomic_write(path, data)
        pid = self.pid()
        if pid is not None and previous[0] is not None:
            os.kill(pid, signal.SIGHUP)

    def _healthy(self, port: int, routing_id: str | None) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", HEALTH_PATH)
            response = connection.getresponse()
            response.read()
            return response.status == 200 and (routing_id is None or response.getheader("X-Routing") == routing_id)
        except OSError:
            return False
        finally:
            connection.close()

    def _nginx(self, *args: str, conf: Path, what: str) -> None:
        command = [self.nginx_bin, *args, "-p", f"{self.prefix_dir}/", "-c", str(conf), "-e", str(self.error_log)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FrontDoorError(f"{what}: {exc}") from exc
        if result.returncode != 0:
            raise FrontDoorError(f"{what}: {(result.stderr or result.stdout).strip()}")

    def _make_dirs(self) -> None:
        (self.prefix_dir / "tmp").mkdir(parents=True, exist_ok=True)

    def _error_tail(self, lines: int = 5) -> str:
        text = self._read(self.error_log) or ""
        tail = " | ".join(text.strip().splitlines()[-lines:])
        return f"error.log: {tail}" if tail else "error.log is empty"

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing): one change at a time, across processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _routing_id(config: str) -> str | None:
    """The routing id a rendered config embeds (None for a config that has none)."""
    match = _ROUTING_HEADER.search(config)
    return match[1] if match else None


def _poll(condition: Callable[[], bool], timeout: float) -> bool:
    """Call `condition` until it is true or `timeout` seconds have passed: bounded polling, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)
