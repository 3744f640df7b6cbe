"""The documentation site builds strictly and renders offline in a real browser.

``mkdocs build --strict`` fails on a broken link, a page missing from the nav, an API reference
naming nothing, or a docstring it cannot parse; the CLI reference is generated from the click
commands during that build. Then headless Chromium (Debian's ``chromium``, driven by Playwright's
Python client; ``make test`` installs both) opens the built site from a local server, with no
network, and finds the home page's and a tutorial's text, the generated CLI reference, and
search results — which means the search index loaded. Without Chromium the browser test skips,
unless ``KDEDGE_REQUIRE_BROWSER=1`` (as ``make test`` sets when it could install it).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As this machine's probe starts it: no sandbox (root), no GPU, and none of the background connections a closed network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def test_site_builds_strict_with_every_page(site):
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name != "404.html")
    docs = sorted(p.relative_to(ROOT / "docs").with_suffix(".html").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages == docs
    cli = (site / "cli.html").read_text()
    # Generated from click, so every command and one of its flags appear: a command added to the CLI appears here by itself.
    from kdedge.cli import cli as group

    for name in group.commands:
        assert f"kdedge {name}" in cli, name
    assert "--min-retention" in cli and "--input-format" in cli
    api = (site / "api.html").read_text()
    assert 'id="kdedge.runs.distill"' in api and 'id="kdedge.bundle.compress_and_export"' in api and "DistillConfig" in api
    assert 'id="kdedge.distill"' not in api  # the function, not the subpackage of the same name
    assert ":func:" not in api and ":class:" not in api  # Sphinx roles rendered as code names (scripts/docs_hooks.py)
    assert "Sentinel" not in cli  # click's unset defaults never shown as such
    assert (site / "search" / "search_index.json").stat().st_size > 100_000


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_site_renders_offline_in_chromium(served, tmp_path):
    if not _chromium_runs() or not _has_playwright():
        if os.environ.get("KDEDGE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"KDEDGE_REQUIRE_BROWSER=1 but chromium is {CHROMIUM} ({'runs' if _chromium_runs() else 'does not run'}) and playwright "
                        f"{'is' if _has_playwright() else 'is not'} importable")
        pytest.skip("needs a chromium that runs (Debian's; Ubuntu's apt package is a stub for a snap) and the playwright package "
                    "(make test installs both on Debian)")
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"{served}/index.html")
        assert page.title() == "kdedge"
        assert "deployment bundle" in page.inner_text("article")
        assert page.locator("article table").count() >= 1  # the headline numbers
        page.goto(f"{served}/tutorials/image-folder.html")
        article = page.inner_text("article")
        assert "Your own image folder" in article and "kdedge compress-and-export --teacher runs/photo-teacher" in article
        page.screenshot(path=str(tmp_path / "tutorial.png"))
        # Search: the query opens the search box, the worker loads the index, and results render.
        page.goto(f"{served}/getting-started.html?q=retention")
        page.wait_for_selector(".md-search-result__item", timeout=30_000)
        assert page.locator(".md-search-result__item").count() >= 3
        browser.close()
    assert (tmp_path / "tutorial.png").stat().st_size > 20_000  # a rendered page, not a blank one
    assert all(url.startswith(served) or url.startswith("data:") for url in requests), [u for u in requests if not u.startswith(served)]


@functools.cache
def _chromium_runs() -> bool:
    """Ubuntu's apt ``chromium`` is a stub that asks for the snap: present on PATH, but it does not run."""
    try:
        return bool(CHROMIUM) and subprocess.run([CHROMIUM, "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True
