"""The one feature function: columns, warm-up, no look-ahead, as-of alignment, targets."""

from __future__ import annotations

from datetime import timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from sofare.config import load_config
from sofare.data.features import compute_features, feature_spec
from sofare.data.sources.base import FetchRequest
from sofare.data.sources.sample import SampleSource
from sofare.data.visibility import macro_known_at, safe_haven_known_at

CFG = load_config(env={})
SPEC = feature_spec(CFG)
UTC = timezone.utc
HOUR = timedelta(hours=1)


def _real_inputs(start: str, end: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Real candles, safe-haven bars and macro observations (with known_at) from the sample data."""
    src = SampleSource(CFG)
    lo, hi = pd.Timestamp(start, tz="UTC").to_pydatetime(), pd.Timestamp(end, tz="UTC").to_pydatetime()
    candles = src.fetch(FetchRequest("candles", lo, hi, symbol="BTCUSDT", interval="1h"))
    bars = src.fetch(FetchRequest("safe_haven", lo, hi, tickers=tuple(CFG.safe_haven.tickers)))
    bars = pd.concat(
        [part.assign(known_at=safe_haven_known_at(CFG, t, part["date"])) for t, part in bars.groupby("ticker")]
    )
    macro = src.fetch(FetchRequest("macro", lo, hi, series=tuple(CFG.macro.series)))
    macro = pd.concat(
        [part.assign(known_at=macro_known_at(CFG, s, part["observation_date"], part["realtime_start"]))
         for s, part in macro.groupby("series_id")]
    )
    return candles, bars, macro


@pytest.fixture(scope="module")
def inputs():
    return _real_inputs("2024-01-01", "2024-04-01")


@pytest.fixture(scope="module")
def features(inputs):
    return compute_features(*inputs, CFG, "1h")


def test_feature_set_shape_and_version():
    assert len(SPEC.micro) >= 19, "the seeds ask for 19+ technical features"
    assert {"rsi_14", "macd", "bb_pctb", "sma_ratio_25", "ema_ratio_12", "atr_pct_14", "obv_flow_14",
            "stoch_k", "log_ret_lag_1", "vol_24", "hour_sin", "dow_cos"} <= set(SPEC.micro)
    assert "sh_spx_ret1" in SPEC.safe_haven and "macro_dff" in SPEC.macro and "macro_cpiaucsl_growth" in SPEC.macro
    assert len(set(SPEC.columns)) == len(SPEC.columns)
    assert feature_spec(load_config(env={})).version == SPEC.version
    assert feature_spec(load_config(env={"SOFARE_FEATURES__WARMUP_BARS": "300"})).version != SPEC.version


def test_warm_up_rows_are_null_and_later_rows_complete(features):
    warm = CFG.features.warmup_bars
    assert features.loc[: warm - 2, list(SPEC.columns)].isna().all().all()
    after = features.loc[warm - 1 :, list(SPEC.columns)]
    assert after.notna().all().all(), after.columns[after.isna().any()].tolist()
    assert np.isfinite(after.to_numpy()).all()
    assert after["rsi_14"].between(0, 100).all() and after["stoch_k"].between(0, 100).all()


def test_changing_inputs_after_t_changes_nothing_at_or_before_t(inputs, features):
    candles, bars, macro = inputs
    rng = np.random.default_rng(7)
    for t in pd.to_datetime(["2024-02-05 20:00", "2024-03-12 03:00"], utc=True):
        as_of = t + HOUR
        c2 = candles.copy()
        later = c2["open_time"] > t
        scale = rng.uniform(0.5, 2.0, later.sum())
        for col in ("open", "high", "low", "close"):
            c2.loc[later, col] = c2.loc[later, col] * scale
        c2.loc[later, "volume"] = c2.loc[later, "volume"] * rng.uniform(0, 3, later.sum())
        b2 = bars.copy()
        b2.loc[b2["known_at"] > as_of, ["open", "high", "low", "close"]] *= 1.5
        m2 = macro.copy()
        m2.loc[m2["known_at"] > as_of, "value"] += 10.0
        changed = compute_features(c2, b2, m2, CFG, "1h")
        upto = features["open_time"] <= t
        pd.testing.assert_frame_equal(changed.loc[upto, list(SPEC.columns)], features.loc[upto, list(SPEC.columns)])
        # the perturbation is real: features after t do change
        assert not changed.loc[~upto, "rsi_14"].equals(features.loc[~upto, "rsi_14"])
        # targets look ahead by definition, exactly `horizon` rows
        moved = changed["target_return"].ne(features["target_return"]) & changed["target_return"].notna()
        assert changed.loc[moved, "open_time"].min() == t


def test_same_window_same_features_whatever_history_came_before(inputs, features):
    """Serving computes from a window of warmup_bars + lookback candles; training from all history."""
    candles, bars, macro = inputs
    window = candles.tail(CFG.features.warmup_bars + 50)
    served = compute_features(window, bars, macro, CFG, "1h").tail(50)
    stored = features.tail(50)
    np.testing.assert_allclose(served[list(SPEC.columns)].to_numpy(), stored[list(SPEC.columns)].to_numpy(),
                               rtol=1e-6, atol=1e-9)


def _hourly(day: str, hours: int = 400) -> pd.DataFrame:
    """Synthetic but valid candles ending at midnight after `day` (enough history for warm-up)."""
    end = pd.Timestamp(day, tz="UTC") + pd.Timedelta(days=1)
    times = pd.date_range(end=end - HOUR, periods=hours, freq="h")
    close = 100 + np.sin(np.arange(hours) / 7.0)
    return pd.DataFrame({"open_time": times, "open": close, "high": close + 1, "low": close - 1, "close": close,
                         "volume": 10.0})


def _spx(days: list[str], closes: list[float]) -> pd.DataFrame:
    frame = pd.DataFrame({"ticker": "^GSPC", "date": pd.to_datetime(days).date, "open": closes, "high": closes,
                          "low": closes, "close": closes, "volume": 1.0})
    return frame.assign(known_at=safe_haven_known_at(CFG, "^GSPC", frame["date"]))


@pytest.mark.parametrize(("day", "first_visible_open"), [("2024-06-03", 20), ("2024-01-03", 21)])
def test_us_close_becomes_visible_at_the_first_candle_closing_after_it(day, first_visible_open):
    """^GSPC closes 16:00 New York (20:00 UTC in summer, 21:00 in winter) + 30 min delay."""
    prev = (pd.Timestamp(day) - pd.Timedelta(days=1)).strftime("%Y-%m-%d")
    feats = compute_features(_hourly(day), _spx([prev, day], [100.0, 110.0]), pd.DataFrame(), CFG, "1h")
    ret = feats.set_index("open_time")["sh_spx_ret1"]
    hour = lambda h: pd.Timestamp(f"{day} {h:02d}:00", tz="UTC")  # noqa: E731
    assert np.isnan(ret[hour(first_visible_open - 1)]), "the day's close leaked into an earlier candle"
    assert ret[hour(first_visible_open)] == pytest.approx(np.log(110 / 100))


def test_fred_value_becomes_visible_exactly_at_its_release():
    """CPI for January 2024 is visible from 2024-02-21 00:00 UTC (period end + 20 days)."""
    macro = pd.DataFrame({"series_id": "CPIAUCSL",
                          "observation_date": pd.to_datetime(["2023-12-01", "2024-01-01"]).date,
                          "value": [300.0, 303.0], "realtime_start": pd.NaT})
    macro["known_at"] = macro_known_at(CFG, "CPIAUCSL", macro["observation_date"], macro["realtime_start"])
    feats = compute_features(_hourly("2024-02-20"), pd.DataFrame(), macro, CFG, "1h").set_index("open_time")
    growth = feats["macro_cpiaucsl_growth"]
    assert growth[pd.Timestamp("2024-02-20 23:00", tz="UTC")] == pytest.approx(np.log(303 / 300))  # closes 00:00
    assert np.isnan(growth[pd.Timestamp("2024-02-20 22:00", tz="UTC")])  # only December was known


def test_revised_vintage_is_used_only_after_it_became_known():
    macro = pd.DataFrame({
        "series_id": "DFF",
        "observation_date": pd.to_datetime(["2024-02-01", "2024-02-02", "2024-02-02"]).date,
        "value": [5.33, 5.30, 5.40],
        "known_at": pd.to_datetime(["2024-02-02 12:00", "2024-02-03 12:00", "2024-02-04 12:00"], utc=True),
    })
    feats = compute_features(_hourly("2024-02-04"), pd.DataFrame(), macro, CFG, "1h").set_index("open_time")
    at = lambda s: feats.loc[pd.Timestamp(s, tz="UTC"), ["macro_dff", "macro_dff_chg"]].tolist()  # noqa: E731
    assert at("2024-02-03 10:00") == pytest.approx([5.33, np.nan], nan_ok=True)
    assert at("2024-02-03 11:00") == pytest.approx([5.30, -0.03])
    assert at("2024-02-04 11:00") == pytest.approx([5.40, 0.07])


def test_targets_are_null_when_the_future_candle_is_missing():
    candles, bars, macro = _real_inputs("2023-03-20", "2023-03-28")
    feats = compute_features(candles, bars, macro, CFG, "1h").set_index("open_time")
    before_gap = pd.Timestamp("2023-03-24 12:00", tz="UTC")
    assert np.isnan(feats.loc[before_gap, "target_return"])  # 13:00 is the real missing hour
    after = pd.Timestamp("2023-03-24 14:00", tz="UTC")
    assert feats.loc[after, "target_up"] in (0.0, 1.0)
    assert np.isnan(feats["target_return"].iloc[-1])  # the horizon has not passed
    ok = feats["target_return"].notna()
    assert ((feats.loc[ok, "target_return"] > 0).astype(float) == feats.loc[ok, "target_up"]).all()


def test_empty_input_gives_empty_frame_with_all_columns():
    out = compute_features(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), CFG, "1h")
    assert out.empty and list(out.columns) == ["open_time", *SPEC.columns, "target_return", "target_up"]
