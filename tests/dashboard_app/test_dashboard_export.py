"""`fmaudit report RUN_DIR --html out.html`: one self-contained file with the dashboard's views."""

from __future__ import annotations

import json
import re

import pytest
from dashboard_reports import PROBE, build
from typer.testing import CliRunner

from fmaudit.cli import app as cli


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    return build(tmp_path_factory, tiny_bert_dir, sentiment_csv)


@pytest.fixture(scope="module")
def exported(reports, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "review" / "report.html"
    res = CliRunner().invoke(cli, ["report", str(reports["base_dir"]), "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert "HTML report" in res.output
    return out, out.read_text(encoding="utf-8")


def test_html_is_one_self_contained_file(exported):
    out, doc = exported
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # nothing beside it
    assert doc.startswith("<!DOCTYPE html>") and doc.rstrip().endswith("</html>")
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    assert doc.count(plotly_js) == 1  # plotly.js inlined, once
    rest = doc.replace(plotly_js, "")
    # Nothing is fetched when it opens: no external scripts, styles, images or fonts.
    assert not re.search(r"<script[^>]+src=", rest)
    assert not re.search(r"<link[^>]+href=", rest)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", rest)
    assert "@import" not in rest and "url(" not in rest


def test_html_has_the_same_views_with_the_reports_numbers(exported, reports):
    _, doc = exported
    base = reports["base"]
    for anchor in ("overview", "privacy", "robustness", "explainability"):
        assert f'id="{anchor}"' in doc
    assert base.run_id in doc
    # Failed gate notice, errored unit, scorecard, targets.
    assert "Gate failed" in doc or "fails:" in doc
    assert 'class="notice error"' in doc and "ValueError" in doc
    # The probe's ROC curve is embedded as plotly data on log axes, with the low-FPR TPR in its legend.
    figs = [json.loads(m) for m in re.findall(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', doc, flags=re.S)]
    assert figs, "no plotly figure in the document"
    curve = base.result(PROBE, "bert").curves["roc_loss"]
    xs = [x for x, y in zip(curve.x, curve.y) if x > 0 and y > 0]
    assert any(t.get("x") == xs and "TPR@1%FPR" in t.get("name", "") for data in figs for t in data)
    assert '"type":"log"' in doc.replace(" ", "")
    # Metric tables carry the unit and the one-line description on hover.
    auc = base.result(PROBE, "bert").metrics["auc"]
    assert f'title="{auc.description}' in doc
    # Sortable tables.
    assert 'class="sortable"' in doc and "addEventListener('click'" in doc


def test_report_text_is_escaped(exported):
    _, doc = exported
    # The probe's finding carries markup; it must arrive as text, not as a live element.
    assert "<script>alert(" not in doc
    assert "&lt;script&gt;alert(" in doc


@pytest.mark.parametrize(
    "run,message", [("corrupt", "not valid JSON"), ("old-schema", "schema 0.3"), ("partial", "no report.json")]
)
def test_unreadable_runs_exit_2_with_a_message(reports, tmp_path, run, message):
    out = tmp_path / "x.html"
    res = CliRunner().invoke(cli, ["report", str(reports["root"] / run), "--html", str(out)])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert not out.exists()


def test_export_of_an_interrupted_run_shows_its_partial_results(reports, tmp_path):
    from dashboard.export import export_html

    doc = export_html(reports["root"] / "partial", tmp_path / "p.html").read_text()
    assert "No report.json" in doc and "Plotly.newPlot" in doc


def test_dashboard_command_refuses_a_missing_folder(tmp_path):
    res = CliRunner().invoke(cli, ["dashboard", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a folder" in " ".join(res.output.split())


# ---------------------------------------------------------------------------------------------------
# The verdict block, on constructed reports (no pipeline run: fast)


def _constructed_run(tmp_path, rep):
    from fmaudit.report import write_report

    run = tmp_path / "runs" / rep.run_id
    write_report(rep, run / "report.json")
    return run


def test_html_starts_with_the_verdict_per_area(tmp_path):
    from report_fixtures import leaky_report, text_attack

    from dashboard.export import export_html
    from fmaudit.report import Finding
    from fmaudit.verdict import COLOURS

    rep = leaky_report()
    evil = text_attack("bert", "deepwordbug", 0.54, index=3)
    evil = evil.model_copy(
        update={
            "params": {"attack": "<script>alert(1)</script>"},
            "findings": [Finding(severity="high", title="flips <b>54%</b>")],
        }
    )
    rep = rep.model_copy(update={"audits": rep.audits + [evil]})
    doc = export_html(_constructed_run(tmp_path, rep), tmp_path / "r.html").read_text(encoding="utf-8")
    body = doc.split("<main>", 1)[1]
    # The verdict block is the first thing of the overview, before the gate cards and the run table.
    i = body.index('class="verdicts"')
    assert i < body.index('class="cards"') and i < body.index('class="sortable"')
    levels = re.findall(r'data-area="(\w+)" data-level="(\w+)"', body)
    assert levels == [("privacy", "high"), ("robustness", "high"), ("explainability", "none"), ("utility", "ok")]
    block = body[i : body.index("</div></div>", i)]
    assert f"border-left:5px solid {COLOURS['high']}" in block and f"solid {COLOURS['ok']}" in block
    assert "Leaks membership" in block and "best attack TPR 12% at 1% FPR [8, 16]" in block
    assert "DP twin bert-dp (ε=8) indistinguishable from chance" in block
    assert "Fooled by" in block and "54% of correct predictions flipped" in block
    assert "<script>alert(1)" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt;" in block


def test_verdicts_of_an_interrupted_run_come_from_its_finished_units(tmp_path):
    from report_fixtures import leaky_report

    from dashboard.runs import RunEntry
    from dashboard.sinks import HtmlSink
    from dashboard.views import view_overview

    rep = leaky_report()
    entry = RunEntry(
        name="partial",
        path=tmp_path,
        state="partial",
        notice="No report.json: interrupted",
        partial_results=[a for a in rep.audits if a.module == "utility"],
    )
    sink = HtmlSink()
    view_overview(sink, entry)
    doc = sink.render()
    assert re.findall(r'data-area="(\w+)" data-level="(\w+)"', doc) == [
        ("privacy", "none"),
        ("robustness", "none"),
        ("explainability", "none"),
        ("utility", "ok"),
    ]
    assert "From the units that finished." in doc


def test_html_figures_colour_targets_alike_and_keep_legends_below(tmp_path):
    from report_fixtures import leaky_report

    from dashboard.colours import target_colours
    from dashboard.export import export_html

    rep = leaky_report()
    doc = export_html(_constructed_run(tmp_path, rep), tmp_path / "r.html").read_text(encoding="utf-8")
    plots = [
        (json.loads(d), json.loads(lay))
        for d, lay in re.findall(
            r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*(\{.*?\}),\s*\{"displaylogo"', doc, flags=re.S
        )
    ]
    assert plots
    colours = target_colours(rep)
    utility = next(data for data, lay in plots if "private vs non-private" in json.dumps(lay.get("title")))
    assert {t["name"]: t["marker"]["color"] for t in utility} == {
        "bert (non-private)": colours["bert"],
        "bert-dp (private, DP)": colours["bert-dp"],
    }
    for data, lay in plots:
        if any(t.get("name") and t.get("showlegend") is not False for t in data) and lay.get("showlegend") is not False:
            assert lay["legend"]["yref"] == "container" and lay["legend"]["yanchor"] == "bottom", lay.get("title")
