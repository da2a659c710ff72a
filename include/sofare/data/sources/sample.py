"""The `sample` source: replays the embedded real market data (include/sample_data).

Files keep their originals' column layout and are mapped to the same canonical columns as the live
adapters. Candle intervals without a file are aggregated from the finest file that divides them
(complete buckets only, so a missing hour stays missing).
"""

from __future__ import annotations

import functools
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sofare.config import INTERVALS
from sofare.data.sources.base import (
    CANDLE_COLUMNS,
    MACRO_COLUMNS,
    SAFE_HAVEN_COLUMNS,
    FetchRequest,
    Source,
    SourceError,
)

if TYPE_CHECKING:
    import pandas as pd

_CANDLE_FILE = re.compile(r"^(?P<symbol>[A-Z0-9]+)_(?P<interval>\d+[mhd])(_.*)?\.csv\.gz$")


@functools.cache
def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(path)


def _candle_files(directory: Path, symbol: str) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.glob(f"{symbol}_*.csv.gz")):
        match = _CANDLE_FILE.match(path.name)
        if match and match["interval"] in INTERVALS:
            found.setdefault(match["interval"], []).append(path)
    return found


def _resample(frame: pd.DataFrame, source_interval: str, interval: str) -> pd.DataFrame:
    """Aggregate candles to a coarser interval, keeping only complete buckets."""
    per_bucket = INTERVALS[interval] // INTERVALS[source_interval]
    bucket = frame["open_time"].dt.floor(INTERVALS[interval])
    grouped = frame.groupby(bucket)
    out = grouped.agg(
        open=("open", "first"),
        high=("high", "max"),
        low=("low", "min"),
        close=("close", "last"),
        volume=("volume", "sum"),
        quote_volume=("quote_volume", "sum"),
        trade_count=("trade_count", "sum"),
        rows=("open", "size"),
    )
    out = out[out["rows"] == per_bucket].drop(columns="rows")
    return out.rename_axis("open_time").reset_index()


class SampleSource(Source):
    name = "sample"
    modalities = frozenset({"candles", "safe_haven", "macro"})

    def _fetch(self, request: FetchRequest) -> pd.DataFrame:
        return getattr(self, f"_{request.modality}")(request)

    def _candles(self, request: FetchRequest) -> pd.DataFrame:
        import pandas as pd

        directory = self.cfg.sample_dir / "binance"
        files = _candle_files(directory, request.symbol)
        if request.interval in files:
            source_interval = request.interval
        else:
            wanted = INTERVALS[request.interval]
            finer = [i for i in files if INTERVALS[i] < wanted and wanted % INTERVALS[i] == timedelta(0)]
            if not finer:
                raise SourceError(
                    f"sample data has no {request.symbol} candles at {request.interval} or finer "
                    f"(files in {directory}: {', '.join(sorted(files)) or 'none'})"
                )
            source_interval = max(finer, key=lambda i: INTERVALS[i])
        parts = [_read_csv(p) for p in files[source_interval]]
        raw = pd.concat(parts, ignore_index=True).rename(columns={"timestamp": "open_time"})
        raw["open_time"] = pd.to_datetime(raw["open_time"], utc=True)
        if source_interval != request.interval:
            lo = request.start - INTERVALS[request.interval]
            raw = _resample(
                raw[(raw["open_time"] >= lo) & (raw["open_time"] < request.end)], source_interval, request.interval
            )
        window = raw[(raw["open_time"] >= request.start) & (raw["open_time"] < request.end)]
        return window.loc[:, list(CANDLE_COLUMNS)].reset_index(drop=True)

    def _safe_haven(self, request: FetchRequest) -> pd.DataFrame:
        import pandas as pd

        parts = []
        for ticker in request.tickers:
            path = self.cfg.sample_dir / "yahoo" / f"{ticker}.csv.gz"
            if not path.exists():
                raise SourceError(f"sample data has no daily bars for {ticker!r} ({path} is missing)")
            bars = _read_csv(path).copy()
            bars["date"] = pd.to_datetime(bars["date"]).dt.date
            bars.insert(0, "ticker", ticker)
            parts.append(bars)
        if not parts:
            return pd.DataFrame(columns=list(SAFE_HAVEN_COLUMNS))
        return pd.concat(parts, ignore_index=True).loc[:, list(SAFE_HAVEN_COLUMNS)]

    def _macro(self, request: FetchRequest) -> pd.DataFrame:
        import pandas as pd

        parts = []
        for series_id in request.series:
            path = self.cfg.sample_dir / "fred" / f"{series_id}.csv.gz"
            if not path.exists():
                raise SourceError(f"sample data has no FRED series {series_id!r} ({path} is missing)")
            raw = _read_csv(path)
            if series_id not in raw.columns or "observation_date" not in raw.columns:
                raise SourceError(f"{path}: expected columns observation_date,{series_id}")
            obs = pd.DataFrame(
                {
                    "series_id": series_id,
                    "observation_date": pd.to_datetime(raw["observation_date"]).dt.date,
                    "value": raw[series_id],
                    "realtime_start": pd.NaT,
                }
            )
            parts.append(obs[obs["value"].notna()])  # an empty cell is no publication
        if not parts:
            return pd.DataFrame(columns=list(MACRO_COLUMNS))
        return pd.concat(parts, ignore_index=True)
