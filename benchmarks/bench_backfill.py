"""Backfill throughput (rows/s) on SQLite and on a durable PostgreSQL server.

Cases: the 2.5 years of real hourly candles, the real December 2024 minute candles, and one year of
minute candles (the real December minutes tiled 12x with shifted timestamps: throughput depends on
the number and shape of rows, not their values). Each case runs the sofare_backfill task functions
in order on a fresh database: load every chunk, then materialise features.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import ROOT, machine, write_section

GOAL_SECONDS = 60.0
CASES = [
    ("hourly 2023-01 .. 2025-06 (real)", "1h", "2023-01-01", "2025-06-30", None),
    ("minute 2024-12-01 .. 12-29 (real)", "1m", "2024-12-01", "2024-12-29", None),
    ("minute, one year (real Dec 2024 tiled)", "1m", "2023-01-01", "2023-12-31", "year"),
]


def _year_of_minutes(directory: Path) -> Path:
    """A sample_data folder whose 1m candle file is one year of the real December minutes, tiled."""
    (directory / "binance").mkdir(parents=True)
    for part in ("yahoo", "fred"):
        (directory / part).symlink_to(ROOT / "include" / "sample_data" / part)
    real = pd.read_csv(ROOT / "include" / "sample_data" / "binance" / "BTCUSDT_1m_2024-12.csv.gz")
    times = pd.date_range("2023-01-01", "2024-01-01", freq="1min", inclusive="left", tz="UTC")
    tiled = pd.concat([real] * (len(times) // len(real) + 1), ignore_index=True).iloc[: len(times)].copy()
    tiled["timestamp"] = times.strftime("%Y-%m-%d %H:%M:%S+00:00")
    tiled.to_csv(directory / "binance" / "BTCUSDT_1m_2023.csv.gz", index=False)
    return directory


def _run_case(url: str, interval: str, start: str, end: str, sample_dir: Path | None, var: Path) -> dict:
    env = {"SOFARE_WAREHOUSE__URL": url, "SOFARE_MARKET__INTERVAL": interval, "SOFARE_PATHS__VAR": str(var)}
    if sample_dir is not None:
        env["SOFARE_PATHS__SAMPLE_DATA"] = str(sample_dir)
    os.environ.update(env)
    try:
        from sofare import tasks
        from sofare.config import load_config

        cfg = load_config()
        plan = tasks.plan_backfill(cfg, ["sample"], start, end)
        tasks.status(cfg)  # creates the schema outside the timed part
        timings = {"candles": 0.0, "daily+macro": 0.0, "features": 0.0}
        rows = 0
        for chunk in plan:
            began = time.perf_counter()
            result = tasks.load_chunk(cfg, chunk)
            key = "candles" if chunk["modality"] == "candles" else "daily+macro"
            timings[key] += time.perf_counter() - began
            rows += result["rows"] if key == "candles" else 0
        for chunk in tasks.plan_feature_chunks(cfg, start, end):
            began = time.perf_counter()
            tasks.features_chunk(cfg, chunk)
            timings["features"] += time.perf_counter() - began
        return {"rows": rows, **timings}
    finally:
        for key in env:
            os.environ.pop(key, None)


def run() -> str:
    from sofare.data.pgserver import LocalPostgres

    scratch = Path(tempfile.mkdtemp(prefix="sofare-bench-"))
    year = _year_of_minutes(scratch / "year-sample")
    results = []
    try:
        with LocalPostgres(durable=True) as pg:
            for label, interval, start, end, special in CASES:
                for backend in ("SQLite", "PostgreSQL"):
                    name = f"b{len(results)}"
                    url = f"sqlite:///{scratch / name}.db" if backend == "SQLite" else pg.create_database(name)
                    print(f"  {label} on {backend} …", flush=True)
                    out = _run_case(url, interval, start, end, year if special else None, scratch / name)
                    results.append((label, backend, special, out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    lines = [
        "## Backfill throughput",
        "",
        f"Machine: {machine()}. PostgreSQL 15 with fsync and synchronous commit on (durable).",
        "Each row: a fresh database, the `sofare_backfill` steps in order (load every chunk of",
        "`ingest.chunk_days`, then features), one process. *Candles* is loading and validating candles,",
        "*daily+macro* the safe-haven and FRED data with their 400-day context, *features* the feature",
        "function and its upsert. Throughput = candle rows / (candles + features).",
        "",
        "| case | database | candle rows | candles s | daily+macro s | features s | total s | rows/s | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, backend, special, r in results:
        core = r["candles"] + r["features"]
        total = core + r["daily+macro"]
        goal = ""
        if special:
            goal = f"≤ {GOAL_SECONDS:.0f} s: **{'met' if total <= GOAL_SECONDS else 'MISSED'}** ({total:.1f} s)"
        lines.append(
            f"| {label} | {backend} | {r['rows']:,} | {r['candles']:.1f} | {r['daily+macro']:.1f} | "
            f"{r['features']:.1f} | {total:.1f} | {r['rows'] / core:,.0f} | {goal} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    write_section("backfill", run())
