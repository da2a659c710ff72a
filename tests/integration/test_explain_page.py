"""The plugin's "What the model relies on" page (/sofare/explain): the champion's and the challenger's global views
side by side, read from a real MLflow registry (SQLite under the test's var/), with honest empty states for an
unset alias and for a version whose run holds no global view."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from sofare.explain import global_view as gv
from sofare.registry import versions
from sofare.training import tracking
from tests.conftest import logged_in

NAMES = (("log_ret_1", "rsi_14"), ("sh_gold_ret1",), ("macro_dff",))


def _plugin(cfg: Any) -> ModuleType:
    spec = importlib.util.spec_from_file_location("sofare_plugin_explain", cfg.root / "plugins" / "sofare_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _view(lead: str, seed: int) -> gv.GlobalView:
    """A global view whose permutation signal is all in the feature `lead` (built by the real `gv.build`)."""
    rng = np.random.default_rng(seed)
    names = [n for group in NAMES for n in group]
    folds = []
    for _ in range(3):
        features = {n: list(rng.normal(0.02 if n == lead else 0.0, 0.001, size=2)) for n in names}
        by_modality = {
            m: list(rng.normal(0.02 if lead in group else 0.0, 0.001, size=2))
            for m, group in zip(("micro", "safe", "macro"), NAMES, strict=True)
        }
        folds.append((0.55, features, by_modality))
    attribution = ({n: (3.0 if n == lead else 1.0) for n in names}, {"micro": 2.0, "safe": 1.5, "macro": 1.0})
    return gv.build(
        "roc_auc",
        NAMES,
        folds,
        attribution,
        attribution_method="integrated_gradients",
        attribution_windows=64,
        permutation_windows=[64, 64, 64],
        permutation_repeats=2,
        test_window="2024-03-01 00:00:00+00:00..2024-03-31 23:00:00+00:00",
    )


def _register(cfg: Any, view: gv.GlobalView | None, tmp: Path) -> str:
    """A registered version whose training run holds `view` (as training logs it) or nothing."""
    c = tracking.client(cfg)
    run = c.create_run(tracking.experiment_id(cfg))
    if view is not None:
        c.log_dict(run.info.run_id, view.model_dump(mode="json"), gv.ARTIFACT)
        c.log_artifact(run.info.run_id, str(gv.plot(view, tmp / gv.PLOT)), artifact_path="plots")
    c.set_terminated(run.info.run_id)
    if not c.search_registered_models(f"name = '{cfg.mlflow.model_name}'"):
        c.create_registered_model(cfg.mlflow.model_name)
    mv = c.create_model_version(cfg.mlflow.model_name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    versions.set_tags(cfg, str(mv.version), {"semver": f"1.0.{int(mv.version) - 1}"})
    return str(mv.version)


def test_champion_and_challenger_side_by_side_and_what_is_missing_is_said(cfg, tmp_path):
    """One registry through three states (one MLflow database: its migrations are the slow part)."""
    client = logged_in(_plugin(cfg))
    empty = client.get("/explain").text
    assert "No version has the alias <code>champion</code> yet" in empty
    assert "No version has the alias <code>challenger</code> yet" in empty
    assert client.get("/explain/champion/global_view.png").status_code == 404

    older = _register(cfg, None, tmp_path)  # trained before the global view existed
    versions.set_alias(cfg, "champion", older)
    text = client.get("/explain").text
    assert "<h2>champion: version 1 (semver 1.0.0)</h2>" in text
    assert "This version has no global view: its training run holds no <code>global_view.json</code>" in text
    assert "No version has the alias <code>challenger</code> yet" in text
    assert client.get("/explain/champion/global_view.png").status_code == 404

    champion = _register(cfg, _view("rsi_14", 1), tmp_path)
    challenger = _register(cfg, _view("macro_dff", 2), tmp_path)
    versions.set_alias(cfg, "champion", champion)
    versions.set_alias(cfg, "challenger", challenger)
    page = client.get("/explain")
    assert page.status_code == 200
    text = page.text
    left, right = text.index("<h2>champion: version 2 (semver 1.0.1)</h2>"), text.index("<h2>challenger: version 3")
    assert left < right, "the champion on the left, the challenger on the right"
    champion_html, challenger_html = text[left:right], text[right:]
    assert "the signal is carried by <strong>micro</strong>" in champion_html
    assert "the signal is carried by <strong>macro</strong>" in challenger_html
    for half in (champion_html, challenger_html):
        assert "<th>ROC-AUC drop when shuffled</th>" in half and "<td>safe haven</td>" in half
        assert "Spearman ρ" in half and 'src="explain/' in half
    assert "The two views <strong>disagree</strong> on the top modality" in challenger_html
    for alias in ("champion", "challenger"):
        png = client.get(f"/explain/{alias}/global_view.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG") and len(png.content) > 10_000
    assert client.get("/explain/stable/global_view.png").status_code == 422


def test_the_page_is_in_the_navigation():
    from airflow import plugins_manager

    plugins, _ = plugins_manager._get_plugins()
    views = next(p for p in plugins if p.name == "sofare").external_views
    assert {"name": "What the model relies on", "href": "/sofare/explain", "category": "SOFARE"} in [
        {k: v[k] for k in ("name", "href", "category")} for v in views
    ]


def test_the_page_needs_an_airflow_login(cfg):
    module = _plugin(cfg)
    logged_in(module)
    anonymous = TestClient(module.app)
    for path in ("/explain", "/explain/champion/global_view.png"):
        answer = anonymous.get(path)
        assert answer.status_code == 401 and "log in to Airflow" in answer.json()["detail"]
        browser = anonymous.get(path, headers={"Accept": "text/html"}, follow_redirects=False)
        assert browser.status_code == 303 and browser.headers["location"].startswith("/auth/login?next_url=")
        assert anonymous.get(path, headers={"Authorization": "Bearer forged"}).status_code == 403
