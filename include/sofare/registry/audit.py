"""The `audit_log` table: who did what to which model version, with what outcome (MLflow keeps no
history of aliases; this does)."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from sofare.data import warehouse

if TYPE_CHECKING:
    from sofare.config import Config


def record(cfg: Config, actor: str, action: str, model_version: str, outcome: str, details: dict[str, Any]) -> str:
    import pandas as pd

    audit_id = uuid.uuid4().hex
    row = pd.DataFrame(
        [
            {
                "audit_id": audit_id,
                "at": pd.Timestamp.now(tz="UTC"),
                "actor": actor,
                "action": action,
                "model_version": str(model_version),
                "outcome": outcome,
                "details": json.dumps(details, default=str),
            }
        ]
    )
    with warehouse.transaction(warehouse.get_engine(cfg)) as conn:
        warehouse.upsert(conn, warehouse.audit_log, row)
    return audit_id
