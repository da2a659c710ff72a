"""What a sofare_validate run covers: Params, asset events, or its data interval."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sofare import tasks


def test_manual_params_win_and_cover_inclusive_days():
    windows = tasks.validation_windows(
        {"start": "2024-01-01", "end": "2024-01-03"},
        datetime(2024, 5, 1, tzinfo=UTC),
        datetime(2024, 5, 2, tzinfo=UTC),
        [{"start": "2024-06-01T00:00:00+00:00", "end": "2024-06-02T00:00:00+00:00"}],
    )
    assert windows == [{"start": "2024-01-01T00:00:00+00:00", "end": "2024-01-04T00:00:00+00:00"}]


def test_asset_events_are_merged_where_they_touch_and_kept_apart_otherwise():
    extras = [
        {"start": "2024-01-02T00:00:00+00:00", "end": "2024-01-03T00:00:00+00:00"},
        {"start": "2024-01-01T00:00:00+00:00", "end": "2024-01-02T00:00:00+00:00"},
        {"start": "2024-02-01T00:00:00+00:00", "end": "2024-02-02T00:00:00+00:00"},
        {"start": "2024-01-01T12:00:00+00:00", "end": "2024-01-02T12:00:00+00:00"},
    ]
    assert tasks.validation_windows({"start": None, "end": None}, None, None, extras) == [
        {"start": "2024-01-01T00:00:00+00:00", "end": "2024-01-03T00:00:00+00:00"},
        {"start": "2024-02-01T00:00:00+00:00", "end": "2024-02-02T00:00:00+00:00"},
    ]


def test_a_scheduled_run_covers_its_data_interval():
    assert tasks.validation_windows({}, datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 2, tzinfo=UTC)) == [
        {"start": "2024-03-01T00:00:00+00:00", "end": "2024-03-02T00:00:00+00:00"}
    ]


def test_nothing_to_validate_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to validate"):
        tasks.validation_windows({}, None, None)
    with pytest.raises(ValueError, match="carry no interval"):
        tasks.validation_windows({}, None, None, [{"rows": 3}])
    with pytest.raises(ValueError, match="before start"):
        tasks.validation_windows({"start": "2024-01-05", "end": "2024-01-01"}, None, None)
