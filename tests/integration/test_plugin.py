"""The Airflow plugin: registered with Airflow, and its status page reports the warehouse."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sofare import tasks
from sofare.config import load_config
from tests.conftest import logged_in


def test_plugin_is_registered_with_airflow():
    from airflow import plugins_manager

    plugins, _ = plugins_manager._get_plugins()
    sofare = [p for p in plugins if p.name == "sofare"]
    assert sofare, "plugins/sofare_plugin.py was not loaded from the plugins folder"
    assert sofare[0].fastapi_apps[0]["url_prefix"] == "/sofare"
    assert sofare[0].external_views[0]["href"] == "/sofare/status"


def test_status_page_shows_rows_and_gaps(cfg):
    for chunk in tasks.plan_backfill(load_config(), ["sample"], "2023-03-24", "2023-03-24"):
        if chunk["modality"] == "candles":
            tasks.load_chunk(load_config(), chunk)
    import importlib.util

    spec = importlib.util.spec_from_file_location("sofare_plugin", cfg.root / "plugins" / "sofare_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = logged_in(module)
    page = client.get("/status")
    assert page.status_code == 200
    assert "BTCUSDT 1h" in page.text and "gap: 2023-03-24T13:00:00+00:00 (1 missing)" in page.text
    assert client.get("/status.json").json()["candles"][0]["rows"] == 23


def test_data_docs_are_served_under_the_plugin(cfg):
    import importlib.util

    index = cfg.var_dir / "data_docs" / "index.html"
    index.parent.mkdir(parents=True)
    index.write_text("<html><body>SOFARE data docs: candles</body></html>")
    spec = importlib.util.spec_from_file_location("sofare_plugin_docs", cfg.root / "plugins" / "sofare_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = logged_in(module)
    page = client.get("/data-docs/index.html")
    assert page.status_code == 200 and "SOFARE data docs: candles" in page.text
    assert client.get("/data-docs/missing.html").status_code == 404


@pytest.mark.parametrize("path", ["/status", "/status.json", "/monitor", "/data-docs/index.html", "/reports/x.html"])
def test_every_page_needs_an_airflow_login(cfg, path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sofare_plugin_login", cfg.root / "plugins" / "sofare_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logged_in(module)
    anonymous = TestClient(module.app)
    answer = anonymous.get(path)
    assert answer.status_code == 401 and "log in to Airflow" in answer.json()["detail"]
    browser = anonymous.get(path, headers={"Accept": "text/html"}, follow_redirects=False)
    assert browser.status_code == 303 and browser.headers["location"].startswith("/auth/login?next_url=")
    forged = anonymous.get(path, headers={"Authorization": "Bearer forged"})
    assert forged.status_code == 403
    assert anonymous.get("/monitor/metrics").status_code == 200, "Prometheus scrapes the gauges without a login"
