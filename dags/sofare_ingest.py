"""
### sofare_ingest — load one data interval of every modality, then its features

Time-scheduled (`ingest.schedule`, daily by default) with real data intervals, so each run loads
**exactly** `[data_interval_start, data_interval_end)`:

| task | loads | rows selected by |
|---|---|---|
| `load_candles` | BTC/USDT klines (`ingest.sources.candles`: sample or binance) | candle open time |
| `load_safe_haven` | daily safe-haven bars (sample or yfinance) | exchange trading date |
| `load_macro` | FRED observations (sample or fred) | instant the value became known |
| `build_features` | the features table for the interval (and the previous `horizon` rows' targets) | candle open time |

Every load validates before it writes and writes in one transaction: a failed run leaves nothing
half-written and a repeated run leaves identical rows. Gaps are reported in the task log and in the
returned summary. Backfill with `airflow backfill create --dag-id sofare_ingest --from-date … --to-date …`
or the UI's *Backfill* button; for long ranges in parallel chunks use `sofare_backfill`.
Emits the `sofare_*` Assets; the features event carries the interval, which `sofare_validate`
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

        return run(tasks.load, "candles", data_interval_start, data_interval_end)

    @task(outlets=[SAFE_HAVEN])
    def load_safe_haven(data_interval_start=None, data_interval_end=None) -> dict:
        from sofare import tasks

        return run(tasks.load, "safe_haven", data_interval_start, data_interval_end)

    @task(outlets=[MACRO])
    def load_macro(data_interval_start=None, data_interval_end=None) -> dict:
        from sofare import tasks

        return run(tasks.load, "macro", data_interval_start, data_interval_end)

    # Features need the previous interval's candles as warm-up: runs build them in order.
    @task(outlets=[FEATURES], depends_on_past=True)
    def build_features(data_interval_start=None, data_interval_end=None, outlet_events=None) -> dict:
        from sofare import tasks

        result = run(tasks.build_features, data_interval_start, data_interval_end)
        outlet_events[FEATURES].extra = interval_extra(data_interval_start, data_interval_end)
        return result

    [load_candles(), load_safe_haven(), load_macro()] >> build_features()


sofare_ingest()
