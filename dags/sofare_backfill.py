"""
### sofare_backfill — load a long date range in parallel chunks (manual)

Trigger with the form (typed Params): which **sources**, the inclusive **start** and **end** days,
and optionally **symbol** and **interval**. The range is cut into `ingest.chunk_days` chunks:

1. `plan_loads` — one load per (source, modality, chunk); daily and macro data start
   `ingest.context_days` earlier as history chunks that only fill what the warehouse lacks (as-of features need
   it from the first candle; validated history before the range stays validated);
2. `load_chunk` — dynamically mapped, one transaction per chunk (retried with back-off);
3. `plan_features` → `features_chunk` — mapped over the same chunks once every load is in
   (features need their neighbours' candles as warm-up and targets);
4. `summarize` — rows, ranges and gaps per table (also in the task log).

Each features chunk emits `sofare_features` with its interval (from the previous day when the chunk refreshed the
targets of that day's last hours), so `sofare_validate` validates it.
Sources: `sample` (embedded real data, all modalities), `binance` (candles), `yfinance`
(safe-haven bars), `fred` (macro). Repeating a backfill gives identical rows.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from sofare.config import INTERVALS, load_config
from sofare.orchestration import (
    CANDLES,
    FEATURES,
    MACRO,
    SAFE_HAVEN,
    UNSCHEDULED_START,
    default_args,
    interval_extra,
    run,
)

CFG = load_config()
SOURCES = {
    "sample": "sample (embedded data, every modality)",
    "binance": "binance (candles, live)",
    "yfinance": "yfinance (safe-haven bars, live)",
    "fred": "fred (macro, live)",
}


@dag(
    dag_id="sofare_backfill",
    schedule=None,
    start_date=UNSCHEDULED_START,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    tags=["sofare", "ingest", "backfill"],
    doc_md=__doc__,
    params={
        "sources": Param(
            ["sample"],
            type="array",
            title="Sources",
            items={"type": "string", "enum": list(SOURCES)},
            examples=list(SOURCES),
            values_display=SOURCES,  # `examples`: the form shows a multi-select of them
            description="sample = embedded data for every modality; or live binance / yfinance / fred",
            minItems=1,
            uniqueItems=True,
        ),
        "start": Param(
            "2023-01-01",
            type="string",
            format="date",
            title="First day (UTC, inclusive)",
            description="YYYY-MM-DD; the embedded sample holds 2023-01-01 .. 2025-06-30",
        ),
        "end": Param(
            "2025-06-30",
            type="string",
            format="date",
            title="Last day (UTC, inclusive)",
            description="YYYY-MM-DD, on or after the first day",
        ),
        "symbol": Param(
            CFG.market.symbol,
            type="string",
            pattern="^[A-Z0-9]+$",
            title="Symbol",
            description="Binance symbol in capitals, e.g. BTCUSDT",
        ),
        "interval": Param(
            CFG.market.interval,
            type="string",
            enum=list(INTERVALS),
            title="Candle interval",
            description="the candle length to load (the model serves market.interval)",
        ),
    },
)
def sofare_backfill():
    @task
    def plan_loads(params=None) -> list[dict]:
        from sofare import tasks

        return run(
            tasks.plan_backfill, params["sources"], params["start"], params["end"], params["symbol"], params["interval"]
        )

    @task(outlets=[CANDLES, SAFE_HAVEN, MACRO], map_index_template="{{ chunk_label }}")
    def load_chunk(chunk: dict) -> dict:
        from airflow.sdk import get_current_context

        from sofare import tasks

        get_current_context()["chunk_label"] = f"{chunk['source']} {chunk['modality']} {chunk['start'][:10]}"
        return run(tasks.load_chunk, chunk)

    @task
    def plan_features(loads: list, params=None) -> list[dict]:
        from sofare import tasks

        return run(tasks.plan_feature_chunks, params["start"], params["end"], params["symbol"], params["interval"])

    @task(outlets=[FEATURES])
    def features_chunk(chunk: dict, outlet_events=None) -> dict:
        from sofare import tasks

        result = run(tasks.features_chunk, chunk)
        outlet_events[FEATURES].extra = interval_extra(result["validate_from"], chunk["end"])
        return result

    @task
    def summarize(loads: list, features: list) -> dict:
        from sofare import tasks

        return run(tasks.summarize, list(loads))

    loads = load_chunk.expand(chunk=plan_loads())
    features = features_chunk.expand(chunk=plan_features(loads))
    summarize(loads, features)


sofare_backfill()
