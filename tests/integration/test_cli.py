"""The `sofare` command as people run it: a real process, exit codes, one-line errors."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def sofare(*args: str, env: dict[str, str], bare: bool = False) -> subprocess.CompletedProcess[str]:
    """`sofare ARGS` in this environment plus `env`; `bare`: without the test session's AIRFLOW__* settings, as a
    user's shell has none."""
    base = {k: v for k, v in os.environ.items() if not (bare and k.startswith("AIRFLOW__"))}
    return subprocess.run(
        [sys.executable, "-m", "sofare.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=600,
        check=False,
    )


@pytest.fixture
def env(tmp_path, db_url):
    return {"SOFARE_PATHS__VAR": str(tmp_path / "var"), "SOFARE_WAREHOUSE__URL": db_url}


def test_backfill_then_status_reports_rows_ranges_and_the_real_gap(env):
    done = sofare("backfill", "--source", "sample", "--start", "2023-03-20", "--end", "2023-03-28", env=env)
    assert done.returncode == 0, done.stderr
    assert "candles: 215 rows" in done.stdout  # 9 days x 24 - the real missing hour
    assert "gap: 2023-03-24T13:00:00+00:00 (1 missing)" in done.stdout
    status = sofare("status", "--json", "--checksum", env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["candles"][0]["rows"] == 215 and report["candles"][0]["missing"] == 1
    assert report["features"][0]["rows"] == 215
    again = sofare("backfill", "--source", "sample", "--start", "2023-03-20", "--end", "2023-03-28", env=env)
    assert again.returncode == 0
    assert json.loads(sofare("status", "--json", "--checksum", env=env).stdout)["checksums"] == report["checksums"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("backfill", "--source", "sample", "--start", "2023-02-30", "--end", "2023-03-01"), "day is out of range"),
        (("backfill", "--source", "sample", "--start", "2023-03-05", "--end", "2023-03-01"), "is before start"),
        (
            ("backfill", "--source", "sample", "--start", "2023-03-01", "--end", "2023-03-01", "--symbol", "DOGEUSDT"),
            "no DOGEUSDT candles",
        ),
    ],
)
def test_bad_input_is_a_one_line_error_and_a_nonzero_exit(env, args, message):
    done = sofare(*args, env=env)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sofare {args[0]}: error:") and message in last


def test_live_source_without_credentials_fails_clearly(env):
    done = sofare(
        "backfill", "--source", "fred", "--start", "2024-01-01", "--end", "2024-01-02", env={**env, "FRED_API_KEY": ""}
    )
    assert done.returncode == 1 and "FRED needs an API key" in done.stderr


def test_invalid_config_override_is_reported(env):
    done = sofare("status", env={**env, "SOFARE_MARKET__INTERVAL": "7m"})
    assert done.returncode == 1 and "market.interval" in done.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_init_creates_schema_airflow_db_and_connection(tmp_path, env):
    env = {**env, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    env.pop("SOFARE_WAREHOUSE__URL")
    first = sofare("init", env=env, bare=True)
    assert first.returncode == 0, first.stderr
    assert "Airflow connection 'sofare_warehouse' created" in first.stdout
    # the airflow.cfg Airflow generated holds the project's settings, not Airflow's defaults (examples, ~/airflow/dags,
    # the API on 0.0.0.0), and keeps the rest of what Airflow wrote
    written = configparser.ConfigParser(interpolation=None)
    written.read(tmp_path / "airflow" / "airflow.cfg")
    assert written["core"]["load_examples"] == "False"
    assert written["core"]["dags_folder"] == str(ROOT / "dags")
    assert written["core"]["plugins_folder"] == str(ROOT / "plugins")
    assert written["core"]["dags_are_paused_at_creation"] == "True"
    assert written["api"]["host"] == "127.0.0.1" and written["api"]["port"] == "8080"
    assert written["core"]["execution_api_server_url"] == "http://127.0.0.1:8080/execution/", "tasks reach the API"
    assert written["core"]["fernet_key"] and written["database"]["sql_alchemy_conn"].startswith("sqlite:///")
    second = sofare("init", env=env, bare=True)
    assert second.returncode == 0 and "exists (left as it is)" in second.stdout
    assert "airflow.cfg" not in second.stdout, "nothing left to change the second time"
    # a plain `airflow` pointed at that home, with none of the project's environment, reads the same settings
    plain = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")} | {
        "AIRFLOW_HOME": env["AIRFLOW_HOME"]
    }
    for section, key, value in (("core", "load_examples", "False"), ("core", "dags_folder", str(ROOT / "dags"))):
        got = subprocess.run(
            [sys.executable, "-m", "airflow", "config", "get-value", section, key],
            capture_output=True,
            text=True,
            env=plain,
            check=True,
        )
        assert got.stdout.strip() == value
    listed = subprocess.run(
        [sys.executable, "-m", "airflow", "connections", "get", "sofare_warehouse", "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    assert json.loads(listed.stdout)[0]["host"] == str(tmp_path / "var" / "warehouse.db")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_validate_exits_0_on_real_data_and_1_naming_a_broken_expectation(env, tmp_path):
    env = {**env, "SOFARE_INGEST__CONTEXT_DAYS": "40"}
    assert (
        sofare("backfill", "--source", "sample", "--start", "2023-02-10", "--end", "2023-03-23", env=env).returncode
        == 0
    )
    ok = sofare("validate", "--start", "2023-03-21", "--end", "2023-03-23", env=env)
    assert ok.returncode == 0, ok.stderr
    docs = tmp_path / "var" / "data_docs" / "index.html"
    assert f"Data Docs: {docs}" in ok.stdout and docs.exists()
    assert ok.stdout.count(": passed (") == 4
    import sqlite3

    with sqlite3.connect(env["SOFARE_WAREHOUSE__URL"].removeprefix("sqlite:///")) as db:
        db.execute("UPDATE candles SET volume = -1 WHERE open_time LIKE '2023-03-22 07:00%'")
    bad = sofare("validate", "--start", "2023-03-21", "--end", "2023-03-23", env=env)
    assert bad.returncode == 1
    assert "volume >= 0: 1 row(s) break it; days: 2023-03-22" in bad.stdout
    assert f"Data Docs: {docs}" in bad.stdout
    assert bad.stderr.strip().splitlines()[-1].startswith("sofare validate: error: validation failed: candles")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sofare_airflow_runs_airflow_on_the_project_airflow(tmp_path, env):
    """`sofare airflow ARGS` is the venv's `airflow` with the environment `sofare init` and `make airflow` use: it
    reads var/airflow (not ~/airflow), dags/ and plugins/, whatever the caller's PATH and AIRFLOW__* settings."""
    env = {**env, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    env.pop("AIRFLOW_HOME", None)
    base = {k: v for k, v in os.environ.items() if k != "AIRFLOW_HOME" and not k.startswith("AIRFLOW__")}
    run = {**base, **env}

    def airflow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sofare.cli", "airflow", *args], capture_output=True, text=True, env=run, check=False
        )

    for key, value in (
        ("dags_folder", str(ROOT / "dags")),
        ("plugins_folder", str(ROOT / "plugins")),
        ("load_examples", "False"),
    ):
        got = airflow("config", "get-value", "core", key)
        assert got.returncode == 0 and got.stdout.strip() == value, got.stderr
    assert airflow("config", "get-value", "api", "host").stdout.strip() == "127.0.0.1"
    assert (tmp_path / "var" / "airflow" / "airflow.cfg").exists() and not (tmp_path / "airflow").exists()
    helped = airflow("--help")
    assert helped.returncode == 0 and "GROUP_OR_COMMAND" in helped.stdout
    wrong = airflow("no-such-command")
    assert wrong.returncode == 2 and "no-such-command" in wrong.stderr, "Airflow's own exit status and message"
