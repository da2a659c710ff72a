"""Alerts: always logged and stored in the `alerts` table; POSTed as JSON to `alerts.webhook_url` when
set (a Slack/Teams/Alertmanager bridge). Delivery failures are recorded, never raised: an alert must
not hide the failure that caused it."""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

from sofare.data import warehouse

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)


def send(
    cfg: Config, source: str, severity: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Record and deliver one alert; returns what was recorded."""
    import pandas as pd

    alert = {
        "alert_id": uuid.uuid4().hex,
        "raised_at": pd.Timestamp.now(tz="UTC"),
        "source": source,
        "severity": severity,
        "message": message,
        "details": json.dumps(details or {}, default=str),
    }
    delivered = False
    if cfg.alerts.webhook_url:
        body = json.dumps(
            {**alert, "raised_at": alert["raised_at"].isoformat(), "details": details or {}}, default=str
        ).encode()
        request = urllib.request.Request(
            cfg.alerts.webhook_url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=cfg.alerts.timeout_seconds) as response:
                delivered = 200 <= response.status < 300
        except OSError as exc:
            log.error("alert webhook %s failed: %s", cfg.alerts.webhook_url, exc)
    log.error("ALERT [%s] %s: %s", severity, source, message)
    try:
        with warehouse.transaction(warehouse.get_engine(cfg)) as conn:
            warehouse.upsert(conn, warehouse.alerts, pd.DataFrame([{**alert, "delivered": delivered}]))
    except Exception as exc:  # noqa: BLE001 - the warehouse may be what is down
        log.error("could not store alert %s: %s", alert["alert_id"], exc)
    return {**alert, "delivered": delivered}
