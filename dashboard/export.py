"""`fmaudit report RUN_DIR --html out.html`: one self-contained HTML file with the dashboard's views of a run.

Self-contained means: plotly.js is inlined once, images are data: URIs, the sortable-table script and the
styles are inline, and nothing is fetched from the network when the file is opened.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from dashboard.colours import colour_scope
from dashboard.runs import RunEntry, load_entry
from dashboard.sinks import HtmlSink, Sink
from dashboard.views import CATEGORY_OF_VIEW, view_category, view_overview, view_runs

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1f2430; }
header { background: #1f2430; color: #fff; padding: 12px 24px; }
header a { color: #cfe3ff; margin-right: 16px; text-decoration: none; }
main { padding: 8px 24px 48px; max-width: 1400px; }
section.view { border-top: 1px solid #ddd; margin-top: 24px; }
h2 { margin-top: 18px; } h3 { margin-top: 16px; } h4 { margin: 12px 0 4px; }
.caption { color: #666; font-size: 0.88em; }
.notice { padding: 8px 12px; border-radius: 6px; margin: 8px 0; }
.notice.info { background: #e8f1fb; } .notice.warning { background: #fff4d6; }
.notice.error { background: #fde7e9; } .notice.success { background: #e6f4ea; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0; }
.card { border: 1px solid #e3e3e3; border-radius: 8px; padding: 8px 14px; min-width: 140px; cursor: help; }
.card .label { color: #666; font-size: 0.85em; } .card .value { font-size: 1.35em; font-weight: 600; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #e3e3e3; padding: 4px 8px; text-align: left; vertical-align: top; }
table.sortable th { cursor: pointer; background: #f6f7f9; }
table.sortable th:after { content: " \\2195"; color: #aaa; }
.cols { display: flex; gap: 16px; } .cols .col { flex: 1 1 0; min-width: 0; overflow: hidden; }
.fig { width: 100%; }
details { margin: 8px 0; } summary { cursor: pointer; font-weight: 600; }
figure { margin: 4px; display: inline-block; } figure img { image-rendering: pixelated; width: 160px; }
pre { background: #f6f7f9; padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""

SORT_JS = """
// Plots drawn while the page was still being parsed measured their column before it had its final width.
window.addEventListener('load', function () {
  document.querySelectorAll('.js-plotly-plot').forEach(function (g) { Plotly.Plots.resize(g); });
});
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    var asc = true;
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var nx = x.dataset.sort !== undefined ? parseFloat(x.dataset.sort) : NaN;
        var ny = y.dataset.sort !== undefined ? parseFloat(y.dataset.sort) : NaN;
        var r = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.textContent.localeCompare(y.textContent);
        return asc ? r : -r;
      });
      asc = !asc;
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


class ExportError(ValueError):
    """The run folder has nothing that can be exported."""


def render_entry_html(entry: RunEntry) -> str:
    """The full HTML document for one run."""
    from plotly.offline import get_plotlyjs

    sections = []
    views: list[tuple[str, str, Callable[[Sink], None]]] = [
        ("overview", "Run overview", lambda s: view_overview(s, entry))
    ]
    for view in CATEGORY_OF_VIEW:
        views.append((view.lower(), view, partial(view_category, entry=entry, view=view)))
    # One colour per target in every view of the document (a DP twin: its source's hue, lighter).
    with colour_scope(entry.report if entry.report is not None else SimpleNamespace(targets={}, audits=entry.results)):
        for anchor, _title, fn in views:
            sink = HtmlSink()
            fn(sink)
            sections.append(f'<section class="view" id="{anchor}">{sink.render()}</section>')
    runs = HtmlSink()
    view_runs(runs, [entry])
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in views)
    title = f"fmaudit report — {entry.label}"
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f'<style>{CSS}</style><script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<header><b>{html.escape(title)}</b> &nbsp; {nav}</header><main>"
        f'<p class="caption">Exported by fmaudit at {made}. Hover a number or a column header for its unit and '
        "meaning; click a column header to sort. The verdict per area comes first.</p>"
        f"{sections[0]}{runs.render()}{''.join(sections[1:])}"
        f"</main><script>{SORT_JS}</script></body></html>\n"
    )


def export_html(run_dir: str | Path, out: str | Path) -> Path:
    """Write the HTML of the run in `run_dir` (a run folder or its report.json) to `out`; returns `out`.

    Raises FileNotFoundError when there is no run there and ExportError when it cannot be read."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    entry = load_entry(run_dir, run_dir)
    if entry is None:
        raise FileNotFoundError(f"{run_dir}: no report.json or events.jsonl (not an fmaudit run folder)")
    if entry.state not in ("ok", "partial"):  # old / newer schema, corrupt, too large
        raise ExportError(f"{run_dir}: {entry.notice}")
    doc = render_entry_html(entry)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    return out
