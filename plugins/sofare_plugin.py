"""SOFARE inside Airflow's UI, linked from the navigation bar: a warehouse status page (rows,
ranges, gaps per table) under /sofare/status, the Great Expectations Data Docs under
/sofare/data-docs/, and the monitor (live accuracy, drift, serving health as charts) under
/sofare/monitor with its Evidently reports under /sofare/reports/ and its gauges at
/sofare/monitor/metrics for Prometheus, and what the champion and the challenger rely on (their global views:
attributions and permutation importance per feature and modality) side by side under /sofare/explain. Imports
nothing heavy until a page is opened.

Every page and file needs an Airflow login (the API server's JWT: the UI's `_token` cookie or an
`Authorization: Bearer` token); a browser without one is sent to the login page and back. Only the
gauges stay open, for Prometheus (numbers the monitor already exports; no data rows)."""

from __future__ import annotations

import html
from typing import Literal
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from sofare.config import load_config

app = FastAPI(title="SOFARE", description="SOFARE pages served by the Airflow API server (Airflow login required)")
OPEN_PATHS = ("/monitor/metrics",)  # Prometheus scrapes it without a login


async def verify(token: str | None) -> None:
    """The Airflow API server's own check of its JWT (HTTPException 401/403 when missing, expired or invalid)."""
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    await resolve_user_from_token(token)


def login_url(next_url: str) -> str:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().get_url_login(next_url=next_url)


@app.middleware("http")
async def require_login(request: Request, call_next):
    """Before any route or static file: an Airflow login, or a redirect to it (browsers) / 401 (API clients)."""
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    if path in OPEN_PATHS:
        return await call_next(request)
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get("_token")
    try:
        await verify(token)
    except HTTPException as refused:
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(login_url(quote(str(request.url), safe=":/?=&")), status_code=303)
        return JSONResponse(
            {"detail": f"{refused.detail}: log in to Airflow first (cookie or Bearer token)"},
            status_code=refused.status_code,
        )
    return await call_next(request)


class Files(StaticFiles):
    """Static files from a folder a later run creates: until it exists, a 404 that says what creates it (Starlette
    answers a missing folder with a 500)."""

    def __init__(self, directory: str, created_by: str, **kwargs: object) -> None:
        super().__init__(directory=directory, check_dir=False, **kwargs)
        self.created_by = created_by

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        from pathlib import Path

        if not Path(str(self.directory)).is_dir():
            missing = Response(
                f"not generated yet: {self.created_by} writes it", status_code=404, media_type="text/plain"
            )
            return await missing(scope, receive, send)
        return await super().__call__(scope, receive, send)


app.mount(
    "/data-docs",
    Files(str(load_config().var_dir / "data_docs"), "`sofare validate` (Data Docs)", html=True),
    name="data-docs",
)
app.mount(
    "/reports", Files(str(load_config().var_dir / "reports"), "`sofare monitor` (Evidently reports)"), name="reports"
)  # the Evidently drift reports the monitor writes and its page links

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


MONITOR_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SOFARE monitor</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px}}
table{{border-collapse:collapse;margin:.5rem 0 1rem}}td,th{{border:1px solid #d0d7de;padding:.25rem .5rem;
font-size:.85rem;text-align:left;vertical-align:top}}th{{background:#f6f8fa}}.insufficient{{color:#6e7781}}
.sev-high,.sev-critical{{color:#c0392b;font-weight:600}}.sev-medium{{color:#e67e22;font-weight:600}}
figure.chart{{margin:1rem 0}}figure.chart svg{{max-width:100%;height:auto}}</style></head>
<body><h1>SOFARE monitor</h1><p>Live quality, drift and serving health from <code>monitoring_runs</code>,
last {days} days of monitored hours. Gauges for Prometheus: <a href="monitor/metrics">monitor/metrics</a></p>
{body}</body></html>"""


@app.get("/monitor", response_class=HTMLResponse)
def monitor_page(days: int = Query(30, ge=1, le=366)) -> str:
    from sofare.monitoring import dashboard

    cfg = load_config()
    return MONITOR_PAGE.format(days=days, body=dashboard.render(cfg, dashboard.load(cfg, days=days)))


@app.get("/monitor/metrics")
def monitor_metrics() -> Response:
    from sofare.monitoring import dashboard

    return Response(dashboard.prometheus_text(load_config()), media_type=dashboard.CONTENT_TYPE)


EXPLAIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SOFARE: what the model relies on</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}.side-by-side{{display:flex;gap:2rem;align-items:flex-start}}
.side-by-side section{{flex:1;min-width:0}}table{{border-collapse:collapse;margin:.5rem 0 1rem}}td,th{{border:1px solid
#d0d7de;padding:.25rem .5rem;font-size:.85rem;text-align:left}}th{{background:#f6f8fa}}img{{max-width:100%}}
.empty{{color:#6e7781}}</style></head>
<body><h1>What the model relies on</h1><p>The global view of the champion and the challenger, computed when each
was trained: mean |attribution| (Integrated Gradients) on its test window and permutation importance on its
walk-forward folds, per modality and per feature, and where the two views disagree. The same section is in each
version's model card.</p>
{body}</body></html>"""


@app.get("/explain", response_class=HTMLResponse)
def explain_page() -> str:
    from sofare.registry import model_card

    return EXPLAIN_PAGE.format(body=model_card.global_view_html(load_config()))


@app.get("/explain/{alias}/global_view.png")
def explain_plot(alias: Literal["champion", "challenger"]) -> Response:
    from sofare.registry import model_card

    png = model_card.global_view_plot(load_config(), alias)
    if png is None:
        return Response(f"no global view picture for {alias}", status_code=404, media_type="text/plain")
    return Response(png, media_type="image/png")


class SofarePlugin(AirflowPlugin):
    name = "sofare"
    fastapi_apps = [{"app": app, "url_prefix": "/sofare", "name": "SOFARE"}]
    external_views = [
        {"name": "Warehouse status", "href": "/sofare/status", "category": "SOFARE", "destination": "nav"},
        {"name": "Data Docs", "href": "/sofare/data-docs/index.html", "category": "SOFARE", "destination": "nav"},
        {"name": "SOFARE monitor", "href": "/sofare/monitor", "category": "SOFARE", "destination": "nav"},
        {"name": "What the model relies on", "href": "/sofare/explain", "category": "SOFARE", "destination": "nav"},
    ]
