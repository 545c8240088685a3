"""The dashboard's views under Streamlit's AppTest, against reports the real pipeline wrote (see
tests/dashboard_reports.py), including a corrupt, an old-schema and an interrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from dashboard_reports import PROBE, REPO, build

APP = REPO / "dashboard" / "app.py"


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    return build(tmp_path_factory, tiny_bert_dir, sentiment_csv)


@pytest.fixture()
def app(reports, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FMAUDIT_REPORTS_DIR", str(reports["root"]))

    def _open(view: str = "Runs", run: str | None = None, **select) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception, [e.value for e in at.exception]
        at.radio(key="view").set_value(view).run()
        if run is not None:
            at.selectbox(key="run").set_value(run).run()
        for key, value in select.items():
            at.selectbox(key=key).set_value(value).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return _open


def figures(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def texts(elements) -> list[str]:
    return [e.value.replace("\\", "") for e in elements]


def frame(at, column: str):
    """The first dataframe that has `column`."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with column {column!r}")


# ---------------------------------------------------------------------------------------------------


def test_fixture_reports_are_real(reports):
    base = reports["base"]
    assert base.result("utility", "bert").status == "ok"
    assert base.result(PROBE, "bert").status == "ok"
    assert [r.status for r in base.audits if r.module == "utility" and r.target == "bert"] == ["ok", "error"]
    assert not base.gates_passed


def test_runs_view_lists_every_run_with_states_and_filters(app, reports):
    at = app("Runs")
    df = frame(at, "gates")
    by_run = {row["run"]: row for row in df.to_dict("records")}
    base, other = reports["base_dir"].name, reports["other_dir"].name
    expected = {base, other, "corrupt", "old-schema", "partial"}
    if reports["images_dir"] is not None:
        expected.add(reports["images_dir"].name)
    assert set(by_run) == expected
    assert by_run[base]["recipe"] == "dash-base" and by_run[base]["gates"] == "FAIL"
    assert by_run[base]["modules errored"] == sum(r.status == "error" for r in reports["base"].audits) >= 1
    assert by_run["corrupt"]["state"] == "corrupt" and by_run["old-schema"]["state"] == "old schema"
    assert by_run["partial"]["state"] == "partial"
    assert by_run["partial"]["modules ok"] == by_run[base]["modules ok"]  # recovered from events.jsonl
    assert "utility@bert: error" in by_run[base]["module statuses"]
    notices = " ".join(texts(at.error) + texts(at.warning))
    assert "schema 0.3" in notices and "could not be read" in notices and "No report.json" in notices
    # Filters narrow the list.
    at.multiselect[0].set_value(["dash-other"]).run()
    assert list(frame(at, "gates")["run"]) == [other]
    at.multiselect[0].set_value([]).run()
    at.text_input[0].set_value("corr").run()
    assert list(frame(at, "gates")["run"]) == ["corrupt"]


def test_overview_puts_failed_gates_first_and_counts_findings(app, reports):
    base = reports["base"]
    at = app("Run overview", run=reports["base_dir"].name)
    errors = texts(at.error)
    assert errors and "accuracy" in errors[0] and "fails" in errors[0]  # the failed gate, first
    assert any("errored" in e and "ValueError" in e and "split" in e for e in errors)  # the errored unit
    counts = {m.label: int(m.value) for m in at.metric if m.label in ("critical", "high", "medium", "low", "info")}
    expected = {s: sum(f.severity == s for r in base.audits for f in r.findings) for s in counts}
    assert counts == expected and counts["high"] >= 1
    findings = frame(at, "failed gate")
    assert findings.iloc[0]["failed gate"] == "yes"
    targets = frame(at, "architecture")
    row = targets[targets["target"] == "bert"].iloc[0]
    assert row["accuracy"] == pytest.approx(base.result("utility", "bert").metrics["accuracy"].value)
    assert row["parameters"] == base.targets["bert"].num_parameters
    # Every metric help text (hover) is the module's own description, with the unit.
    helps = {m.label: m.help for m in at.metric}
    assert "gates" in helps and helps["gates"]


def _title(fig: dict) -> str:
    t = fig["layout"].get("title") or {}
    return t.get("text", "") if isinstance(t, dict) else str(t)


def test_privacy_view_draws_log_log_roc_from_the_report(app, reports):
    base = reports["base"]
    at = app("Privacy", run=reports["base_dir"].name)
    figs = figures(at)
    rocs = [f for f in figs if f["layout"]["xaxis"].get("type") == "log" and f["layout"]["yaxis"].get("type") == "log"]
    assert rocs, "no log-log ROC figure"
    # The plugin's curve, drawn by the generic view (any module's curve with log axes).
    curve = base.result(PROBE, "bert").curves["roc_loss"]
    fig = next(f for f in rocs if _title(f) == "roc_loss")
    trace = next(t for t in fig["data"] if "TPR@1%FPR" in t.get("name", ""))
    # No such metric in the plugin: the legend's TPR at 1% FPR is read off the stored curve.
    expected = max(y for x, y in zip(curve.x, curve.y) if x <= 0.01)
    assert f"TPR@1%FPR {expected:.3f}" in trace["name"]
    # Points at FPR = 0 cannot be drawn on a log axis and are dropped, the rest kept in order.
    assert trace["x"] == [x for x, y in zip(curve.x, curve.y) if x > 0 and y > 0]
    metrics = frame(at, "metric")
    assert metrics.set_index("metric").loc["auc", "value"] == pytest.approx(
        base.result(PROBE, "bert").metrics["auc"].value
    )
    assert "unit" in metrics.columns and "description" in metrics.columns


def _ok(report, module):
    return [r for r in report.audits if r.module == module and r.status == "ok"]


def test_privacy_views_use_the_modules_real_keys(app, reports):
    """Specific views of privacy.membership / dp_finetune / canary_audit, when those modules exist here."""
    base = reports["base"]
    mia, dp, canary = (_ok(base, m) for m in ("privacy.membership", "privacy.dp_finetune", "privacy.canary_audit"))
    if not (mia or dp or canary):
        pytest.skip("no privacy module is registered in this checkout yet")
    at = app("Privacy", run=reports["base_dir"].name)
    figs = figures(at)
    for r in mia:  # legend numbers are the module's own metrics, one ROC per attack, private and not side by side
        fig = next(f for f in figs if _title(f).startswith("ROC") and r.target in _title(f))
        assert fig["layout"]["xaxis"]["type"] == "log" and fig["layout"]["yaxis"]["type"] == "log"
        for attack in r.params["attacks"]:
            trace = next(t for t in fig["data"] if t["name"].startswith(f"{attack} — "))
            tpr = r.metrics[f"{attack}.tpr_at_1pct_fpr"].value
            assert f"TPR@1%FPR {tpr:.3f}" in trace["name"]
            assert f"AUC {r.metrics[f'{attack}.auc'].value:.3f}" in trace["name"]
        auc_fig = next(f for f in figs if _title(f).startswith("Attack AUC"))
        point = next(t for t in auc_fig["data"] if t["x"] == [f"{r.target} · {r.params['attacks'][0]}"])
        m = r.metrics[f"{r.params['attacks'][0]}.auc"]
        assert point["y"] == [pytest.approx(m.value)]
        if m.ci_high is not None:
            assert point["error_y"]["array"] == [pytest.approx(m.ci_high - m.value)]
    if len(mia) > 1 and dp:
        assert any("private" in _title(f) for f in figs)
    for r in dp:
        ledger = next(f for f in figs if "ledger" in _title(f))
        assert ledger["data"][0]["y"] == [v for v in r.curves["epsilon_ledger"].y if v is not None]
        assert any(c.label == "epsilon" for c in at.metric)
    for r in canary:
        assert any("audit shows ε ≥" in t for t in texts(at.info) + texts(at.error))
        bars = next(f for f in figs if _title(f).startswith("Epsilon: audit lower bound"))
        lower = next(t for t in bars["data"] if t["name"].startswith("audit lower bound"))
        assert lower["y"][0] == pytest.approx(r.metrics["epsilon_lb"].value)


def test_explain_view_uses_the_modules_real_keys(app, reports):
    att = _ok(reports["base"], "explain.attribution")
    if not att:
        pytest.skip("explain.attribution is not registered (or errored) in this checkout")
    at = app("Explainability", run=reports["base_dir"].name)
    html_blocks = [m.value for m in at.markdown if 'class="tokens"' in m.value]
    r = att[0]
    ev = next(e for e in r.evidence if isinstance(e.get("attributions"), dict))
    rows = next(iter(ev["attributions"].values()))
    assert html_blocks, "no token heatmap"
    assert any(all(f">{t['token']}<" in b for t in rows if t.get("token", "").isalnum()) for b in html_blocks)
    titles = [_title(f) for f in figures(at)]
    assert any("Deletion" in t for t in titles)
    if "randomization" in r.tables:
        assert any("randomization" in t.lower() for t in titles)


def test_robustness_view_uses_the_modules_real_keys(app, reports):
    txt = _ok(reports["base"], "robustness.text_attack")
    if not txt:
        pytest.skip("robustness.text_attack is not registered (or errored) in this checkout")
    at = app("Robustness", run=reports["base_dir"].name)
    assert any(c.label.startswith("attack_success_rate") for c in at.metric)
    assert any(_title(f).startswith("Query cost") for f in figures(at))
    pairs = [e for e in txt[0].evidence if "adversarial_text" in e]
    if pairs:
        assert any("<mark" in m.value for m in at.markdown)


@pytest.mark.parametrize(
    "view,modules",
    [
        ("Robustness", ("robustness.text_attack", "robustness.image_attack")),
        ("Explainability", ("explain.attribution",)),
    ],
)
def test_category_views_show_only_what_exists(app, reports, view, modules):
    at = app(view, run=reports["base_dir"].name)
    ran = [r for r in reports["base"].audits if r.module in modules]
    if not ran:
        assert not figures(at), "a view for a module that did not run must not draw anything"
        assert any("no" in t.lower() for t in texts(at.info))
    for r in ran:
        if r.status == "error":  # someone's module failing shows as a notice naming it, never a crash
            assert any(r.module in t and r.error.type in t for t in texts(at.error))
        else:
            assert figures(at), f"{view}: nothing drawn for {r.module}"


def test_every_view_survives_corrupt_old_and_partial_runs(app):
    at = app("Run overview")
    for run in ("corrupt", "old-schema", "partial"):
        at.selectbox(key="run").set_value(run).run()
        for view in ("Run overview", "Privacy", "Robustness", "Explainability"):
            at.radio(key="view").set_value(view).run()
            assert not at.exception, (run, view, [e.value for e in at.exception])
            shown = " ".join(texts(at.error) + texts(at.warning))
            assert run in shown, (run, view, shown)
    at = app("Run overview", run="old-schema")
    assert "schema 0.3" in " ".join(texts(at.error)) and "Re-run" in " ".join(texts(at.error))
    at = app("Privacy", run="partial")  # the completed units of an interrupted run are still shown
    assert figures(at)


def test_compare_view_matches_metrics_and_highlights_differences(app, reports):
    from fmaudit.compare import diff_metric

    base, other = reports["base"], reports["other"]
    at = app("Compare", run_a=reports["base_dir"].name, run_b=reports["other_dir"].name)
    df = frame(at, "verdict")
    acc = df[(df["module"] == "utility") & (df["metric"] == "accuracy")].iloc[0]
    ma = base.result("utility", "bert").metrics["accuracy"]
    mb = other.result("utility", "bert").metrics["accuracy"]
    a, b = ma.value, mb.value
    assert acc["A"] == pytest.approx(a) and acc["B"] == pytest.approx(b)
    # The verdict is fmaudit.compare's: a difference inside the interval of the difference is noise.
    assert acc["verdict"] == diff_metric("utility", "bert", "accuracy", ma, mb).verdict
    if a != b:
        assert acc["B − A"] == pytest.approx(b - a)
    if acc["verdict"] in ("better in B", "worse in B"):
        assert acc["verdict"] == ("better in B" if b > a else "worse in B")
        bars = next(f for f in figures(at) if _title(f).startswith("Relative change"))["data"][0]
        i = bars["y"].index("utility @ bert · accuracy")
        assert bars["x"][i] == pytest.approx((b - a) / abs(a))
        assert bars["marker"]["color"][i] == ("#2ca02c" if b > a else "#d62728")
    ece = df[(df["module"] == "utility") & (df["metric"] == "ece")].iloc[0]
    if abs(ece["B"] - ece["A"]) > 1e-6 * max(abs(ece["A"]), abs(ece["B"])) + 1e-12:  # lower is better for ECE
        assert ece["verdict"] == ("better in B" if ece["B"] < ece["A"] else "worse in B")
    directed = df[(df["kind"] == "audit") & df["verdict"].isin(["better in B", "worse in B"])]
    diff_html = " ".join(m.value for m in at.markdown if "<table" in m.value)
    assert "verdict" in diff_html
    assert directed.empty or ("better in B" in diff_html or "worse in B" in diff_html)
    # Timings are never better or worse.
    assert not df[(df["kind"] == "cost") & df["verdict"].isin(["better in B", "worse in B"])].shape[0]
    # Comparing a run with itself: nothing differs.
    at = app("Compare", run_a=reports["base_dir"].name, run_b=reports["base_dir"].name)
    assert set(frame(at, "verdict")["verdict"]) == {"same"}


def test_reads_only_inside_the_reports_folder(reports, tmp_path, monkeypatch):
    from dashboard.runs import safe_child, scan_runs

    root = tmp_path / "reports"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(reports["base_dir"], outside)
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert scan_runs(root) == []  # the symlinked run lies outside: not read
    run = root / "run"
    shutil_copy(reports["base_dir"], run)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    assert safe_child(run, "../secret.png") is None
    assert safe_child(run, str(secret)) is None
    assert safe_child(run, "report.json") == (run / "report.json").resolve()
    assert [e.name for e in scan_runs(root)] == ["run"]
    # An unknown run named in the URL is ignored, not opened.
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FMAUDIT_REPORTS_DIR", str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["view"] = "Run overview"
    at.query_params["run"] = "../elsewhere"
    at.run()
    assert not at.exception and at.selectbox(key="run").value == "run"


def test_missing_or_empty_folder_is_a_notice(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FMAUDIT_REPORTS_DIR", str(tmp_path / "nope"))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "does not exist" in texts(at.error)[0]
    monkeypatch.setenv("FMAUDIT_REPORTS_DIR", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "No runs" in " ".join(texts(at.info))


def test_dashboard_never_imports_torch(reports):
    """The app, run through every view, and the HTML export load no torch (a reviewer's laptop has none)."""
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
os.environ["FMAUDIT_REPORTS_DIR"] = {str(reports["root"])!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(APP)!r}, default_timeout=60).run()
for view in ("Runs", "Run overview", "Privacy", "Robustness", "Explainability", "Compare"):
    at.radio(key="view").set_value(view).run()
    assert not at.exception, view
from dashboard.export import export_html
export_html({str(reports["base_dir"])!r}, {str(reports["root"] / "x.html")!r})
heavy = [m for m in ("torch", "transformers", "opacus", "captum", "textattack", "torchattacks") if m in sys.modules]
print("HEAVY", heavy)
"""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HEAVY []" in res.stdout, res.stdout
    (reports["root"] / "x.html").unlink()


def test_image_grids_and_attribution_overlays(app, reports):
    images = reports["images"]
    if images is None:
        pytest.skip("neither robustness.image_attack nor explain.attribution is registered in this checkout")
    run = reports["images_dir"].name
    attack = _ok(images, "robustness.image_attack")
    if attack:
        at = app("Robustness", run=run)
        r = attack[0]
        fig = next(f for f in figures(at) if _title(f).startswith("Accuracy vs epsilon"))
        curve = r.curves["robust_accuracy.fgsm"]
        trace = next(t for t in fig["data"] if t["name"] == "fgsm")
        assert trace["y"] == curve.y and trace["x"] == curve.x
        pngs = [e["image"] for e in r.evidence if "image" in e]
        assert len(at.get("image")) == len(pngs) >= 1  # the clean | adversarial | perturbation strips
    overlays = [r for r in _ok(images, "explain.attribution") if any("heatmap" in e for e in r.evidence)]
    if overlays:
        at = app("Explainability", run=run)
        assert len(at.get("image")) == sum(1 for e in overlays[0].evidence if e.get("heatmap"))
