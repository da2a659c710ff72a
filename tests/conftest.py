"""Shared fixtures: an isolated Airflow home and var/, SQLite and a real PostgreSQL server,
and the local market API that stands in for the internet."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SESSION_DIR = Path(tempfile.mkdtemp(prefix="sofare-tests-"))
SMALL_TRAINING = {  # a small, fast search space for tests that train
    "SOFARE_TRAINING__SEARCH_SPACE__HIDDEN_SIZE": "[64, 96, 32]",
    "SOFARE_TRAINING__SEARCH_SPACE__NUM_LAYERS": "[1, 2]",
    "SOFARE_TRAINING__SEARCH_SPACE__NUM_HEADS": "[4]",
    "SOFARE_TRAINING__SEARCH_SPACE__LOOKBACK": "[24]",
    "SOFARE_TRAINING__WORKERS": "2",
    "SOFARE_EVALUATION__BOOTSTRAP_SAMPLES": "200",
    "SOFARE_TRAINING__WALK_FORWARD__FOLDS": "2",  # the full evidence (4 folds, ablations) in test_training_run
    "SOFARE_EVALUATION__ABLATIONS": "false",
    "SOFARE_EVALUATION__GLOBAL_VIEW": "false",  # computed and checked in test_training_run
}


def pytest_configure(config: pytest.Config) -> None:
    """Airflow reads its home when first imported: point it at a throw-away one before that."""
    for name in list(os.environ):
        if name.startswith(("SOFARE_", "AIRFLOW_CONN_", "AIRFLOW__")) or name == "FRED_API_KEY":
            del os.environ[name]
    os.environ.update(
        AIRFLOW_HOME=str(SESSION_DIR / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        SOFARE_PATHS__VAR=str(SESSION_DIR / "var"),
    )


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata database (SQLite), migrated once per session."""
    home = Path(os.environ["AIRFLOW_HOME"])
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return home


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """One real PostgreSQL server for the session, from the local binaries."""
    from sofare.data.pgserver import LocalPostgres

    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: object) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs on SQLite and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'warehouse.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def cfg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The real config with var/ in a temporary directory and a SQLite warehouse there."""
    from sofare.config import load_config

    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", f"sqlite:///{tmp_path / 'var' / 'warehouse.db'}")
    return load_config()


@pytest.fixture
def db_cfg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str):
    """The real config pointed at `db_url` (SQLite, then PostgreSQL)."""
    from sofare.config import load_config

    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", db_url)
    return load_config()


@pytest.fixture
def engine(db_cfg):
    from sofare.data import warehouse
    from sofare.data.features import feature_spec

    eng = warehouse.get_engine(db_cfg)
    warehouse.init_schema(eng, feature_spec(db_cfg).columns)
    return eng


@pytest.fixture
def market_api(cfg) -> Iterator[object]:
    from tests.fakes.market_api import MarketAPI

    with MarketAPI(cfg) as api:
        yield api


@pytest.fixture
def live_cfg(monkeypatch: pytest.MonkeyPatch, market_api):
    """Config whose live sources talk to the local market API, with short timeouts and back-off."""
    from sofare.config import load_config

    monkeypatch.setenv("SOFARE_SOURCES__BINANCE__BASE_URL", market_api.url)
    monkeypatch.setenv("SOFARE_SOURCES__YFINANCE__BASE_URL", market_api.url)
    monkeypatch.setenv("SOFARE_SOURCES__FRED__BASE_URL", market_api.url)
    monkeypatch.setenv("SOFARE_SOURCES__HTTP__TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("SOFARE_SOURCES__HTTP__BACKOFF_BASE_SECONDS", "0.01")
    monkeypatch.setenv("SOFARE_SOURCES__HTTP__MAX_ATTEMPTS", "4")
    monkeypatch.setenv("FRED_API_KEY", "sofare-test-key")
    return load_config()


class SleepRecorder:
    """Records requested back-off delays instead of sleeping (the waits themselves are not under test)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture(scope="session")
def validated_db(tmp_path_factory) -> Path:
    """Real hourly data 2023-10 .. 2024-06, loaded and validated once per session (SQLite)."""
    from sofare import tasks
    from sofare.config import load_config

    path = tmp_path_factory.mktemp("validated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFARE_PATHS__VAR", str(path / "var"))
        mp.setenv("SOFARE_WAREHOUSE__URL", f"sqlite:///{path / 'warehouse.db'}")
        mp.setenv("SOFARE_INGEST__CONTEXT_DAYS", "60")
        cfg = load_config()
        tasks.backfill(cfg, ["sample"], "2023-10-01", "2024-06-30")
        results = tasks.validate_range(cfg, "2023-10-01", "2024-06-30")
        assert all(r.success for r in results)
    return path / "warehouse.db"


MODEL_WINDOW = ("2024-01-12", "2024-03-31")


@pytest.fixture(scope="session")
def model_home(validated_db, tmp_path_factory) -> dict[str, Any]:
    """A copy of the validated warehouse with version 1 trained on it, gated and built (the serving and
    deploy tiers share it: one training per session)."""
    from sofare import tasks
    from sofare.config import load_config
    from sofare.registry import gate

    home = tmp_path_factory.mktemp("served")
    db = home / "warehouse.db"
    with sqlite3.connect(validated_db) as source, sqlite3.connect(db) as target:
        source.backup(target)
    env = {
        "SOFARE_PATHS__VAR": str(home / "var"),
        "SOFARE_WAREHOUSE__URL": f"sqlite:///{db}",
        "SOFARE_SERVING__MAX_BATCH_WINDOWS": "8",
        **SMALL_TRAINING,
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        cfg = load_config()
        result = tasks.train(cfg, n_trials=1, max_epochs=1, start=MODEL_WINDOW[0], end=MODEL_WINDOW[1])
        verdict = gate.gate(cfg, result["version"])
        built = tasks.build_bento(cfg, result["version"])
    return {"cfg": cfg, "env": env, "version": result["version"], "verdict": verdict, "built": built}


def logged_in(module: Any, token: str = "valid-token") -> Any:
    """A client of the plugin app whose Airflow login check accepts exactly `token` (the real check needs a running
    API server: tests/integration/test_airflow_standalone.py does that)."""
    from fastapi import HTTPException
    from fastapi.testclient import TestClient

    async def verify(given: str | None) -> None:
        if given != token:
            raise HTTPException(401 if not given else 403, "Not authenticated" if not given else "Invalid JWT token")

    module.verify = verify
    module.login_url = lambda next_url: f"/auth/login?next_url={next_url}"
    return TestClient(module.app, cookies={"_token": token})


def processes_with_env(name: str, value: str) -> list[int]:
    """Processes (other than this one) whose environment holds NAME=value: what a test started, however deep,
    since every descendant inherits it."""
    found, needle = [], f"{name}={value}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]
