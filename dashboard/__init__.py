"""fmaudit's review UI: a Streamlit dashboard (`fmaudit dashboard`) and a static HTML export
(`fmaudit report RUN_DIR --html out.html`) that render the same views.

Reads reports only through `fmaudit.report` (pydantic + standard library): nothing here imports torch,
so the dashboard starts in seconds on a machine that only has the reports.

Layout: `runs` finds and loads run folders (never a crash: old schema, corrupt and partial runs become
notices); `figures` builds plotly figures, `colours` gives each target its hue, `fragments` builds small
HTML pieces (token heatmaps, verdicts); `views` writes the generic views (run list, overview, category
views) into a `Sink`, `compare_view` the Compare view; `generic` renders any module's result, and
`renderers` holds the per-module renderers, registered by module name; `sinks` has the Streamlit sink and
the HTML sink; `export` writes the self-contained HTML file; `app` is the Streamlit entry point.
"""
