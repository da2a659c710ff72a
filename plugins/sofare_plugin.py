"""SOFARE inside Airflow's UI, linked from the navigation bar: a warehouse status page (rows,
ranges, gaps per table) under /sofare/status and the Great Expectations Data Docs under
/sofare/data-docs/. Imports nothing heavy until a page is opened."""

from __future__ import annotations

import html

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from sofare.config import load_config

app = FastAPI(title="SOFARE", description="SOFARE pages served by the Airflow API server")
app.mount("/data-docs", StaticFiles(directory=str(load_config().var_dir / "data_docs"), html=True, check_dir=False),
          name="data-docs")

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SOFARE warehouse status</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}pre{{background:#f6f8fa;padding:1rem}}</style></head>
<body><h1>SOFARE warehouse status</h1><p>Rows, ranges and gaps per table, computed from the data now.
JSON: <a href="status.json">status.json</a></p><pre>{body}</pre></body></html>"""


@app.get("/status", response_class=HTMLResponse)
def status_page() -> str:
    from sofare import tasks
    from sofare.data import report

    return PAGE.format(body=html.escape(report.format_status(tasks.status(load_config()), max_gaps=20)))


@app.get("/status.json")
def status_json() -> dict:
    from sofare import tasks

    return tasks.status(load_config())


class SofarePlugin(AirflowPlugin):
    name = "sofare"
    fastapi_apps = [{"app": app, "url_prefix": "/sofare", "name": "SOFARE"}]
    external_views = [
        {"name": "Warehouse status", "href": "/sofare/status", "category": "SOFARE", "destination": "nav"},
        {"name": "Data Docs", "href": "/sofare/data-docs/index.html", "category": "SOFARE", "destination": "nav"},
    ]
