"""`make airflow` (scripts/airflow-standalone.sh): starts with a bare PATH (the venv's `airflow` is found by the
script itself), serves the API on 127.0.0.1 only, puts the SOFARE pages behind Airflow's login, and SIGTERM stops
every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sofare.serving.bento import free_port
from tests.conftest import processes_with_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _listening(port: int) -> set[str]:
    """Local addresses listening on `port` (IPv4 and IPv6), from /proc/net."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                out.add(address)
    return out


def _started_by(home: Path) -> list[int]:
    """Processes whose environment names this Airflow home (what the script started, however deep)."""
    return processes_with_env("AIRFLOW_HOME", str(home))


def _status(url: str, authorization: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_make_airflow_binds_loopback_and_stops_everything_it_started(tmp_path):
    home, port = tmp_path / "airflow", free_port(0)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__PORT": str(port),
        "SOFARE_PATHS__VAR": str(tmp_path / "var"),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port(0)),
    }
    script = subprocess.Popen(
        [str(ROOT / "scripts" / "airflow-standalone.sh")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # a bound, not a goal: standalone migrates its database first
        while True:
            assert script.poll() is None, script.stdout.read().decode(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/version", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the API server never answered"
            time.sleep(1)
        assert _listening(port) == {"0100007F"}, f"the API listens on {_listening(port)}, not only 127.0.0.1"
        # the SOFARE pages behind the real API server's login (its own JWT check)
        page = f"http://127.0.0.1:{port}/sofare/data-docs/no-such-page.html"
        assert _status(page) == 401, "no login, no page"
        assert _status(page, "Bearer forged") == 403
        users = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())
        user, password = next(iter(users.items()))
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/auth/token",
            method="POST",
            data=json.dumps({"username": user, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            token = json.loads(answer.read())["access_token"]
        assert _status(page, f"Bearer {token}") == 404, "logged in: past the check, to a page that does not exist"
        explain = f"http://127.0.0.1:{port}/sofare/explain"  # the global views page: no version yet, said plainly
        assert _status(explain) == 401 and _status(explain, f"Bearer {token}") == 200
        assert _status(f"http://127.0.0.1:{port}/sofare/monitor/metrics") == 200, "Prometheus needs no login"
        assert len(_started_by(home)) >= 3, "scheduler, API server, dag-processor … run"
        script.send_signal(signal.SIGTERM)
        script.wait(120)
        deadline = time.monotonic() + 60
        while _started_by(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _started_by(home) == [], "SIGTERM to `make airflow` stops every process it started"
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        for pid in _started_by(home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
