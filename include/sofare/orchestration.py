"""Wiring shared by the DAG files: the Assets that connect DAGs and the default task arguments.

Light on purpose (Airflow's SDK and the config only): DAG files import this at parse time.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from airflow.sdk import Asset

from sofare.config import Config, ConfigError

T = TypeVar("T")

OWNER = "sofare"

CANDLES = Asset(name="sofare_candles", uri="sofare://warehouse/candles", group="warehouse")
SAFE_HAVEN = Asset(name="sofare_safe_haven_bars", uri="sofare://warehouse/safe_haven_bars", group="warehouse")
MACRO = Asset(name="sofare_macro_observations", uri="sofare://warehouse/macro_observations", group="warehouse")
FEATURES = Asset(name="sofare_features", uri="sofare://warehouse/features", group="warehouse")
VALIDATED_FEATURES = Asset(name="sofare_validated_features", uri="sofare://warehouse/validated_days", group="warehouse")
MODEL_CANDIDATE = Asset(name="sofare_model_candidate", uri="sofare://mlflow/sofare-m3", group="models")
BENTO = Asset(name="sofare_bento", uri="sofare://bentoml/sofare", group="models")
RAW_ASSETS = {"candles": CANDLES, "safe_haven": SAFE_HAVEN, "macro": MACRO}


def default_args(cfg: Config) -> dict[str, Any]:
    """Owner and retries with exponential back-off (every SOFARE task does I/O)."""
    return {
        "owner": OWNER,
        "retries": cfg.ingest.retries,
        "retry_delay": timedelta(seconds=cfg.ingest.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=cfg.ingest.max_retry_delay_seconds),
    }


def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a task body; errors that a retry cannot fix fail the task at once (no retries burnt).

    Malformed source data, rejected requests and bad parameters are permanent; timeouts, rate limits,
    5xx answers and database hiccups keep Airflow's retries with exponential back-off.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from sofare.sources import SourceError, TransientSourceError

    try:
        return fn(*args, **kwargs)
    except TransientSourceError:
        raise
    except (SourceError, ConfigError, ValueError, LookupError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def interval_extra(start: Any, end: Any) -> dict[str, str]:
    """What an asset event carries: the interval the producing task wrote (validation reads it)."""
    return {"start": start.isoformat() if hasattr(start, "isoformat") else str(start),
            "end": end.isoformat() if hasattr(end, "isoformat") else str(end)}
