"""Data Docs work offline and under safe names: every stylesheet, script, font and image a page loads is a file of
the site (no CDN), the pages are styled and their JavaScript runs in a headless Chromium that cannot resolve any
host, every path is made of [A-Za-z0-9._/-], and the Airflow plugin serves the vendored assets."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from sofare import tasks
from sofare.config import load_config
from sofare.data import ingest, warehouse
from sofare.validation import data_docs, suites
from tests.conftest import logged_in

DAY = ("2023-03-22", "2023-03-22")
SAFE_PATH = re.compile(r"[A-Za-z0-9._/-]+")
CSS_REFS = re.compile(r"url\(\s*[\"']?([^\"')]+)|@import\s+(?:url\()?\s*[\"']([^\"']+)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A real day validated by every suite (scopes `BTCUSDT 1h` and `*`), plus a failing candles run whose run id
    holds a space, rendered into Data Docs."""
    path = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFARE_PATHS__VAR", str(path / "var"))
        mp.setenv("SOFARE_WAREHOUSE__URL", f"sqlite:///{path / 'warehouse.db'}")
        cfg = load_config()
        tasks.backfill(cfg, ["sample"], "2023-03-21", DAY[1])
        assert all(r.success for r in tasks.validate_range(cfg, *DAY))
        with warehouse.get_engine(cfg).connect() as conn:
            frame = suites.candles_frame(conn, cfg, "BTCUSDT", "1h", *ingest.day_range(*DAY))
        frame.loc[5, "high"] = frame.loc[5, "oc_max"] - 1
        ok, _, _ = suites.check_frame(cfg, "candles", frame, *ingest.day_range(*DAY), "BTCUSDT 1h", "high bar")
        assert not ok
        suites.build_data_docs(cfg)
        yield cfg, suites.data_docs_dir(cfg)


class Refs(HTMLParser):
    """What a page loads: <link href>, <script src>, <img src>, and its styles (<style> text, style attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "link" and a.get("href"):
            self.loads.append(a["href"])
        elif tag in ("script", "img") and a.get("src"):
            self.loads.append(a["src"])
        if a.get("style"):
            self.styles.append(a["style"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def _parse(page: Path) -> Refs:
    refs = Refs()
    refs.feed(page.read_text(encoding="utf-8"))
    return refs


def _local(base: Path, ref: str, root: Path) -> Path:
    """The file a relative reference names; fails for network URLs and for files outside the site."""
    assert not re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", ref, re.IGNORECASE), f"{ref} is loaded from the network"
    target = (base.parent / unquote(urlsplit(ref).path)).resolve()
    assert root.resolve() in target.parents, f"{ref} points outside the site"
    assert target.is_file(), f"{ref} (from {base.relative_to(root)}) does not exist"
    return target


def _css_refs(text: str) -> list[str]:
    return [ref for m in CSS_REFS.finditer(text) if not (ref := (m[1] or m[2]).strip()).startswith(("data:", "#"))]


def _pages(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.html") if (root / data_docs.VENDOR) not in p.parents]


def test_every_page_loads_only_files_of_the_site(site):
    _, root = site
    pages = _pages(root)
    assert {p.relative_to(root).parts[0] for p in pages} == {"index.html", "expectations", "validations"}
    stylesheets: set[Path] = set()
    for page in pages:
        refs = _parse(page)
        assert len(refs.loads) >= 17, f"{page}: {refs.loads}"
        for ref in refs.loads:
            target = _local(page, ref, root)
            if target.suffix == ".css":
                stylesheets.add(target)
        for style in refs.styles:
            for ref in _css_refs(style):
                _local(page, ref, root)
        assert not re.search(r"\b(?:integrity|crossorigin)=", page.read_text()), "file:// pages cannot load those"
    bootstrap = root / data_docs.VENDOR / "bootstrap-4.3.1/css/bootstrap.min.css"
    assert bootstrap in stylesheets and bootstrap.stat().st_size > 100_000
    for sheet in stylesheets | set((root / "static" / "styles").glob("*.css")):
        for ref in _css_refs(sheet.read_text(encoding="utf-8")):
            _local(sheet, ref, root)  # Font Awesome's webfonts, GX's logo in dark mode
    fonts = {p.name for p in (root / data_docs.VENDOR / "fontawesome-free-6.6.0/webfonts").iterdir()}
    assert "fa-solid-900.woff2" in fonts


def test_every_path_is_url_and_shell_safe_and_the_index_links_resolve(site):
    _, root = site
    unsafe = [str(p.relative_to(root)) for p in root.rglob("*") if not SAFE_PATH.fullmatch(str(p.relative_to(root)))]
    assert unsafe == []
    results = sorted(str(p.relative_to(root)) for p in (root / "validations").rglob("*.html"))
    assert len(results) == 5
    assert any(
        re.fullmatch(
            r"validations/candles/BTCUSDT-1h_2023-03-22_high-bar/\d{8}T\d{6}\.\d{6}Z/"
            r"sofare_warehouse-candles\.html",
            r,
        )
        for r in results
    ), results
    assert any(r.startswith("validations/macro_observations/all_2023-03-22_") for r in results), results
    index = root / "index.html"
    text = index.read_text()
    rows = re.findall(r"'_table_row_link_path': '([^']+)'", text)
    assert sorted(r for r in rows if r.startswith("validations/")) == results
    links = _links(text)  # the index's table rows are data of a script: its links are strings there
    assert {"expectations/candles.html", "expectations/features.html"} <= set(links)
    for ref in rows + links:
        _local(index, ref, root)
    for page in _pages(root):  # breadcrumbs, home and suite links of every page
        for ref in _links(page.read_text()):
            _local(page, ref, root)


def _links(text: str) -> list[str]:
    """Every href of a page, in its markup or in its scripts' strings, but anchors and web links."""
    return [ref for ref in re.findall(r"href=\\?[\"']([^\"'\\]+)", text) if not ref.startswith(("#", "http"))]


def test_vendored_assets_are_the_files_listed_with_their_licenses():
    sums = {}
    for line in (data_docs.ASSETS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        sums[name] = digest
    files = {str(p.relative_to(data_docs.ASSETS)) for p in data_docs.ASSETS.rglob("*") if p.is_file()}
    assert files - set(sums) == {"README.md", "SHA256SUMS", *(f for f in files if Path(f).name.startswith("LICENSE"))}
    for name, digest in sums.items():
        assert hashlib.sha256((data_docs.ASSETS / name).read_bytes()).hexdigest() == digest, name
    assert set(data_docs.CDN.values()) <= set(sums)
    for package in {Path(f).parts[0] for f in sums}:
        assert list((data_docs.ASSETS / package).glob("LICENSE*")), f"{package} has no LICENSE"


def test_the_rewrite_covers_every_remote_reference_of_the_gx_templates():
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view"
    text = "\n".join(p.read_text() for p in templates.rglob("*") if p.suffix in (".j2", ".css"))
    remote = set(data_docs.remote_references(text))
    assert remote, "the check finds the CDN references of GX's templates"
    left = set(data_docs.remote_references(data_docs.offline_html(text, "../")))
    assert left == set(), "a Great Expectations upgrade loads new URLs: add them to data_docs.CDN"


def test_results_of_older_runs_named_with_stars_and_spaces_are_renamed(site, tmp_path):
    cfg, _ = site
    var = tmp_path / "var"
    shutil.copytree(cfg.var_dir, var)
    store = var / "gx" / "gx" / "uncommitted" / "validations" / "macro_observations"
    [run] = [p for p in store.iterdir() if p.name.startswith("all_")]
    run.rename(store / "* 2023-03-22 0ld5tar5")  # as written before names were made safe
    stale = var / "data_docs" / "validations" / "macro_observations" / "* 2023-03-22 0ld5tar5"
    stale.mkdir()
    (stale / "page with spaces.html").write_text("stale")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFARE_PATHS__VAR", str(var))
        suites.build_data_docs(load_config())
    docs = var / "data_docs"
    assert [p for p in docs.rglob("*") if not SAFE_PATH.fullmatch(str(p.relative_to(docs)))] == []
    assert list((docs / "validations" / "macro_observations").glob("all-2023-03-22-0ld5tar5/*/*.html"))
    assert "all-2023-03-22-0ld5tar5" in (docs / "index.html").read_text()


def test_the_plugin_serves_the_site_and_its_assets(site, monkeypatch):
    cfg, root = site
    monkeypatch.setenv("SOFARE_PATHS__VAR", str(cfg.var_dir))
    spec = importlib.util.spec_from_file_location("sofare_plugin_assets", cfg.root / "plugins" / "sofare_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = logged_in(module)
    [page] = (root / "validations" / "candles").glob("BTCUSDT-1h_2023-03-22_high-bar/*/*.html")
    url = "/data-docs/" + str(page.relative_to(root))
    answer = client.get(url)
    assert answer.status_code == 200 and answer.text == page.read_text()
    kinds = {".css": "text/css", ".js": "javascript"}
    for ref in _parse(page).loads:
        served = client.get(_resolve(f"{Path(url).parent}/{ref}"))
        assert served.status_code == 200, ref
        path = urlsplit(ref).path
        if Path(path).suffix in kinds:
            assert kinds[Path(path).suffix] in served.headers["content-type"], (ref, served.headers["content-type"])


def _resolve(url: str) -> str:
    """/a/b/../c -> /a/c"""
    parts: list[str] = []
    for part in url.split("/"):
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs chromium and chromium-driver (the setup path installs them)",
)
def test_pages_are_styled_and_their_scripts_run_in_a_browser_without_network(site):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, root = site
    [failing] = (root / "validations" / "candles").glob("BTCUSDT-1h_2023-03-22_high-bar/*/*.html")
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ):  # no host resolves: a CDN reference would fail
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        for page in (root / "index.html", root / "expectations" / "candles.html", failing):
            driver.get(page.as_uri())
            state = driver.execute_script("""return {
                libraries: [typeof jQuery, typeof (window.jQuery && jQuery.fn.modal),
                            typeof (window.jQuery && jQuery.fn.bootstrapTable),
                            typeof (window.jQuery && jQuery.fn.datepicker), typeof Popper,
                            typeof vega, typeof vegaLite, typeof vegaEmbed],
                navbar: getComputedStyle(document.querySelector('nav.navbar')).position,
                font: getComputedStyle(document.body).fontFamily,
                tables: document.querySelectorAll('.bootstrap-table').length,
                logo: document.querySelector('.navbar-brand img').naturalWidth,
            }""")
            icons = driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "document.fonts.load('900 1em \"Font Awesome 6 Free\"').then(f => done(f.length), e => done(0));"
            )
            errors = [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
            name = page.relative_to(root)
            assert errors == [], f"{name}: {errors}"
            assert state["libraries"] == ["function"] * 5 + ["object", "object", "function"], (name, state)
            assert state["navbar"] == "sticky" and "Segoe UI" in state["font"], (name, state)  # bootstrap's CSS
            assert state["tables"] >= 1, f"{name}: bootstrap-table did not build its tables"
            assert state["logo"] > 0 and icons >= 1, (name, state, icons)
    finally:
        driver.quit()


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("BTCUSDT 1h_2023-03-20_2e825ed3", "BTCUSDT-1h_2023-03-20_2e825ed3"),
        ("*_2023-03-20_d008047f", "all_2023-03-20_d008047f"),
        ("* 2023-03-01 look-ahe", "all-2023-03-01-look-ahe"),
        ("a/b\\c?d#e%f", "a-b-c-d-e-f"),
        ("  ", "unnamed"),
    ],
)
def test_safe_names(text, name):
    assert data_docs.safe_name(text) == name and SAFE_PATH.fullmatch(name)
