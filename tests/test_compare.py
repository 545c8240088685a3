"""Comparisons that know what a difference is (fmaudit.compare, and the dashboard's Compare built on it)."""

from __future__ import annotations

import re

import pytest
from report_fixtures import leaky_report, metric, text_attack, unit

from fmaudit.compare import compare_results, diff_metric, is_cost_metric, summary


def noisy_twin(rep, *, scale_time: float = 5.8):
    """The same run again: every audit number moved by float noise (< 1e-6 relative), every timing changed."""
    audits = []
    for r in rep.audits:
        ms = {}
        for n, m in r.metrics.items():
            if is_cost_metric(n, m):
                ms[n] = m.model_copy(update={"value": m.value * scale_time})
            elif m.value is not None:
                ms[n] = m.model_copy(update={"value": m.value * (1 + 4e-7)})
            else:
                ms[n] = m
        audits.append(r.model_copy(update={"metrics": ms}))
    return rep.model_copy(update={"audits": audits})


def quickstart_like():
    rep = leaky_report()
    extra = [
        unit(
            "utility",
            "gpt",
            {"nll": metric(0.48444377, unit="nats", better=False), "ece": metric(0.0312345678, better=False)},
            index=5,
        ),
        text_attack("bert", "deepwordbug", 0.4, index=6),
        unit(
            "explain.attribution",
            "bert",
            {
                "integrated_gradients.seconds_per_example": metric(0.06, unit="seconds"),
                "integrated_gradients.deletion_aopc": metric(0.2, ci=(0.1, 0.3)),
            },
            index=7,
        ),
        unit(
            "robustness.image_attack",
            "bert",
            {"attack_seconds.pgd": metric(3.0, unit="seconds"), "robust_accuracy.pgd@0.03": metric(0.4, ci=(0.3, 0.5))},
            index=8,
        ),
    ]
    return rep.model_copy(update={"audits": rep.audits + extra})


def by_name(diffs):
    return {(d.module, d.target, d.metric): d for d in diffs}


def test_same_seed_runs_have_zero_audit_changes():
    a = quickstart_like()
    b = noisy_twin(a)
    diffs = compare_results(a.audits, b.audits)
    s = summary(diffs)
    assert (
        s["changes"] == 0
        and s["changed"] == 0
        and s["better in B"] == 0
        and s["worse in B"] == 0
        and s["within noise"] == 0
    )
    assert s["same"] == len([d for d in diffs if d.kind == "audit"]) > 10
    # The timings did change (x5.8), and are reported in their own section only.
    cost = [d for d in diffs if d.kind == "cost"]
    assert {d.metric for d in cost} >= {
        "reference_cost_ratio",
        "train_seconds",
        "wall_time_per_example_s",
        "integrated_gradients.seconds_per_example",
        "attack_seconds.pgd",
    }
    assert all(d.verdict == "higher in B" and not d.changed for d in cost)
    assert s["cost changed"] == len(cost)
    nll = by_name(diffs)[("utility", "gpt", "nll")]
    assert nll.delta != 0 and nll.verdict == "same"  # 0.48444377 vs 0.48444396: float noise


def test_a_change_beyond_the_interval_is_reported_and_within_it_is_noise():
    a = quickstart_like()
    b = noisy_twin(a)
    audits = []
    for r in b.audits:
        if r.module == "utility" and r.target == "bert":  # accuracy 0.90 [0.86, 0.93] -> 0.70 [0.64, 0.75]
            r = r.model_copy(update={"metrics": r.metrics | {"accuracy": metric(0.70, ci=(0.64, 0.75), better=True)}})
        if r.module == "privacy.membership" and r.target == "bert":  # TPR 0.12 [0.08, 0.16] -> 0.14 [0.10, 0.18]
            r = r.model_copy(
                update={"metrics": r.metrics | {"tpr_at_1pct_fpr": metric(0.14, ci=(0.10, 0.18), better=False)}}
            )
        audits.append(r)
    b = b.model_copy(update={"audits": audits})
    diffs = by_name(compare_results(a.audits, b.audits))
    acc = diffs[("utility", "bert", "accuracy")]
    assert acc.verdict == "worse in B" and acc.changed and acc.delta == pytest.approx(-0.2)
    # the bound is sqrt(0.04^2 + 0.05^2): A's lower arm, B's upper arm
    assert acc.noise == pytest.approx((0.04**2 + 0.05**2) ** 0.5)
    tpr = diffs[("privacy.membership", "bert", "tpr_at_1pct_fpr")]
    assert tpr.verdict == "within noise" and not tpr.changed
    assert summary(list(diffs.values()))["changes"] == 1


def test_verdicts_without_intervals_use_the_relative_tolerance():
    m = metric(1.0, better=True)
    assert diff_metric("u", "t", "x", m, metric(1.0 + 5e-7, better=True)).verdict == "same"
    assert diff_metric("u", "t", "x", m, metric(1.0 + 5e-6, better=True)).verdict == "better in B"
    assert diff_metric("u", "t", "x", m, metric(0.9, better=True)).verdict == "worse in B"
    assert diff_metric("u", "t", "x", metric(1.0), metric(2.0)).verdict == "changed"
    assert diff_metric("u", "t", "x", m, metric(1.0, better=True), rtol=0).verdict == "same"
    assert (
        diff_metric("u", "t", "x", metric(1.0, better=True), metric(1.0 + 5e-7, better=True), rtol=1e-9).verdict
        == "better in B"
    )
    assert diff_metric("u", "t", "x", m, None).verdict == "only in A"
    assert diff_metric("u", "t", "x", None, m).verdict == "only in B"
    assert diff_metric("u", "t", "x", metric(None), m).verdict == "changed"
    assert diff_metric("u", "t", "x", metric(None), metric(None)).verdict == "same"
    assert diff_metric("u", "t", "x", metric(0.0), metric(1e-13)).verdict == "same"  # atol near zero


@pytest.mark.parametrize(
    "name,unit_,cost",
    [
        ("reference_cost_ratio", "ratio", True),
        ("train_seconds", "seconds", True),
        ("wall_time_per_example_s", "seconds", True),
        ("integrated_gradients.seconds_per_example", "seconds", True),
        ("attack_seconds.pgd", "seconds", True),
        ("latency", "s", True),
        ("speedup", "ratio", True),
        ("auc", "fraction", False),
        ("tpr_at_1pct_fpr", "fraction", False),
        ("perplexity_ratio", None, False),
        ("num_examples", "examples", False),
        ("avg_queries", "queries", False),
        ("epsilon_lb", "epsilon", False),
        ("robust_accuracy.pgd@0.03", "fraction", False),
        ("nll", "nats", False),
        ("num_successes", "examples", False),
    ],
)
def test_cost_metrics_are_recognised(name, unit_, cost):
    assert is_cost_metric(name, metric(1.0, unit=unit_)) is cost


def test_dashboard_compare_frame_and_view_use_the_rule(tmp_path):
    from dashboard.compare_view import compare_frame, view_compare
    from dashboard.runs import RunEntry
    from dashboard.sinks import HtmlSink

    a = quickstart_like()
    b = noisy_twin(a)
    ea = RunEntry(name="a", path=tmp_path, state="ok", report=a, run_id="a")
    eb = RunEntry(name="b", path=tmp_path, state="ok", report=b, run_id="b")
    df = compare_frame(ea, eb)
    audit = df[df["kind"] == "audit"]
    assert set(audit["verdict"]) == {"same"}
    assert set(df[df["kind"] == "cost"]["verdict"]) == {"higher in B"}
    sink = HtmlSink()
    view_compare(sink, ea, eb)
    html = sink.render()
    cards = dict(re.findall(r'<div class="label">([^<]+?)(?: \(\?\))?</div><div class="value">([^<]*)</div>', html))
    assert cards["changed"] == cards["better in B"] == cards["worse in B"] == cards["within noise"] == "0"
    assert cards["timing / cost"] == str(len(df[df["kind"] == "cost"])) != "0"
    assert "No audit metric changed beyond its noise" in html
    differences = html.split("<h3>Differences</h3>")[1].split("<h3>Timing and cost")[0]
    assert "<table" not in differences and "plotly" not in differences  # nothing listed as a difference
    timing = html.split("<h3>Timing and cost (not audit results)</h3>")[1].split("<h3>All metrics")[0]
    assert "reference_cost_ratio" in timing and "higher in B" in timing and "worse in B" not in timing
    # The verdicts of both runs side by side.
    assert 'class="verdicts-compare"' in html and html.count("Leaks membership") == 2

    # A real change is listed under Differences, coloured.
    c = b.model_copy(
        update={
            "audits": [
                r.model_copy(update={"metrics": r.metrics | {"accuracy": metric(0.70, ci=(0.64, 0.75), better=True)}})
                if r.module == "utility" and r.target == "bert"
                else r
                for r in b.audits
            ]
        }
    )
    sink = HtmlSink()
    view_compare(sink, ea, RunEntry(name="c", path=tmp_path, state="ok", report=c, run_id="c"))
    html = sink.render()
    differences = html.split("<h3>Differences</h3>")[1].split("<h3>Timing and cost")[0]
    assert "<td>accuracy</td>" in differences and "worse in B" in differences and "#fde7e9" in differences
