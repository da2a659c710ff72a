"""Each model test trains on its own copy of the session's validated warehouse (tests/conftest.py)
with a small, fast search space."""

from __future__ import annotations

import sqlite3

import pytest

from tests.conftest import SMALL_TRAINING


@pytest.fixture
def train_cfg(validated_db, tmp_path, monkeypatch):
    """Config on a private copy of the validated warehouse, MLflow under its own var/."""
    from sofare.config import load_config

    db = tmp_path / "warehouse.db"
    with sqlite3.connect(validated_db) as source, sqlite3.connect(db) as target:  # WAL-safe copy
        source.backup(target)
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(tmp_path / "var"))
    monkeypatch.setenv("SOFARE_WAREHOUSE__URL", f"sqlite:///{db}")
    for key, value in SMALL_TRAINING.items():
        monkeypatch.setenv(key, value)
    return load_config()
