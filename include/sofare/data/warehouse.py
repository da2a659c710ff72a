"""The warehouse: dialect-neutral SQLAlchemy Core tables, engines, idempotent upserts and reads.

SQLite (var/warehouse.db) by default; PostgreSQL through the Airflow connection `sofare_warehouse`
or an explicit URL. Every write is an upsert keyed by the table's natural primary key.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.types import TypeDecorator

from sofare.config import ConfigError
from sofare.errors import InputError, PermanentError

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.dialects.postgresql import Insert as PostgresInsert
    from sqlalchemy.dialects.sqlite import Insert as SqliteInsert

    from sofare.config import Config

log = logging.getLogger(__name__)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the database stores."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        # SQLite has no time zone type: store naive UTC so text order is time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = sa.MetaData()

candles = sa.Table(
    "candles",
    metadata,
    sa.Column("symbol", sa.String(20), primary_key=True),
    sa.Column("interval", sa.String(8), primary_key=True),
    sa.Column("open_time", UTCDateTime, primary_key=True),
    sa.Column("open", sa.Double, nullable=False),
    sa.Column("high", sa.Double, nullable=False),
    sa.Column("low", sa.Double, nullable=False),
    sa.Column("close", sa.Double, nullable=False),
    sa.Column("volume", sa.Double, nullable=False),
    sa.Column("quote_volume", sa.Double),
    sa.Column("trade_count", sa.BigInteger),
    sa.Column("source", sa.String(16), nullable=False),
)

safe_haven_bars = sa.Table(
    "safe_haven_bars",
    metadata,
    sa.Column("ticker", sa.String(16), primary_key=True),
    sa.Column("date", sa.Date, primary_key=True),
    sa.Column("open", sa.Double, nullable=False),
    sa.Column("high", sa.Double, nullable=False),
    sa.Column("low", sa.Double, nullable=False),
    sa.Column("close", sa.Double, nullable=False),
    sa.Column("volume", sa.Double),
    sa.Column("known_at", UTCDateTime, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
)

macro_observations = sa.Table(
    "macro_observations",
    metadata,
    sa.Column("series_id", sa.String(32), primary_key=True),
    sa.Column("observation_date", sa.Date, primary_key=True),
    sa.Column("known_at", UTCDateTime, primary_key=True),
    sa.Column("value", sa.Double, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
)

validation_runs = sa.Table(
    "validation_runs",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("suite", sa.String(40), nullable=False),
    sa.Column("scope", sa.String(40), nullable=False),  # "BTCUSDT 1h" for candles/features, "*" otherwise
    sa.Column("interval_start", UTCDateTime, nullable=False),
    sa.Column("interval_end", UTCDateTime, nullable=False),
    sa.Column("run_at", UTCDateTime, nullable=False),
    sa.Column("success", sa.Boolean, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("statistics", sa.Text, nullable=False),  # JSON: evaluated/successful/unsuccessful/percent
    sa.Column("failed_expectations", sa.Text, nullable=False),  # JSON list: expectation, column, rows, days
    sa.Column("known_gaps", sa.Text, nullable=False),  # JSON list of the configured gaps inside the interval
    sa.Column("data_docs", sa.Text),
    sa.Index("ix_validation_runs_suite_interval", "suite", "scope", "interval_start"),
)

validated_days = sa.Table(
    "validated_days",
    metadata,
    sa.Column("suite", sa.String(40), primary_key=True),
    sa.Column("scope", sa.String(40), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("status", sa.String(8), nullable=False),  # passed | failed
    sa.Column("run_id", sa.String(40), nullable=False),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("alert_id", sa.String(40), primary_key=True),
    sa.Column("raised_at", UTCDateTime, nullable=False),
    sa.Column("source", sa.String(120), nullable=False),
    sa.Column("severity", sa.String(12), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False),  # JSON
    sa.Column("delivered", sa.Boolean, nullable=False),  # reached the webhook (False when none is set)
)

# Raw tables by modality, each with its time column (the one data intervals select on).
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("audit_id", sa.String(40), primary_key=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("actor", sa.String(80), nullable=False),
    sa.Column("action", sa.String(40), nullable=False),  # promotion_gate, build, containerize, …
    sa.Column("model_version", sa.String(20), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("details", sa.Text, nullable=False),  # JSON
)

deployment_events = sa.Table(  # every step of a deployment: what served, at which weight, and why it changed
    "deployment_events",
    metadata,
    sa.Column("event_id", sa.String(40), primary_key=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("deployment_id", sa.String(40), nullable=False),  # one canary rollout or one rollback
    sa.Column("action", sa.String(20), nullable=False),  # serve, canary, step, promote, abort, rollback, verify
    sa.Column("stable_version", sa.String(20)),
    sa.Column("canary_version", sa.String(20)),
    sa.Column("canary_weight", sa.Double, nullable=False),
    sa.Column("measurements", sa.Text, nullable=False),  # JSON list (canary analysis), else []
    sa.Column("decision", sa.String(20), nullable=False),  # done, continue, retry, abort, promote, noop, failed
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(80), nullable=False),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("prediction_id", sa.String(40), primary_key=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("endpoint", sa.String(20), nullable=False),
    sa.Column("model_version", sa.String(20), nullable=False),
    sa.Column("variant", sa.String(12), nullable=False),
    sa.Column("symbol", sa.String(20), nullable=False),
    sa.Column("interval", sa.String(8), nullable=False),
    sa.Column("as_of", UTCDateTime, nullable=False),  # close of the last candle of the window
    sa.Column("horizon", sa.Integer, nullable=False),
    sa.Column("prob_up", sa.Double, nullable=False),
    sa.Column("expected_return", sa.Double, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),
)

prediction_inputs = sa.Table(  # the features the model was served at `as_of` (the window's last row): drift's input
    "prediction_inputs",
    metadata,
    sa.Column("prediction_id", sa.String(40), primary_key=True),
    sa.Column("as_of", UTCDateTime, nullable=False, index=True),
    sa.Column("model_version", sa.String(20), nullable=False),
    sa.Column("variant", sa.String(12), nullable=False),
    sa.Column("feature_set_version", sa.String(40), nullable=False),
    sa.Column("features", sa.Text, nullable=False),  # JSON list, in the order of the version's columns
)

prediction_outcomes = sa.Table(  # what happened after a prediction: filled once the candle at as_of + horizon exists
    "prediction_outcomes",
    metadata,
    sa.Column("prediction_id", sa.String(40), primary_key=True),
    sa.Column("as_of", UTCDateTime, nullable=False, index=True),
    sa.Column("target_time", UTCDateTime, nullable=False),  # close of the candle the outcome is read from
    sa.Column("base_close", sa.Double, nullable=False),  # close at as_of
    sa.Column("target_close", sa.Double, nullable=False),  # close at as_of + horizon bars
    sa.Column("realised_return", sa.Double, nullable=False),  # log(target_close / base_close)
    sa.Column("realised_up", sa.SmallInteger, nullable=False),
    sa.Column("correct", sa.Boolean, nullable=False),  # predicted direction (prob_up > 0.5) == realised
    sa.Column("last_return", sa.Double),  # the bar ending at as_of: what persistence predicts from (NULL: unknown)
    sa.Column("filled_at", UTCDateTime, nullable=False),
)

monitoring_runs = sa.Table(  # one sofare_monitor run: what it measured, the severity, the action and why
    "monitoring_runs",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("at", UTCDateTime, nullable=False, index=True),  # the hour monitored (logical time: windows end here)
    sa.Column("ran_at", UTCDateTime, nullable=False),  # wall clock
    sa.Column("actor", sa.String(80), nullable=False),
    sa.Column("outcomes_filled", sa.Integer, nullable=False),
    sa.Column("outcomes_pending", sa.Integer, nullable=False),
    sa.Column("quality", sa.Text, nullable=False),  # JSON list of contracts.LiveQuality
    sa.Column("drift", sa.Text, nullable=False),  # JSON contracts.DriftResult
    sa.Column("drift_share", sa.Double),  # share of drifted input features; NULL: not measured
    sa.Column("service", sa.Text, nullable=False),  # JSON list of contracts.ServiceHealth (per variant)
    sa.Column("severity", sa.String(10), nullable=False),  # none | low | medium | high | critical
    sa.Column("action", sa.String(12), nullable=False),  # none | alert | retrain | rollback (after the cool-down)
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),  # JSON contracts.Decision: every rule that fired, cool-downs
)

RAW_TABLES: dict[str, tuple[sa.Table, str]] = {
    "candles": (candles, "open_time"),
    "safe_haven": (safe_haven_bars, "date"),
    "macro": (macro_observations, "known_at"),
}

FEATURE_KEY_COLUMNS = ("symbol", "interval", "open_time")
# Column.info flag: an upsert never replaces this column's known value with NULL (COALESCE(new, old)).
KEEP_KNOWN = "keep_known"


@functools.cache
def features_table(feature_columns: tuple[str, ...]) -> sa.Table:
    """The wide features table for a feature set (its columns come from the feature function)."""
    return sa.Table(
        "features",
        sa.MetaData(),  # one per feature set: two sets never share a Table object
        sa.Column("symbol", sa.String(20), primary_key=True),
        sa.Column("interval", sa.String(8), primary_key=True),
        sa.Column("open_time", UTCDateTime, primary_key=True),
        sa.Column("feature_set_version", sa.String(40), nullable=False),
        *(sa.Column(name, sa.Double) for name in feature_columns),
        # targets are a function of the candles: NULL means "not known yet", never "unknown again"
        sa.Column("target_return", sa.Double, info={KEEP_KNOWN: True}),
        sa.Column("target_up", sa.SmallInteger, info={KEEP_KNOWN: True}),
    )


class SchemaMismatchError(PermanentError):
    """The database's features table was built for another feature set."""


# --- engines -----------------------------------------------------------------------------------


def _airflow_connection_url(conn_id: str) -> str | None:
    """The SQLAlchemy URL of an Airflow connection, or None when Airflow does not define it."""
    try:
        from airflow.sdk import BaseHook  # inside a task, or AIRFLOW_CONN_* in the environment

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - Airflow raises several types for "not found here"
        try:
            from airflow.models import Connection  # the CLI: Airflow's metadata database

            conn = Connection.get_connection_from_secrets(conn_id)
        except Exception:  # noqa: BLE001
            return None
    if conn.conn_type == "sqlite":
        path = conn.host or conn.schema  # sqlite://%2Fpath puts it in host, sqlite:////path in schema
        if not path:
            raise ConfigError(f"Airflow connection {conn_id!r} is SQLite but names no database file")
        return f"sqlite:///{path}"
    if conn.conn_type in ("postgres", "postgresql"):
        extra = conn.extra_dejson if conn.extra else {}
        query = {k: str(v) for k, v in extra.items() if k in ("sslmode", "options", "application_name")}
        return URL.create(
            "postgresql+psycopg2",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port,
            database=conn.schema or None,
            query=query,
        ).render_as_string(hide_password=False)
    raise ConfigError(f"Airflow connection {conn_id!r} has type {conn.conn_type!r}; expected postgres or sqlite")


def normalize_url(url: str) -> str:
    """Accept postgres://, postgresql:// and sqlite:// URLs; use psycopg2 for PostgreSQL."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"unsupported warehouse database {parsed.get_backend_name()!r}: use SQLite or PostgreSQL")
    return parsed.render_as_string(hide_password=False)


def warehouse_url(cfg: Config) -> str:
    """Explicit config/env URL, else the Airflow connection, else SQLite under var/."""
    if cfg.warehouse.url:
        return normalize_url(cfg.warehouse.url)
    from_airflow = _airflow_connection_url(cfg.warehouse.conn_id)
    return normalize_url(from_airflow or cfg.default_warehouse_url)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


@functools.cache
def engine_for(url: str) -> Engine:
    """One pooled engine per URL and process."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def get_engine(cfg: Config) -> Engine:
    return engine_for(warehouse_url(cfg))


def describe(engine: Engine) -> str:
    """The engine's URL without its password, for logs and reports."""
    return engine.url.render_as_string(hide_password=True)


def init_schema(engine: Engine, feature_columns: Sequence[str], rebuild_features: bool = False) -> None:
    """Create every table that is missing; refuse a features table built for other features."""
    metadata.create_all(engine)
    table = features_table(tuple(feature_columns))
    inspector = sa.inspect(engine)
    if inspector.has_table("features"):
        existing = {c["name"] for c in inspector.get_columns("features")}
        wanted = {c.name for c in table.columns}
        if existing != wanted:
            if not rebuild_features:
                missing, extra = sorted(wanted - existing), sorted(existing - wanted)
                raise SchemaMismatchError(
                    "the features table was built for another feature set "
                    f"(missing columns {missing}, unexpected {extra}); "
                    "run `sofare init --rebuild-features` to drop and rebuild it"
                )
            log.warning("dropping features table to rebuild it for the current feature set")
            table.drop(engine)
    table.create(engine, checkfirst=True)


_ready: set[tuple[str, tuple[str, ...]]] = set()


def ensure_schema(engine: Engine, feature_columns: Sequence[str]) -> None:
    """init_schema once per process and database; tolerate a concurrent task creating it first."""
    key = (describe(engine), tuple(feature_columns))
    if key in _ready:
        return
    try:
        init_schema(engine, feature_columns)
    except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
        init_schema(engine, feature_columns)  # another worker won the race; now it all exists
    _ready.add(key)


# --- writes --------------------------------------------------------------------------------------


def _column_values(frame: pd.DataFrame, column: sa.Column[Any]) -> list[Any]:
    """Driver-ready values of one column for SQLite: NaN -> None, timestamps as SQLAlchemy stores them."""
    import numpy as np
    import pandas as pd

    series = frame[column.name]
    missing = series.isna().to_numpy()
    if isinstance(column.type, UTCDateTime):
        times = pd.to_datetime(series, utc=True).dt.tz_localize(None)
        values = times.dt.strftime("%Y-%m-%d %H:%M:%S.%f").to_numpy(dtype=object)  # SQLAlchemy's SQLite format
    elif isinstance(column.type, sa.Date):
        values = pd.to_datetime(series).dt.strftime("%Y-%m-%d").to_numpy(dtype=object)
    elif isinstance(column.type, (sa.Integer, sa.SmallInteger, sa.BigInteger)):
        values = np.array([None if m else int(v) for v, m in zip(series.to_numpy(dtype=object), missing)], dtype=object)
    elif isinstance(column.type, sa.Double):
        numbers = series.to_numpy(dtype=float, na_value=np.nan)
        missing = missing | ~np.isfinite(numbers)
        values = numbers.astype(object)
    else:
        values = series.to_numpy(dtype=object)
    values[missing] = None
    return values.tolist()


def _upsert_statement(conn: Connection, table: sa.Table, columns: list[str], source: Any = None) -> Any:
    """INSERT … ON CONFLICT (primary key) DO UPDATE, from VALUES or from a SELECT (every write path: executemany
    on SQLite, the COPY staging table and executemany on PostgreSQL). A column flagged `KEEP_KNOWN` in its
    Column.info keeps its stored value where the new one is NULL."""
    stmt: SqliteInsert | PostgresInsert
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects import sqlite

        stmt = sqlite.insert(table)
    elif conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        stmt = postgresql.insert(table)
    else:  # pragma: no cover - normalize_url refuses other databases
        raise ValueError(f"unsupported dialect {conn.dialect.name}")
    stmt = (
        stmt.from_select(columns, source) if source is not None else stmt.values({c: sa.bindparam(c) for c in columns})
    )
    keys = [c.name for c in table.primary_key.columns]
    updates = {
        c: sa.func.coalesce(stmt.excluded[c], table.c[c]) if table.c[c].info.get(KEEP_KNOWN) else stmt.excluded[c]
        for c in columns
        if c not in keys
    }
    return stmt.on_conflict_do_update(index_elements=keys, set_=updates) if updates else stmt.on_conflict_do_nothing()


def _upsert_sqlite(conn: Connection, table: sa.Table, frame: pd.DataFrame, columns: list[str], batch_size: int) -> None:
    compiled = _upsert_statement(conn, table, columns).compile(dialect=conn.dialect)
    order = compiled.positiontup or []
    values = {name: _column_values(frame, table.c[name]) for name in columns}
    rows = list(zip(*(values[name] for name in order)))
    for start in range(0, len(rows), batch_size):
        conn.exec_driver_sql(str(compiled), rows[start : start + batch_size])


_PG_EPOCH_US = 946_684_800 * 10**6  # 2000-01-01 in Unix microseconds: PostgreSQL's binary epoch
_PG_EPOCH_DAYS = 10_957
_INTEGER_TYPES = (sa.Integer, sa.SmallInteger, sa.BigInteger)


def _binary_copy(frame: pd.DataFrame, table: sa.Table, columns: list[str]) -> tuple[bytes, list[str]]:
    """Rows in PostgreSQL's binary COPY format, built column-wise with numpy (fixed-width fields).

    Numbers travel as float8 with NaN for missing (NULLIF turns them into NULL on insert), strings
    space-padded to the column's longest value (trimmed on insert). Returns payload and staging DDL.
    """
    import numpy as np
    import pandas as pd

    fields: list[tuple[str, str]] = [("n", ">i2")]
    values: dict[str, np.ndarray] = {}
    lengths: dict[str, int] = {}
    ddl = []
    for name in columns:
        kind = table.c[name].type
        series = frame[name]
        if isinstance(kind, UTCDateTime):
            times = pd.to_datetime(series, utc=True)
            if times.isna().any():
                raise InputError(f"cannot write {table.name}: {name} has missing timestamps")
            micros = times.dt.tz_localize(None).to_numpy(dtype="datetime64[us]").astype("int64")
            values[name], lengths[name], dtype, sql = micros - _PG_EPOCH_US, 8, ">i8", "timestamptz"
        elif isinstance(kind, sa.Date):
            days = pd.to_datetime(series).to_numpy(dtype="datetime64[D]").astype("int64")
            values[name], lengths[name], dtype, sql = days - _PG_EPOCH_DAYS, 4, ">i4", "date"
        elif isinstance(kind, (sa.Double, *_INTEGER_TYPES)):
            numbers = pd.to_numeric(series).to_numpy(dtype=float, na_value=np.nan)
            numbers[~np.isfinite(numbers)] = np.nan
            values[name], lengths[name], dtype, sql = numbers, 8, ">f8", "float8"
        else:
            if series.isna().any() or series.astype(str).str.contains(r"\s$|\x00", regex=True).any():
                raise InputError(f"cannot bulk-copy {table.name}: {name} has missing values or trailing whitespace")
            encoded = series.astype(str).str.encode("utf-8")
            width = max(1, int(encoded.str.len().max()))
            padded = encoded.map(lambda raw, width=width: raw.ljust(width)).to_numpy(dtype=f"S{width}")
            values[name], lengths[name], dtype, sql = padded, width, f"S{width}", "text"
        fields += [(f"{name}__len", ">i4"), (name, dtype)]
        ddl.append(f'"{name}" {sql}')
    rows = np.empty(len(frame), dtype=fields)
    rows["n"] = len(columns)
    for name in columns:
        rows[f"{name}__len"] = lengths[name]
        rows[name] = values[name]
    payload = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + rows.tobytes() + b"\xff\xff"
    return payload, ddl


def _upsert_postgres(conn: Connection, table: sa.Table, frame: pd.DataFrame, columns: list[str]) -> None:
    """Binary COPY into a temporary table, then one INSERT … SELECT … ON CONFLICT (same transaction)."""
    import io
    import uuid

    payload, ddl = _binary_copy(frame, table, columns)
    stage = f"stage_{table.name}_{uuid.uuid4().hex[:8]}"
    quoted = ", ".join(f'"{c}"' for c in columns)
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None  # None only once the pooled connection is closed; `conn` is open here
    cursor = dbapi.cursor()
    try:
        cursor.execute(f'CREATE TEMP TABLE "{stage}" ({", ".join(ddl)}) ON COMMIT DROP')
        cursor.copy_expert(f'COPY "{stage}" ({quoted}) FROM STDIN WITH (FORMAT binary)', io.BytesIO(payload))
    finally:
        cursor.close()
    nan: sa.ColumnClause[Any] = sa.literal_column("'NaN'::float8")
    selected = []
    for name in columns:
        kind = table.c[name].type
        column: sa.ColumnElement[Any] = sa.column(name)
        if isinstance(kind, sa.Double):
            column = sa.func.nullif(column, nan)
        elif isinstance(kind, _INTEGER_TYPES):
            column = sa.cast(sa.func.nullif(column, nan), kind)
        elif not isinstance(kind, (UTCDateTime, sa.Date)):
            column = sa.func.rtrim(column)
        selected.append(column.label(name))
    source = sa.select(*selected).select_from(sa.table(stage))
    conn.execute(_upsert_statement(conn, table, columns, source))
    conn.exec_driver_sql(f'DROP TABLE "{stage}"')


def upsert(conn: Connection, table: sa.Table, frame: pd.DataFrame, batch_size: int = 50_000) -> int:
    """Insert or update `frame` by the table's primary key inside the caller's transaction.

    Statements are SQLAlchemy Core; rows go through the driver in bulk (executemany on SQLite,
    COPY into a staging table on PostgreSQL) because per-row parameter processing dominated.
    """
    if frame.empty:
        return 0
    keys = [c.name for c in table.primary_key.columns]
    missing = [c.name for c in table.columns if not c.nullable and c.name not in frame.columns]
    if missing:
        raise InputError(f"cannot write {table.name}: missing columns {missing}")
    duplicated = frame.duplicated(subset=keys, keep=False)
    if duplicated.any():
        example = frame.loc[duplicated, keys].iloc[0].to_dict()
        raise InputError(f"cannot write {table.name}: duplicate key {example}")
    columns = [c.name for c in table.columns if c.name in frame.columns]
    if conn.dialect.name == "sqlite":
        _upsert_sqlite(conn, table, frame, columns, batch_size)
    elif len(frame) >= _COPY_MIN_ROWS and _copyable(table, columns):
        _upsert_postgres(conn, table, frame, columns)
    else:
        conn.execute(_upsert_statement(conn, table, columns), _python_rows(frame, table, columns))
    return len(frame)


_COPY_MIN_ROWS = 100  # below this, a staging table costs more than executemany saves


def _copyable(table: sa.Table, columns: list[str]) -> bool:
    """Binary COPY carries numbers, timestamps, dates and short key strings (no free text, no booleans)."""
    return not any(isinstance(table.c[c].type, (sa.Text, sa.Boolean)) for c in columns)


def _python_rows(frame: pd.DataFrame, table: sa.Table, columns: list[str]) -> list[dict[str, Any]]:
    """Plain Python values for SQLAlchemy's own parameter handling (small frames)."""
    import math

    import pandas as pd

    rows = []
    for record in frame[columns].to_dict("records"):
        row: dict[str, Any] = {}
        for name, value in record.items():
            if value is None or (isinstance(value, float) and not math.isfinite(value)) or value is pd.NaT:
                row[name] = None
            elif isinstance(value, pd.Timestamp):
                row[name] = value.to_pydatetime()
            elif isinstance(table.c[name].type, sa.Boolean):
                row[name] = bool(value)
            elif hasattr(value, "item"):  # numpy scalars
                row[name] = value.item()
            else:
                row[name] = value
        rows.append(row)
    return rows


def _key_values(frame: pd.DataFrame, table: sa.Table) -> list[tuple[Any, ...]]:
    """The primary key of each row, normalised so that a frame's keys and the database's compare equal."""
    import pandas as pd

    parts = []
    for column in table.primary_key.columns:
        values = frame[column.name]
        if isinstance(column.type, UTCDateTime):
            parts.append(pd.to_datetime(values, utc=True).dt.strftime("%Y-%m-%d %H:%M:%S.%f").tolist())
        elif isinstance(column.type, sa.Date):
            parts.append(pd.to_datetime(values).dt.strftime("%Y-%m-%d").tolist())
        else:
            parts.append(values.astype(str).tolist())
    return list(zip(*parts))


def missing_rows(conn: Connection, table: sa.Table, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` whose primary key `table` does not hold yet (read in the caller's transaction)."""
    if frame.empty:
        return frame
    query = sa.select(*table.primary_key.columns)
    for column in table.primary_key.columns:
        values = frame[column.name]
        if isinstance(column.type, (UTCDateTime, sa.Date)):
            query = query.where(column.between(values.min(), values.max()))
        else:
            query = query.where(column.in_(sorted(set(values.astype(str)))))
    stored = set(_key_values(query_frame(conn, query), table))
    return frame[[key not in stored for key in _key_values(frame, table)]]


def update_targets(conn: Connection, table: sa.Table, symbol: str, interval: str, frame: pd.DataFrame) -> int:
    """Set target_return/target_up of existing feature rows (open_time, target_return, target_up); a NULL
    leaves a known target as it is (as the upsert does)."""
    import pandas as pd

    if frame.empty:
        return 0
    stmt = (
        table.update()
        .where(table.c.symbol == symbol, table.c.interval == interval, table.c.open_time == sa.bindparam("b_time"))
        .values(
            target_return=sa.func.coalesce(
                sa.bindparam("b_return", type_=table.c.target_return.type), table.c.target_return
            ),
            target_up=sa.func.coalesce(sa.bindparam("b_up", type_=table.c.target_up.type), table.c.target_up),
        )
    )
    rows = [
        {
            "b_time": t.to_pydatetime(),
            "b_return": None if pd.isna(r) else float(r),
            "b_up": None if pd.isna(u) else int(u),
        }
        for t, r, u in zip(frame["open_time"], frame["target_return"], frame["target_up"])
    ]
    conn.execute(stmt, rows)
    return len(rows)


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One atomic unit of work: everything inside commits together or not at all."""
    with engine.begin() as conn:
        yield conn


def lock_key(name: str) -> int:
    """The signed 64-bit PostgreSQL advisory lock key of a lock name (stable across processes)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def locked_transaction(engine: Engine, name: str) -> Iterator[Connection]:
    """A transaction that holds the lock `name` from its first statement, its reads included, to its end, so
    transactions taking the same lock see each other whole: one reads what the other committed, never half of
    it, and neither writes over what it has not read. PostgreSQL: a transaction-level advisory lock on
    `lock_key(name)`; SQLite: BEGIN IMMEDIATE (the database's one write lock: other writers wait, readers don't)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(name)})
        else:  # pysqlite has begun nothing yet (its implicit BEGIN comes before the first INSERT/UPDATE/DELETE)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


# --- reads ---------------------------------------------------------------------------------------


def query_frame(conn: Connection, query: sa.Select[Any]) -> pd.DataFrame:
    import pandas as pd

    result = conn.execute(query)
    frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    for column in query.selected_columns:
        if isinstance(column.type, UTCDateTime) and column.name in frame:
            frame[column.name] = pd.to_datetime(frame[column.name], utc=True)
    return frame


def read_candles(
    conn: Connection,
    symbol: str,
    interval: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Candles with start <= open_time < end, in time order."""
    query = sa.select(candles).where(candles.c.symbol == symbol, candles.c.interval == interval)
    if start is not None:
        query = query.where(candles.c.open_time >= start)
    if end is not None:
        query = query.where(candles.c.open_time < end)
    return query_frame(conn, query.order_by(candles.c.open_time))


def read_candles_before(
    conn: Connection, symbol: str, interval: str, before: datetime, limit: int, since: datetime | None = None
) -> pd.DataFrame:
    """The last `limit` candles that open before `before` (and not before `since`), in time order."""
    query = (
        sa.select(candles)
        .where(candles.c.symbol == symbol, candles.c.interval == interval, candles.c.open_time < before)
        .order_by(candles.c.open_time.desc())
        .limit(limit)
    )
    if since is not None:
        query = query.where(candles.c.open_time >= since)
    return query_frame(conn, query).iloc[::-1].reset_index(drop=True)


def read_safe_haven(conn: Connection, start: date | None = None, known_before: datetime | None = None) -> pd.DataFrame:
    """Daily safe-haven bars dated on/after `start` and visible before `known_before`."""
    query = sa.select(safe_haven_bars)
    if start is not None:
        query = query.where(safe_haven_bars.c.date >= start)
    if known_before is not None:
        query = query.where(safe_haven_bars.c.known_at < known_before)
    return query_frame(conn, query.order_by(safe_haven_bars.c.ticker, safe_haven_bars.c.date))


def read_macro(
    conn: Connection, known_from: datetime | None = None, known_before: datetime | None = None
) -> pd.DataFrame:
    """Macro observations (every vintage) that became known in [known_from, known_before)."""
    query = sa.select(macro_observations)
    if known_from is not None:
        query = query.where(macro_observations.c.known_at >= known_from)
    if known_before is not None:
        query = query.where(macro_observations.c.known_at < known_before)
    order = (macro_observations.c.series_id, macro_observations.c.known_at, macro_observations.c.observation_date)
    return query_frame(conn, query.order_by(*order))


def read_features(
    conn: Connection,
    table: sa.Table,
    symbol: str,
    interval: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    query = sa.select(table).where(table.c.symbol == symbol, table.c.interval == interval)
    if start is not None:
        query = query.where(table.c.open_time >= start)
    if end is not None:
        query = query.where(table.c.open_time < end)
    return query_frame(conn, query.order_by(table.c.open_time))


def read_column(conn: Connection, table: sa.Table, column: str, **equals: Any) -> list[Any]:
    """One column of a table (filtered by equality), ordered: the input of gap detection."""
    col = table.c[column]
    query = sa.select(col).where(*(table.c[k] == v for k, v in equals.items())).order_by(col)
    return list(conn.execute(query).scalars())


# --- validation marks ---------------------------------------------------------------------------------

MARKET_SUITES = ("candles", "features")  # scoped by symbol and interval; the others are global ("*")


def scope_of(suite: str, symbol: str, interval: str) -> str:
    """The `validated_days.scope` a suite's marks are kept under."""
    return f"{symbol} {interval}" if suite in MARKET_SUITES else "*"


def invalidate(conn: Connection, suite: str, scope: str, start: datetime, end: datetime) -> None:
    """Data was rewritten: its days are no longer validated until the next validation run."""
    v = validated_days
    conn.execute(
        sa.delete(v).where(
            v.c.suite == suite,
            v.c.scope == scope,
            v.c.day >= start.date(),
            v.c.day <= (end - timedelta(microseconds=1)).date(),
        )
    )
