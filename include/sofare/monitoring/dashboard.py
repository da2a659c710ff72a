"""Look, don't read: the monitor's history as charts and its latest run as a table (the "SOFARE monitor"
plugin page), and the latest run as Prometheus gauges (what production's Prometheus and Grafana read).

Everything comes from `monitoring_runs`, computed by the monitor: this module measures nothing itself.
Charts are inline SVG rendered by matplotlib (no JavaScript, no CDN: the page works offline). Windows
without enough outcomes are gaps in a chart and absent from the gauges, never drawn or exported as a
number. matplotlib and prometheus_client are imported inside the functions that use them.
"""

from __future__ import annotations

import html
import io
import logging
import math
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError

from sofare.contracts import (
    ACTIONS,
    SEVERITIES,
    Decision,
    DriftResult,
    LiveQuality,
    LiveScore,
    MonitorRun,
    ServiceHealth,
)
from sofare.data import warehouse

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from sqlalchemy.engine import Engine

    from sofare.config import Config

log = logging.getLogger(__name__)

DEFAULT_DAYS = 30
MAX_RUNS = 2000  # a month of hourly runs is 720; the cap keeps a misconfigured schedule from flooding the page
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format
_QUALITY = TypeAdapter(tuple[LiveQuality, ...])
_SERVICE = TypeAdapter(tuple[ServiceHealth, ...])
NAN = float("nan")


class Run(MonitorRun):
    """One `monitoring_runs` row: what the run recorded (its `MonitorRun`, JSON columns parsed back), the hour as a
    datetime, when it ran, and the drift share it judged."""

    # the hour parsed back to a datetime: a narrower field than MonitorRun's ISO string (a Run is never handed on as
    # a MonitorRun; splitting the contract in two for the type checker would duplicate its fields)
    at: datetime  # type: ignore[assignment]
    ran_at: datetime
    drift_share: float | None = None

    @property
    def severity(self) -> str:
        return self.decision.severity

    @property
    def action(self) -> str:
        return self.decision.action

    @property
    def reason(self) -> str:
        return self.decision.reason


@dataclass(frozen=True)
class AccuracySeries:
    """Live accuracy of one model version and variant in one window, one point per run (NaN: a gap)."""

    model_version: str
    variant: str
    window: str
    at: tuple[datetime, ...]
    value: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    persistence: tuple[float, ...]
    n: tuple[int | None, ...]  # None: the pair was not measured in that run


@dataclass(frozen=True)
class ServiceSeries:
    """One variant's traffic per run, whichever version served it (NaN: unreachable or no requests)."""

    variant: str
    at: tuple[datetime, ...]
    p95_ms: tuple[float, ...]
    error_rate: tuple[float, ...]
    requests: tuple[float, ...]


@dataclass(frozen=True)
class Dashboard:
    """What the page shows: the runs in time order and the series drawn from them."""

    runs: tuple[Run, ...]
    window: str | None  # the quality window charted (the shortest one measured)
    accuracy: tuple[AccuracySeries, ...]
    service: tuple[ServiceSeries, ...]
    table_exists: bool = True

    @property
    def latest(self) -> Run | None:
        return self.runs[-1] if self.runs else None


# --- reading ------------------------------------------------------------------------------------------


def _has_table(engine: Engine) -> bool:
    return sa.inspect(engine).has_table(warehouse.monitoring_runs.name)


def _parse(row: Any) -> Run | None:
    """A row back into contracts; a row an older or newer monitor wrote differently is skipped, not fatal."""
    try:
        return Run(
            run_id=row.run_id,
            at=row.at,
            ran_at=row.ran_at,
            drift_share=row.drift_share,
            outcomes_filled=row.outcomes_filled,
            outcomes_pending=row.outcomes_pending,
            quality=_QUALITY.validate_json(row.quality),
            drift=DriftResult.model_validate_json(row.drift),
            service=_SERVICE.validate_json(row.service),
            decision=Decision.model_validate_json(row.decision),
        )
    except (ValidationError, ValueError) as exc:
        log.warning("monitoring_runs row %s does not match the contracts, skipped: %s", row.run_id, exc)
        return None


def _one_per_hour(runs: Iterable[Run]) -> list[Run]:
    """A rerun of an hour replaces it: keep the latest wall-clock run per monitored hour, in time order."""
    by_hour: dict[datetime, Run] = {}
    for run in runs:
        if run.at not in by_hour or run.ran_at > by_hour[run.at].ran_at:
            by_hour[run.at] = run
    return [by_hour[at] for at in sorted(by_hour)]


def read_runs(cfg: Config, days: int = DEFAULT_DAYS, limit: int = MAX_RUNS) -> tuple[list[Run], bool]:
    """The runs of the last `days` of monitored time (ending at the latest `at`, so a replay of history
    shows too), at most `limit`, oldest first; and whether the table exists at all."""
    engine = warehouse.get_engine(cfg)
    if not _has_table(engine):
        return [], False
    t = warehouse.monitoring_runs
    with engine.connect() as conn:
        last = conn.execute(sa.select(sa.func.max(t.c.at))).scalar()
        if last is None:
            return [], True
        rows = conn.execute(
            sa.select(t)
            .where(t.c.at > last - timedelta(days=days))
            .order_by(t.c.at.desc(), t.c.ran_at.desc())
            .limit(limit)
        ).all()
    return _one_per_hour(run for run in map(_parse, rows) if run is not None), True


def latest_run(cfg: Config) -> Run | None:
    """The most recent monitored hour's latest run (what the gauges export), or None."""
    engine = warehouse.get_engine(cfg)
    if not _has_table(engine):
        return None
    t = warehouse.monitoring_runs
    with engine.connect() as conn:
        for row in conn.execute(sa.select(t).order_by(t.c.at.desc(), t.c.ran_at.desc()).limit(5)):
            run = _parse(row)
            if run is not None:
                return run
    return None


# --- series -------------------------------------------------------------------------------------------


def _v(score: LiveScore | None, field: str = "value") -> float:
    return NAN if score is None else float(getattr(score, field))


def _variant_order(variant: str) -> tuple[int, str]:
    """stable before canary, so each keeps its colour from chart to chart."""
    return ({"stable": 0, "canary": 1}.get(variant, 2), variant)


def _window_hours(cfg: Config, window: str) -> float:
    return cfg.monitoring.windows.get(window, math.inf)


def shortest_window(cfg: Config, runs: Sequence[Run]) -> str | None:
    """The shortest configured window the runs measured (the most responsive line to chart)."""
    seen = {q.window for run in runs for q in run.quality}
    return min(seen, key=lambda w: (_window_hours(cfg, w), w)) if seen else None


def accuracy_series(runs: Sequence[Run], window: str) -> list[AccuracySeries]:
    """Per (version, variant), a point for every run: NaN where insufficient or not measured."""
    pairs = sorted(
        {(q.model_version, q.variant) for run in runs for q in run.quality if q.window == window},
        key=lambda p: (p[0], _variant_order(p[1])),
    )
    out = []
    for version, variant in pairs:
        points = []
        for run in runs:
            q = next(
                (q for q in run.quality if (q.model_version, q.variant, q.window) == (version, variant, window)), None
            )
            acc = pers = None
            if q is not None and q.status == "ok":
                acc, pers = q.accuracy, q.persistence_accuracy
            points.append((_v(acc), _v(acc, "ci_low"), _v(acc, "ci_high"), _v(pers), q.n if q else None))
        value, low, high, persistence, n = zip(*points)  # a pair exists only if some run measured it
        out.append(
            AccuracySeries(version, variant, window, tuple(r.at for r in runs), value, low, high, persistence, n)
        )
    return out


def service_series(runs: Sequence[Run]) -> list[ServiceSeries]:
    """Per variant, a point for every run (the version serving it may change along the line)."""
    variants = sorted({s.variant for run in runs for s in run.service}, key=_variant_order)
    out = []
    for variant in variants:
        p95, errors, requests = [], [], []
        for run in runs:
            s = next((s for s in run.service if s.variant == variant and s.status == "ok"), None)
            p95.append(NAN if s is None or s.p95_ms is None else s.p95_ms)
            errors.append(NAN if s is None or s.error_rate is None else s.error_rate)
            requests.append(NAN if s is None else s.requests)
        out.append(ServiceSeries(variant, tuple(r.at for r in runs), tuple(p95), tuple(errors), tuple(requests)))
    return out


def load(cfg: Config, days: int = DEFAULT_DAYS, limit: int = MAX_RUNS) -> Dashboard:
    runs, exists = read_runs(cfg, days, limit)
    window = shortest_window(cfg, runs)
    return Dashboard(
        tuple(runs), window, tuple(accuracy_series(runs, window)) if window else (), tuple(service_series(runs)), exists
    )


# --- charts ---------------------------------------------------------------------------------------------


def _figure(rows: int = 1, height: float = 3.2) -> tuple[Figure, Any]:
    """A figure on the Agg canvas, without pyplot: no global state in the API server's threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _dates(ax: Any) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.grid(True, alpha=0.3)


def _svg(fig: Figure) -> str:
    """The figure as an inline <svg> element: text stays text, no XML prolog, no timestamp."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def accuracy_chart(series: Sequence[AccuracySeries], window: str) -> str:
    """Accuracy per version and variant with its CI band, persistence dashed in the same colour."""
    fig, (ax,) = _figure()
    colors = [f"C{i % 10}" for i in range(len(series))]
    for s, color in zip(series, colors):
        label = f"{s.model_version} {s.variant}"
        shown = [not math.isnan(v) for v in s.value]
        ax.fill_between(s.at, s.ci_low, s.ci_high, where=shown, color=color, alpha=0.18, linewidth=0, interpolate=False)
        ax.plot(s.at, s.value, color=color, marker="o", markersize=2.5, linewidth=1.4, label=f"{label} accuracy")
        ax.plot(s.at, s.persistence, color=color, linestyle="--", linewidth=1.0, label=f"{label} persistence")
    ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle=":", label="coin (0.5)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Live accuracy, {window} window, 95% CI band (gaps: insufficient outcomes)", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    _dates(ax)
    return _svg(fig)


def drift_chart(runs: Sequence[Run], thresholds: dict[str, float]) -> str:
    """Drifted share of the hourly (micro) input features per measuring run (drift runs every few hours), against
    the severity thresholds it is judged by."""
    fig, (ax,) = _figure(height=2.8)
    measured = [r for r in runs if r.drift_share is not None]
    ax.plot(
        [r.at for r in measured],
        [r.drift_share for r in measured],
        color="C0",
        marker="o",
        markersize=2.5,
        linewidth=1.4,
        label="drifted share (hourly features)",
    )
    for (level, value), color in zip(thresholds.items(), ("#d4a017", "#e67e22", "#c0392b")):
        ax.axhline(value, color=color, linestyle="--", linewidth=0.9, label=f"{level} ≥ {value:g}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of features")
    ax.set_title("Input drift (Evidently, served inputs vs the version's reference)", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    _dates(ax)
    return _svg(fig)


def service_chart(series: Sequence[ServiceSeries]) -> str:
    """p95 latency and 5xx share per variant, since each previous monitor run."""
    fig, (latency, errors) = _figure(rows=2, height=2.6)
    for i, s in enumerate(series):
        latency.plot(s.at, s.p95_ms, color=f"C{i}", marker="o", markersize=2.5, label=s.variant)
        errors.plot(s.at, s.error_rate, color=f"C{i}", marker="o", markersize=2.5, label=s.variant)
    latency.set_ylabel("p95 latency (ms)")
    latency.set_title("Serving per variant (gaps: unreachable or no requests)", fontsize=10)
    errors.set_ylabel("5xx share")
    errors.set_ylim(bottom=0)
    for ax in (latency, errors):
        if series:
            ax.legend(fontsize=7, loc="upper left")
        _dates(ax)
    return _svg(fig)


# --- the latest run as tables ---------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def fmt_score(score: LiveScore | None) -> str:
    if score is None:
        return "–"
    return f"{score.value:.3f} [{score.ci_low:.3f}, {score.ci_high:.3f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are already escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def quality_rows(cfg: Config, quality: Sequence[LiveQuality]) -> list[list[str]]:
    ordered = sorted(
        quality, key=lambda q: (q.model_version, _variant_order(q.variant), _window_hours(cfg, q.window), q.window)
    )
    rows = []
    for q in ordered:
        head = [_e(q.model_version), _e(q.variant), _e(q.window), str(q.n), str(q.pending)]
        if q.status != "ok":
            rows.append([*head, f'<span class="insufficient">insufficient (n={q.n})</span>', "", "", "", "", ""])
            continue
        rows.append(
            [
                *head,
                fmt_score(q.accuracy),
                fmt_score(q.persistence_accuracy),
                fmt_score(q.always_up_accuracy),
                fmt_score(q.vs_persistence),
                fmt_score(q.roc_auc),
                fmt_score(q.brier),
            ]
        )
    return rows


def report_href(report: str | None) -> str | None:
    """The page-relative link of an Evidently report stored under var/reports (served at /sofare/reports)."""
    if not report:
        return None
    parts = PurePosixPath(report).parts
    if len(parts) < 2 or parts[0] != "reports" or ".." in parts:
        return None
    return "reports/" + "/".join(urllib.parse.quote(p) for p in parts[1:])


def latest_report(cfg: Config, runs: Sequence[Run]) -> tuple[Run, str] | None:
    """The newest run whose Evidently report is still on disk (old ones are pruned), with its link."""
    for run in reversed(runs):
        href = report_href(run.drift.report)
        if href and run.drift.report and (cfg.var_dir / run.drift.report).is_file():
            return run, href
    return None


def _summary_html(run: Run) -> str:
    d = run.decision
    summary = _table(
        ["monitored hour", "ran at", "severity", "action", "wanted", "reason", "outcomes filled", "outcomes pending"],
        [
            [
                _e(run.at.isoformat()),
                _e(run.ran_at.isoformat(timespec="seconds")),
                f'<span class="sev-{_e(run.severity)}">{_e(run.severity)}</span>',
                _e(run.action),
                _e(d.wanted),
                _e(run.reason),
                str(run.outcomes_filled),
                str(run.outcomes_pending),
            ]
        ],
    )
    cooldown = f"<p>Held back by the cool-down: {_e(d.cooldown)}</p>" if d.cooldown else ""
    findings = (
        _table(
            ["rule", "severity", "action", "version", "variant", "message"],
            (
                [
                    _e(f.rule),
                    _e(f.severity),
                    _e(f.action),
                    _e(f.model_version or ""),
                    _e(f.variant or ""),
                    _e(f.message),
                ]
                for f in d.findings
            ),
        )
        if d.findings
        else "<p>No rule fired.</p>"
    )
    return f"{summary}{cooldown}<h3>Findings</h3>{findings}"


def _drift_score(score: float | None, drifted: bool | None) -> str:
    return "–" if score is None else f"{score:.3g}" + (" drifted" if drifted else "")


def _drift_html(cfg: Config, run: Run, runs: Sequence[Run]) -> str:
    drift = run.drift
    share = "–" if drift.share is None else f"{drift.share:.3f} ({drift.drifted_columns}/{drift.columns})"
    share += "".join(f"<br>{_e(k)} {v:.2f}" for k, v in drift.shares.items())
    table = _table(
        ["status", "version", "drifted share", "drifted features", "prediction drift", "target drift", "note"],
        [
            [
                _e(drift.status),
                _e(drift.model_version or ""),
                share,
                ", ".join(_e(f) for f in drift.drifted) or "none",
                _drift_score(drift.prediction_drift, drift.prediction_drifted),
                _drift_score(drift.target_drift, drift.target_drifted),
                _e(drift.message),
            ]
        ],
        "drift",
    )
    found = latest_report(cfg, runs)
    if found is None:
        return f'{table}<p class="report">No Evidently report on disk yet.</p>'
    report_run, href = found
    return (
        f'{table}<p class="report">Latest Evidently report: <a href="{_e(href)}">{_e(report_run.drift.report)}'
        f"</a> (hour {_e(report_run.at.isoformat())})</p>"
    )


def _service_html(run: Run) -> str:
    if not run.service:
        return "<p>No serving variant scraped.</p>"
    rows = (
        [
            _e(s.variant),
            _e(s.model_version),
            _e(s.status),
            f"{s.requests:g}",
            "–" if s.error_rate is None else f"{s.error_rate:.4f}",
            "–" if s.p95_ms is None else f"{s.p95_ms:.1f}",
        ]
        for s in sorted(run.service, key=lambda s: _variant_order(s.variant))
    )
    return _table(["variant", "version", "status", "requests", "5xx share", "p95 ms"], rows, "service")


def latest_html(cfg: Config, dash: Dashboard) -> str:
    """The latest run as tables: what was decided and why, then the numbers it was decided on."""
    run = dash.latest
    if run is None:
        return ""
    quality = (
        _table(
            [
                "version",
                "variant",
                "window",
                "n",
                "pending",
                "accuracy [95% CI]",
                "persistence",
                "always up",
                "vs persistence",
                "ROC-AUC",
                "Brier",
            ],
            quality_rows(cfg, run.quality),
            "quality",
        )
        if run.quality
        else "<p>No predictions in any window.</p>"
    )
    return (
        f"<h2>Latest run</h2>{_summary_html(run)}<h3>Live quality</h3>{quality}"
        f"<h3>Drift</h3>{_drift_html(cfg, run, dash.runs)}<h3>Serving</h3>{_service_html(run)}"
    )


def render(cfg: Config, dash: Dashboard) -> str:
    """The page body: the latest run's tables, then the charts over the runs shown."""
    if not dash.runs:
        why = "" if dash.table_exists else " (the monitoring_runs table does not exist yet)"
        return f'<p class="empty">No monitor runs yet{_e(why)}: sofare_monitor has not written any.</p>'
    first, last = dash.runs[0].at, dash.runs[-1].at
    parts = [
        f"<p>{len(dash.runs)} monitored hours, {_e(first.isoformat())} to {_e(last.isoformat())}.</p>",
        latest_html(cfg, dash),
        "<h2>Over time</h2>",
    ]
    if dash.window and dash.accuracy:
        parts.append(f'<figure class="chart accuracy">{accuracy_chart(dash.accuracy, dash.window)}</figure>')
    parts.append(f'<figure class="chart drift">{drift_chart(dash.runs, cfg.monitoring.drift.model_dump())}</figure>')
    parts.append(f'<figure class="chart service">{service_chart(dash.service)}</figure>')
    return "".join(parts)


# --- Prometheus ----------------------------------------------------------------------------------------


def _gauges(run: Run) -> list[Any]:
    """Gauge families of one run; a metric that was not measured is left out, never reported as 0."""
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    q_labels = ("model_version", "variant", "window")
    live = {
        "accuracy": gauge("sofare_live_accuracy", "Live directional accuracy in the window", q_labels),
        "ci_low": gauge("sofare_live_accuracy_ci_low", "Lower end of the accuracy's 95% bootstrap CI", q_labels),
        "ci_high": gauge("sofare_live_accuracy_ci_high", "Upper end of the accuracy's 95% bootstrap CI", q_labels),
        "persistence": gauge("sofare_live_persistence_accuracy", "Persistence accuracy on the same hours", q_labels),
        "roc_auc": gauge("sofare_live_roc_auc", "Live ROC-AUC in the window", q_labels),
        "brier": gauge("sofare_live_brier", "Live Brier score in the window", q_labels),
        "n": gauge(
            "sofare_live_outcomes", "Hours with a known outcome in the window (also when insufficient)", q_labels
        ),
    }
    for q in run.quality:
        labels = [q.model_version, q.variant, q.window]
        live["n"].add_metric(labels, q.n)
        if q.status != "ok":
            continue
        for key, score, field in (
            ("accuracy", q.accuracy, "value"),
            ("ci_low", q.accuracy, "ci_low"),
            ("ci_high", q.accuracy, "ci_high"),
            ("persistence", q.persistence_accuracy, "value"),
            ("roc_auc", q.roc_auc, "value"),
            ("brier", q.brier, "value"),
        ):
            if score is not None and math.isfinite(getattr(score, field)):
                live[key].add_metric(labels, getattr(score, field))
    families = list(live.values())

    share = run.drift_share if run.drift_share is not None else run.drift.share
    if share is not None and math.isfinite(share):
        families.append(
            GaugeMetricFamily(
                "sofare_drift_share", "Share of the hourly input features Evidently found drifted", value=share
            )
        )
        families.append(
            GaugeMetricFamily(
                "sofare_drift_drifted_features",
                "Input features found drifted",
                value=len(run.drift.drifted) or run.drift.drifted_columns,
            )
        )
    families.append(
        GaugeMetricFamily(
            "sofare_monitor_severity",
            "Severity of the latest run: 0 none .. 4 critical",  # the index in contracts.SEVERITIES
            value=SEVERITIES.index(run.severity) if run.severity in SEVERITIES else -1,
        )
    )
    action = gauge("sofare_monitor_action", "1 for the action the latest run took, 0 for the others", ["action"])
    for name in ACTIONS:
        action.add_metric([name], 1 if run.action == name else 0)
    families.append(action)
    families.append(
        GaugeMetricFamily(
            "sofare_outcomes_pending", "Predictions whose outcome is not known yet", value=run.outcomes_pending
        )
    )
    s_labels = ("variant", "model_version")
    errors = gauge("sofare_variant_error_rate", "5xx share of a variant's requests since the previous run", s_labels)
    p95 = gauge("sofare_variant_p95_latency_seconds", "p95 latency of a variant since the previous run", s_labels)
    for s in run.service:
        if s.status != "ok":
            continue
        if s.error_rate is not None:
            errors.add_metric([s.variant, s.model_version], s.error_rate)
        if s.p95_ms is not None:
            p95.add_metric([s.variant, s.model_version], s.p95_ms / 1000)
    families += [errors, p95]
    families.append(
        GaugeMetricFamily(
            "sofare_monitor_last_run_timestamp_seconds",
            "Wall-clock time of the latest monitor run (Unix seconds)",
            value=run.ran_at.timestamp(),
        )
    )
    return [f for f in families if f.samples]


class _Collector:
    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterable[Any]:
        return iter(self._families)


def prometheus_text(cfg: Config) -> str:
    """The latest run as gauges in the Prometheus text format (empty when no monitor has run)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    run = latest_run(cfg)
    if run is None:
        return ""
    registry = CollectorRegistry(auto_describe=False)  # fresh per call: nothing process-global
    registry.register(_Collector(_gauges(run)))
    return generate_latest(registry).decode()
