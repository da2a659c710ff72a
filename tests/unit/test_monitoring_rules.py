"""Monitoring's pure parts: outcomes from closes, live scores beside the baselines, severity -> action with
minimum samples and the cool-down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from sofare.config import load_config
from sofare.contracts import DriftResult, LiveQuality, LiveScore, ServiceHealth
from sofare.monitoring import outcomes, policy, quality

H = timedelta(hours=1)
T0 = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def _closes(n: int, missing: tuple[int, ...] = ()) -> pd.Series:
    """Closes by close time T0 + k h: 100, 101, 100, 101, ... (up, down, up, ...)."""
    values = [100.0 + (k % 2) for k in range(n)]
    index = [T0 + k * H for k in range(n)]
    keep = [k for k in range(n) if k not in missing]
    return pd.Series([values[k] for k in keep], index=pd.DatetimeIndex([index[k] for k in keep]))


def _pending(as_of: list[datetime], prob: float = 0.7, horizon: int = 1) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prediction_id": [f"p{k}" for k in range(len(as_of))],
            "as_of": as_of,
            "horizon": [horizon] * len(as_of),
            "prob_up": [prob] * len(as_of),
        }
    )


def test_an_outcome_is_the_log_return_to_the_close_horizon_bars_later():
    rows = outcomes.compute(_pending([T0 + 2 * H]), _closes(6), H, known_by=T0 + 10 * H)
    (row,) = rows.to_dict("records")
    assert row["base_close"] == 100.0 and row["target_close"] == 101.0
    assert row["realised_return"] == pytest.approx(np.log(101 / 100)) and row["realised_up"] == 1
    assert row["correct"]  # prob_up 0.7 said up
    assert row["last_return"] == pytest.approx(np.log(100 / 101))  # the bar ending at as_of went down
    assert row["target_time"] == T0 + 3 * H


def test_a_missing_or_not_yet_closed_candle_leaves_the_prediction_pending():
    closes = _closes(6, missing=(3,))
    assert outcomes.compute(_pending([T0 + 2 * H]), closes, H, known_by=T0 + 10 * H).empty  # target missing
    assert outcomes.compute(_pending([T0 + 3 * H]), closes, H, known_by=T0 + 10 * H).empty  # base missing
    assert outcomes.compute(_pending([T0 + 4 * H]), _closes(6), H, known_by=T0 + 4 * H).empty  # the future
    three = outcomes.compute(_pending([T0 + H], horizon=3), _closes(6), H, known_by=T0 + 4 * H)
    assert len(three) == 1 and three["target_time"].iloc[0] == T0 + 4 * H


def test_live_scores_sit_beside_persistence_and_always_up_on_the_same_hours():
    rng = np.random.default_rng(0)
    up = rng.integers(0, 2, 400).astype(float)
    last = np.where(up > 0, 0.01, -0.01)  # persistence is right every time here
    prob = np.full(400, 0.9)
    found = quality.scores(prob, up, last, samples=200, block=6, seed=1)
    assert found["persistence_accuracy"].value == 1.0
    assert found["always_up_accuracy"].value == pytest.approx(up.mean())
    assert found["accuracy"].value == pytest.approx(up.mean())
    assert found["vs_persistence"].ci_high < 0  # provably below persistence
    assert found["brier"].value == pytest.approx(np.mean((0.9 - up) ** 2))
    assert found["vs_coin_brier"].ci_low > 0  # 0.9 on a coin flip: worse than 0.5
    for name in ("accuracy", "brier", "persistence_accuracy"):
        s = found[name]
        assert s.ci_low <= s.value <= s.ci_high
    calibrated = quality.ece(np.full(1000, 0.5), np.tile([0.0, 1.0], 500))
    assert calibrated == pytest.approx(0.0)


def _q(
    version: str, variant: str, window: str, vs: tuple[float, float, float] | None = None, status: str = "ok"
) -> LiveQuality:
    extra = {}
    if vs is not None:
        extra = {
            "accuracy": LiveScore(value=0.4, ci_low=0.35, ci_high=0.45),
            "vs_persistence": LiveScore(value=vs[0], ci_low=vs[1], ci_high=vs[2]),
        }
    return LiveQuality(
        model_version=version,
        variant=variant,
        window=window,
        start="s",
        end="e",
        n=200 if status == "ok" else 5,
        pending=0,
        status=status,
        **extra,
    )


def test_quality_below_persistence_retrains_or_rolls_back_the_change_at_fault(cfg):
    worse = (-0.1, -0.15, -0.05)
    assert policy.quality_findings(cfg, [_q("3", "stable", "7d", worse)], set())[0].action == "retrain"
    finding = policy.quality_findings(cfg, [_q("4", "canary", "7d", worse)], {"4"})[0]
    assert (finding.severity, finding.action) == ("critical", "rollback")
    assert policy.quality_findings(cfg, [_q("3", "stable", "7d", (-0.05, -0.1, 0.01))], set()) == []  # CI spans 0
    assert policy.quality_findings(cfg, [_q("3", "stable", "7d", status="insufficient")], set()) == []
    # the longest window with enough outcomes is the one judged
    longest = policy.quality_findings(
        cfg, [_q("3", "stable", "24h", worse), _q("3", "stable", "7d", (0, -0.05, 0.05))], set()
    )
    assert longest == []


def test_drift_and_error_rules_respect_thresholds_and_minimum_samples(cfg):
    def drift(share: float, slow: float = 0.0) -> DriftResult:
        return DriftResult(
            status="ok",
            model_version="3",
            columns=10,
            drifted_columns=round(share * 10),
            share=share,
            drifted=("a",),
            shares={"micro": share, "macro": slow},
        )

    levels = [
        [(f.severity, f.action) for f in policy.drift_findings(cfg, drift(s))] for s in (0.1, 0.2, 0.35, 0.5, 1.0)
    ]
    assert levels == [[], [("low", "none")], [("medium", "alert")], [("high", "retrain")], [("high", "retrain")]]
    slow = policy.drift_findings(cfg, drift(0.0, slow=1.0))  # a week of monthly values: recorded, never acted on
    assert [(f.severity, f.action) for f in slow] == [("low", "none")] and "recorded" in slow[0].message
    assert policy.drift_findings(cfg, DriftResult(status="insufficient", current_rows=3)) == []

    def health(rate: float, requests: float = 1000, variant: str = "canary") -> ServiceHealth:
        return ServiceHealth(
            variant=variant,
            model_version="4",
            requests=requests,
            server_errors=rate * requests,
            error_rate=rate,
            p95_ms=10.0,
        )

    assert policy.error_findings(cfg, [health(0.5, requests=10)], {"4"}) == []  # too few requests
    assert policy.error_findings(cfg, [health(0.001)], {"4"}) == []
    assert [(f.severity, f.action) for f in policy.error_findings(cfg, [health(0.3)], {"4"})] == [
        ("critical", "rollback")
    ]
    assert [(f.severity, f.action) for f in policy.error_findings(cfg, [health(0.3)], set())] == [("high", "alert")]
    assert [(f.severity, f.action) for f in policy.error_findings(cfg, [health(0.02)], set())] == [("medium", "alert")]


def test_the_cool_down_holds_an_action_back_and_says_why(cfg):
    finding = policy.quality_findings(cfg, [_q("3", "stable", "7d", (-0.1, -0.15, -0.05))], set())
    at = T0 + 30 * H
    first = policy.decide(cfg, at, finding, [], None)
    assert (first.severity, first.action, first.cooldown) == ("high", "retrain", None)
    held = policy.decide(cfg, at + H, finding, [{"at": at, "action": "retrain"}], None)
    assert (held.severity, held.wanted, held.action) == ("high", "retrain", "none")
    assert "cool-down" in held.reason and at.isoformat() in held.cooldown
    later = policy.decide(
        cfg, at + timedelta(hours=cfg.monitoring.cooldown_hours) + H, finding, [{"at": at, "action": "retrain"}], None
    )
    assert later.action == "retrain"
    # a different action is not held back by the cool-down of another
    assert policy.decide(cfg, at + H, finding, [{"at": at, "action": "alert"}], None).action == "retrain"


def test_a_rollback_without_a_target_becomes_a_retrain_and_nothing_firing_is_none(cfg):
    critical = policy.quality_findings(cfg, [_q("4", "canary", "7d", (-0.1, -0.15, -0.05))], {"4"})
    assert policy.decide(cfg, T0, critical, [], "3").action == "rollback"
    assert policy.decide(cfg, T0, critical, [], "3").rollback_target == "3"
    fallback = policy.decide(cfg, T0, critical, [], None)
    assert fallback.action == "retrain" and "no version to roll back to" in fallback.reason
    calm = policy.decide(cfg, T0, [], [], None)
    assert (calm.severity, calm.action) == ("none", "none") and calm.reason.startswith("nothing fired")


def test_a_version_that_no_longer_serves_is_reported_but_not_acted_on(cfg):
    worse = (-0.1, -0.15, -0.05)
    retired = [_q("4", "canary", "7d", worse), _q("3", "stable", "7d", (0.0, -0.05, 0.05))]
    assert policy.quality_findings(cfg, retired, set(), serving={"3"}) == []
    assert [f.model_version for f in policy.quality_findings(cfg, retired, {"4"}, serving={"3", "4"})] == ["4"]


@pytest.mark.parametrize("value", ["9999-99-99", "yesterday", "1600-01-01", "2200-01-01T00:00:00+00:00", "\x00"])
def test_a_bad_hour_is_an_input_error_naming_the_field(value):
    from sofare.errors import InputError
    from sofare.monitoring.monitor import hour_of

    with pytest.raises(InputError, match="^start: "):
        hour_of(value, "start")


def test_an_hour_is_floored_and_made_utc():
    from sofare.monitoring.monitor import hour_of

    assert hour_of("2025-06-01T12:34:56") == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert hour_of("2025-06-01T12:34:56+02:00") == datetime(2025, 6, 1, 10, tzinfo=UTC)
