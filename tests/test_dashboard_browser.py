"""A real browser on the real server: `fmaudit dashboard` on a loopback port, driven by headless chromium
(Debian's package, through Playwright). Checks that the run list and a privacy plot rendered and saves
screenshots to build/test-artifacts/dashboard/ (or $FMAUDIT_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from dashboard_reports import REPO, build

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium) to run the "
                              "real-browser dashboard test"),
]


def artifacts_dir() -> Path:
    d = Path(os.environ.get("FMAUDIT_TEST_ARTIFACTS") or REPO / "build" / "test-artifacts") / "dashboard"
    d.mkdir(parents=True, exist_ok=True)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    reports = build(tmp_path_factory, tiny_bert_dir, sentiment_csv)
    port = free_port()
    fmaudit = shutil.which("fmaudit", path=str(Path(sys.executable).parent)) or "fmaudit"
    log = open(tmp_path_factory.mktemp("dash-server") / "server.log", "w+")
    proc = subprocess.Popen([fmaudit, "dashboard", str(reports["root"]), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path_factory.getbasetemp())
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                proc.kill()
                pytest.fail(f"the dashboard did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.2)
    yield {"url": f"http://127.0.0.1:{port}", **reports}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_run_list_and_privacy_plot_render_in_chromium(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    out = artifacts_dir()
    base = server["base_dir"].name
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Runs: the table lists every run folder (the data grid keeps an accessible copy of its cells).
            page.goto(f"{server['url']}/?view=Runs", wait_until="domcontentloaded")
            page.get_by_text("Runs", exact=True).first.wait_for(timeout=90_000)
            grid = page.locator("[data-testid='stDataFrame']").first
            grid.wait_for(timeout=90_000)
            page.wait_for_function(
                "names => names.every(n => document.body.innerText.includes(n) || "
                "[...document.querySelectorAll('[data-testid=stDataFrame] *')].some(e => (e.textContent || '')"
                ".includes(n)))", arg=[base, "corrupt", "old-schema"], timeout=90_000)
            page.screenshot(path=str(out / "runs.png"), full_page=True)
            # Privacy: a plotly ROC rendered as SVG, on log axes, with TPR at low FPR in its legend.
            page.goto(f"{server['url']}/?view=Privacy&run={quote(base)}", wait_until="domcontentloaded")
            page.locator(".js-plotly-plot .main-svg").first.wait_for(state="attached", timeout=90_000)
            page.wait_for_function("() => [...document.querySelectorAll('.legendtext')]"
                                   ".some(e => e.textContent.includes('TPR@1%FPR'))", timeout=90_000)
            assert page.locator(".js-plotly-plot").count() >= 1
            assert page.locator(".js-plotly-plot .xaxislayer-above .xtick").count() > 0  # axes drawn
            page.screenshot(path=str(out / "privacy.png"), full_page=True)
            roc = page.locator(".js-plotly-plot").filter(has_text="TPR@1%FPR").first
            roc.scroll_into_view_if_needed()
            roc.screenshot(path=str(out / "privacy-roc.png"))
            assert not [e for e in errors if "plotly" in e.lower()], errors
        finally:
            browser.close()
    for name in ("runs.png", "privacy.png", "privacy-roc.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_exported_html_renders_offline_in_chromium(server, tmp_path):
    """The HTML export draws its plots with every network request blocked (it is self-contained)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    from dashboard.export import export_html

    doc = export_html(server["base_dir"], tmp_path / "report.html")
    outside: list[str] = []

    def block(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", block)
            page.goto(doc.resolve().as_uri(), wait_until="load")
            page.wait_for_function("() => [...document.querySelectorAll('.legendtext')]"
                                   ".some(e => e.textContent.includes('TPR@1%FPR'))", timeout=90_000)
            assert page.locator(".js-plotly-plot").count() >= 2
            page.screenshot(path=str(artifacts_dir() / "export.png"), full_page=False)
        finally:
            browser.close()
    assert outside == []
