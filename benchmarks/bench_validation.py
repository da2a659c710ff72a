"""Validation time: all four Great Expectations suites over one day and one year of hourly data, and
over one day of minute data, on SQLite and on a durable PostgreSQL server.

Each case reads its interval from the warehouse, validates every suite in the File Data Context,
records the runs and marks the days, exactly as a `sofare_validate` task does (Data Docs are rebuilt
once per DAG run and timed separately). Loading the data is not timed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_section

GOALS = {"day": 5.0, "year": 60.0}
CASES = [  # label, interval, first validated day, last validated day, goal key
    ("hourly, one day", "1h", "2024-06-12", "2024-06-12", "day"),
    ("hourly, one year (2024)", "1h", "2024-01-01", "2024-12-31", "year"),
    ("minute, one day", "1m", "2024-12-12", "2024-12-12", "day"),
]
LOADED = {"1h": ("2023-01-01", "2024-12-31"), "1m": ("2024-12-01", "2024-12-13")}


def _environment(url: str, interval: str, var: Path) -> dict[str, str]:
    return {"SOFARE_WAREHOUSE__URL": url, "SOFARE_MARKET__INTERVAL": interval, "SOFARE_PATHS__VAR": str(var)}


def _case(url: str, interval: str, first: str, last: str, var: Path, load: bool) -> dict:
    env = _environment(url, interval, var)
    os.environ.update(env)
    try:
        from sofare import tasks
        from sofare.config import load_config
        from sofare.data import ingest, warehouse
        from sofare.validation import suites

        if load:
            start, end = LOADED[interval]
            tasks.backfill(load_config(), ["sample"], start, end)
        cfg = load_config()
        engine = warehouse.get_engine(cfg)
        lo, hi = ingest.day_range(first, last)
        timings, rows, ok = {}, 0, True
        for suite in suites.SUITES:
            began = time.perf_counter()
            result = suites.run_suite(cfg, engine, suite, lo, hi)
            timings[suite] = time.perf_counter() - began
            rows += result.rows
            ok &= result.success
        began = time.perf_counter()
        suites.build_data_docs(cfg)
        timings["data_docs"] = time.perf_counter() - began
        return {"timings": timings, "rows": rows, "success": ok}
    finally:
        for key in env:
            os.environ.pop(key, None)


def run() -> str:
    import great_expectations  # noqa: F401 - the one-off import cost is not part of a validation

    from sofare.data.pgserver import LocalPostgres
    from sofare.validation.suites import SUITES

    scratch = Path(tempfile.mkdtemp(prefix="sofare-bench-"))
    results = []
    try:
        with LocalPostgres(durable=True) as pg:
            urls = {("SQLite", i): f"sqlite:///{scratch / f'{i}.db'}" for i in LOADED}
            urls.update({("PostgreSQL", i): pg.create_database(f"v{i}") for i in LOADED})
            loaded: set = set()
            for label, interval, first, last, goal in CASES:
                for backend in ("SQLite", "PostgreSQL"):
                    print(f"  {label} on {backend} …", flush=True)
                    key = (backend, interval)
                    out = _case(urls[key], interval, first, last, scratch / f"{backend}-{interval}", key not in loaded)
                    loaded.add(key)
                    results.append((label, backend, goal, out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    lines = [
        "## Validation time",
        "",
        f"Machine: {machine()}. PostgreSQL 15 durable. Great Expectations Core 1.x, File Data Context.",
        "Each row: every suite over the interval (read from the warehouse, validate, record the run and",
        "the day marks), seconds per suite; *total* is their sum, the work of one `sofare_validate` run.",
        "Data Docs are rebuilt once per run and shown apart (their time grows with the stored results).",
        "",
        "| case | database | rows | "
        + " | ".join(f"{s} s" for s in SUITES)
        + " | total s | Data Docs s | result | goal |",
        "|---|---|---:|" + "---:|" * len(SUITES) + "---:|---:|---|---|",
    ]
    for label, backend, goal, r in results:
        total = sum(r["timings"][s] for s in SUITES)
        verdict = "met" if total <= GOALS[goal] else "MISSED"
        lines.append(
            f"| {label} | {backend} | {r['rows']:,} | "
            + " | ".join(f"{r['timings'][s]:.2f}" for s in SUITES)
            + f" | {total:.2f} | {r['timings']['data_docs']:.2f} | {'passed' if r['success'] else 'FAILED'}"
            + f" | ≤ {GOALS[goal]:.0f} s: **{verdict}** |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    write_section("validation", run())
