"""Great Expectations validation on real data: passes as loaded, fails loudly on every broken rule,
records runs per day, builds Data Docs, and keeps failed or unvalidated days out of training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from sofare import tasks
from sofare.config import load_config
from sofare.data import ingest, warehouse
from sofare.training import dataset
from sofare.validation import suites

ROOT = Path(__file__).resolve().parents[2]
WEEK = ("2023-03-20", "2023-03-26")  # holds the real 2023-03-24 13:00 halt
DAY = ingest.day_range("2023-03-22", "2023-03-22")


def _backfill(start: str, end: str) -> None:
    tasks.backfill(load_config(), ["sample"], start, end)


@pytest.fixture
def loaded(db_cfg, engine, monkeypatch):
    """Real sample data for a week in March 2023 (with warm-up history from February)."""
    monkeypatch.setenv("SOFARE_INGEST__CONTEXT_DAYS", "60")
    _backfill("2023-02-01", WEEK[1])
    return load_config()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The same real week, loaded once into SQLite, for the rule-by-rule checks on frames
    (frames are database-independent once read; both databases are covered end to end below)."""
    path = tmp_path_factory.mktemp("rules")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFARE_PATHS__VAR", str(path / "var"))
        mp.setenv("SOFARE_WAREHOUSE__URL", f"sqlite:///{path / 'warehouse.db'}")
        mp.setenv("SOFARE_INGEST__CONTEXT_DAYS", "60")
        _backfill("2023-02-01", WEEK[1])
        cfg = load_config()
        engine = warehouse.get_engine(cfg)
        with engine.connect() as conn:
            frames = {
                "candles": suites.candles_frame(conn, cfg, "BTCUSDT", "1h", *DAY),
                "safe_haven_bars": suites.safe_haven_frame(conn, cfg, *DAY),
                "macro_observations": suites.macro_frame(conn, cfg, *ingest.day_range("2023-03-01", "2023-03-26")),
                "features": suites.features_frame(conn, cfg, "BTCUSDT", "1h", *DAY),
            }
        yield cfg, frames


def test_real_data_passes_and_the_real_gap_is_reported_as_known(loaded, engine):
    results = tasks.validate_range(load_config(), *WEEK)
    assert [r.suite for r in results] == list(suites.SUITES)
    assert all(r.success for r in results), "\n".join(r.summary() for r in results if not r.success)
    candles = results[0]
    assert candles.known_gaps == [
        {"first": "2023-03-24T13:00:00+00:00", "last": "2023-03-24T13:00:00+00:00", "reason": "Binance trading halt"}
    ]
    with engine.connect() as conn:
        marks = conn.execute(sa.select(warehouse.validated_days)).mappings().all()
        runs = conn.execute(sa.select(warehouse.validation_runs)).mappings().all()
    assert len(marks) == 7 * 4 and {m["status"] for m in marks} == {"passed"}
    assert len(runs) == 4 and all(r["success"] for r in runs)


def test_an_unlisted_gap_fails_bars_per_day_on_its_day_only(loaded, engine, monkeypatch):
    monkeypatch.setenv("SOFARE_VALIDATION__KNOWN_GAPS", "[]")
    result = suites.run_suite(load_config(), engine, "candles", *ingest.day_range(*WEEK))
    assert not result.success and result.days_failed == ["2023-03-24"]
    [failure] = result.failures
    assert "bars per day" in failure.rule and failure.rows == 1


# --- every rule, on a corrupted copy of a real day ---------------------------------------------


def _corrupt_candles(frame: pd.DataFrame, how: str) -> pd.DataFrame:
    f = frame.copy()
    i = f.index[f["open_time"] == pd.Timestamp("2023-03-22 05:00", tz="UTC")][0]
    if how == "schema":
        return f.drop(columns="volume")
    if how == "type":
        f["close"] = f["close"].astype(object)
        f.loc[i, "close"] = "28000.5"
    elif how == "null":
        f.loc[i, "close"] = np.nan
    elif how == "unique":
        return pd.concat([f, f.loc[[i]]], ignore_index=True)
    elif how == "missing bar":
        f.loc[i, "present"] = 0
    elif how == "high":
        f.loc[i, "high"] = f.loc[i, "oc_max"] - 1
    elif how == "low":
        f.loc[i, "low"] = f.loc[i, "oc_min"] + 1
    elif how == "positive":
        f.loc[i, "low"] = -1.0
    elif how == "volume":
        f.loc[i, "volume"] = -5.0
    elif how == "log return":
        f.loc[i, "abs_log_return"] = 0.9
    elif how == "freshness":
        f.loc[f["open_time"].dt.date == f.loc[i, "open_time"].date(), "freshness_lag_bars"] = 5
    return f


@pytest.mark.parametrize(
    ("how", "rule"),
    [
        ("schema", "schema"),
        ("type", "type: close is a float"),
        ("null", "not null: close"),
        ("unique", "unique (symbol, interval, open_time)"),
        ("missing bar", "bars per day"),
        ("high", "high >= max(open, close)"),
        ("low", "low <= min(open, close)"),
        ("positive", "prices > 0"),
        ("volume", "volume >= 0"),
        ("log return", "bounded |log return|"),
        ("freshness", "freshness"),
    ],
)
def test_each_candle_rule_fails_on_a_corrupted_real_day(real, how, rule):
    cfg, frames = real
    frame = frames["candles"]
    ok, _, failures = suites.check_frame(cfg, "candles", frame, *DAY, "BTCUSDT 1h", "clean")
    assert ok and failures == []
    ok, _, failures = suites.check_frame(cfg, "candles", _corrupt_candles(frame, how), *DAY, "BTCUSDT 1h", how)
    assert not ok
    named = [f for f in failures if rule in f.rule]
    assert named, f"{rule!r} not among {[f.rule for f in failures]}"
    assert named[0].days == ["2023-03-22"]
    if how not in ("schema", "freshness"):
        assert named[0].rows >= 1


@pytest.mark.parametrize(
    ("how", "rule"),
    [
        ("schema", "schema"),
        ("null", "not null: close"),
        ("unique", "unique (ticker, date)"),
        ("ticker", "ticker is configured"),
        ("high", "high >= max(open, close)"),
        ("low", "low <= min(open, close)"),
        ("positive", "prices > 0"),
        ("volume", "volume >= 0"),
        ("log return", "bounded daily |log return|"),
        ("visibility", "visible only after its market closed"),
        ("rows", "at most one bar per ticker"),
    ],
)
def test_each_safe_haven_rule_fails_on_a_corrupted_real_day(real, how, rule):
    loaded, frames = real
    frame = frames["safe_haven_bars"]
    assert len(frame) == 6
    assert suites.check_frame(loaded, "safe_haven_bars", frame, *DAY, "*", "clean")[0]
    f = frame.copy()
    i = f.index[f["ticker"] == "GC=F"][0]
    if how == "schema":
        f = f.drop(columns="known_at")
    elif how == "null":
        f.loc[i, "close"] = np.nan
    elif how in ("unique", "rows"):
        f = pd.concat([f, f.loc[[i]]], ignore_index=True)
    elif how == "ticker":
        f.loc[i, "ticker"] = "BTC-USD"
    elif how == "high":
        f.loc[i, "high"] = f.loc[i, "oc_max"] - 1
    elif how == "low":
        f.loc[i, "low"] = f.loc[i, "oc_min"] + 1
    elif how == "positive":
        f.loc[i, "low"] = 0.0
    elif how == "volume":
        f.loc[i, "volume"] = -1.0
    elif how == "log return":
        f.loc[i, "abs_log_return_excess"] = 0.4
    elif how == "visibility":
        f.loc[i, "known_hours_after_date"] = 0.0
    ok, _, failures = suites.check_frame(loaded, "safe_haven_bars", f, *DAY, "*", how)
    assert not ok and any(rule in x.rule for x in failures), [x.rule for x in failures]


@pytest.mark.parametrize(
    ("how", "rule"),
    [
        ("schema", "schema"),
        ("null", "not null: value"),
        ("unique", "unique (series_id"),
        ("series", "series is configured"),
        ("look-ahead", "known only after its period ended"),
        ("jump", "bounded change"),
    ],
)
def test_each_macro_rule_fails_on_a_corrupted_real_interval(real, how, rule):
    loaded, frames = real
    window = ingest.day_range("2023-03-01", "2023-03-26")
    frame = frames["macro_observations"]
    assert suites.check_frame(loaded, "macro_observations", frame, *window, "*", "clean")[0]
    f = frame.copy()
    i = f.index[f["series_id"] == "DGS10"][0]
    if how == "schema":
        f = f.drop(columns="value")
    elif how == "null":
        f.loc[i, "value"] = np.nan
    elif how == "unique":
        f = pd.concat([f, f.loc[[i]]], ignore_index=True)
    elif how == "series":
        f.loc[i, "series_id"] = "SP500"
    elif how == "look-ahead":
        f.loc[i, "days_after_period_end"] = -3.0
    elif how == "jump":
        f.loc[i, "abs_change_excess"] = 2.0
    ok, _, failures = suites.check_frame(loaded, "macro_observations", f, *window, "*", how)
    assert not ok and any(rule in x.rule for x in failures), [x.rule for x in failures]


@pytest.mark.parametrize(
    ("how", "rule"),
    [
        ("schema", "schema"),
        ("version", "current feature-set version"),
        ("unique", "unique (symbol"),
        ("null", "no NULL feature after warm-up"),
        ("rsi", "range: rsi_14 in [0, 100]"),
        ("willr", "range: willr_14 in [-100, 0]"),
        ("atr", "range: atr_pct_14 >= 0"),
        ("hour", "range: hour_sin"),
        ("target", "targets present exactly where the horizon has passed"),
        ("sign", "target_up is the sign"),
    ],
)
def test_each_feature_rule_fails_on_a_corrupted_real_day(real, how, rule):
    loaded, frames = real
    frame = frames["features"]
    ok, _, _ = suites.check_frame(loaded, "features", frame, *DAY, "BTCUSDT 1h", "clean")
    assert ok
    f = frame.copy()
    if how == "schema":
        f = f.drop(columns="macd")
    elif how == "version":
        f.loc[3, "feature_set_version"] = "fs0-old"
    elif how == "unique":
        f = pd.concat([f, f.loc[[3]]], ignore_index=True)
    elif how == "null":
        f.loc[3, "null_features_after_warmup"] = 1
    elif how == "rsi":
        f.loc[3, "rsi_14"] = 140.0
    elif how == "willr":
        f.loc[3, "willr_14"] = 5.0
    elif how == "atr":
        f.loc[3, "atr_pct_14"] = -0.01
    elif how == "hour":
        f.loc[3, "hour_sin"] = 1.5
    elif how == "target":
        f.loc[3, "target_expected"] = 0
    elif how == "sign":
        f.loc[3, "target_up"] = 1 - f.loc[3, "target_up"]
    ok, _, failures = suites.check_frame(loaded, "features", f, *DAY, "BTCUSDT 1h", how)
    assert not ok and any(rule in x.rule for x in failures), [x.rule for x in failures]


# --- end to end through the warehouse ----------------------------------------------------------


def test_breaking_one_value_in_the_warehouse_fails_the_next_validation_and_blocks_training(loaded, engine):
    week = ingest.day_range(*WEEK)
    tasks.validate_range(load_config(), *WEEK)
    assert len(dataset.training_frame(loaded, engine, *week)) == 7 * 24 - 1
    with engine.begin() as conn:
        c = warehouse.candles
        conn.execute(
            sa.update(c)
            .where(c.c.open_time == pd.Timestamp("2023-03-22 05:00", tz="UTC").to_pydatetime())
            .values(high=c.c.low - 10)
        )
    results = {r.suite: r for r in tasks.validate_range(load_config(), *WEEK)}
    assert not results["candles"].success and results["candles"].days_failed == ["2023-03-22"]
    assert "high >= max(open, close): 1 row(s) break it; days: 2023-03-22" in results["candles"].summary()
    with pytest.raises(
        suites.UnvalidatedIntervalError, match=r"candles \[BTCUSDT 1h\] failed validation: 2023-03-22 \(run "
    ):
        dataset.training_frame(loaded, engine, *week)
    other_days = ingest.day_range("2023-03-23", "2023-03-26")
    assert len(dataset.training_frame(loaded, engine, *other_days)) == 4 * 24 - 1


def test_unvalidated_days_and_reingested_days_are_refused_by_name(loaded, engine):
    validation_window = ingest.day_range("2023-03-20", "2023-03-23")
    tasks.validate_range(load_config(), "2023-03-20", "2023-03-23")
    with pytest.raises(suites.UnvalidatedIntervalError, match=r"not validated: 2023-03-24 \.\. 2023-03-26"):
        dataset.training_frame(loaded, engine, validation_window[0], ingest.day_range(*WEEK)[1])
    ingest.load_interval(loaded, engine, "sample", "candles", *ingest.day_range("2023-03-21", "2023-03-21"))
    with pytest.raises(suites.UnvalidatedIntervalError, match=r"candles \[BTCUSDT 1h\] not validated: 2023-03-21"):
        dataset.training_frame(loaded, engine, *validation_window)


def test_data_docs_site_lists_every_suite(real):
    loaded, _ = real
    tasks.validate_range(load_config(), *WEEK)
    index = suites.data_docs_index(loaded)
    assert index.exists()
    page = index.read_text()
    for suite in suites.SUITES:
        assert suite in page


def test_suites_are_read_never_rewritten_by_great_expectations(real):
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROOT / "expectations").iterdir()}
    tasks.validate_range(load_config(), *WEEK)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROOT / "expectations").iterdir()}
    assert after == before
    assert sorted(before) == [f"{s}.json" for s in sorted(suites.SUITES)]
