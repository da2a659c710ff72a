"""Wiring shared by the DAG files: the Assets that connect DAGs and the default task arguments.

Light on purpose (Airflow's SDK and the config only): DAG files import this at parse time.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from airflow.sdk import Asset, BaseNotifier

from sofare.config import Config, load_config
from sofare.errors import PermanentError

T = TypeVar("T")

OWNER = "sofare"

# start_date of the DAGs no clock schedules (manual or asset-triggered): fixed in the past. Airflow creates no task
# instances for a run whose logical date precedes a task's start_date, and a form-triggered run has one (now), so
# tying these to the configurable ingest.start_date would let a future value turn the on-call rollback form into
# runs that "succeed" with no task at all.
UNSCHEDULED_START = datetime(2023, 1, 1, tzinfo=UTC)

CANDLES = Asset(name="sofare_candles", uri="sofare://warehouse/candles", group="warehouse")
SAFE_HAVEN = Asset(name="sofare_safe_haven_bars", uri="sofare://warehouse/safe_haven_bars", group="warehouse")
MACRO = Asset(name="sofare_macro_observations", uri="sofare://warehouse/macro_observations", group="warehouse")
FEATURES = Asset(name="sofare_features", uri="sofare://warehouse/features", group="warehouse")
VALIDATED_FEATURES = Asset(name="sofare_validated_features", uri="sofare://warehouse/validated_days", group="warehouse")
MODEL_CANDIDATE = Asset(name="sofare_model_candidate", uri="sofare://mlflow/sofare-m3", group="models")
BENTO = Asset(name="sofare_bento", uri="sofare://bentoml/sofare", group="models")
CHAMPION = Asset(name="sofare_champion", uri="sofare://mlflow/sofare-m3/champion", group="models")
RETRAIN_REQUEST = Asset(name="sofare_retrain_request", uri="sofare://monitoring/retrain", group="monitoring")
MONITORING = Asset(name="sofare_monitoring_runs", uri="sofare://warehouse/monitoring_runs", group="monitoring")
RAW_ASSETS = {"candles": CANDLES, "safe_haven": SAFE_HAVEN, "macro": MACRO}


def fail_fast(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a task body, mapping the error taxonomy onto Airflow: a `PermanentError` (bad input, failed
    validation, something missing) fails the task at once, no retries burnt; a `TransientError`
    (network, rate limits, locks) and anything unexpected keep Airflow's retries with back-off."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        return fn(*args, **kwargs)
    except PermanentError as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fail_fast(fn, cfg, *args)` with the configuration read once, when the task runs (a worker's
    environment may differ from the parser's)."""
    return fail_fast(fn, load_config(), *args, **kwargs)


def interval_extra(start: Any, end: Any) -> dict[str, str]:
    """What an asset event carries: the interval the producing task wrote (validation reads it)."""
    return {
        "start": start.isoformat() if hasattr(start, "isoformat") else str(start),
        "end": end.isoformat() if hasattr(end, "isoformat") else str(end),
    }


class SofareNotifier(BaseNotifier):
    """The one way SOFARE alerts from Airflow: task failures (every DAG's `on_failure_callback`), drift and
    monitoring decisions, rollbacks. Each alert is logged, stored in the `alerts` table and POSTed to
    `alerts.webhook_url` when set (`sofare.data.alerts.send`). Without a message it describes the failed task."""

    template_fields = ("message", "source", "severity")

    def __init__(
        self,
        message: str | None = None,
        severity: str = "high",
        source: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.message = message
        self.severity = severity
        self.source = source
        self.details = details or {}

    def notify(self, context: Any) -> None:
        from sofare.data import alerts

        ti = context.get("task_instance") or context.get("ti")
        dag_id, task_id = getattr(ti, "dag_id", "?"), getattr(ti, "task_id", "?")
        message = self.message or f"{dag_id}.{task_id} failed: {context.get('exception')}"
        alerts.send(
            load_config(),
            self.source or f"airflow:{dag_id}.{task_id}",
            self.severity,
            message,
            {
                **self.details,
                "run_id": context.get("run_id"),
                "map_index": getattr(ti, "map_index", None),
                "try_number": getattr(ti, "try_number", None),
            },
        )


def default_args(cfg: Config) -> dict[str, Any]:
    """Owner, retries with exponential back-off (every SOFARE task does I/O), and an alert on failure."""
    return {
        "owner": OWNER,
        "retries": cfg.ingest.retries,
        "retry_delay": timedelta(seconds=cfg.ingest.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=cfg.ingest.max_retry_delay_seconds),
        "on_failure_callback": SofareNotifier(),
    }
