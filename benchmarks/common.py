"""Helpers shared by the benchmarks: machine description and section-wise docs/benchmarks.md updates."""

from __future__ import annotations

import os
import platform
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Measured by `make bench` (`python benchmarks/run.py [name …]`), which rewrites only the section of
the benchmark it ran. Numbers are from the machine named in each section; goals come from the issues.
Speed goals live here, never in timed unit tests.
"""


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}; measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between <!-- bench:name --> markers."""
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"<!-- bench:{name} -->\n{body.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


SMALL_TRAINING = {  # the tests' small search space (tests/conftest.py): the model's quality is irrelevant here
    "SOFARE_TRAINING__SEARCH_SPACE__HIDDEN_SIZE": "[64, 96, 32]",
    "SOFARE_TRAINING__SEARCH_SPACE__NUM_LAYERS": "[1, 2]",
    "SOFARE_TRAINING__SEARCH_SPACE__NUM_HEADS": "[4]",
    "SOFARE_TRAINING__SEARCH_SPACE__LOOKBACK": "[24]",
    "SOFARE_EVALUATION__BOOTSTRAP_SAMPLES": "200",
    "SOFARE_TRAINING__WALK_FORWARD__FOLDS": "2",  # walk-forward evidence is not what these benchmarks measure
    "SOFARE_EVALUATION__ABLATIONS": "false",
}


def leftovers(scratch: Path) -> list[int]:
    """Processes (other than this one) whose command line or environment names the scratch folder: every
    `bentoml serve` and nginx of a benchmark would, since their var/ lives there."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(scratch).encode() in text:
            found.append(int(proc.name))
    return found


def request_windows(cfg: Any) -> list[dict[str, Any]]:
    """The request bodies the serving benchmarks send: 36 real windows of June 2024 (03:00 and 15:00 UTC)."""
    from sofare.serving import schemas

    return [
        schemas.request_body(cfg, datetime(2024, 6, day, hour, tzinfo=UTC)) for day in range(10, 28) for hour in (3, 15)
    ]


@contextmanager
def scratch_home(prefix: str) -> Iterator[Path]:
    """A throw-away var/ and SQLite warehouse in the environment while a benchmark runs (SOFARE_BENCH_SCRATCH names
    a folder to use and keep instead); on exit the environment is restored and a temporary folder removed."""
    keep = os.environ.get("SOFARE_BENCH_SCRATCH")
    scratch = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    scratch.mkdir(parents=True, exist_ok=True)
    env = {
        "SOFARE_PATHS__VAR": str(scratch / "var"),
        "SOFARE_WAREHOUSE__URL": f"sqlite:///{scratch / 'wh.db'}",
        "SOFARE_INGEST__CONTEXT_DAYS": "60",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield scratch
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def deployment_home(prefix: str, left: list[int] | None = None) -> Iterator[Path]:
    """A throw-away var/, warehouse and Airflow home, free ports for the front door and the servers, the small
    search space, all in the environment; on exit the deployment is stopped, the environment restored, stray
    processes reported (and added to `left`) and the folder removed."""
    from sofare.serving import bento

    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    saved = dict(os.environ)
    os.environ.update(
        {
            "SOFARE_PATHS__VAR": str(scratch / "var"),
            "SOFARE_WAREHOUSE__URL": f"sqlite:///{scratch / 'wh.db'}",
            "SOFARE_INGEST__CONTEXT_DAYS": "60",
            "SOFARE_DEPLOY__FRONTDOOR_PORT": str(bento.free_port(0)),
            "SOFARE_SERVING__PORT": str(bento.free_port(0)),
            "AIRFLOW_HOME": str(scratch / "airflow"),
            **SMALL_TRAINING,
        }
    )
    try:
        yield scratch
    finally:
        try:
            from sofare import tasks
            from sofare.config import load_config

            tasks.stop_deployment(load_config())
        finally:
            os.environ.clear()
            os.environ.update(saved)
            stray = leftovers(scratch)
            if stray:
                print(f"  WARNING: processes of this benchmark still run: {stray}", flush=True)
            if left is not None:
                left.extend(stray)
            shutil.rmtree(scratch, ignore_errors=True)
