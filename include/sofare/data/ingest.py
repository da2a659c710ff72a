"""Loading data intervals into the warehouse and materialising features: what DAG tasks and CLI call.

Each call loads exactly one modality over one half-open UTC interval, validates everything before
writing, and writes in ONE transaction: a failed interval leaves nothing behind, a repeated one
leaves the same rows. Interval membership: candles by open_time, daily bars by trading date,
macro observations by the instant they became known (so a daily run replays history as it was).

A sofare_ingest run loads its interval *with context*: also what `materialize_features` reads for it
(`feature_inputs`: the warm-up candles before it, daily and macro history before those), so its features
read only rows it loaded itself and runs of any intervals give the same rows in any order or at once.

Features are computed in fixed blocks (`feature_blocks`: `features.warmup_bars` candle intervals each, on a grid
from the epoch), each from the `warmup_bars` candles before it, whatever interval asked for them: the same stored
candles give the same rows, bit for bit, however a backfill was chunked (and `sofare status --checksum` compares
across reruns).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sofare.config import interval_delta
from sofare.data import quality, warehouse
from sofare.data.features import feature_spec
from sofare.data.sources import SOURCE_MODALITIES, FetchRequest, get_source
from sofare.data.sources.base import trading_dates
from sofare.data.visibility import macro_known_at, safe_haven_known_at
from sofare.errors import InputError

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Engine

    from sofare.config import Config
    from sofare.data.sources import Source

log = logging.getLogger(__name__)
MODALITIES = ("candles", "safe_haven", "macro")
# Warm-up candles are looked for this many `warmup_bars` spans back, so that a row keeps its full warm-up
# across gaps of up to `warmup_bars` missing candles before its interval.
WARMUP_REACH = 2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # where the grids of feature blocks and of their context reads start
# The daily and macro history a feature block reads starts on this grid: blocks whose reads start in one cell
# share one context (a year of minute candles is ~1,200 blocks), and what a block reads depends on the block only.
CONTEXT_GRID = timedelta(days=30)


@dataclass
class LoadResult:
    """What one interval load did (JSON-able for XCom and the CLI)."""

    modality: str
    source: str
    start: datetime
    end: datetime
    rows: int  # rows of the interval itself
    gaps: list[quality.Gap] = field(default_factory=list)  # inside the interval
    context: Context | None = None  # what else features read, when loaded with it
    history: bool = False  # a backfill's history before its range: only rows the warehouse lacks were written

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "source": self.source,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "rows": self.rows,
            "gaps": [g.to_dict() for g in self.gaps],
            "note": self.note,
            "context": self.context.to_dict() if self.context else None,
            "history": self.history,
        }

    @property
    def note(self) -> str:
        """Why an interval loaded nothing, in words (a green run with 0 rows must not look like success)."""
        if self.rows or self.history:
            return ""
        why = (
            (
                " — the embedded sample is a fixed history (include/sample_data/SOURCES.md): backfill inside it, or "
                "configure a live source in ingest.sources"
            )
            if self.source == "sample"
            else " — the source published nothing for it yet (weekend/holiday for daily markets, a release calendar for macro)"
        )
        return f"no rows: {self.source} has no {self.modality} for this interval{why}"

    def __str__(self) -> str:
        gaps = f", {len(self.gaps)} gap(s): " + "; ".join(map(str, self.gaps)) if self.gaps else ""
        note = f" ({self.note})" if self.note else ""
        context = f"; {self.context}" if self.context else ""
        return (
            f"{self.modality} from {self.source} [{self.start:%Y-%m-%d %H:%M} .. {self.end:%Y-%m-%d %H:%M}): "
            f"{self.rows} rows{gaps}{note}{context}"
        )


@dataclass
class Context:
    """The rows a load fetched around its interval for the interval's features: the fetch covered [start, end),
    the interval included; `rows` counts those outside the interval.
    They are validated like the interval's, and written only where the warehouse lacks them (`written`): a
    stored row stays as its own interval's load wrote it."""

    start: datetime
    end: datetime
    rows: int
    written: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "rows": self.rows,
            "written": self.written,
        }

    def __str__(self) -> str:
        return (
            f"fetched with its context [{self.start:%Y-%m-%d %H:%M} .. {self.end:%Y-%m-%d %H:%M}): {self.rows} "
            f"rows around the interval, {self.written} of them new"
        )


def utc(moment: datetime | date | str) -> datetime:
    """A timezone-aware UTC datetime from a datetime, date or ISO string (naive means UTC)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    # a plain datetime, whatever came in (Airflow hands out pendulum DateTimes pandas cannot compare)
    return datetime(*moment.timetuple()[:6], moment.microsecond, tzinfo=UTC)


def day_range(start: date | str, end: date | str) -> tuple[datetime, datetime]:
    """Inclusive calendar days [start, end] as the UTC interval [start 00:00, end+1 00:00). A bad day is an
    InputError naming its field (a DAG form's `start`/`end`, the CLI's --start/--end)."""

    def day(value: date | str, field: str) -> datetime:
        if not isinstance(value, str):
            return utc(value)
        try:
            return utc(date.fromisoformat(value.strip()))
        except ValueError as exc:
            raise InputError(f"{field}: {value[:40]!r} is not a day (YYYY-MM-DD): {exc}") from None

    first, last = day(start, "start"), day(end, "end")
    if last < first:
        raise InputError(f"end: {last.date()} is before start {first.date()}")
    return first, last + timedelta(days=1)


def _prepare_candles(raw: pd.DataFrame, req: FetchRequest, source: str) -> pd.DataFrame:
    what = f"{source} candles {req.symbol} {req.interval} [{req.start:%Y-%m-%d %H:%M}, {req.end:%Y-%m-%d %H:%M})"
    rows = quality.check_candles(raw, interval_delta(req.interval), what)
    rows = rows[(rows["open_time"] >= req.start) & (rows["open_time"] < req.end)].copy()
    rows["symbol"], rows["interval"], rows["source"] = req.symbol, req.interval, source
    return rows


def _per_key(rows: pd.DataFrame, key: str, allowed: Any, what: str, known_at: Any) -> pd.DataFrame:
    """Refuse keys the config does not know; add known_at computed per key (ticker or series)."""
    import pandas as pd

    unknown = set(rows[key]) - set(allowed)
    if unknown:
        raise quality.MalformedDataError(f"{what}: {key} values not in the config: {sorted(unknown)}")
    known = [known_at(value, part) for value, part in rows.groupby(key)]
    return rows.assign(known_at=pd.concat(known) if known else pd.Series(dtype="datetime64[ns, UTC]"))


def _prepare_safe_haven(raw: pd.DataFrame, req: FetchRequest, source: str, cfg: Config) -> pd.DataFrame:
    what = f"{source} safe-haven bars [{req.start:%Y-%m-%d}, {req.end:%Y-%m-%d})"
    first, last = trading_dates(req.start, req.end)
    rows = quality.check_safe_haven(raw, what)
    rows = rows[(rows["date"] >= first) & (rows["date"] < last)]
    rows = _per_key(
        rows,
        "ticker",
        cfg.safe_haven.tickers,
        what,
        lambda ticker, part: safe_haven_known_at(cfg, ticker, part["date"]),
    )
    return rows.assign(source=source)


def _prepare_macro(raw: pd.DataFrame, req: FetchRequest, source: str, cfg: Config) -> pd.DataFrame:
    what = f"{source} macro observations known in [{req.start:%Y-%m-%d}, {req.end:%Y-%m-%d})"
    rows = _per_key(
        quality.check_macro(raw, what),
        "series_id",
        cfg.macro.series,
        what,
        lambda series, part: macro_known_at(cfg, series, part["observation_date"], part["realtime_start"]),
    )
    rows = rows[(rows["known_at"] >= req.start) & (rows["known_at"] < req.end)]
    return rows.assign(source=source).drop(columns="realtime_start")


def feature_inputs(
    cfg: Config, modality: str, start: datetime, end: datetime, interval: str
) -> tuple[datetime, datetime]:
    """[lo, hi): the rows of `modality` that `materialize_features` may read for the interval [start, end), in
    the modality's own time (candle open time, trading date at UTC midnight, macro known_at):

    - candles: the `features.warmup_bars` before the start of the feature block holding `start`
      (`feature_blocks`), looked for `WARMUP_REACH` warm-ups back;
    - safe_haven: trading dates from `features.daily_context_days` before the first of those candles, earlier
      to the `CONTEXT_GRID` cell that holds that day;
    - macro: known from `features.macro_context_days` before it (from its `CONTEXT_GRID` cell too), to the
      close of the interval's last candle included (a value known at that instant is visible to it: hi = end
      + one interval).

    sofare_ingest loads these with its interval (`load_interval(context=True)`), so its features read
    nothing another run loaded."""
    delta = interval_delta(interval)
    block = _block_start(cfg, start, interval)
    if modality == "candles":
        return block - delta * cfg.features.warmup_bars * WARMUP_REACH, end
    if modality == "safe_haven":
        return _context_start(cfg, block, interval)[0], end
    if modality == "macro":
        return _context_start(cfg, block, interval)[1], end + delta
    raise InputError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")


def feature_blocks(cfg: Config, start: datetime, end: datetime, interval: str) -> list[tuple[datetime, datetime]]:
    """The feature blocks that meet [start, end): consecutive spans of `features.warmup_bars` candle intervals on a
    grid from the epoch. `materialize_features` computes every row of a block from the same candles (the
    `warmup_bars` before the block, then the block's own up to the row), so which interval asks for a row
    does not change it."""
    span = interval_delta(interval) * cfg.features.warmup_bars
    lo, blocks = _block_start(cfg, start, interval), []
    while lo < end:
        blocks.append((lo, lo + span))
        lo += span
    return blocks


def _block_start(cfg: Config, moment: datetime, interval: str) -> datetime:
    """The start of the feature block holding `moment`."""
    span = interval_delta(interval) * cfg.features.warmup_bars
    return _EPOCH + span * ((utc(moment) - _EPOCH) // span)


def _context_start(cfg: Config, block: datetime, interval: str) -> tuple[datetime, datetime]:
    """Where the daily bars (a UTC midnight: trading dates from its day) and the macro values (known from it) that
    the feature block starting at `block` reads begin: the context days before its earliest warm-up candle, earlier
    to the start of their `CONTEXT_GRID` cell."""
    earliest = block - interval_delta(interval) * cfg.features.warmup_bars * WARMUP_REACH

    def cell(days: int) -> datetime:
        return _EPOCH + CONTEXT_GRID * ((earliest - timedelta(days=days) - _EPOCH) // CONTEXT_GRID)

    return cell(cfg.features.daily_context_days), cell(cfg.features.macro_context_days)


def _inside(modality: str, rows: pd.DataFrame, start: datetime, end: datetime) -> Any:
    """Which rows belong to the interval [start, end) itself (each modality by its own time)."""
    if modality == "candles":
        return ((rows["open_time"] >= start) & (rows["open_time"] < end)).to_numpy(dtype=bool)
    if modality == "safe_haven":
        first, last = trading_dates(start, end)
        return ((rows["date"] >= first) & (rows["date"] < last)).to_numpy(dtype=bool)
    return ((rows["known_at"] >= start) & (rows["known_at"] < end)).to_numpy(dtype=bool)


def _times(modality: str, rows: pd.DataFrame) -> Any:
    """The instants rows are validated by (what `warehouse.invalidate` takes): open time, date, known_at."""
    import pandas as pd

    column = {"candles": "open_time", "safe_haven": "date", "macro": "known_at"}[modality]
    return pd.to_datetime(rows[column], utc=True)


def load_interval(
    cfg: Config,
    engine: Engine,
    source: str | Source,
    modality: str,
    start: datetime,
    end: datetime,
    symbol: str | None = None,
    interval: str | None = None,
    context: bool = False,
    history: bool = False,
) -> LoadResult:
    """Fetch one modality for [start, end), validate it, and upsert it in one transaction.

    With `context`, the fetch also covers `feature_inputs` (what the interval's features read): all of it is
    validated before anything is written; rows outside the interval are written only where the warehouse
    lacks them (their days' validation marks are dropped then), and are reported apart from the interval's
    own rows, gaps and note.

    With `history`, [start, end) is history a backfill's range needs before it (as-of context), not the range:
    all its rows are context, written only where the warehouse lacks them, so a backfill of a new week leaves the
    validated history before it as it was."""
    src = get_source(source, cfg) if isinstance(source, str) else source
    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    start, end = utc(start), utc(end)
    lo, hi = start, end
    if context:
        around = feature_inputs(cfg, modality, start, end, interval)
        lo, hi = min(start, around[0]), max(end, around[1])
    req = FetchRequest(
        modality,
        lo,
        hi,
        symbol=symbol,
        interval=interval,
        tickers=tuple(cfg.safe_haven.tickers),
        series=tuple(cfg.macro.series),
    )
    raw = src.fetch(req)  # raises on a source failure: nothing has been written
    table, _ = warehouse.RAW_TABLES[modality]
    if modality == "candles":
        rows = _prepare_candles(raw, req, src.name)
    elif modality == "safe_haven":
        rows = _prepare_safe_haven(raw, req, src.name, cfg)
    else:
        rows = _prepare_macro(raw, req, src.name, cfg)
    inside = _inside(modality, rows, start, end) & (not history)
    own, others = rows[inside], rows[~inside]
    suite = table.name  # the validation suite of this table
    scope = warehouse.scope_of(suite, symbol, interval)
    with warehouse.transaction(engine) as conn:
        written = warehouse.upsert(conn, table, own)
        if not history:
            warehouse.invalidate(conn, suite, scope, start, end)
        if context or history:
            new = warehouse.missing_rows(conn, table, others)
            warehouse.upsert(conn, table, new)
            if len(new):
                times = _times(modality, new)
                warehouse.invalidate(
                    conn,
                    suite,
                    scope,
                    times.min().to_pydatetime(),
                    times.max().to_pydatetime() + timedelta(microseconds=1),
                )
    gaps: list[quality.Gap] = []
    if modality == "candles" and not history:
        horizon = min(end, datetime.now(UTC).replace(second=0, microsecond=0))
        gaps = quality.candle_gaps(own["open_time"], interval_delta(interval), start, horizon)
    result = LoadResult(
        modality,
        src.name,
        start,
        end,
        written,
        gaps,
        Context(lo, hi, len(others), len(new)) if context or history else None,
        history,
    )
    for gap in gaps:
        log.warning("gap in %s %s %s: %s", symbol, interval, modality, gap)
    (log.warning if result.note else log.info)("loaded %s", result)
    return result


def features_lock(symbol: str, interval: str) -> str:
    """The lock `materialize_features` holds for a symbol and interval (`warehouse.locked_transaction`)."""
    return f"features {symbol} {interval}"


def revalidate_from(
    cfg: Config, engine: Engine, start: datetime, symbol: str | None = None, interval: str | None = None
) -> datetime:
    """Where the validation of a features run must start: `materialize_features` also refreshes the targets of the
    `horizon` rows before `start` (which clears their day's validation), so when such rows exist it is the start
    of their day, else `start`. The features asset event carries this, so `sofare_validate` revalidates that day."""
    import sqlalchemy as sa

    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    start = utc(start)
    table = warehouse.features_table(feature_spec(cfg).columns)
    with engine.connect() as conn:
        first = conn.execute(
            sa.select(sa.func.min(table.c.open_time)).where(
                table.c.symbol == symbol,
                table.c.interval == interval,
                table.c.open_time >= start - interval_delta(interval) * cfg.features.horizon,
                table.c.open_time < start,
            )
        ).scalar()
    if first is None:
        return start
    first = utc(first)
    return min(start, first.replace(hour=0, minute=0, second=0, microsecond=0))


def _block_rows(
    conn: Any, cfg: Config, candles: pd.DataFrame, start: datetime, end: datetime, interval: str
) -> tuple[Any, Any]:
    """Open times (int64 ns) and feature values of the candles in [start, end), computed block by block.

    `candles` holds every candle from `feature_inputs`' start to `end`. Each feature block's rows come from the
    `warmup_bars` candles before the block (looked for `WARMUP_REACH` warm-ups back) and the block's own up to
    `end`, in fresh arrays, with the daily and macro rows known from the block's `_context_start` to the
    interval's last close: all of it fixed by the block and the stored rows, and every computation runs forward
    in time, so a row does not depend on the interval that asks for it."""
    import numpy as np
    import pandas as pd

    from sofare.data.features import feature_matrix, prepare_context

    delta = interval_delta(interval)
    warm = cfg.features.warmup_bars
    times = pd.DatetimeIndex(candles["open_time"]).as_unit("ns").asi8
    ohlcv = [candles[k].to_numpy(dtype=float) for k in ("open", "high", "low", "close", "volume")]

    def ns(moment: datetime) -> int:
        return (moment - _EPOCH) // timedelta(microseconds=1) * 1000

    contexts: dict[tuple[datetime, datetime], Any] = {}
    opens, values = [], []
    for lo, hi in feature_blocks(cfg, start, end, interval):
        first, own, stop = np.searchsorted(times, [ns(lo - delta * warm * WARMUP_REACH), ns(lo), ns(min(hi, end))])
        if stop == own:
            continue
        first = max(first, own - warm)
        key = _context_start(cfg, lo, interval)
        if key not in contexts:
            bars = warehouse.read_safe_haven(conn, key[0].date(), end + delta)
            macro = warehouse.read_macro(conn, key[1], end + delta)
            contexts[key] = prepare_context(bars, macro, cfg)
        # fresh arrays: the same memory layout whichever interval slices them
        o, h, low, c, v, t = (x[first:stop].copy() for x in (*ohlcv, times))
        matrix = feature_matrix(o, h, low, c, v, t, cfg, interval, contexts[key])
        keep = max(own, int(np.searchsorted(times, ns(start)))) - first
        opens.append(t[keep:])
        values.append(matrix[keep:])
    if not opens:
        return np.empty(0, np.int64), np.empty((0, len(feature_spec(cfg).columns)))
    return np.concatenate(opens), np.concatenate(values)


def materialize_features(
    cfg: Config,
    engine: Engine,
    start: datetime,
    end: datetime,
    symbol: str | None = None,
    interval: str | None = None,
) -> int:
    """Compute the features of candles in [start, end) and upsert them in one transaction.

    Each row is computed by its feature block (`feature_blocks`), from exactly `warmup_bars` candles before
    the block's start (found within `feature_inputs`, as is every daily and macro row it reads), so a row is
    the same bit for bit whatever interval computed it: reruns in any task order and backfills in any chunks
    give the same content. The targets of the `horizon` candles before `start` are refreshed too: their future
    may be in this interval. A target is never set back to NULL (the upsert keeps a known one); reads and
    writes hold one lock per symbol and interval, so of two concurrent neighbours one reads the other's candles
    or refreshes the other's rows.
    """
    import pandas as pd

    from sofare.data.features import TARGET_COLUMNS, targets

    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    start, end = utc(start), utc(end)
    spec = feature_spec(cfg)
    delta = interval_delta(interval)
    lookahead = delta * cfg.features.horizon
    since = feature_inputs(cfg, "candles", start, end, interval)[0]
    table = warehouse.features_table(spec.columns)
    with warehouse.locked_transaction(engine, features_lock(symbol, interval)) as conn:
        candles = warehouse.read_candles(conn, symbol, interval, min(since, start - lookahead), end + lookahead)
        candles["open_time"] = pd.to_datetime(candles["open_time"], utc=True)
        body = candles[candles["open_time"] >= start - lookahead].reset_index(drop=True)
        if body.empty:
            return 0
        opens, values = _block_rows(conn, cfg, candles[candles["open_time"] < end], start, end, interval)
        if not len(opens):
            return 0
        feats = pd.DataFrame(values, columns=list(spec.columns))
        feats.insert(0, "open_time", pd.to_datetime(opens, utc=True))
        # targets look `horizon` candles past the interval's end: from every candle read
        future = pd.concat([body[["open_time"]], targets(body, delta, cfg.features.horizon)], axis=1)
        feats[list(TARGET_COLUMNS)] = future.set_index("open_time").loc[feats["open_time"]].to_numpy()
        feats.insert(0, "symbol", symbol)
        feats.insert(1, "interval", interval)
        feats.insert(3, "feature_set_version", spec.version)
        refreshed = future[future["open_time"] < start].reset_index(drop=True)
        written = warehouse.upsert(conn, table, feats)
        warehouse.update_targets(conn, table, symbol, interval, refreshed)
        warehouse.invalidate(
            conn,
            "features",
            warehouse.scope_of("features", symbol, interval),
            min(start, refreshed["open_time"].min()) if len(refreshed) else start,
            end,
        )
    log.info("features %s %s [%s, %s): %d rows (%s)", symbol, interval, start, end, written, spec.version)
    return written


def plan_chunks(start: datetime, end: datetime, chunk_days: int) -> list[tuple[datetime, datetime]]:
    """Split [start, end) into consecutive chunks of at most `chunk_days` days."""
    chunks = []
    cursor = start
    while cursor < end:
        stop = min(cursor + timedelta(days=chunk_days), end)
        chunks.append((cursor, stop))
        cursor = stop
    return chunks


def plan_backfill(
    cfg: Config,
    sources: list[str],
    start: datetime,
    end: datetime,
    symbol: str | None = None,
    interval: str | None = None,
) -> list[dict[str, Any]]:
    """The load tasks of a backfill: one per (source, modality, chunk). Daily and macro data also load the
    `ingest.context_days` before `start` as `history` chunks (as-of features need them from the first candle),
    which only fill what the warehouse lacks."""
    if not sources:
        raise InputError("choose at least one source")
    unknown = [s for s in sources if s not in SOURCE_MODALITIES]
    if unknown:
        raise InputError(f"unknown source(s) {unknown}; expected {', '.join(SOURCE_MODALITIES)} or all")
    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    interval_delta(interval)
    tasks = []
    seen: dict[str, str] = {}
    for source in sources:
        for modality in SOURCE_MODALITIES[source]:
            if modality in seen:
                raise InputError(f"both {seen[modality]!r} and {source!r} provide {modality}; choose one")
            seen[modality] = source
            before = start - timedelta(days=cfg.ingest.context_days)
            spans = [(before, start, True)] if modality != "candles" and before < start else []
            for lo, hi, history in [*spans, (start, end, False)]:
                # history is one load (a few hundred daily rows; it writes only what is missing): chunking it
                # would add a mapped task per month for nothing
                for a, b in [(lo, hi)] if history else plan_chunks(lo, hi, cfg.ingest.chunk_days):
                    tasks.append(
                        {
                            "source": source,
                            "modality": modality,
                            "start": a.isoformat(),
                            "end": b.isoformat(),
                            "symbol": symbol,
                            "interval": interval,
                            "history": history,
                        }
                    )
    return tasks


def expand_sources(source: str) -> list[str]:
    """CLI/DAG source choice -> source names ('all' means every live source)."""
    from sofare.data.sources import LIVE_SOURCES

    return list(LIVE_SOURCES) if source == "all" else [source]
