"""Evidently drift (sofare.monitoring.drift): shifted synthetic features are flagged, the same distribution is not
(the false-alarm rate over many seeded samples is measured and printed), too few rows / constant / NaN columns are
handled, HTML reports are written and pruned, and the reference sample travels with a model directory."""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sofare.config import load_config
from sofare.contracts import META_FILE, ModelMeta
from sofare.monitoring import drift
from sofare.training import export

COLUMNS = [f"f{k}" for k in range(10)]
SHIFTED = {"f0": 0.5, "f1": 0.6, "f2": 0.8, "f3": 1.0, "f4": 0.7, "f5": 0.9}  # in standard deviations


def config(tmp_path: Path, **env: str):
    """Evidently's own defaults (K-S p-values at 0.05 up to 1,000 rows): the synthetic samples here are independent,
    which is what K-S assumes; the configured default (Wasserstein, for autocorrelated hourly features) is tested
    on its own below."""
    return load_config(
        env={
            "SOFARE_PATHS__VAR": str(tmp_path / "var"),
            "SOFARE_MONITORING__DRIFT_METHOD": "",
            "SOFARE_MONITORING__DRIFT_THRESHOLD": "",
            **env,
        }
    )


def sample(
    rng: np.random.Generator,
    rows: int,
    shift: dict[str, float] | None = None,
    prob_shift: float = 0.0,
    ret_scale: float = 1.0,
) -> pd.DataFrame:
    frame = pd.DataFrame(rng.normal(size=(rows, len(COLUMNS))), columns=COLUMNS)
    for column, sd in (shift or {}).items():
        frame[column] += sd
    frame["prob_up"] = np.clip(rng.normal(0.5 + prob_shift, 0.05, rows), 0, 1)
    frame["realised_return"] = rng.normal(0, 0.01 * ret_scale, rows)
    return frame


def test_shifted_features_are_flagged_most_drifted_first(tmp_path):
    cfg = config(tmp_path)
    rng = np.random.default_rng(7)
    reference, current = sample(rng, 1000), sample(rng, 300, SHIFTED, prob_shift=0.03, ret_scale=2.0)
    result = drift.measure(cfg, reference, current, COLUMNS, "3", None, "shifted")
    assert result.status == "ok" and result.model_version == "3"
    assert (result.reference_rows, result.current_rows, result.columns) == (1000, 300, 10)
    assert result.method == "K-S p_value"  # Evidently's default up to 1,000 reference rows
    assert set(SHIFTED) <= set(result.drifted), result.drifted
    assert result.share == result.drifted_columns / result.columns >= 0.6 >= cfg.monitoring.drift.medium
    scores = [result.scores[c] for c in result.drifted]
    assert scores == sorted(scores) and all(s < 0.05 for s in scores)  # p-values: the smallest first
    assert result.drifted[0] == "f3"  # the 1 sd shift
    assert result.prediction_drifted and result.prediction_drift < 0.05
    assert result.target_drifted and result.target_drift < 0.05
    assert result.report is None  # no report_dir: no HTML


def test_same_distribution_false_alarm_rate(tmp_path, capsys):
    """30 seeded samples of 300 served hours x 10 features against 1,000 reference rows, all N(0, 1)."""
    cfg = config(tmp_path)
    seeds, flagged, tested, dataset_medium, dataset_low, pred, target = 30, 0, 0, 0, 0, 0, 0
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        result = drift.measure(cfg, sample(rng, 1000), sample(rng, 300), COLUMNS, "1", None, f"s{seed}")
        assert result.status == "ok" and result.columns == 10
        flagged += result.drifted_columns
        tested += result.columns
        dataset_medium += result.share >= cfg.monitoring.drift.medium
        dataset_low += result.share >= cfg.monitoring.drift.low
        pred += bool(result.prediction_drifted)
        target += bool(result.target_drifted)
    rate = flagged / tested
    with capsys.disabled():
        print(
            f"\nDRIFT FALSE-ALARM RATE (same distribution, K-S at 0.05, {seeds} seeds x 10 features, 300 current vs "
            f"1000 reference rows): per column {rate:.3f} ({flagged}/{tested}); dataset drifted share >= medium "
            f"{cfg.monitoring.drift.medium}: {dataset_medium / seeds:.3f} ({dataset_medium}/{seeds}), >= low "
            f"{cfg.monitoring.drift.low}: {dataset_low / seeds:.3f} ({dataset_low}/{seeds}); prediction "
            f"{pred}/{seeds}, target {target}/{seeds}"
        )
    assert rate <= 0.10
    assert dataset_medium == 0


def test_too_few_served_hours_is_insufficient_and_writes_nothing(tmp_path):
    cfg = config(tmp_path)
    rng = np.random.default_rng(1)
    reports = cfg.var_dir / "reports" / "drift"
    result = drift.measure(
        cfg, sample(rng, 1000), sample(rng, cfg.monitoring.min_drift_rows - 1), COLUMNS, "1", reports, "few"
    )
    assert result.status == "insufficient" and result.share is None and result.report is None
    assert str(cfg.monitoring.min_drift_rows) in result.message
    assert not reports.exists() or not any(reports.iterdir())


def test_constant_nan_and_pending_columns_do_not_crash(tmp_path):
    cfg = config(tmp_path)
    rng = np.random.default_rng(2)
    reference, current = sample(rng, 1000), sample(rng, 200)
    reference["const"], current["const"] = 1.0, 1.0
    reference["gone"], current["gone"] = rng.normal(size=1000), np.nan
    current.loc[current.index[0], "f0"] = np.inf  # treated as missing
    current["realised_return"] = np.nan  # every outcome pending
    result = drift.measure(cfg, reference, current, [*COLUMNS, "const", "gone"], "1", None, "odd")
    assert result.status == "ok" and result.columns == 10 and set(result.scores) == set(COLUMNS)
    assert "const (constant (1))" in result.message and "gone (all NaN (served))" in result.message
    assert result.target_drift is None and result.target_drifted is None and "realised_return" in result.message
    assert result.prediction_drifted is not None
    only_odd = drift.measure(cfg, reference, current, ["const", "gone"], "1", None, "odd")
    assert only_odd.status == "no_data" and only_odd.share is None


def test_html_report_written_relative_to_var_and_pruned(tmp_path):
    cfg = config(tmp_path, SOFARE_MONITORING__REPORTS_KEPT="2")
    rng = np.random.default_rng(3)
    reference, current = sample(rng, 1000), sample(rng, 168, {"f0": 1.0})
    reports = cfg.var_dir / "reports" / "drift"
    reports.mkdir(parents=True)
    now = time.time()
    for k, name in enumerate(("drift-old-1.html", "drift-old-2.html", "drift-old-3.html")):
        (reports / name).write_text("old")
        os.utime(reports / name, (now - 3600 + k, now - 3600 + k))
    (reports / "notes.txt").write_text("not a report: kept")
    result = drift.measure(cfg, reference, current, COLUMNS, "4", reports, "2024-05-01T10 v4")
    assert result.report == "reports/drift/drift-2024-05-01T10-v4.html"
    page = cfg.var_dir / result.report
    text = page.read_text()
    assert "Dataset Drift" in text and "Drift is detected for 10.0% of columns (1 out of 10)" in text
    assert sorted(p.name for p in reports.iterdir()) == ["drift-2024-05-01T10-v4.html", "drift-old-3.html", "notes.txt"]
    fast = drift.measure(cfg, reference, current, COLUMNS, "4", reports, "again", html=False)
    assert fast.report is None and not (reports / "drift-again.html").exists()
    assert fast.scores == result.scores and fast.drifted == result.drifted  # the preset and ValueDrift agree
    assert fast.prediction_drift == result.prediction_drift and fast.target_drift == result.target_drift


def test_parse_reads_by_type_and_column_not_position():
    snapshot = {
        "metrics": [
            {
                "id": "b",
                "config": {
                    "type": "evidently:metric_v2:ValueDrift",
                    "column": "x",
                    "method": "K-S p_value",
                    "threshold": 0.05,
                },
                "value": 0.01,
            },
            {
                "id": "a",
                "config": {"type": "evidently:metric_v2:DriftedColumnsCount", "columns": ["x", "y"]},
                "value": {"count": 1.0, "share": 0.5},
            },
            {
                "id": "c",
                "config": {
                    "type": "evidently:metric_v2:ValueDrift",
                    "column": "y",
                    "method": "Wasserstein distance (normed)",
                    "threshold": 0.1,
                },
                "value": 0.2,
            },
            {
                "id": "d",
                "config": {"type": "evidently:metric_v2:ValueDrift", "column": "z", "method": "psi", "threshold": 0.1},
                "value": 0.05,
            },
        ],
        "tests": [  # z has no test: its verdict follows the method's direction
            {
                "metric_config": {"metric_id": "c", "params": {"type": "evidently:metric_v2:ValueDrift"}},
                "status": "FAIL",
            },
            {
                "metric_config": {"metric_id": "a", "params": {"type": "evidently:metric_v2:DriftedColumnsCount"}},
                "status": "FAIL",
            },
            {
                "metric_config": {"metric_id": "b", "params": {"type": "evidently:metric_v2:ValueDrift"}},
                "status": "SUCCESS",
            },
        ],
    }
    got = drift.parse(snapshot)
    assert set(got) == {"x", "y", "z"}
    assert (got["x"].score, got["x"].drifted) == (0.01, False)  # Evidently's test status wins
    assert (got["y"].score, got["y"].drifted, got["y"].threshold) == (0.2, True, 0.1)
    assert got["z"].drifted is False  # a distance below its threshold


def _meta(**extra) -> ModelMeta:
    return ModelMeta(
        architecture="SofareM3",
        hyper={},
        lookback=2,
        columns=("f0", "f1"),
        groups={"micro": (0,), "safe": (1,), "macro": ()},
        n_inputs={"micro": 1, "safe": 1, "macro": 0},
        loss={},
        scaler={"mean": (0.0, 0.0), "std": (1.0, 1.0), "ret_mean": 0.0, "ret_std": 1.0},
        feature_set_version="v1",
        symbol="BTCUSDT",
        interval="1h",
        horizon=1,
        warmup_bars=0,
        threshold=0.5,
        data_window={"start": "2024-01-01", "end": "2024-01-31"},
        **extra,
    )


def test_reference_round_trip_and_meta_without_it(tmp_path, monkeypatch):
    old = _meta().model_dump(mode="json")
    old.pop("reference_file")  # a meta.json written before the field existed
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / META_FILE).write_text(json.dumps(old))
    assert ModelMeta.read(tmp_path / "old").reference_file is None
    assert export.read_reference(tmp_path / "old") is None

    new = tmp_path / "new" / "artifacts" / "model"  # as an MLflow download nests it
    new.mkdir(parents=True)
    reference = sample(np.random.default_rng(4), 60)
    reference.insert(0, "open_time", pd.date_range("2024-01-29", periods=60, freq="h", tz="UTC"))
    name = export.write_reference(reference, new)
    (new / META_FILE).write_text(_meta(reference_file=name).model_dump_json())
    pd.testing.assert_frame_equal(export.read_reference(tmp_path / "new"), reference)

    from sofare.registry import versions

    downloads: list[str] = []

    def download(cfg, version):
        downloads.append(version)
        return tmp_path / ("new" if version == "7" else "old")

    monkeypatch.setattr(versions, "download", download)
    cfg = config(tmp_path)
    for _ in range(2):  # downloaded once, then read from var/monitoring/reference/
        pd.testing.assert_frame_equal(drift.load_reference(cfg, "7"), reference)
        assert drift.load_reference(cfg, "6") is None  # registered before reference samples: None, no error
    assert downloads == ["7", "6"]
    assert drift.reference_cache(cfg, "7").is_file()


def test_evidently_is_imported_inside_functions_only():
    tree = ast.parse(Path(drift.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "evidently"], names
    assert "evidently.legacy" not in Path(drift.__file__).read_text()


@pytest.mark.parametrize(
    "method, distance",
    [
        ("K-S p_value", False),
        ("ks", False),
        ("Z-test p_value", False),
        ("Wasserstein distance (normed)", True),
        ("psi", True),
        ("PSI", True),
        ("Jensen-Shannon distance", True),
        ("ed", True),
        ("Total-Variation-Distance", False),
    ],
)
def test_score_direction_of_evidently_methods(method, distance):
    assert drift._is_distance(method) is distance


def test_the_configured_wasserstein_rule_flags_real_shifts_only(tmp_path):
    """The shipped default: normed Wasserstein distance >= 0.5 (half a reference standard deviation of distribution
    distance). It does not grow with the sample or with autocorrelation the way a K-S p-value does."""
    cfg = load_config(env={"SOFARE_PATHS__VAR": str(tmp_path / "var")})
    assert (cfg.monitoring.drift_method, cfg.monitoring.drift_threshold) == ("wasserstein", 0.5)
    rng = np.random.default_rng(11)
    reference = sample(rng, 1000)
    shifted = drift.measure(
        cfg, reference, sample(rng, 168, {"f0": 1.0, "f1": 0.8, "f2": 0.2}), COLUMNS, "3", None, "w"
    )
    assert (
        "wasserstein" in shifted.method.lower() and {"f0", "f1"} <= set(shifted.drifted) and "f2" not in shifted.drifted
    )
    alarms = [
        drift.measure(cfg, reference, sample(np.random.default_rng(seed), 168), COLUMNS, "3", None, "w").drifted_columns
        for seed in range(5)
    ]
    assert alarms == [0] * 5
