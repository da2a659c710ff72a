"""Temporal splits, purge gaps and windows: no window crosses a boundary or a gap, no statistic
comes from rows after the fitted ones."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from sofare.config import load_config
from sofare.data.features import feature_spec
from sofare.training.windows import Scaler, purge_rows, temporal_split, walk_forward_splits, window_ends

CFG = load_config(env={})
SPEC = feature_spec(CFG)


def _frame(n: int, missing: tuple[int, ...] = ()) -> pd.DataFrame:
    times = pd.date_range("2024-01-01", periods=n + len(missing), freq="1h", tz="UTC")
    times = times.delete(list(missing)) if missing else times
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, len(SPEC.columns))), columns=list(SPEC.columns))
    frame.insert(0, "open_time", times)
    frame["target_return"] = rng.normal(scale=0.01, size=n)
    frame["target_up"] = (frame["target_return"] > 0).astype(float)
    return frame


def test_purge_is_at_least_the_longest_lookback_plus_horizon():
    assert purge_rows(CFG) >= max(CFG.training.search_space.lookback) + CFG.features.horizon
    assert purge_rows(load_config(env={"SOFARE_TRAINING__PURGE_BARS": "500"})) == 500


def test_temporal_split_keeps_order_ratios_and_purge_gaps():
    parts = temporal_split(10_000, 0.7, 0.15, 49)
    assert parts["train"] == range(7000 - 49)
    assert parts["validation"] == range(7000, 8500 - 49)
    assert parts["test"] == range(8500, 10_000)
    assert parts["validation"].start - parts["train"].stop >= 49
    assert parts["test"].start - parts["validation"].stop >= 49
    with pytest.raises(ValueError, match="not enough rows"):
        temporal_split(100, 0.7, 0.15, 49)


@pytest.mark.parametrize("mode", ["expanding", "sliding"])
def test_walk_forward_folds_are_ordered_purged_and_tile_the_end(mode):
    folds = walk_forward_splits(10_000, 3, mode, 0.15, 0.15, 49)
    assert [f["test"].stop for f in folds][-1] == 10_000
    for a, b in itertools.pairwise(folds):
        assert a["test"].stop == b["test"].start
    for f in folds:
        assert f["train"].stop + 49 <= f["validation"].start and f["validation"].stop + 49 <= f["test"].start
    lengths = {len(f["train"]) for f in folds}
    assert (len(lengths) == 1) == (mode == "sliding")


def test_windows_stay_inside_their_part_skip_gaps_and_need_a_target():
    frame = _frame(300, missing=(150,))  # one missing hour after row 149
    frame.loc[20, "rsi_14"] = np.nan  # a NULL micro feature
    frame.loc[250, "target_return"] = np.nan
    ends = window_ends(frame, SPEC, range(10, 280), 24, pd.Timedelta(hours=1))
    assert ends.min() == 20 + 24  # first window after the NULL row, and none starting before row 10
    assert ends.max() < 280
    crossing = [t for t in ends if t - 23 < 150 <= t]
    assert crossing == [], "no window spans the missing hour"
    assert 250 not in ends
    times = frame["open_time"].to_numpy()
    assert all(times[t] - times[t - 23] == np.timedelta64(23, "h") for t in ends)


def test_scaler_statistics_come_only_from_the_fitted_rows():
    frame = _frame(200)
    fitted = Scaler.fit(frame, list(SPEC.columns), np.arange(0, 100))
    frame.loc[150:, list(SPEC.columns)] = 1e6  # later rows change wildly
    again = Scaler.fit(frame, list(SPEC.columns), np.arange(0, 100))
    assert np.array_equal(fitted.mean, again.mean) and np.array_equal(fitted.std, again.std)
    assert fitted.ret_std == again.ret_std
