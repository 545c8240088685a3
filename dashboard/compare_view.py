"""The Compare view: two runs metric by metric, with the verdicts side by side.

A metric counts as changed only beyond its noise (the rule is `fmaudit.compare`'s); wall-clock and cost figures
are listed in their own section, never as better or worse.
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from dashboard import figures as F
from dashboard.fragments import verdict_compare_html
from dashboard.generic import metric_value
from dashboard.runs import RunEntry, gate_verdict
from dashboard.sinks import Card, Sink


def compare_frame(a: RunEntry, b: RunEntry) -> pd.DataFrame:
    """Every metric of both runs, matched on (module, target, metric), with a verdict that knows noise from
    change (the rule is `fmaudit.compare`'s): 'kind' is 'audit' or 'cost' (wall-clock and cost figures, never
    better or worse)."""
    from fmaudit.compare import compare_results

    rows = []
    for d in compare_results(a.results, b.results):
        m = d.a or d.b
        rows.append(
            {
                "module": d.module,
                "target": d.target,
                "metric": d.metric,
                "A": metric_value(d.a),
                "B": metric_value(d.b),
                "B − A": d.delta,
                "relative": d.relative,
                "noise bound": d.noise,
                "verdict": d.verdict,
                "kind": d.kind,
                "unit": m.unit or "",
                "description": m.description or "",
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "module",
            "target",
            "metric",
            "A",
            "B",
            "B − A",
            "relative",
            "noise bound",
            "verdict",
            "kind",
            "unit",
            "description",
        ],
    )


COMPARE_HELP = {
    "B − A": "Difference B minus A, in the metric's unit.",
    "relative": "(B − A) / |A|.",
    "noise bound": "The largest |B − A| that counts as no change: the interval of the difference (from both runs' "
    "confidence intervals) when the metric has one, else the relative tolerance 1e-6.",
    "verdict": "same: equal within float tolerance; within noise: differs by less than the interval of the "
    "difference; better / worse by the metric's good direction ('changed' when it has none). Timing and "
    "cost metrics are only higher / lower.",
    "kind": "audit: a measured result; cost: wall-clock time or a cost ratio (depends on the machine, its load and "
    "the cache, not on the model).",
}


def view_compare(sink: Sink, a: RunEntry, b: RunEntry) -> pd.DataFrame:
    from fmaudit.compare import CHANGED

    sink.header(f"Compare: A = {a.label}  ·  B = {b.label}", level=1)
    for e in (a, b):
        if e.state != "ok":
            sink.notice("warning" if e.state == "partial" else "error", f"{e.label}: {e.notice}")
    df = compare_frame(a, b)
    if df.empty:
        sink.notice("info", "Neither run has metrics to compare.")
        return df
    audit, cost = df[df["kind"] == "audit"], df[df["kind"] == "cost"]
    changed = audit[audit["verdict"].isin(sorted(CHANGED))]
    count = lambda v: str(int((audit["verdict"] == v).sum()))  # noqa: E731
    sink.cards(
        [
            Card("metrics compared", str(len(df)), "Metrics matched by module, target and name."),
            Card(
                "changed",
                str(len(changed)),
                "Audit metrics that moved beyond their noise bound, or are in one run only.",
            ),
            Card("better in B", count("better in B"), "Moved beyond its noise in the metric's good direction."),
            Card("worse in B", count("worse in B"), "Moved beyond its noise in the metric's bad direction."),
            Card("within noise", count("within noise"), "Differ, but by less than the interval of the difference."),
            Card(
                "only in one run",
                str(int(audit["verdict"].str.startswith("only").sum())),
                "Metric present in one run only.",
            ),
            Card("timing / cost", str(len(cost)), "Wall-clock and cost figures: shown apart, never better or worse."),
        ]
    )
    cols = sink.columns(2)
    for col, e, tag in ((cols[0], a, "A"), (cols[1], b, "B")):
        col.header(f"{tag}: {e.label}", level=3)
        rep = e.report
        col.caption(
            f"recipe {e.recipe_name or '—'} · {e.created_at or '—'} · gates {gate_verdict(e)}"
            + (f" · recipe sha256 {rep.recipe_sha256[:12]}" if rep else "")
        )
    if a.report is not None and b.report is not None:
        from fmaudit.verdict import verdicts

        va, vb = verdicts(a.report), verdicts(b.report)
        sink.html(verdict_compare_html([(x.area, (x.level, x.text), (y.level, y.text)) for x, y in zip(va, vb)]))
    sink.header("Differences", level=2)
    if changed.empty:
        sink.notice(
            "success",
            "No audit metric changed beyond its noise (confidence interval, or a relative "
            "tolerance of 1e-6 when it has none)"
            + (
                f"; {int((audit['verdict'] == 'within noise').sum())} differ within their intervals."
                if (audit["verdict"] == "within noise").any()
                else "."
            ),
        )
    else:
        order = {"worse in B": 0, "better in B": 1, "changed": 2, "only in A": 3, "only in B": 4}
        changed = (
            changed.assign(_o=changed["verdict"].map(order))
            .sort_values(["_o", "module", "target", "metric"], kind="stable")
            .drop(columns="_o")
        )
        both = changed[changed["relative"].notna()]
        if not both.empty:
            sink.figure(F.diff_figure(both.to_dict("records")), key="compare-diff")
        sink.html(_diff_html(changed))
    noise = audit[audit["verdict"] == "within noise"]
    if not noise.empty:
        sink.section(f"Within noise ({len(noise)})", expanded=False).html(_diff_html(noise))
    sink.header("Timing and cost (not audit results)", level=2)
    if cost.empty:
        sink.caption("No timing or cost metric in these runs.")
    else:
        sink.caption(
            "Wall-clock times and cost ratios depend on the machine, its load and the cache (a cached "
            "fine-tune takes no time), not on the model: they are never counted as better or worse."
        )
        sink.html(_diff_html(cost))
    sink.header("All metrics", level=2)
    sink.table(df, help=COMPARE_HELP, key="compare-table")
    return df


def _diff_html(df: pd.DataFrame) -> str:
    colour = {
        "better in B": "#e6f4ea",
        "worse in B": "#fde7e9",
        "changed": "#fff4d6",
        "only in A": "#eef",
        "only in B": "#eef",
        "within noise": "#f6f7f9",
        "higher in B": "#f6f7f9",
        "lower in B": "#f6f7f9",
    }
    rows = []
    for _, r in df.iterrows():

        def f(v: Any) -> str:
            return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

        noise = r.get("noise bound")
        rows.append(
            f'<tr style="background:{colour.get(r["verdict"], "#fff")}" title="{html.escape(r["description"])}">'
            f"<td>{html.escape(r['module'])}</td><td>{html.escape(r['target'])}</td>"
            f"<td>{html.escape(r['metric'])}</td><td>{f(r['A'])}</td><td>{f(r['B'])}</td>"
            f"<td>{f(r['B − A'])}</td><td>{'±' + f(noise) if noise is not None and noise == noise else '—'}</td>"
            f"<td>{html.escape(r['unit'])}</td>"
            f'<td style="white-space:nowrap"><b>{html.escape(r["verdict"])}</b></td></tr>'
        )
    return (
        '<table class="diff" style="border-collapse:collapse; width:100%; font-size:0.85em; '
        'overflow-wrap:anywhere"><thead><tr><th>module</th><th>target'
        "</th><th>metric</th><th>A</th><th>B</th><th>B − A</th><th>noise bound</th><th>unit</th><th>verdict</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
