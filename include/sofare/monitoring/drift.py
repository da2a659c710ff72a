"""Evidently 0.7 data drift of the served input features against a version's reference sample, plus prediction
drift (prob_up) and target drift (realised return).

The reference sample is written at training time (`sofare.training.pipeline.finalize`: the held-out test hours,
raw features at each window's last row, out-of-sample prob_up, realised return) into the model directory as
`meta.reference_file`, so it travels with the registered version. `load_reference` fetches it once per version.

`measure` runs one Evidently `Report` and reads its `snapshot.dict()`:

    {"metrics": [{"id": ..., "config": {"type": "evidently:metric_v2:ValueDrift", "column": c, "method": m,
                  "threshold": t}, "value": score}, ...,            # one per column (method/threshold resolved)
                 {"config": {"type": "evidently:metric_v2:DriftedColumnsCount", ...}, "value": {"count", "share"}}],
     "tests":   [{"metric_config": {"metric_id": <the ValueDrift's id>, "params": {"type": ...ValueDrift}},
                  "status": FAIL | SUCCESS, ...}, ...]}              # with include_tests=True

parsed by metric type and column, never by position: a column's score is its ValueDrift value (a p-value for K-S
and the other tests, a distance for Wasserstein, PSI, Jensen-Shannon, ...), whether it drifted is Evidently's own
test status for that metric. The drifted share is computed here from the per-column results (Evidently's
dataset-level test is a strict `<` on its own share).

Cost (2 CPU cores, 40 features x 168 served hours vs 1,000 reference rows): with the HTML report ~3.2 s for the
run (DataDriftPreset renders its plotly figures while it runs) + ~0.35 s to save; without it ~1.6 s (one ValueDrift
per column, the same numbers). Evidently's cold import (~3-8 s) happens in the first call, never at import time.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import pandas as pd

from sofare.contracts import DriftResult

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)
PREDICTION, TARGET = "prob_up", "realised_return"
REPORT_PREFIX = "drift-"
# Evidently's distance-like methods (drift when score >= threshold); every other method is a test's p-value
# (drift when p < threshold). Matched against the method's id or display name.
_DISTANCES = ("wasserstein", "psi", "jensen", "kl_div", "kullback", "hellinger", "energy")  # and "ed"


# --- the reference sample of a version ---------------------------------------------------------------------


def reference_cache(cfg: Config, version: str) -> Path:
    return cfg.var_dir / "monitoring" / "reference" / f"{version}.parquet"


def load_reference(cfg: Config, version: str) -> pd.DataFrame | None:
    """The drift reference sample of a registered version, downloaded once and cached under
    var/monitoring/reference/. None when the version has none (registered before reference samples were
    written); an unknown version raises the registry's NotFoundError."""
    cache = reference_cache(cfg, version)
    missing = cache.with_suffix(".none")  # the version has no reference: do not download it again
    if cache.is_file():
        return pd.read_parquet(cache)
    if missing.is_file():
        return None
    from sofare.registry import versions
    from sofare.training.export import read_reference

    frame = read_reference(versions.download(cfg, str(version)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    if frame is None:
        missing.write_text(f"model version {version} was registered without a drift reference sample\n")
        log.info("model version %s has no drift reference sample", version)
        return None
    scratch = cache.with_suffix(f".{os.getpid()}.tmp")
    frame.to_parquet(scratch, index=False)
    scratch.replace(cache)
    return frame


# --- measuring -----------------------------------------------------------------------------------------------


class _Sizes(TypedDict):
    """The fields every DriftResult of `measure` carries, whatever its status."""

    model_version: str
    reference_rows: int
    current_rows: int


@dataclass(frozen=True)
class ColumnDrift:
    score: float
    method: str
    threshold: float | None
    drifted: bool


def measure(
    cfg: Config,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: list[str],
    model_version: str,
    report_dir: Path | None,
    label: str,
    html: bool = True,
) -> DriftResult:
    """Drift of `current` (the served hours: `columns`, optionally prob_up and realised_return, NaN while
    pending) against `reference`, with Evidently. The HTML report goes to `report_dir`/drift-<label>.html when
    `report_dir` is given and `html` (the newest `monitoring.reports_kept` are kept); without it the run is about
    twice as fast and gives the same numbers."""
    m = cfg.monitoring
    base: _Sizes = {"model_version": model_version, "reference_rows": len(reference), "current_rows": len(current)}
    if len(reference) == 0:
        return DriftResult(status="no_reference", **base, message="the reference sample is empty")
    if len(current) < m.min_drift_rows:
        return DriftResult(
            status="insufficient",
            **base,
            message=f"{len(current)} served hours < min_drift_rows {m.min_drift_rows}: drift not measured",
        )
    notes: list[str] = []
    wanted = list(dict.fromkeys([*columns, PREDICTION, TARGET]))
    ref, cur = _numeric(reference, wanted), _numeric(current, wanted)
    features = _testable(ref, cur, list(dict.fromkeys(columns)), m.min_drift_rows, notes, "feature")
    extras = _testable(ref, cur, [PREDICTION, TARGET], m.min_drift_rows, notes, None)
    if not features:
        return DriftResult(status="no_data", **base, message="; ".join(["no feature could be tested", *notes]))
    save = html and report_dir is not None
    try:
        snapshot = _run(cfg, ref[features + extras], cur[features + extras], features, extras, preset=save)
    except ValueError as exc:  # Evidently's charts (only drawn for the HTML) fail on some degenerate value ranges
        if not save:
            raise
        log.warning("Evidently could not draw the drift report, measured without it: %s", exc)
        notes.append(f"HTML report not written (Evidently could not draw it: {exc})")
        save = False
        snapshot = _run(cfg, ref[features + extras], cur[features + extras], features, extras, preset=False)
    found = parse(snapshot.dict())
    lost = [c for c in features + extras if c not in found]
    if lost:  # never expected: Evidently reported no ValueDrift for them
        notes.append(f"Evidently returned no drift for {', '.join(lost)}")
    per = {c: found[c] for c in features if c in found}
    drifted = sorted((c for c, d in per.items() if d.drifted), key=lambda c: (_strength(per[c]), c))
    methods = pd.Series([d.method for d in per.values()]).value_counts()
    if len(methods) > 1:
        notes.append(
            "methods differ by column (scores not comparable across them): "
            + ", ".join(f"{name} x{n}" for name, n in methods.items())
        )
    report = _save(cfg, snapshot, report_dir, label) if save and report_dir is not None else None
    pred, target = found.get(PREDICTION), found.get(TARGET)
    return DriftResult(
        status="ok",
        **base,
        method=" / ".join(methods.index) if len(methods) else None,
        columns=len(per),
        drifted_columns=len(drifted),
        share=len(drifted) / len(per) if per else None,
        drifted=tuple(drifted),
        scores={c: d.score for c, d in per.items() if np.isfinite(d.score)},
        prediction_drift=_finite(pred.score) if pred else None,
        prediction_drifted=pred.drifted if pred else None,
        target_drift=_finite(target.score) if target else None,
        target_drifted=target.drifted if target else None,
        report=report,
        message="; ".join(notes),
    )


def _numeric(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The named columns that are there, as floats (inf and anything unreadable: NaN)."""
    out = pd.DataFrame({c: pd.to_numeric(frame[c], errors="coerce") for c in names if c in frame}, dtype=float)
    return out.replace([np.inf, -np.inf], np.nan).reset_index(drop=True)


def _constant(values: pd.Series) -> bool:
    """One value, up to float noise (a spread below 1e-9 of its magnitude: histograms cannot bin it)."""
    spread = float(values.max() - values.min())
    return spread <= 1e-9 * max(1.0, float(values.abs().max()))


def _testable(
    ref: pd.DataFrame, cur: pd.DataFrame, columns: list[str], min_rows: int, notes: list[str], kind: str | None
) -> list[str]:
    """The columns Evidently can test; why each of the others is left out goes into `notes`. Features must be
    there; prob_up and realised_return (kind None) are optional."""
    out, why = [], {}
    for c in columns:
        if c not in ref or c not in cur:
            if kind:
                why[c] = "missing from the " + ("reference" if c not in ref else "served inputs")
            continue
        r, s = ref[c].dropna(), cur[c].dropna()
        if len(s) < min_rows or len(r) < min_rows:
            side, n = ("served", len(s)) if len(s) < min_rows else ("reference", len(r))
            why[c] = f"all NaN ({side})" if n == 0 else f"{n} {side} values < {min_rows}"
        elif _constant(pd.concat([r, s])):
            why[c] = f"constant ({r.iloc[0]:g})"
        else:
            out.append(c)
    if why:
        what = f"{kind}s left out" if kind else "not measured"
        notes.append(f"{what}: " + ", ".join(f"{c} ({reason})" for c, reason in why.items()))
    return out


def _run(
    cfg: Config, reference: pd.DataFrame, current: pd.DataFrame, features: list[str], extras: list[str], preset: bool
) -> Any:
    """One Evidently report: DataDriftPreset over the features (for the HTML) or one ValueDrift per feature, plus
    ValueDrift of prob_up and realised_return; tests included (each column's drift verdict)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    m = cfg.monitoring
    how = {"method": m.drift_method, "threshold": m.drift_threshold}
    metrics: list[Any] = (
        [DataDriftPreset(columns=features, drift_share=m.drift.medium, **how)]
        if preset
        else [ValueDrift(column=c, **how) for c in features]
    )
    metrics += [ValueDrift(column=c, **how) for c in extras]
    definition = DataDefinition(numerical_columns=features + extras)
    return Report(metrics, include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )


def parse(snapshot: dict[str, Any]) -> dict[str, ColumnDrift]:
    """Per column: the ValueDrift score, its (resolved) method and threshold, and Evidently's drift verdict (the
    status of the test bound to that metric; by the method's direction when no test came back)."""
    status: dict[str, bool] = {}
    for test in snapshot.get("tests") or []:
        config = test.get("metric_config") or {}
        if str((config.get("params") or {}).get("type", "")).endswith("ValueDrift") and "metric_id" in config:
            value = test.get("status")
            status[config["metric_id"]] = str(getattr(value, "value", value)).upper() in ("FAIL", "WARNING")
    out = {}
    for metric in snapshot.get("metrics") or []:
        config = metric.get("config") or {}
        if not str(config.get("type", "")).endswith("ValueDrift") or "column" not in config:
            continue
        value = metric.get("value")
        score = float(value.get("value", np.nan) if isinstance(value, dict) else value)
        method = str(config.get("method") or "")
        threshold = config.get("threshold")
        threshold = None if threshold is None else float(threshold)
        drifted = status.get(metric.get("id", ""))
        if drifted is None:
            drifted = (
                threshold is not None
                and np.isfinite(score)
                and (score >= threshold if _is_distance(method) else score < threshold)
            )
        out[str(config["column"])] = ColumnDrift(score, method, threshold, bool(drifted))
    return out


def _is_distance(method: str) -> bool:
    name = method.strip().lower()
    return name == "ed" or any(d in name for d in _DISTANCES)


def _strength(d: ColumnDrift) -> float:
    """Sort key, most drifted first: a small p-value, a large distance."""
    if not np.isfinite(d.score):
        return np.inf
    return -d.score if _is_distance(d.method) else d.score


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# --- HTML reports --------------------------------------------------------------------------------------------


def _save(cfg: Config, snapshot: Any, report_dir: Path, label: str) -> str:
    """Save the HTML, keep the newest `monitoring.reports_kept`; its path relative to var/ (absolute when the
    directory is elsewhere)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"{REPORT_PREFIX}{re.sub(r'[^A-Za-z0-9._-]+', '-', label).strip('-') or 'report'}.html"
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    snapshot.save_html(str(scratch))
    scratch.replace(path)
    prune(report_dir, cfg.monitoring.reports_kept, keep=path)
    try:
        return str(path.relative_to(cfg.var_dir))
    except ValueError:
        return str(path)


def prune(report_dir: Path, kept: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest `kept` drift reports (by modification time) in `report_dir`; those deleted."""

    def age(p: Path) -> tuple[int, str]:
        try:
            return p.stat().st_mtime_ns, p.name
        except FileNotFoundError:
            return 0, p.name

    reports = sorted(report_dir.glob(f"{REPORT_PREFIX}*.html"), key=age, reverse=True)
    if keep is not None and keep in reports:  # the report just written stays, whatever the clock says
        reports.remove(keep)
        reports.insert(0, keep)
    gone = reports[kept:]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
