"""Market-data sources behind one interface (see base.Source)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sofare.data.sources.base import (
    FetchRequest,
    MalformedDataError,
    RateLimitedError,
    Source,
    SourceError,
    TransientSourceError,
)

if TYPE_CHECKING:
    from sofare.config import Config

# Which modality each source provides; `sample` provides all three.
SOURCE_MODALITIES: dict[str, tuple[str, ...]] = {
    "sample": ("candles", "safe_haven", "macro"),
    "binance": ("candles",),
    "yfinance": ("safe_haven",),
    "fred": ("macro",),
}
LIVE_SOURCES = ("binance", "yfinance", "fred")


def get_source(name: str, cfg: Config, sleep: Callable[[float], None] = time.sleep) -> Source:
    """Build a source by name (imports its client library only when asked for)."""
    cls: type[Source]
    if name == "sample":
        from sofare.data.sources.sample import SampleSource as cls
    elif name == "binance":
        from sofare.data.sources.binance import BinanceSource as cls
    elif name == "yfinance":
        from sofare.data.sources.yfinance import YfinanceSource as cls
    elif name == "fred":
        from sofare.data.sources.fred import FredSource as cls
    else:
        raise SourceError(f"unknown source {name!r}; expected one of {', '.join(SOURCE_MODALITIES)}")
    return cls(cfg, sleep=sleep)


__all__ = [
    "LIVE_SOURCES",
    "SOURCE_MODALITIES",
    "FetchRequest",
    "MalformedDataError",
    "RateLimitedError",
    "Source",
    "SourceError",
    "TransientSourceError",
    "get_source",
]
