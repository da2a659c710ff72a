"""The UIs in a real browser (Selenium driving Debian's headless Chromium), tried as a new user would, on the stack
the pipeline test left: log in to Airflow; trigger sofare_backfill and sofare_rollback from their forms and see the
runs succeed; open the SOFARE plugin pages, the Data Docs (styled, with every host but 127.0.0.1 unresolvable),
the service's Swagger UI (Try it out on /predict_latest) and the MLflow model page.

Screenshots are kept under var/screenshots/ for people to look at. Waits poll for what the page shows, bounded;
none assumes how fast this machine is."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, Stack, free_port, wait_for

pytestmark = pytest.mark.slow
SHOTS = ROOT / "var" / "screenshots"
BOUND_S = 300


class Browser:
    """A headless Chromium that can reach 127.0.0.1 only (every other host name fails to resolve)."""

    def __init__(self) -> None:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--lang=en-US",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(
            service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
        )

    def until(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll the page until `check` returns something truthy (bounded; a screenshot when it never does)."""
        deadline = time.monotonic() + BOUND_S
        while True:
            try:
                value = check()
                if value:
                    return value
            except WebDriverException:
                pass
            if time.monotonic() > deadline:
                self.shot(f"failed-{what.replace(' ', '-')[:40]}")
                raise AssertionError(f"the page never showed {what}: {self.driver.current_url}")
            time.sleep(0.5)

    def visible(self, css: str, text: str | None = None) -> WebElement | None:
        for element in self.driver.find_elements(By.CSS_SELECTOR, css):
            if element.is_displayed() and (text is None or element.text.strip() == text):
                return element
        return None

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def failed_resources(self) -> list[str]:
        """Stylesheets, scripts, fonts and images the page asked for and did not get."""
        return [m for m in self.console_errors() if "Failed to load resource" in m or "ERR_NAME_NOT_RESOLVED" in m]


@pytest.fixture(scope="module")
def browser(stack: Stack, pipeline: dict[str, Any]) -> Iterator[Browser]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("chromium and chromedriver are missing: run scripts/system-deps.sh (make test does)")
    # The pipeline test has proved the asset chain; here a form's backfill would start validate -> train again,
    # which on 2 cores slows every later browser test and leaves a tuning task for the workers to finish at teardown.
    stack.unpause("sofare_validate", "sofare_train", "sofare_promote", "sofare_deploy", paused=True)
    b = Browser()
    try:
        login(b, stack)
        yield b
    finally:
        b.driver.quit()


def login(b: Browser, stack: Stack) -> None:
    user, password = stack.credentials()
    b.driver.get(stack.api + "/")
    b.until("the login form", lambda: "/auth/login" in b.driver.current_url and b.visible("input[name=username]"))
    b.shot("01-airflow-login")
    b.driver.find_element(By.NAME, "username").send_keys(user)
    b.driver.find_element(By.NAME, "password").send_keys(password)
    b.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    b.until(
        "the home page after login",
        lambda: (
            "/auth/login" not in b.driver.current_url and any(c["name"] == "_token" for c in b.driver.get_cookies())
        ),
    )


def trigger_dialog(b: Browser, stack: Stack, dag_id: str) -> WebElement:
    b.driver.get(f"{stack.api}/dags/{dag_id}")
    b.until(f"{dag_id}'s Trigger button", lambda: b.visible("button", "Trigger")).click()
    return b.until(
        "the trigger form",
        lambda: (
            b.visible("[role=dialog][data-state=open]")
            or b.visible("[role=dialog]:not([hidden]) input[name^=element_]")
        ),
    )


def submit(b: Browser, dialog: WebElement) -> None:
    """Click the form's Trigger button (looked up afresh: the dialog may have re-rendered since it opened)."""
    button = b.until(
        "an enabled Trigger button in the form",
        lambda: next(
            (
                x
                for x in b.driver.find_elements(By.CSS_SELECTOR, "[role=dialog] button")
                if x.text.strip() == "Trigger" and x.is_enabled()
            ),
            None,
        ),
    )
    b.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()


def type_date(b: Browser, element: WebElement, day: str) -> None:
    """A date input as a user fills it (Chromium's en-US field: month, day, year)."""
    year, month, dom = day.split("-")
    b.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()
    element.send_keys(month + dom + year)


def newest_run(stack: Stack, dag_id: str, known: int) -> dict[str, Any]:
    return wait_for(f"a new {dag_id} run", lambda: len(stack.runs(dag_id)) > known and stack.runs(dag_id)[-1], stack)


def test_backfill_from_its_form(stack, browser):
    b, known = browser, len(stack.runs("sofare_backfill"))
    dialog = trigger_dialog(b, stack, "sofare_backfill")
    sources = b.until(
        "the Sources field", lambda: b.driver.find_element(By.CSS_SELECTOR, "[role=dialog] [id=element_sources]")
    )
    assert sources.tag_name != "textarea", "sources is a multi-select of the known sources, not free text"
    assert "sample (embedded data, every modality)" in b.visible("[role=dialog]").text, "the source shows its label"
    type_date(b, b.driver.find_element(By.NAME, "element_start"), "2024-03-08")
    type_date(b, b.driver.find_element(By.NAME, "element_end"), "2024-03-09")
    b.shot("02-backfill-form")
    submit(b, dialog)
    run = newest_run(stack, "sofare_backfill", known)
    assert run["conf"]["start"] == "2024-03-08" and run["conf"]["end"] == "2024-03-09", run["conf"]
    assert run["conf"]["sources"] == ["sample"], run["conf"]
    stack.wait_run("sofare_backfill", run["dag_run_id"])
    states = {ti["task_id"]: ti["state"] for ti in stack.tasks("sofare_backfill", run["dag_run_id"])}
    assert set(states) == {"plan_loads", "load_chunk", "plan_features", "features_chunk", "summarize"}, states
    assert set(states.values()) == {"success"}, states
    b.driver.get(f"{stack.api}/dags/sofare_backfill/runs/{run['dag_run_id']}")
    b.until("the run shown as success", lambda: "success" in b.driver.page_source.lower())
    b.shot("03-backfill-run-succeeded")


def test_rollback_from_its_form(stack, browser):
    b, known = browser, len(stack.runs("sofare_rollback"))
    dialog = trigger_dialog(b, stack, "sofare_rollback")
    details = b.until("the Details field", lambda: b.driver.find_element(By.NAME, "element_details"))
    assert "Incident (errors, outage)" in b.visible("[role=dialog]").text, "the reason is a drop-down with labels"
    b.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", details)
    details.send_keys("browser tier: the on-call form")
    b.shot("04-rollback-form")
    submit(b, dialog)
    run = newest_run(stack, "sofare_rollback", known)
    assert run["conf"]["reason"] == "incident" and run["conf"]["details"] == "browser tier: the on-call form"
    stack.wait_run("sofare_rollback", run["dag_run_id"])
    states = {ti["task_id"]: ti["state"] for ti in stack.tasks("sofare_rollback", run["dag_run_id"])}
    assert states == {"rollback": "success"}, f"the form's run did the rollback (not an empty run): {states}"
    b.driver.get(f"{stack.api}/dags/sofare_rollback/runs/{run['dag_run_id']}")
    b.until("the run shown as success", lambda: "success" in b.driver.page_source.lower())
    b.shot("05-rollback-run-succeeded")


@pytest.mark.parametrize(
    ("page", "shows"),
    [("status", "SOFARE warehouse status"), ("monitor", "SOFARE monitor"), ("explain", "What the model relies on")],
)
def test_plugin_pages(stack, browser, page, shows):
    b = browser
    b.driver.get_log("browser")  # forget earlier pages' messages
    b.driver.get(f"{stack.api}/sofare/{page}")
    b.until(f"the {page} page", lambda: shows in b.driver.page_source)
    b.shot(f"06-plugin-{page}")
    assert not b.failed_resources(), b.failed_resources()


def test_data_docs_styled_with_no_network(stack, browser):
    b = browser
    b.driver.get_log("browser")
    b.driver.get(f"{stack.api}/sofare/data-docs/index.html")
    b.until(
        "the Data Docs index",
        lambda: (
            b.driver.execute_script("return document.readyState") == "complete"
            and b.driver.find_elements(By.CSS_SELECTOR, "table")
        ),
    )
    styled = b.driver.execute_script(
        "return [...document.styleSheets].filter(s => { try { return s.cssRules.length > 0 } catch (e) { return false } })"
        ".map(s => s.href).filter(h => h && h.includes('bootstrap'))"
    )
    assert styled, "bootstrap's stylesheet loaded and parsed"
    assert b.driver.execute_script("return typeof window.jQuery") == "function", "the scripts ran"
    assert not b.failed_resources(), b.failed_resources()
    b.shot("07-data-docs-index")

    def open_features_result() -> bool:
        """Click a features result row (the table's rows link to their pages); bootstrap-table may re-render the
        rows under us, and a stale row raises, which `until` retries."""
        row = next((r for r in b.driver.find_elements(By.CSS_SELECTOR, "table tbody tr") if "features" in r.text), None)
        if row is None:
            return False
        row.find_elements(By.TAG_NAME, "td")[2].click()
        return True

    b.until("a features validation result to click", open_features_result)
    b.until(
        "a validation result page",
        lambda: "/validations/" in b.driver.current_url and "Overview" in b.driver.page_source,
    )
    assert not b.failed_resources(), b.failed_resources()
    b.shot("08-data-docs-validation")


def test_swagger_try_predict_latest(stack, browser):
    b = browser
    b.driver.get_log("browser")
    b.driver.get(f"http://127.0.0.1:{stack.env['SOFARE_DEPLOY__FRONTDOOR_PORT']}/")
    operation = b.until(
        "the /predict_latest operation",
        lambda: (
            b.visible("#operations-default-predict_latest")
            or next(
                (
                    x
                    for x in b.driver.find_elements(By.CSS_SELECTOR, ".opblock")
                    if "/predict_latest" in x.text and x.is_displayed()
                ),
                None,
            )
        ),
    )
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    b.until("Try it out", lambda: b.visible("button.try-out__btn")).click()
    b.until("Execute", lambda: b.visible("button.execute")).click()
    answer = b.until(
        "the live response",
        lambda: next(
            (
                x
                for x in b.driver.find_elements(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status")
                if x.text.strip()
            ),
            None,
        ),
    )
    assert answer.text.strip().startswith("200"), answer.text
    assert '"direction"' in b.driver.find_element(By.CSS_SELECTOR, ".live-responses-table").text
    assert not b.failed_resources(), b.failed_resources()
    b.driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center'})",
        b.driver.find_element(By.CSS_SELECTOR, ".live-responses-table"),
    )
    b.shot("09-swagger-predict-latest")


@pytest.fixture(scope="module")
def mlflow_ui(stack: Stack) -> Iterator[str]:
    port = free_port()
    stack.start(
        "mlflow-ui",
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{stack.env['SOFARE_PATHS__VAR']}/mlflow.db",
        "--workers",
        "1",
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    wait_for("the MLflow UI", lambda: urllib.request.urlopen(url + "/health", timeout=5).status == 200, stack)
    yield url
    process = stack.processes.pop("mlflow-ui")
    os.killpg(process.pid, 15)
    process.wait(60)


def test_mlflow_model_page(stack, browser, mlflow_ui, pipeline):
    b = browser
    b.driver.get(f"{mlflow_ui}/#/models/sofare-m3")
    b.until(
        "the registered model with its versions",
        lambda: (
            "sofare-m3" in b.driver.page_source
            and f"Version {pipeline['version']}" in b.driver.find_element(By.TAG_NAME, "body").text
        ),
    )
    body = b.driver.find_element(By.TAG_NAME, "body").text
    assert "champion" in body, "the alias shows"
    b.shot("10-mlflow-model")
