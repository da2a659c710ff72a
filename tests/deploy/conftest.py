"""What the deploy tier's modules share: a private copy of the session's trained-and-built model home."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

from tests.serving.conftest import free_port


def copy_home(model_home: dict[str, Any], where: Path, **extra: str) -> dict[str, str]:
    """Copy the served model's var/ (MLflow, bento store, warehouse) under `where`; the environment that points a
    config at it, with the front door and the servers on free ports, plus `extra`."""
    src = Path(model_home["env"]["SOFARE_PATHS__VAR"])
    var = where / "var"
    var.mkdir()
    shutil.copy2(src / "mlflow.db", var / "mlflow.db")
    shutil.copytree(src / "bentoml", var / "bentoml", symlinks=True)
    db = var / "warehouse.db"
    with (
        sqlite3.connect(model_home["env"]["SOFARE_WAREHOUSE__URL"].removeprefix("sqlite:///")) as a,
        sqlite3.connect(db) as b,
    ):
        a.backup(b)
    return {
        **model_home["env"],
        "SOFARE_PATHS__VAR": str(var),
        "SOFARE_WAREHOUSE__URL": f"sqlite:///{db}",
        "SOFARE_DEPLOY__FRONTDOOR_PORT": str(free_port()),
        "SOFARE_SERVING__PORT": str(free_port()),
        **extra,
    }
