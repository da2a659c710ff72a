"""
### sofare_ingest — load one data interval of every modality, then its features

Time-scheduled (`ingest.schedule`, daily by default) with real data intervals. Each run is
self-contained: its loads fetch `[data_interval_start, data_interval_end)` **plus the context its
features read** (`sofare.data.ingest.feature_inputs`), so its features never wait for another run and
runs of any intervals give the same rows in any order or at once (`max_active_runs` = 4):

| task | loads | rows selected by | context fetched with it |
|---|---|---|---|
| `load_candles` | BTC/USDT klines (`ingest.sources.candles`: sample or binance) | candle open time | 2 × `features.warmup_bars` candles before the feature block holding the interval's start |
| `load_safe_haven` | daily safe-haven bars (sample or yfinance) | exchange trading date | `features.daily_context_days` before those candles |
| `load_macro` | FRED observations (sample or fred) | instant the value became known | `features.macro_context_days` before them, and what is known at the interval's end |
| `build_features` | the features table for the interval (and the previous `horizon` rows' targets) | candle open time | |

Every load validates before it writes and writes in one transaction: a failed run leaves nothing
half-written and a repeated run leaves identical rows. Context rows are written only where the
warehouse lacks them. Each task's summary (XCom, log) describes the run's own interval: its rows, its
gaps and, when it has none, a `note` saying why; the context is reported apart (`context`: window,
rows fetched, rows new). The last `horizon` rows get their targets when the next interval's candles
exist (that run's `build_features` fills them; a known target is never set back to NULL).
Backfill with `airflow backfill create --dag-id sofare_ingest --from-date … --to-date …` or the UI's
*Backfill* button, any reprocess behaviour, forwards or backwards; for long ranges in parallel chunks use
`sofare_backfill`. Emits the `sofare_*` Assets; the features event carries the interval to validate
(from the start of the previous day when this run refreshed that day's last targets), which `sofare_validate`
then validates.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, task

from sofare.config import load_config
from sofare.orchestration import CANDLES, FEATURES, MACRO, SAFE_HAVEN, default_args, interval_extra, run

CFG = load_config()


@dag(
    dag_id="sofare_ingest",
    schedule=CronDataIntervalTimetable(CFG.ingest.schedule, timezone="UTC"),
    start_date=pendulum.parse(CFG.ingest.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    default_args=default_args(CFG),
    tags=["sofare", "ingest"],
    doc_md=__doc__,
)
def sofare_ingest():
    @task(outlets=[CANDLES])
    def load_candles(data_interval_start=None, data_interval_end=None) -> dict:
        from sofare import tasks

        return run(tasks.load, "candles", data_interval_start, data_interval_end, context=True)

    @task(outlets=[SAFE_HAVEN])
    def load_safe_haven(data_interval_start=None, data_interval_end=None) -> dict:
        from sofare import tasks

        return run(tasks.load, "safe_haven", data_interval_start, data_interval_end, context=True)

    @task(outlets=[MACRO])
    def load_macro(data_interval_start=None, data_interval_end=None) -> dict:
        from sofare import tasks

        return run(tasks.load, "macro", data_interval_start, data_interval_end, context=True)

    # Reads only what this run's loads fetched (their context included): no depends_on_past, so the
    # UI's Backfill dialog works with its default reprocess behaviour.
    @task(outlets=[FEATURES])
    def build_features(data_interval_start=None, data_interval_end=None, outlet_events=None) -> dict:
        from sofare import tasks

        result = run(tasks.build_features, data_interval_start, data_interval_end)
        outlet_events[FEATURES].extra = interval_extra(result["validate_from"], data_interval_end)
        return result

    [load_candles(), load_safe_haven(), load_macro()] >> build_features()


sofare_ingest()
