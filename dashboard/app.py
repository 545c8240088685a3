"""fmaudit dashboard: review the runs in one reports folder.

    fmaudit dashboard [REPORTS_DIR]                 # starts it on localhost
    streamlit run dashboard/app.py -- REPORTS_DIR   # the same, by hand

The folder comes from FMAUDIT_REPORTS_DIR, else the first argument after `--`, else ./reports. The app
reads nothing outside that folder and never imports torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, _REPO)

import streamlit as st  # noqa: E402

from dashboard.colours import colour_scope  # noqa: E402
from dashboard.compare_view import view_compare  # noqa: E402
from dashboard.runs import RunEntry, scan_runs  # noqa: E402
from dashboard.sinks import StreamlitSink  # noqa: E402
from dashboard.views import CATEGORY_OF_VIEW, VIEWS, view_category, view_overview, view_runs  # noqa: E402


def reports_dir() -> Path:
    env = os.environ.get("FMAUDIT_REPORTS_DIR")
    if env:
        return Path(env)
    if len(sys.argv) > 1 and sys.argv[0].endswith("app.py") and not sys.argv[1].startswith("-"):
        return Path(sys.argv[1])
    return Path("reports")


def _signature(root: Path) -> tuple:
    """Cheap fingerprint of the folder: reload when a run is added or a report changes."""
    sig = []
    try:
        for child in sorted(root.iterdir()):
            sig.append((child.name,))  # a new (even empty) run folder is listed too
            for f in ("report.json", "events.jsonl"):
                p = child / f
                try:
                    st_ = p.stat()
                    sig.append((child.name, f, st_.st_mtime_ns, st_.st_size))
                except OSError:
                    pass
        for f in ("report.json", "events.jsonl"):
            p = root / f
            if p.exists():
                sig.append((".", f, p.stat().st_mtime_ns, p.stat().st_size))
    except OSError:
        pass
    return tuple(sig)


@st.cache_resource(show_spinner=False, max_entries=8)
def _load(root: str, signature: tuple) -> list[RunEntry]:
    return scan_runs(root)


def _runs_page(sink: StreamlitSink, entries: list[RunEntry]) -> None:
    st.header("Runs", anchor=False)
    st.caption("Every run in the reports folder, newest first. Pick one in the sidebar to open its views.")
    recipes = sorted({e.recipe_name or "—" for e in entries})
    modules = sorted({r.module for e in entries for r in e.results})
    c1, c2, c3, c4 = st.columns(4)
    q = c1.text_input("Search", placeholder="run, recipe or target", help="Case-insensitive text filter.")
    pick_recipes = c2.multiselect("Recipe", recipes, help="Show only runs of these recipes.")
    pick_gates = c3.multiselect(
        "Gates",
        ["pass", "FAIL", "no gates", "unknown", "pass (partial)"],
        help="Overall verdict of the recipe's fail_if gates.",
    )
    pick_modules = c4.multiselect("Module", modules, help="Show only runs that ran one of these modules.")
    errors_only = st.checkbox(
        "Only runs with errors or notices",
        help="Errored modules; partial, corrupt, empty, too large, old- or newer-schema runs.",
    )
    from dashboard.runs import gate_verdict

    shown = []
    for e in entries:
        text = " ".join([e.label, e.recipe_name or "", *(e.report.targets if e.report else [])]).lower()
        if q and q.lower() not in text:
            continue
        if pick_recipes and (e.recipe_name or "—") not in pick_recipes:
            continue
        if pick_gates and gate_verdict(e) not in pick_gates:
            continue
        if pick_modules and not any(r.module in pick_modules for r in e.results):
            continue
        if errors_only and e.state == "ok" and not any(r.status == "error" for r in e.results):
            continue
        shown.append(e)
    st.caption(f"{len(shown)} of {len(entries)} run(s)")
    view_runs(sink, shown)
    for e in shown:
        if e.state != "ok":
            sink.notice("warning" if e.state == "partial" else "error", f"{e.label}: {e.notice}")


def main() -> None:
    st.set_page_config(page_title="fmaudit dashboard", layout="wide")
    root = reports_dir()
    st.sidebar.title("fmaudit")
    st.sidebar.caption(f"Reports folder: {root.resolve()}")
    if not root.is_dir():
        st.error(
            f"Reports folder {str(root)!r} does not exist. Start the dashboard with "
            "`fmaudit dashboard PATH/TO/REPORTS`."
        )
        return
    if st.sidebar.button("Reload", help="Read the folder again (new runs are also picked up automatically)."):
        _load.clear()
    entries = _load(str(root.resolve()), _signature(root))
    labels = [e.label for e in entries]
    by_label = {e.label: e for e in entries}

    params = st.query_params
    want_view = params.get("view")
    view = st.sidebar.radio("View", VIEWS, index=VIEWS.index(want_view) if want_view in VIEWS else 0, key="view")
    sink = StreamlitSink()
    if not entries:
        if view != "Runs":
            st.info("No runs in this folder yet.")
        else:
            view_runs(sink, entries)
        return
    want_run = params.get("run")
    default = labels.index(want_run) if want_run in by_label else 0
    if view == "Compare":  # ?view=Compare&a=<baseline>&run=<run>; A defaults to the second newest
        want_a = params.get("a")
        a_index = labels.index(want_a) if want_a in by_label else min(1, len(labels) - 1)
        a = st.sidebar.selectbox("Run A", labels, index=a_index, key="run_a", help="The baseline.")
        b = st.sidebar.selectbox("Run B", labels, index=default, key="run_b", help="Compared against A.")
        view_compare(sink, by_label[a], by_label[b])
        return
    run = st.sidebar.selectbox("Run", labels, index=default, key="run", help="Newest first.")
    entry = by_label[run]
    if view == "Runs":
        _runs_page(sink, entries)
    elif view in ("Run overview", *CATEGORY_OF_VIEW):
        with colour_scope(entry.report):  # one colour per target in every plot; a DP twin a lighter hue
            if view == "Run overview":
                view_overview(sink, entry)
            else:
                view_category(sink, entry, view)


main()
