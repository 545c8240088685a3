"""A real browser on the real server: `fmaudit dashboard` on a loopback port, driven by headless chromium
(Debian's package at /usr/bin/chromium, or $FMAUDIT_CHROMIUM, through Playwright; skipped when absent).

Checks what a reviewer sees: the run list; the verdict block (one line per area) at the top of the overview;
the privacy, robustness and explainability plots drawn with their legends outside the plotting area and no
plot squeezed; and
Compare on two runs of the same recipe and seed showing zero audit-metric changes, with the timing and cost
figures in their own section. Screenshots of each view are saved to $FMAUDIT_SCREENSHOT_DIR (default
reports/screenshots/, git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from dashboard_reports import REPO, build, same_seed_rerun

CHROMIUM = os.environ.get("FMAUDIT_CHROMIUM") or "/usr/bin/chromium"  # Debian's package
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}
WAIT_MS = 90_000  # first page load compiles the app; later ones take a second or two

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium) to run the "
        "real-browser dashboard test",
    )
]


def screenshot_dir() -> Path:
    """Where the screenshots go: $FMAUDIT_SCREENSHOT_DIR, else reports/screenshots/ in the repository."""
    d = Path(os.environ.get("FMAUDIT_SCREENSHOT_DIR") or REPO / "reports" / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir, sentiment_csv) -> Iterator[dict[str, Any]]:
    """The dashboard on the shared fixture runs plus a same-seed re-run of the base run (in a copy of the reports
    folder, so the other dashboard tests see the runs they expect)."""
    reports = build(tmp_path_factory, tiny_bert_dir, sentiment_csv)
    root = tmp_path_factory.mktemp("browser-reports")
    for child in reports["root"].iterdir():
        shutil.copytree(child, root / child.name)
    rerun = same_seed_rerun(reports["base_dir"], root / f"{reports['base_dir'].name}-rerun")
    port = free_port()
    fmaudit = shutil.which("fmaudit", path=str(Path(sys.executable).parent)) or "fmaudit"
    log = open(tmp_path_factory.mktemp("dash-server") / "server.log", "w+")
    proc = subprocess.Popen(
        [fmaudit, "dashboard", str(root), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path_factory.getbasetemp(),
    )
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
    yield {**reports, "url": f"http://127.0.0.1:{port}", "root": root, "rerun_dir": rerun}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def context() -> Iterator[Any]:
    """One chromium and one browser context for the module: its HTTP cache keeps Streamlit's scripts and
    plotly.js between pages."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b.new_context(viewport=VIEWPORT)
        finally:
            b.close()


@pytest.fixture
def page(context) -> Iterator[Any]:
    """A fresh page; fails the test on any page error (a plot that did not draw, a script error)."""
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    p.close()
    assert not errors, errors


def open_view(page: Any, url: str, heading: str, **query: str) -> None:
    """Open `?view=...&run=...`, wait for `heading`, then for the page to settle."""
    page.goto(f"{url}/?{urlencode(query)}", wait_until="domcontentloaded")
    page.get_by_text(heading, exact=False).first.wait_for(timeout=WAIT_MS)
    settle(page)


# What the page shows: the script is running, or an element is still loading (a skeleton: plotly.js and other
# components load on first use) or stale; every plot drew its SVG; (counts, height) as a signature.
PAGE_STATE = """() => { const plots = [...document.querySelectorAll('[data-testid=stPlotlyChart]')];
    const main = document.querySelector('[data-testid=stMain]');
    return {running: !!document.querySelector('[data-testid=stStatusWidget], [data-testid=stSkeleton], '
                                              + '[data-stale=true]'),
            drawn: plots.every(p => p.querySelector('.main-svg')),
            signature: [plots.length, document.querySelectorAll('.main-svg').length,
                        document.querySelectorAll('[data-testid=stElementContainer]').length,
                        main ? main.scrollHeight : 0].join(',')}; }"""


def settle(page: Any, *, quiet_ms: int = 1000) -> None:
    """Wait until the script run finished, nothing is loading, every plot drew, and nothing changed for
    `quiet_ms` (Streamlit sends elements as the script runs, and loads plotly.js on the first chart)."""
    deadline, last, since = time.monotonic() + WAIT_MS / 1000, None, time.monotonic()
    while time.monotonic() < deadline:
        state = page.evaluate(PAGE_STATE)
        now = time.monotonic()
        if state["running"] or not state["drawn"] or state["signature"] != last:
            last, since = state["signature"], now
        elif (now - since) * 1000 >= quiet_ms:
            return
        page.wait_for_timeout(150)
    pytest.fail(f"the page did not settle within {WAIT_MS // 1000} s: {page.evaluate(PAGE_STATE)}")


def shoot(page: Any, name: str) -> Path:
    """A screenshot of the whole view. Streamlit scrolls inside its main block, not the page, so the viewport is
    grown to the content's height first (and restored after)."""
    height = page.evaluate(
        "() => { const m = document.querySelector('[data-testid=stMain]') || document.body;"
        " return Math.ceil(m.scrollHeight); }"
    )
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(max(height + 40, VIEWPORT["height"]), 16_000)})
    settle(page, quiet_ms=400)
    path = screenshot_dir() / name
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    return path


# Plots that do not read at a glance: a legend over the plotting area, or a plotting area squeezed to less
# than half the figure's width (a legend plotly reserved a side margin for).
PLOT_PROBLEMS = """() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(plot => {
    const legend = plot.querySelector('g.legend'), area = plot.querySelector('.draglayer .nsewdrag');
    if (!area) return [];
    const a = area.getBoundingClientRect(), f = plot.getBoundingClientRect();
    const title = (plot.querySelector('.gtitle') || {}).textContent || '(untitled)';
    const problems = a.width < f.width / 2 ? [`${title}: plotting area ${a.width | 0} of ${f.width | 0} px`] : [];
    if (legend) {
        const l = legend.getBoundingClientRect();
        if (!(l.top >= a.bottom - 1 || l.bottom <= a.top + 1 || l.left >= a.right - 1 || l.right <= a.left + 1))
            problems.push(`${title}: legend over the plotting area`);
    }
    return problems;
})"""


def metric_cards(page: Any) -> dict[str, str]:
    """The st.metric cards on the page: label -> value."""
    return page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('[data-testid=stMetric]')].map(m =>"
        " [m.querySelector('[data-testid=stMetricLabel]').innerText.trim(),"
        " m.querySelector('[data-testid=stMetricValue]').innerText.trim()]))"
    )


def test_run_list_renders_every_run(server, page):
    open_view(page, server["url"], "Runs", view="Runs")
    page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=WAIT_MS)
    # The data grid keeps an accessible copy of its cells.
    page.wait_for_function(
        "names => names.every(n => document.body.innerText.includes(n) || "
        "[...document.querySelectorAll('[data-testid=stDataFrame] *')].some(e => (e.textContent || '')"
        ".includes(n)))",
        arg=[server["base_dir"].name, server["rerun_dir"].name, "corrupt", "old-schema"],
        timeout=WAIT_MS,
    )
    shoot(page, "runs.png")


def test_overview_shows_one_verdict_per_area(server, page):
    from fmaudit.verdict import AREAS, verdicts

    open_view(page, server["url"], "Verdict per area", view="Run overview", run=server["base_dir"].name)
    lines = page.locator(".verdicts .verdict")
    assert lines.count() == len(AREAS)
    shown = [(lines.nth(i).get_attribute("data-area"), lines.nth(i).inner_text()) for i in range(lines.count())]
    assert [area for area, _ in shown] == list(AREAS)
    for v, (_, text) in zip(verdicts(server["base"]), shown):
        headline = v.text.partition(": ")[0]
        assert headline in text and v.area in text, (v, text)
    # The verdicts come first, before the scorecard.
    order = page.evaluate(
        "() => { const t = document.body.innerText;"
        " return [t.indexOf('Verdict per area'), t.indexOf('Findings scorecard')]; }"
    )
    assert 0 <= order[0] < order[1]
    shoot(page, "overview.png")


@pytest.mark.parametrize(
    ("view", "heading", "shot"),
    [
        ("Privacy", "Membership inference", "privacy.png"),
        ("Robustness", "Adversarial text", "robustness.png"),
        ("Explainability", "Attributions", "explainability.png"),
    ],
)
def test_category_views_draw_readable_plots(server, page, view, heading, shot):
    modules = {r.module for r in server["base"].audits}
    wanted = {
        "Privacy": "privacy.membership",
        "Robustness": "robustness.text_attack",
        "Explainability": "explain.attribution",
    }[view]
    if wanted not in modules:
        pytest.skip(f"{wanted} is not registered in this checkout, so the fixture run has no {view.lower()} plots")
    open_view(page, server["url"], heading, view=view, run=server["base_dir"].name)
    assert page.locator(".js-plotly-plot").count() >= 1
    assert page.locator(".js-plotly-plot .xaxislayer-above .xtick").count() > 0  # axes drawn
    if view == "Privacy":  # log-log ROC with TPR at low FPR in its legend
        page.wait_for_function(
            "() => [...document.querySelectorAll('.legendtext')].some(e => e.textContent.includes('TPR@1%FPR'))",
            timeout=WAIT_MS,
        )
    assert page.evaluate(PLOT_PROBLEMS) == []
    shoot(page, shot)
    if view == "Privacy":
        roc = page.locator(".js-plotly-plot").filter(has_text="TPR@1%FPR").first
        roc.scroll_into_view_if_needed()
        roc.screenshot(path=str(screenshot_dir() / "privacy-roc.png"))


def test_image_attack_curves_are_readable(server, page):
    if server.get("images_dir") is None:
        pytest.skip("robustness.image_attack is not registered in this checkout: no image run to show")
    open_view(page, server["url"], "Adversarial images", view="Robustness", run=server["images_dir"].name)
    assert page.locator(".js-plotly-plot").count() >= 1
    assert page.evaluate(PLOT_PROBLEMS) == []
    shoot(page, "robustness-images.png")


def test_compare_same_seed_runs_shows_no_audit_change(server, page):
    from fmaudit.compare import compare_results

    base, rerun = server["base_dir"].name, server["rerun_dir"].name
    open_view(page, server["url"], "Compare: A =", view="Compare", a=base, run=rerun)
    page.get_by_text("Timing and cost (not audit results)").first.wait_for(timeout=WAIT_MS)
    assert page.get_by_text(f"Compare: A = {base}  ·  B = {rerun}").count() == 1
    diffs = list(compare_results(server["base"].audits, server["base"].audits))
    audit = [d for d in diffs if d.kind == "audit"]
    cards = metric_cards(page)
    assert cards["metrics compared"] == str(len(diffs)) and len(audit) > 0
    for label in ("changed", "better in B", "worse in B", "within noise", "only in one run"):
        assert cards[label] == "0", (label, cards)
    assert int(cards["timing / cost"]) > 0  # the re-run took longer: listed apart, never better or worse
    assert page.get_by_text("No audit metric changed beyond its noise").count() == 1
    costs = page.locator("table.diff").last.inner_text()
    assert "higher in B" in costs and "worse in B" not in costs and "better in B" not in costs
    assert page.locator("table.verdicts-compare tbody tr").count() == 4  # both runs' verdicts, per area
    shoot(page, "compare.png")


def test_exported_html_renders_offline_in_chromium(server, context, tmp_path):
    """The HTML export draws its plots with every network request blocked (it is self-contained)."""
    from dashboard.export import export_html

    doc = export_html(server["base_dir"], tmp_path / "report.html")
    outside: list[str] = []

    def block(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page = context.new_page()
    try:
        page.route("**/*", block)
        page.goto(doc.resolve().as_uri(), wait_until="load")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.legendtext')].some(e => e.textContent.includes('TPR@1%FPR'))",
            timeout=WAIT_MS,
        )
        assert page.locator(".js-plotly-plot").count() >= 2
        assert page.locator(".verdicts .verdict").count() == 4
        page.screenshot(path=str(screenshot_dir() / "export.png"), full_page=False)
    finally:
        page.close()
    assert outside == []
