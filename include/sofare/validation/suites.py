"""Data validation with Great Expectations Core: suites in expectations/, runs recorded per day.

For one interval and one table, the rows are read from the warehouse (SQLite or PostgreSQL) into a
frame with a few derived columns the suites check (e.g. `present` on the full candle grid, `oc_max`,
`abs_log_return`), validated by a GX File Data Context (var/gx) whose expectations store is the
repository's expectations/ folder, with thresholds passed as suite parameters from the config.
Every run writes a `validation_runs` row and marks each UTC day of the interval passed or failed in
`validated_days`; failing rows are attributed to their day, table-level failures to every day.
Training reads only days that passed every suite (`require_validated`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from sofare.config import interval_delta
from sofare.data import warehouse
from sofare.data.features import TARGET_COLUMNS, feature_spec
from sofare.data.visibility import period_end
from sofare.errors import InputError, PermanentError
from sofare.validation import SUITES, data_docs
from sofare.validation.data_docs import safe_name

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Connection, Engine

    from sofare.config import Config

log = logging.getLogger(__name__)
INDEX_COLUMNS = {
    "candles": ["open_time"],
    "safe_haven_bars": ["ticker", "date"],
    "macro_observations": ["series_id", "observation_date", "known_at"],
    "features": ["open_time"],
}
DAY_COLUMN = {
    "candles": "open_time",
    "safe_haven_bars": "date",
    "macro_observations": "known_at",
    "features": "open_time",
}


class UnvalidatedIntervalError(PermanentError):
    """A requested training window holds days that are not validated, or failed validation."""


@dataclass
class Failure:
    expectation: str
    rule: str
    column: str
    rows: int
    days: list[str]

    def __str__(self) -> str:
        where = f" on {self.column}" if self.column else ""
        days = ", ".join(self.days[:5]) + (f" (+{len(self.days) - 5} more days)" if len(self.days) > 5 else "")
        return f"{self.expectation}{where} — {self.rule}: {self.rows} row(s) break it; days: {days}"


@dataclass
class SuiteResult:
    suite: str
    scope: str
    start: datetime
    end: datetime
    run_id: str
    success: bool
    rows: int
    statistics: dict[str, Any]
    failures: list[Failure] = field(default_factory=list)
    days_passed: list[str] = field(default_factory=list)
    days_failed: list[str] = field(default_factory=list)
    known_gaps: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["start"], out["end"] = self.start.isoformat(), self.end.isoformat()
        return out

    def summary(self) -> str:
        state = "passed" if self.success else "FAILED"
        head = (
            f"{self.suite} [{self.scope}] {self.start:%Y-%m-%d} .. {(self.end - timedelta(microseconds=1)):%Y-%m-%d}: "
            f"{state} ({self.statistics.get('successful_expectations')}/{self.statistics.get('evaluated_expectations')}"
            f" expectations, {self.rows} rows)"
        )
        gaps = [f"\n    known gap: {g['first']} .. {g['last']} ({g['reason']})" for g in self.known_gaps]
        return head + "".join(gaps) + "".join(f"\n    ✗ {f}" for f in self.failures)


def days_of(start: datetime, end: datetime) -> list[date]:
    """UTC calendar days that the half-open interval [start, end) touches."""
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


# --- frames with derived columns -------------------------------------------------------------


def _known_gaps(cfg: Config, symbol: str, interval: str, start: datetime, end: datetime) -> list[Any]:
    return [
        g
        for g in cfg.validation.known_gaps
        if g.symbol == symbol and g.interval == interval and g.last >= start and g.first < end
    ]


def candles_frame(
    conn: Connection, cfg: Config, symbol: str, interval: str, start: datetime, end: datetime
) -> pd.DataFrame:
    """Candles on the interval's full grid (known gaps removed): a missing bar is a row with present=0."""
    import numpy as np
    import pandas as pd

    delta = interval_delta(interval)
    rows = warehouse.read_candles(conn, symbol, interval, start, end)
    previous = warehouse.read_candles_before(conn, symbol, interval, start, 1)
    grid = pd.DataFrame({"open_time": pd.date_range(start, end - delta, freq=delta)})
    for gap in _known_gaps(cfg, symbol, interval, start, end):
        grid = grid[~grid["open_time"].between(pd.Timestamp(gap.first), pd.Timestamp(gap.last))]
    frame = grid.merge(rows.assign(present=1), on="open_time", how="outer").sort_values("open_time")
    frame["present"] = frame["present"].fillna(0).astype(int)
    frame["symbol"], frame["interval"] = symbol, interval
    frame["oc_max"] = frame[["open", "close"]].max(axis=1)
    frame["oc_min"] = frame[["open", "close"]].min(axis=1)
    parts = [p for p in (previous["close"], frame.loc[frame["present"] == 1, "close"]) if len(p)]
    closes = pd.concat(parts) if parts else pd.Series(dtype=float)
    frame["abs_log_return"] = np.nan
    returns = np.log(closes.astype(float)).diff().abs().iloc[len(previous) :]
    frame.loc[frame["present"] == 1, "abs_log_return"] = returns.to_numpy()
    day = frame["open_time"].dt.floor("D")
    newest = frame.loc[frame["present"] == 1].groupby(day[frame["present"] == 1])["open_time"].max()
    day_end = (day + pd.Timedelta(days=1)).clip(upper=pd.Timestamp(end))
    frame["freshness_lag_bars"] = ((day_end - delta - day.map(newest)) / delta).where(frame["present"] == 1)
    return frame.reset_index(drop=True)


def safe_haven_frame(conn: Connection, cfg: Config, start: datetime, end: datetime) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    from sofare.data.sources.base import trading_dates

    first, last = trading_dates(start, end)
    context = warehouse.read_safe_haven(conn, first - timedelta(days=14))
    context = context[context["date"] < last]
    frame = context[context["date"] >= first].copy()
    frame["oc_max"] = frame[["open", "close"]].max(axis=1)
    frame["oc_min"] = frame[["open", "close"]].min(axis=1)
    log_close = np.log(context["close"].astype(float))
    context_returns = log_close.groupby(context["ticker"]).diff().abs()
    limits = frame["ticker"].map(lambda t: cfg.validation.limit(cfg.validation.safe_haven_max_abs_log_return, t))
    frame["abs_log_return_excess"] = context_returns.loc[frame.index] - limits
    midnight = pd.to_datetime(frame["date"]).dt.tz_localize("UTC")
    frame["known_hours_after_date"] = (pd.to_datetime(frame["known_at"], utc=True) - midnight) / pd.Timedelta(hours=1)
    return frame.reset_index(drop=True)


def macro_frame(conn: Connection, cfg: Config, start: datetime, end: datetime) -> pd.DataFrame:
    """Observations known in [start, end), each with its distance to the previous observation."""
    import pandas as pd

    history = warehouse.read_macro(conn, start - timedelta(days=cfg.features.macro_context_days), end)
    frame = history[history["known_at"] >= start].copy()
    ends, excess = [], []
    for row in frame.itertuples():
        spec = cfg.macro.series.get(row.series_id)
        ends.append(period_end(spec.frequency if spec else "D", pd.Series([row.observation_date])).iloc[0])
        earlier = history[
            (history["series_id"] == row.series_id)
            & (history["observation_date"] < row.observation_date)
            & (history["known_at"] <= row.known_at)
        ]
        if earlier.empty or spec is None:
            excess.append(math.nan)
            continue
        previous = earlier.sort_values(["observation_date", "known_at"]).iloc[-1]["value"]
        change = (
            math.log(row.value / previous)
            if spec.kind == "index" and row.value > 0 and previous > 0
            else row.value - previous
        )
        excess.append(abs(change) - cfg.validation.limit(cfg.validation.macro_max_abs_change, row.series_id))
    frame["days_after_period_end"] = (
        [(known - period) / pd.Timedelta(days=1) for known, period in zip(frame["known_at"], ends)]
        if len(frame)
        else []
    )
    frame["abs_change_excess"] = excess
    return frame.reset_index(drop=True)


def features_frame(
    conn: Connection, cfg: Config, symbol: str, interval: str, start: datetime, end: datetime
) -> pd.DataFrame:
    """Feature rows with: NULL features after warm-up (per row), targets expected vs present."""
    import numpy as np
    import pandas as pd

    spec = feature_spec(cfg)
    table = warehouse.features_table(spec.columns)
    delta = interval_delta(interval)
    lookahead = delta * cfg.features.horizon
    frame = warehouse.read_features(conn, table, symbol, interval, start, end)
    before = warehouse.read_features(
        conn, table, symbol, interval, start - delta * cfg.features.warmup_bars, start
    ).tail(1)
    candles = warehouse.candles
    count_before = conn.execute(
        sa.select(sa.func.count())
        .select_from(candles)
        .where(candles.c.symbol == symbol, candles.c.interval == interval, candles.c.open_time < start)
    ).scalar_one()
    times = pd.Series(warehouse.read_column(conn, candles, "open_time", symbol=symbol, interval=interval))
    times = pd.to_datetime(times, utc=True) if len(times) else pd.Series(dtype="datetime64[ns, UTC]")
    inside = times[(times >= start) & (times < end)]
    position = pd.Series(np.arange(len(inside)) + count_before, index=inside.to_numpy())
    micro = list(spec.micro)
    others = [c for c in spec.columns if c not in spec.micro]
    past_warmup = frame["open_time"].map(position).fillna(-1).to_numpy() >= cfg.features.warmup_bars - 1
    null_micro = frame[micro].isna().to_numpy().sum(axis=1) * past_warmup
    both = pd.concat([before, frame], ignore_index=True)
    seen = both[others].notna().cummax().shift(1, fill_value=False).iloc[len(before) :].to_numpy(dtype=bool)
    null_others = (frame[others].isna().to_numpy() & seen).sum(axis=1)
    frame["null_features_after_warmup"] = null_micro + null_others
    future = set(times.tolist())
    frame["target_present"] = frame["target_return"].notna().astype(int)
    frame["target_expected"] = (frame["open_time"] + lookahead).isin(future).astype(int)
    frame["target_sign"] = (frame["target_return"] > 0).astype(float).where(frame["target_return"].notna())
    return frame


def build_frame(
    conn: Connection, cfg: Config, suite: str, symbol: str, interval: str, start: datetime, end: datetime
) -> pd.DataFrame:
    if suite == "candles":
        return candles_frame(conn, cfg, symbol, interval, start, end)
    if suite == "safe_haven_bars":
        return safe_haven_frame(conn, cfg, start, end)
    if suite == "macro_observations":
        return macro_frame(conn, cfg, start, end)
    if suite == "features":
        return features_frame(conn, cfg, symbol, interval, start, end)
    raise InputError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")


def suite_parameters(cfg: Config, suite: str, frame: pd.DataFrame, start: datetime, end: datetime) -> dict[str, Any]:
    """The suite parameters ($PARAMETER values) for one run, from the config."""
    spec = feature_spec(cfg)
    v = cfg.validation
    if suite == "candles":
        return {"max_abs_log_return": v.max_abs_log_return, "freshness_bars": v.freshness_bars}
    if suite == "safe_haven_bars":
        from sofare.data.sources.base import trading_dates

        first, last = trading_dates(start, end)
        return {
            "tickers": sorted(cfg.safe_haven.tickers),
            "max_rows": len(cfg.safe_haven.tickers) * max((last - first).days, 0),
        }
    if suite == "macro_observations":
        return {"series": sorted(cfg.macro.series)}
    return {"feature_columns": [*spec.columns, *TARGET_COLUMNS], "feature_set_versions": [spec.version]}


# --- Great Expectations ----------------------------------------------------------------------


def gx_root(cfg: Config) -> Path:
    return cfg.var_dir / "gx"


def data_docs_dir(cfg: Config) -> Path:
    return cfg.var_dir / "data_docs"


def data_docs_index(cfg: Config) -> Path:
    return data_docs_dir(cfg) / "index.html"


def _gx_config(cfg: Config) -> str:
    """great_expectations.yml for var/gx: suites from the repository, runtime artefacts under var/."""
    expectations = (cfg.root / "expectations").resolve()
    return f"""# Written by sofare.validation.suites; edits are overwritten. Suites live in {expectations}.
config_version: 4.0
analytics_enabled: false
progress_bars:
  globally: false
config_variables_file_path: uncommitted/config_variables.yml
plugins_directory: plugins/
stores:
  expectations_store:
    class_name: ExpectationsStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      suppress_store_backend_id: true
      base_directory: {expectations}/
  validation_results_store:
    class_name: ValidationResultsStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      base_directory: uncommitted/validations/
  checkpoint_store:
    class_name: CheckpointStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      suppress_store_backend_id: true
      base_directory: checkpoints/
  validation_definition_store:
    class_name: ValidationDefinitionStore
    store_backend:
      class_name: TupleFilesystemStoreBackend
      base_directory: validation_definitions/
expectations_store_name: expectations_store
validation_results_store_name: validation_results_store
checkpoint_store_name: checkpoint_store
data_docs_sites:
  local_site:
    class_name: SiteBuilder
    show_how_to_buttons: false
    store_backend:
      class_name: TupleFilesystemStoreBackend
      base_directory: {data_docs_dir(cfg)}/
    site_index_builder:
      class_name: DefaultSiteIndexBuilder
fluent_datasources: {{}}
"""


@contextlib.contextmanager
def gx_context(cfg: Config) -> Iterator[Any]:
    """The File Data Context in var/gx, held under a file lock (parallel tasks share its files)."""
    root = gx_root(cfg) / "gx"
    root.mkdir(parents=True, exist_ok=True)
    with open(gx_root(cfg) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            config = root / "great_expectations.yml"
            wanted = _gx_config(cfg)
            if not config.exists() or not config.read_text().startswith(wanted.split("fluent_datasources")[0]):
                config.write_text(wanted)
            logging.getLogger("great_expectations").setLevel(logging.WARNING)
            import great_expectations as gx

            yield gx.get_context(mode="file", project_root_dir=str(gx_root(cfg)))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _failures(suite: str, result: Any, days: list[date]) -> list[Failure]:
    import pandas as pd

    failures = []
    day_column = DAY_COLUMN[suite]
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        kwargs = config.kwargs
        column = (
            kwargs.get("column")
            or ", ".join(str(kwargs[k]) for k in ("column_A", "column_B") if k in kwargs)
            or ", ".join(kwargs.get("column_list", []))
        )
        info = item.result or {}
        rows = info.get("unexpected_count")
        failing_days: set[str] = set()
        for entry in info.get("unexpected_index_list") or []:
            value = entry.get(day_column) if isinstance(entry, dict) else None
            if value is not None:
                failing_days.add(str(pd.Timestamp(value).date()))
        if not failing_days:  # a table-level expectation: the whole interval fails
            failing_days = {str(d) for d in days}
        if rows is None:
            rows = info.get("observed_value") if isinstance(info.get("observed_value"), int) else 0
        if item.exception_info and item.exception_info.get("raised_exception"):
            message = item.exception_info.get("exception_message", "")
            rule = f"{(config.meta or {}).get('rule', '')} (could not be evaluated: {message[:160]})"
        else:
            rule = (config.meta or {}).get("rule", "")
        failures.append(Failure(config.type, rule, column, int(rows or 0), sorted(failing_days)))
    return failures


def run_name(scope: str, start: datetime, run_id: str) -> str:
    """The GX run name, which names its Data Docs folder: `BTCUSDT-1h_2023-03-20_2e825ed3`, `all_2023-03-20_…`."""
    return safe_name(f"{scope}_{start:%Y-%m-%d}_{run_id[:8]}")


def check_frame(
    cfg: Config,
    suite: str,
    frame: pd.DataFrame,
    start: datetime,
    end: datetime,
    scope: str,
    run_id: str,
) -> tuple[bool, dict[str, Any], list[Failure]]:
    """Run one suite on a prepared frame in the GX context; success, statistics, failures by day."""
    import great_expectations as gx  # imported before the lock: the first import takes seconds

    with gx_context(cfg) as ctx:
        source = ctx.data_sources.add_or_update_pandas("sofare_warehouse")
        asset = next((a for a in source.assets if a.name == suite), None) or source.add_dataframe_asset(suite)
        batch = next(
            (b for b in asset.batch_definitions if b.name == "interval"), None
        ) or asset.add_batch_definition_whole_dataframe("interval")
        definition = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=safe_name(f"{suite}-{scope}"), data=batch, suite=ctx.suites.get(suite))
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=suite_parameters(cfg, suite, frame, start, end),
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS[suite]},
            run_id=gx.core.run_identifier.RunIdentifier(run_name=run_name(scope, start, run_id)),
        )
    return bool(result.success), dict(result.statistics), _failures(suite, result, days_of(start, end))


def run_suite(
    cfg: Config,
    engine: Engine,
    suite: str,
    start: datetime,
    end: datetime,
    symbol: str | None = None,
    interval: str | None = None,
) -> SuiteResult:
    """Validate one table over [start, end); record the run and mark each day passed or failed."""
    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    with engine.connect() as conn:
        frame = build_frame(conn, cfg, suite, symbol, interval, start, end)
    days = days_of(start, end)
    scope = warehouse.scope_of(suite, symbol, interval)
    run_id = uuid.uuid4().hex
    success, statistics, failures = check_frame(cfg, suite, frame, start, end, scope, run_id)
    failed_days = sorted({d for f in failures for d in f.days})
    gaps = (
        [
            {"first": g.first.isoformat(), "last": g.last.isoformat(), "reason": g.reason}
            for g in _known_gaps(cfg, symbol, interval, start, end)
        ]
        if suite == "candles"
        else []
    )
    outcome = SuiteResult(
        suite,
        scope,
        start,
        end,
        run_id,
        success,
        len(frame),
        statistics,
        failures,
        [str(d) for d in days if str(d) not in failed_days],
        failed_days,
        gaps,
    )
    _record(engine, cfg, outcome, days)
    log.log(logging.INFO if outcome.success else logging.ERROR, "%s", outcome.summary())
    return outcome


def _record(engine: Engine, cfg: Config, outcome: SuiteResult, days: list[date]) -> None:
    import pandas as pd

    run = pd.DataFrame(
        [
            {
                "run_id": outcome.run_id,
                "suite": outcome.suite,
                "scope": outcome.scope,
                "interval_start": pd.Timestamp(outcome.start),
                "interval_end": pd.Timestamp(outcome.end),
                "run_at": pd.Timestamp.now(tz="UTC"),
                "success": outcome.success,
                "rows": outcome.rows,
                "statistics": json.dumps(outcome.statistics, default=str),
                "failed_expectations": json.dumps([asdict(f) for f in outcome.failures]),
                "known_gaps": json.dumps(outcome.known_gaps),
                "data_docs": str(data_docs_index(cfg)),
            }
        ]
    )
    marks = pd.DataFrame(
        {
            "suite": outcome.suite,
            "scope": outcome.scope,
            "day": days,
            "status": ["failed" if str(d) in outcome.days_failed else "passed" for d in days],
            "run_id": outcome.run_id,
        }
    )
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.validation_runs, run)
        warehouse.upsert(conn, warehouse.validated_days, marks)


def build_data_docs(cfg: Config) -> Path:
    """Render Data Docs (suites and every stored validation result) into var/data_docs, working offline: the pages
    load their stylesheets, scripts and fonts from the site's static/vendor/ (see sofare.validation.data_docs), and
    every file and folder is named from [A-Za-z0-9._-] (results of older runs named with `*` or spaces are renamed)."""
    with gx_context(cfg) as ctx:
        data_docs.rename_unsafe(gx_root(cfg) / "gx" / "uncommitted" / "validations")
        data_docs.remove_unsafe(data_docs_dir(cfg))
        ctx.build_data_docs()
        data_docs.make_offline(data_docs_dir(cfg))
    return data_docs_index(cfg)


def require_validated(
    conn: Connection,
    cfg: Config,
    start: datetime,
    end: datetime,
    symbol: str | None = None,
    interval: str | None = None,
) -> None:
    """Raise UnvalidatedIntervalError naming every day of [start, end) that is not validated by every suite."""
    symbol = (symbol or cfg.market.symbol).upper()
    interval = interval or cfg.market.interval
    v = warehouse.validated_days
    days = days_of(start, end)
    problems: list[str] = []
    for suite in SUITES:
        scope = warehouse.scope_of(suite, symbol, interval)
        rows = conn.execute(
            sa.select(v.c.day, v.c.status, v.c.run_id).where(
                v.c.suite == suite, v.c.scope == scope, v.c.day >= days[0], v.c.day <= days[-1]
            )
        ).all()
        status = {row.day: (row.status, row.run_id) for row in rows}
        missing = [d for d in days if d not in status]
        failed = [(d, status[d][1]) for d in days if d in status and status[d][0] != "passed"]
        if missing:
            problems.append(f"{suite} [{scope}] not validated: {_ranges(missing)}")
        if failed:
            problems.append(
                f"{suite} [{scope}] failed validation: "
                + ", ".join(f"{d} (run {run[:8]})" for d, run in failed[:10])
                + (f" (+{len(failed) - 10} more)" if len(failed) > 10 else "")
            )
    if problems:
        raise UnvalidatedIntervalError(
            f"training window {days[0]} .. {days[-1]} holds intervals that cannot be used: "
            + "; ".join(problems)
            + ". Run `sofare validate` for them (and fix the data where it failed)."
        )


def _ranges(days: list[date]) -> str:
    """2024-01-01 .. 2024-01-05, 2024-02-01 — consecutive days folded into ranges."""
    spans: list[list[date]] = []
    for day in days:
        if spans and (day - spans[-1][1]).days == 1:
            spans[-1][1] = day
        else:
            spans.append([day, day])
    return ", ".join(str(a) if a == b else f"{a} .. {b}" for a, b in spans)
