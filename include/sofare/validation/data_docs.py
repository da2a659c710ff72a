"""Data Docs that work offline, under names that are safe in URLs and shells.

Great Expectations 1.24 renders its pages with stylesheets, scripts and fonts from CDNs (bootstrap, jQuery,
bootstrap-table, bootstrap-datepicker, popper, Font Awesome, vega/vega-lite/vega-embed) and its logo from S3;
without network the pages are unstyled and their tables and charts do not work. After every build the files
in data_docs_assets/ (the same files from the npm packages of exactly those versions; see its README.md) are
copied to static/vendor/ in the site and every page is pointed at them, relative to the page, so the site works
from file:// and served by the Airflow plugin (/sofare/data-docs/) alike.

GX names validation folders after run names, so those are built from [A-Za-z0-9._-] only (`safe_name`);
folders of older runs named with `*` or spaces are renamed in the results store and their stale pages removed.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().with_name("data_docs_assets")
VENDOR = "static/vendor"  # where the assets go in the site

# The CDN URLs in GX 1.24.1's page templates -> the same file in data_docs_assets/ (bootstrap-table's
# filter-control CSS 1.19.0 differs from 1.19.1 only in its version comment; bootstrap-dark is its .min.css).
CDN = {
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table-1.19.1/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table-1.19.1/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js": "bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css": "bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css": "bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap-4.3.1/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap-4.3.1/js/bootstrap.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": "bootstrap-datepicker-1.9.0/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": "bootstrap-datepicker-1.9.0/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": "bootstrap-dark-1.1.0/css/bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome-free-6.6.0/css/all.min.css",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery-3.7.1/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js-1.12.9/umd/popper.min.js",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega-5.33.1/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite-5.23.0/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed-6.29.0/vega-embed.min.js",
}
# GX's logo on S3 -> the copy GX itself puts in static/images/ (no dark variant is shipped: the same logo)
GX_IMAGES = re.compile(
    r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/([\w.-]+?)(\?[^\"')\s]*)?"
    r"(?=[\"')\s])"
)
IMAGES = {"full_logo_dark.png": "logo-long.png"}
SRI = re.compile(r"\s+(?:integrity|crossorigin)=\"[^\"]*\"")  # file:// pages cannot load scripts as CORS requests
STATIC = re.compile(r"\b(href|src)=\"(?:\./|(?:\.\./)+)static/")  # GX gets the depth wrong on result pages
REMOTE = re.compile(
    r"<(?:link|script|img)\b[^>]*?\b(?:href|src)=[\"']((?:https?:)?//[^\"']+)"
    r"|url\(\s*[\"']?((?:https?:)?//[^\"')]+)|@import\s+[\"']((?:https?:)?//[^\"']+)"
)
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A GX name that becomes a folder: `*` reads `all`, other runs outside [A-Za-z0-9._-] become `-`."""
    return UNSAFE.sub("-", text.replace("*", "all")).strip("-") or "unnamed"


def offline_html(text: str, to_root: str) -> str:
    """One page with every CDN and S3 reference pointed at the site's own files (`to_root`: "../../", "" ...)."""
    for url, local in CDN.items():
        text = text.replace(f'"{url}"', f'"{to_root}{VENDOR}/{local}"')
    text = SRI.sub("", text)
    text = GX_IMAGES.sub(lambda m: f"{to_root}static/images/{IMAGES.get(m[1], m[1])}", text)
    return STATIC.sub(lambda m: f'{m[1]}="{to_root}static/', text)


def remote_references(text: str) -> list[str]:
    """URLs a page or stylesheet would still load from the network (links to web pages do not count)."""
    return [next(g for g in m.groups() if g) for m in REMOTE.finditer(text)]


def _copy_assets(site: Path) -> None:
    target = site / VENDOR
    for source in ASSETS.rglob("*"):
        if not source.is_file():
            continue
        dest = target / source.relative_to(ASSETS)
        stat = source.stat()
        if dest.exists() and dest.stat().st_size == stat.st_size and dest.stat().st_mtime_ns == stat.st_mtime_ns:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)


def make_offline(site: Path) -> list[Path]:
    """Copy the assets into the built site and rewrite its pages and stylesheets; returns the pages rewritten."""
    _copy_assets(site)
    changed: list[Path] = []
    remote: set[str] = set()
    vendor = site / VENDOR
    for path in [*site.rglob("*.html"), *(site / "static" / "styles").glob("*.css")]:
        if vendor in path.parents:
            continue
        text = path.read_text(encoding="utf-8")
        to_root = "../" * (len(path.relative_to(site).parts) - 1)
        new = offline_html(text, to_root)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
        remote.update(remote_references(new))
    if remote:
        log.warning(
            "Data Docs still load %d URL(s) from the network (a Great Expectations upgrade changed its "
            "templates? add them to sofare.validation.data_docs.CDN): %s",
            len(remote),
            ", ".join(sorted(remote)),
        )
    return changed


def rename_unsafe(root: Path) -> int:
    """Rename files and folders under `root` whose names hold characters outside [A-Za-z0-9._-] (a results store
    written by older runs, e.g. `* 2023-03-20 2e825ed3`), merging into a folder of the new name; returns how many."""
    if not root.is_dir():
        return 0
    renamed = 0
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # deepest first
        if not UNSAFE.search(path.name):
            continue
        _move(path, path.with_name(safe_name(path.name)))
        renamed += 1
    return renamed


def _move(source: Path, dest: Path) -> None:
    if source.is_dir() and dest.is_dir():
        for child in source.iterdir():
            _move(child, dest / child.name)
        source.rmdir()
    elif not dest.exists():
        source.rename(dest)
    elif source.is_dir():  # a folder where a file of the safe name exists: keep what is already safe
        shutil.rmtree(source)
    else:  # the same file under both names
        source.unlink()


def remove_unsafe(site: Path) -> int:
    """Delete pages and folders of the site whose names are unsafe (stale: rebuilt under safe names)."""
    if not site.is_dir():
        return 0
    stale = [p for p in site.rglob("*") if UNSAFE.search(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    return len(stale)
