"""Plot layout rules (dashboard/figures.py, dashboard/colours.py): legends below the plot, axis units, a how-to-read caption, log-log ROC
with the chance diagonal, one colour per target (a DP twin lighter, same hue). Figure objects only: fast."""

from __future__ import annotations

import html

import pytest
from report_fixtures import leaky_report

from dashboard import colours as C
from dashboard import figures as F
from fmaudit.report import Curve

# The curves the built-in modules write (x_label, y_label), as in their source.
BUILTIN_CURVES = {
    "robust_accuracy": ("epsilon (Linf)", "robust accuracy"),
    "epsilon_ledger": ("step", "epsilon"),
    "deletion": ("fraction of features removed", "explained output (probability)"),
    "insertion": ("fraction of features inserted", "explained output (nats)"),
    "canary": ("number of guesses r", "epsilon lower bound"),
    "reliability": ("confidence", "accuracy"),
    "roc": ("false positive rate", "true positive rate"),
}


def curve(x_label="x", y_label="y", **kw) -> Curve:
    return Curve(x=[0.001, 0.01, 0.1, 1.0], y=[0.002, 0.05, 0.3, 1.0], x_label=x_label, y_label=y_label, **kw)


def assert_legend_below(fig):
    lg = fig.layout.legend
    assert lg.yref == "container" and lg.y == 0 and lg.yanchor == "bottom"  # under everything, not on the data
    # x on the plot's own axis: a legend placed on the container's x makes plotly reserve a LEFT margin as wide
    # as a vertical legend, squeezing the plot to a sliver in a half-width column
    assert lg.xref == "paper" and lg.x == 0 and lg.xanchor == "left"
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    rows = 1 if lg.orientation == "h" else len(names)
    if lg.orientation == "h":
        assert sum(len(n) + 6 for n in names) <= F.LEGEND_ONE_ROW_CHARS
    # the bottom margin holds the x-axis title and every legend row
    assert fig.layout.margin.b >= F.AXIS_TITLE_PX + rows * F.LEGEND_ROW_PX


def test_roc_is_log_log_with_the_chance_diagonal_and_its_legend_below():
    fig = F.roc_figure([("rmia", curve(), {"auc": 0.7}), ("loss", curve(), {})], title="ROC — bert")
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    diag = [t for t in fig.data if t.name.startswith("chance")]
    assert len(diag) == 1 and diag[0].line.dash == "dash"
    assert list(diag[0].x) == list(diag[0].y) and diag[0].x[-1] == 1 and diag[0].x[0] <= 0.001
    assert fig.layout.xaxis.title.text == "false positive rate (fraction)"
    assert fig.layout.yaxis.title.text == "true positive rate (fraction)"
    assert "TPR@1%FPR" in fig.data[0].name and "AUC 0.700" in fig.data[0].name
    assert fig.layout.legend.orientation == "v"  # long entries: one per line
    assert_legend_below(fig)
    assert fig.layout.meta["caption"] == F.ROC_CAPTION and "log-log" in fig.layout.title.subtitle.text


@pytest.mark.parametrize("name", sorted(BUILTIN_CURVES))
def test_every_builtin_curve_plot_has_units_and_a_caption(name):
    x, y = BUILTIN_CURVES[name]
    fig = F.curves_figure([("a", curve(x, y)), ("random", curve(x, y))], title=name)
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        assert "(" in axis.title.text and axis.title.text.endswith(")"), axis.title.text
    cap = fig.layout.meta["caption"]
    assert cap == F.how_to_read([("a", curve(x, y))]) and cap != f"{y} against {x}."  # a specific reading
    assert len(cap) < 200
    assert all(len(html.unescape(line)) <= F.CAPTION_CHARS for line in fig.layout.title.subtitle.text.split("<br>"))
    assert_legend_below(fig)
    assert fig.layout.legend.orientation == "h"  # two short names: one row
    assert fig.data[1].line.dash == "dot"  # the random ordering is the grey reference


def test_reliability_diagram_draws_the_diagonal_its_caption_names_and_a_lone_bin_as_a_point():
    one_bin = Curve(x=[0.51], y=[0.48], x_label="confidence", y_label="accuracy")
    fig = F.curves_figure([("reliability", one_bin)])
    assert fig.data[0].mode == "markers"  # a line through one point draws nothing
    diag = [t for t in fig.data if t.name == "perfectly calibrated"]
    assert len(diag) == 1 and list(diag[0].x) == list(diag[0].y) == [0.0, 1]
    assert "diagonal" in fig.layout.meta["caption"]
    assert F.curves_figure([("a", curve())]).data[0].mode == "lines"


def test_unknown_curve_falls_back_to_its_description_and_keeps_its_log_axes():
    c = curve("budget", "loss", log_x=True, description="Loss of the plugin as its budget grows.")
    fig = F.curves_figure([("p", c)])
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type is None
    assert fig.layout.meta["caption"] == "Loss of the plugin as its budget grows."
    assert fig.layout.xaxis.title.text == "budget"  # no unit is invented


def test_many_long_entries_get_one_line_each():
    fig = F.curves_figure([(f"a rather long attack name number {i}", curve()) for i in range(6)])
    assert fig.layout.legend.orientation == "v"
    assert_legend_below(fig)


def test_bars_and_intervals_keep_the_legend_off_the_data():
    bars = F.bar_figure(
        [
            {"x": "accuracy", "y": 0.9, "group": "bert (non-private)"},
            {"x": "accuracy", "y": 0.8, "group": "bert-dp (private, DP)"},
        ],
        "Utility",
        "fraction",
    )
    assert_legend_below(bars)
    one = F.bar_figure([{"x": "accuracy", "y": 0.9, "group": "bert"}], "Utility", "fraction")
    assert one.layout.showlegend is False and one.layout.margin.b == F.AXIS_TITLE_PX  # no room kept for nothing
    intervals = F.interval_figure([{"label": "bert · rmia", "value": 0.7, "lo": 0.6, "hi": 0.8}], "AUC", "AUC")
    assert intervals.layout.showlegend is False


def test_one_colour_per_target_and_the_dp_twin_lighter():
    rep = leaky_report()
    colours = C.target_colours(rep)
    assert colours["bert"] == C.PALETTE[0] and colours["bert-dp"] == C.lighten(C.PALETTE[0], 0.5)
    assert colours["bert-dp"] != colours["bert"]
    with C.colour_scope(rep):
        bars = F.bar_figure(
            [
                {"x": "accuracy", "y": 0.9, "group": "bert (non-private)"},
                {"x": "accuracy", "y": 0.8, "group": "bert-dp (private, DP)"},
            ],
            "Utility",
            "fraction",
        )
        ledger = F.curves_figure([("bert-dp (epsilon_ledger)", curve("step", "epsilon"))])
        auc = F.interval_figure(
            [
                {"label": "bert · rmia", "value": 0.7},
                {"label": "bert · loss", "value": 0.6},
                {"label": "bert-dp · rmia", "value": 0.5},
            ],
            "AUC",
            "AUC",
        )
        attacks = F.curves_figure([("pgd", curve()), ("fgsm", curve())])  # one target's attacks: the palette
    assert [t.marker.color for t in bars.data] == [colours["bert"], colours["bert-dp"]]
    assert ledger.data[0].line.color == colours["bert-dp"]
    assert [t.marker.color for t in auc.data] == [colours["bert"], colours["bert"], colours["bert-dp"]]
    assert [t.line.color for t in attacks.data] == list(C.PALETTE[:2])
    # Outside a scope nothing is coloured by target.
    bars = F.bar_figure([{"x": "a", "y": 1, "group": "bert-dp (private, DP)"}], "t", "fraction")
    assert bars.data[0].marker.color == C.PALETTE[0]


def test_target_of_matches_whole_names_only():
    assert C.target_of("bert-dp (private, DP)", ["bert", "bert-dp"]) == "bert-dp"
    assert C.target_of("bert · rmia", ["bert", "bert-dp"]) == "bert"
    assert C.target_of("bertha", ["bert"]) is None


def _secret_canary_unit(target_name: str, included: list[float], excluded: list[float], p: float, exposed: bool):
    from report_fixtures import metric, unit

    from fmaudit.report import Finding

    ev = [{"id": f"canary:s{i}", "included": True, "exposure_bits": b} for i, b in enumerate(included)]
    ev += [{"id": f"canary:x{i}", "included": False, "exposure_bits": b} for i, b in enumerate(excluded)]
    findings = [Finding(severity="medium", title="Planted secrets are exposed", metric="exposure_p_value")]
    r = unit(
        "privacy.canary_audit",
        target_name,
        {
            "epsilon_lb": metric(0.0, unit="epsilon"),
            "exposure_auc": metric(0.9 if exposed else 0.5, unit="AUC"),
            "exposure_p_value": metric(p, unit="probability"),
        },
        findings if exposed else [],
    )
    r.evidence = ev
    return r


def test_secret_exposure_view_plots_every_secret_and_says_what_the_test_found(tmp_path):
    """The canary view's exposure plot: one point per secret, trained-on and left-out per target, and a
    warning only where the rank test found the trained-on secrets higher."""
    from report_fixtures import report

    from dashboard.renderers.privacy import render_canary
    from dashboard.runs import RunEntry
    from dashboard.sinks import HtmlSink

    leak = _secret_canary_unit("lm", [5.0, 6.5, 7.0], [1.0, 0.5], 0.01, exposed=True)
    null = _secret_canary_unit("lm-dp", [1.2, 0.7], [1.1, 0.9, 1.4], 0.6, exposed=False)
    rep = report([leak, null])
    entry = RunEntry(name="r", path=tmp_path, state="complete", report=rep)
    sink = HtmlSink()
    render_canary(sink, entry, [leak, null])
    doc = sink.render()
    assert "lm: secrets trained on rank higher than the ones left out" in doc
    assert "lm-dp: secrets trained on are not told apart from the ones left out" in doc
    fig = F.exposure_figure([("lm", [5.0, 6.5, 7.0], [1.0, 0.5]), ("lm-dp", [1.2, 0.7], [1.1, 0.9, 1.4])], "t")
    trained, left = fig.data
    assert (trained.name, left.name) == ("trained on", "left out")
    assert list(trained.x) == ["lm"] * 3 + ["lm-dp"] * 2 and list(trained.y) == [5.0, 6.5, 7.0, 1.2, 0.7]
    assert list(left.x) == ["lm"] * 2 + ["lm-dp"] * 3 and list(left.y) == [1.0, 0.5, 1.1, 0.9, 1.4]
    assert trained.boxpoints == "all" and fig.layout.yaxis.title.text == "exposure (bits)"
    assert_legend_below(fig)
    assert fig.layout.meta["caption"] == F.EXPOSURE_CAPTION
