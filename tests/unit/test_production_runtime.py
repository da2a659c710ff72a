"""docker-compose.airflow.yml cannot run here (no container engine); check what can be checked:
its structure, and that every SOFARE_* override it sets is a valid configuration."""

from __future__ import annotations

from pathlib import Path

import yaml

from sofare.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_wires_celery_postgres_and_the_warehouse_connection():
    compose = yaml.safe_load((ROOT / "docker-compose.airflow.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-worker", "airflow-triggerer"} <= set(services)
    env = services["airflow-worker"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW_CONN_SOFARE_WAREHOUSE"].startswith("postgresql://")
    assert (ROOT / services["airflow-worker"]["build"]["dockerfile"]).exists()
    assert (ROOT / "docker" / "postgres-init.sql").exists()


def test_compose_overrides_are_valid_config():
    compose = yaml.safe_load((ROOT / "docker-compose.airflow.yml").read_text())
    env = {k: str(v) for k, v in compose["services"]["airflow-worker"]["environment"].items() if k.startswith("SOFARE_")}
    cfg = load_config(env=env)
    assert (cfg.ingest.sources.candles, cfg.ingest.sources.safe_haven, cfg.ingest.sources.macro) == \
        ("binance", "yfinance", "fred")
