"""Warehouse on SQLite and on a real PostgreSQL server: idempotent upserts, atomic transactions."""

from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa

from sofare.data import warehouse
from sofare.data.features import feature_spec


def _candles(closes: list[float]) -> pd.DataFrame:
    times = pd.date_range("2024-01-01", periods=len(closes), freq="h", tz="UTC")
    return pd.DataFrame(
        {
            "symbol": "BTCUSDT",
            "interval": "1h",
            "open_time": times,
            "open": closes,
            "high": [c + 1 for c in closes],
            "low": [c - 1 for c in closes],
            "close": closes,
            "volume": 1.0,
            "quote_volume": float("nan"),
            "trade_count": pd.array([1] * len(closes), "Int64"),
            "source": "test",
        }
    )


def _count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_upsert_is_idempotent_and_updates_by_natural_key(engine):
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, _candles([10.0, 11.0, 12.0]))
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, _candles([10.0, 11.0, 12.0]))
    assert _count(engine, warehouse.candles) == 3
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, _candles([10.0, 11.5]))
    with engine.connect() as conn:
        rows = warehouse.read_candles(conn, "BTCUSDT", "1h")
    assert rows["close"].tolist() == [10.0, 11.5, 12.0]
    assert rows["quote_volume"].isna().all(), "NaN is stored as NULL on every database"
    assert str(rows["open_time"].dt.tz) == "UTC"


def test_a_failed_transaction_leaves_nothing(engine):
    with pytest.raises(RuntimeError, match="boom"), warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, _candles([10.0, 11.0]))
        raise RuntimeError("boom")
    assert _count(engine, warehouse.candles) == 0


def test_duplicate_keys_in_one_write_are_refused(engine):
    twice = pd.concat([_candles([10.0]), _candles([10.5])])
    with pytest.raises(ValueError, match="duplicate key"), warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, twice)
    assert _count(engine, warehouse.candles) == 0


def test_reads_filter_half_open_ranges(engine):
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, _candles([1.0, 2.0, 3.0, 4.0, 5.0]))
    with engine.connect() as conn:
        rows = warehouse.read_candles(
            conn,
            "BTCUSDT",
            "1h",
            pd.Timestamp("2024-01-01 01:00", tz="UTC"),
            pd.Timestamp("2024-01-01 03:00", tz="UTC"),
        )
        last = warehouse.read_candles_before(conn, "BTCUSDT", "1h", pd.Timestamp("2024-01-01 04:00", tz="UTC"), 2)
    assert rows["close"].tolist() == [2.0, 3.0]
    assert last["close"].tolist() == [3.0, 4.0]


def test_features_table_of_another_feature_set_is_refused_until_rebuilt(engine, db_cfg):
    columns = feature_spec(db_cfg).columns
    with pytest.raises(warehouse.SchemaMismatchError, match="sofare init --rebuild-features"):
        warehouse.init_schema(engine, columns[:-1])
    warehouse.init_schema(engine, columns[:-1], rebuild_features=True)
    assert {c["name"] for c in sa.inspect(engine).get_columns("features")} >= set(columns[:-1])


def test_urls_are_normalised():
    assert warehouse.normalize_url("postgres://u:p@h:5/d") == "postgresql+psycopg2://u:p@h:5/d"
    assert warehouse.normalize_url("postgresql://u@h/d") == "postgresql+psycopg2://u@h/d"
    with pytest.raises(ValueError, match="unsupported warehouse database 'mysql'"):
        warehouse.normalize_url("mysql://u@h/d")


@pytest.mark.parametrize("uri", ["sqlite:////tmp/sofare-x.db", "sqlite://%2Ftmp%2Fsofare-x.db"])
def test_airflow_sqlite_connection_in_either_uri_form(monkeypatch, uri):
    monkeypatch.setenv("AIRFLOW_CONN_SOFARE_TEST", uri)
    assert warehouse._airflow_connection_url("sofare_test") == "sqlite:////tmp/sofare-x.db"


def test_airflow_connection_without_a_database_is_an_error_not_an_in_memory_db(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SOFARE_TEST", "sqlite://")
    with pytest.raises(ValueError, match="names no database file"):
        warehouse._airflow_connection_url("sofare_test")


def test_airflow_postgres_connection_becomes_a_psycopg2_url(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SOFARE_TEST", "postgres://user:secret@db.internal:5433/warehouse?sslmode=require")
    url = warehouse._airflow_connection_url("sofare_test")
    assert url == "postgresql+psycopg2://user:secret@db.internal:5433/warehouse?sslmode=require"


def test_text_and_missing_values_round_trip_exactly(engine):
    """Bulk paths (executemany on SQLite, binary COPY on PostgreSQL) keep every value and NULL."""
    bars = pd.DataFrame(
        {
            "ticker": ["GC=F", "^GSPC", "DX-Y.NYB"],
            "date": pd.to_datetime(["2024-01-02", "2024-01-02", "2024-01-03"]).date,
            "open": [2063.4, 4745.2, 101.3],
            "high": [2079.5, 4754.3, 102.1],
            "low": [2058.1, 4722.7, 101.0],
            "close": [2064.4, 4742.8, 102.0],
            "volume": [110.0, None, float("nan")],
            "known_at": pd.to_datetime(
                ["2024-01-02 22:30:00", "2024-01-02 21:30:00", "2024-01-03 22:30:00.123456"], utc=True, format="ISO8601"
            ),
            "source": "sample",
        }
    )
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.safe_haven_bars, bars)
    with engine.connect() as conn:
        back = warehouse.read_safe_haven(conn).sort_values("date", kind="stable").reset_index(drop=True)
    expected = bars.sort_values("ticker").sort_values("date", kind="stable").reset_index(drop=True)
    assert back["ticker"].tolist() == expected["ticker"].tolist()
    assert back["close"].tolist() == expected["close"].tolist()
    assert back["volume"].isna().tolist() == [False, True, True]
    assert back["known_at"].tolist() == expected["known_at"].tolist()


def test_bulk_paths_round_trip_every_value_and_null(engine):
    """Large frames take the bulk path (executemany on SQLite, binary COPY on PostgreSQL)."""
    import numpy as np

    closes = list(np.round(np.linspace(100, 200, 1500), 6))
    frame = _candles(closes)
    frame.loc[::7, "quote_volume"] = 123.456789
    frame.loc[::5, "trade_count"] = pd.NA
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, frame)
    with engine.connect() as conn:
        back = warehouse.read_candles(conn, "BTCUSDT", "1h")
    assert back["close"].tolist() == closes
    assert back["open_time"].tolist() == frame["open_time"].tolist()
    assert back["quote_volume"].isna().tolist() == frame["quote_volume"].isna().tolist()
    assert back["trade_count"].isna().tolist() == frame["trade_count"].isna().tolist()


def test_bulk_copy_refuses_what_it_cannot_carry_exactly(pg_url):
    engine = warehouse.engine_for(pg_url)
    warehouse.metadata.create_all(engine)
    frame = _candles([10.0] * 1500).assign(source="sample ")
    with pytest.raises(ValueError, match="trailing whitespace"), warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.candles, frame)


def test_booleans_and_text_round_trip(engine):
    row = pd.DataFrame(
        [
            {
                "alert_id": "a1",
                "raised_at": pd.Timestamp("2024-01-01", tz="UTC"),
                "source": "test",
                "severity": "high",
                "message": "line one\nline two ",
                "details": '{"k": 1}',
                "delivered": False,
            }
        ]
    )
    with warehouse.transaction(engine) as conn:
        warehouse.upsert(conn, warehouse.alerts, row)
    with engine.connect() as conn:
        back = conn.execute(sa.select(warehouse.alerts)).mappings().one()
    assert back["message"] == "line one\nline two " and back["delivered"] is False
