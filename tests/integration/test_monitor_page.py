"""The "SOFARE monitor" page and its Prometheus gauges, read from synthetic `monitoring_runs` rows through the
plugin's FastAPI app; the Grafana dashboard queries only what those gauges and BentoML export."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sofare.contracts import Decision, DriftResult, Finding, LiveQuality, LiveScore, ServiceHealth
from sofare.data import warehouse
from tests.conftest import logged_in

ROOT = Path(__file__).resolve().parents[2]
H0 = datetime(2024, 3, 1, 0, tzinfo=UTC)
REPORT = "reports/drift/drift-2024-03-01T02.html"
GAUGES = {
    "sofare_live_accuracy",
    "sofare_live_accuracy_ci_low",
    "sofare_live_accuracy_ci_high",
    "sofare_live_persistence_accuracy",
    "sofare_live_roc_auc",
    "sofare_live_brier",
    "sofare_live_outcomes",
    "sofare_drift_share",
    "sofare_drift_drifted_features",
    "sofare_monitor_severity",
    "sofare_monitor_action",
    "sofare_outcomes_pending",
    "sofare_variant_error_rate",
    "sofare_variant_p95_latency_seconds",
    "sofare_monitor_last_run_timestamp_seconds",
}
BENTOML = {"bentoml_service_request_total", "bentoml_service_request_duration_seconds_bucket"}


def _plugin(cfg: Any, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, cfg.root / "plugins" / "sofare_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _score(value: float, half: float = 0.05) -> LiveScore:
    return LiveScore(value=value, ci_low=round(value - half, 3), ci_high=round(value + half, 3))


def _quality(version: str, variant: str, window: str, n: int, accuracy: float | None) -> LiveQuality:
    base = {
        "model_version": version,
        "variant": variant,
        "window": window,
        "start": "x",
        "end": "y",
        "n": n,
        "pending": 3,
    }
    if accuracy is None:
        return LiveQuality(**base, status="insufficient")
    return LiveQuality(
        **base,
        status="ok",
        accuracy=_score(accuracy),
        roc_auc=_score(0.64),
        brier=_score(0.231, 0.01),
        persistence_accuracy=_score(0.52),
        always_up_accuracy=_score(0.55),
        vs_persistence=_score(accuracy - 0.52),
    )


def _row(
    hour: int, *, share: float | None, severity: str = "none", action: str = "none", ran_late: int = 0
) -> dict[str, Any]:
    """One monitor run of hour H0 + hour: v1 stable measured in 24h (ok) and 7d; v2 canary always insufficient."""
    at = H0 + timedelta(hours=hour)
    quality = [
        _quality("v1", "stable", "24h", 60 + hour, 0.60 + hour / 100),
        _quality("v1", "stable", "7d", 150, 0.58),
        _quality("v2", "canary", "24h", 12, None),
    ]
    drift = DriftResult(
        status="ok" if share is not None else "insufficient",
        model_version="v1",
        reference_rows=1000,
        current_rows=168,
        columns=10,
        drifted_columns=4 if share else 0,
        share=share,
        drifted=("rsi_14", "vol_24h", "ret_1", "macd") if share else (),
        report=REPORT if hour == 2 else None,
    )
    service = [
        ServiceHealth(
            variant="stable", model_version="v1", requests=1000, server_errors=2, error_rate=0.002, p95_ms=12.5 + hour
        ),
        ServiceHealth(
            variant="canary", model_version="v2", requests=100, server_errors=3, error_rate=0.03, p95_ms=20.0
        ),
    ]
    findings = (
        (
            Finding(
                rule="drift", severity="low", action="alert", model_version="v1", message="drifted share 0.40 >= 0.3"
            ),
        )
        if severity != "none"
        else ()
    )
    reason = "drifted share 0.40 >= 0.3 <on v1>" if severity != "none" else "nothing fired"
    decision = Decision(severity=severity, action=action, wanted=action, reason=reason, findings=findings)
    return {
        "run_id": f"run-{hour}-{ran_late}",
        "at": at,
        "ran_at": at + timedelta(minutes=5 + ran_late),
        "actor": "test",
        "outcomes_filled": 5,
        "outcomes_pending": 7,
        "quality": "[" + ",".join(q.model_dump_json() for q in quality) + "]",
        "drift": drift.model_dump_json(),
        "drift_share": share,
        "service": "[" + ",".join(s.model_dump_json() for s in service) + "]",
        "severity": severity,
        "action": action,
        "reason": reason,
        "decision": decision.model_dump_json(),
    }


@pytest.fixture
def runs(cfg: Any) -> Any:
    """Three hours monitored, the last one twice (the later rerun wins), and its Evidently report on disk."""
    engine = warehouse.get_engine(cfg)
    warehouse.metadata.create_all(engine)
    rows = [
        _row(0, share=None),
        _row(1, share=0.1),
        _row(2, share=0.9, severity="high", action="retrain"),  # superseded by the rerun below
        _row(2, share=0.4, severity="low", action="alert", ran_late=30),
    ]
    with warehouse.transaction(engine) as conn:
        conn.execute(sa.insert(warehouse.monitoring_runs), rows)
    report = cfg.var_dir / REPORT
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<html><body>Evidently data drift report</body></html>")
    return cfg


def test_monitor_page_shows_charts_and_the_latest_run(runs):
    client = logged_in(_plugin(runs, "sofare_plugin_monitor"))
    page = client.get("/monitor")
    assert page.status_code == 200 and "<title>SOFARE monitor</title>" in page.text
    text = page.text
    assert text.count("<svg") == 3  # accuracy, drift, serving
    assert "Live accuracy, 24h window" in text and "v1 stable accuracy" in text and "v1 stable persistence" in text
    assert "v2 canary accuracy" in text  # drawn as a gap: no number, but the pair is on the chart
    assert "3 monitored hours" in text  # the rerun of hour 2 replaces it
    assert 'class="sev-low">low</span>' in text and "<td>alert</td>" in text
    assert "drifted share 0.40 &gt;= 0.3 &lt;on v1&gt;" in text  # the reason, escaped
    assert "0.620 [0.570, 0.670]" in text  # v1 stable 24h accuracy at hour 2
    assert "0.520 [0.470, 0.570]" in text  # its persistence
    assert "insufficient (n=12)" in text
    assert "rsi_14, vol_24h, ret_1, macd" in text and "0.400 (4/10)" in text
    assert "<td>0.0300</td>" in text and "<td>14.5</td>" in text  # canary 5xx share, stable p95
    href = re.search(r'Latest Evidently report: <a href="([^"]+)"', text).group(1)
    assert urllib.parse.urljoin("/sofare/monitor", href).startswith("/sofare/reports/drift/")
    assert "Evidently data drift report" in client.get(urllib.parse.urljoin("/monitor", href)).text
    assert "<script" not in text and not re.search(r'(src|href)="(https?:)?//', text)  # works offline
    (runs.var_dir / REPORT).unlink()  # pruned (monitoring.reports_kept): no dead link
    assert "No Evidently report on disk yet" in client.get("/monitor").text


def test_metrics_are_the_latest_run_as_gauges(runs):
    client = TestClient(_plugin(runs, "sofare_plugin_metrics").app)  # no login: Prometheus scrapes it
    answer = client.get("/monitor/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    families = {name for name, _ in samples}
    assert families == GAUGES
    stable_24h = (("model_version", "v1"), ("variant", "stable"), ("window", "24h"))
    canary_24h = (("model_version", "v2"), ("variant", "canary"), ("window", "24h"))
    assert samples[("sofare_live_accuracy", stable_24h)] == pytest.approx(0.62)
    assert samples[("sofare_live_accuracy_ci_low", stable_24h)] == pytest.approx(0.57)
    assert samples[("sofare_live_accuracy_ci_high", stable_24h)] == pytest.approx(0.67)
    assert samples[("sofare_live_persistence_accuracy", stable_24h)] == pytest.approx(0.52)
    assert samples[("sofare_live_brier", stable_24h)] == pytest.approx(0.231)
    assert samples[("sofare_live_outcomes", stable_24h)] == 62
    assert samples[("sofare_live_outcomes", canary_24h)] == 12  # the sample size is known...
    assert not [k for k in samples if k[1] == canary_24h and k[0] != "sofare_live_outcomes"]  # ...nothing else
    assert samples[("sofare_drift_share", ())] == pytest.approx(0.4)
    assert samples[("sofare_drift_drifted_features", ())] == 4
    assert samples[("sofare_monitor_severity", ())] == 1
    assert {dict(k[1])["action"]: v for k, v in samples.items() if k[0] == "sofare_monitor_action"} == {
        "none": 0,
        "alert": 1,
        "retrain": 0,
        "rollback": 0,
    }
    assert samples[("sofare_outcomes_pending", ())] == 7
    assert samples[("sofare_variant_error_rate", (("model_version", "v2"), ("variant", "canary")))] == 0.03
    assert samples[
        ("sofare_variant_p95_latency_seconds", (("model_version", "v1"), ("variant", "stable")))
    ] == pytest.approx(0.0145)
    last_run = (H0 + timedelta(hours=2, minutes=35)).timestamp()  # the rerun's wall clock
    assert samples[("sofare_monitor_last_run_timestamp_seconds", ())] == last_run


@pytest.mark.parametrize("schema", [True, False], ids=["empty table", "no table"])
def test_no_runs_yet_renders_a_page_that_says_so(cfg, schema):
    if schema:
        warehouse.metadata.create_all(warehouse.get_engine(cfg))
    client = logged_in(_plugin(cfg, f"sofare_plugin_empty_{schema}"))
    page = client.get("/monitor")
    assert page.status_code == 200 and "No monitor runs yet" in page.text and "<svg" not in page.text
    metrics = client.get("/monitor/metrics")
    assert metrics.status_code == 200 and list(text_string_to_metric_families(metrics.text)) == []


def test_monitor_is_in_the_navigation():
    from airflow import plugins_manager

    plugins, _ = plugins_manager._get_plugins()
    views = next(p for p in plugins if p.name == "sofare").external_views
    assert any({"name": "SOFARE monitor", "href": "/sofare/monitor"}.items() <= view.items() for view in views)


def test_grafana_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "sofare.json").read_text())
    assert dashboard["schemaVersion"] >= 36
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in dashboard["templating"]["list"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queried = {name for expr in exprs for name in re.findall(r"\b(?:sofare|bentoml)_[a-z0-9_]+", expr)}
    assert queried == GAUGES | BENTOML
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provisioning = ROOT / "docker" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["uid"] == "prometheus" and datasource["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "sofare.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_prometheus_scrapes_both_variants_and_the_monitor():
    path = ROOT / "docker" / "prometheus" / "prometheus.yml"
    jobs = {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}
    serving = {t: c["labels"]["variant"] for c in jobs["sofare-serving"]["static_configs"] for t in c["targets"]}
    assert serving == {"serving-stable:3000": "stable", "serving-canary:3001": "canary"}
    assert jobs["sofare-monitor"]["metrics_path"] == "/sofare/monitor/metrics"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: the config was checked as YAML only")
    done = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
