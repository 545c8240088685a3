"""Plotly figures built from report data (pure functions, no Streamlit).

Every hover shows the unit and what the number means; report text is escaped before it reaches a label. Target
colours come from `dashboard.colours`, HTML fragments (token heatmaps, verdicts) live in `dashboard.fragments`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from dashboard.colours import PALETTE, series_colours
from fmaudit.report import Curve


def fmt(v: float | None, unit: str | None = None) -> str:
    """A number with its unit, compactly."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if unit in ("fraction", "rate", "probability") and 0 <= abs(v) <= 1:
        s = f"{v:.3f}"
    elif isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        s = f"{int(v):,}"
    else:
        s = f"{v:.4g}"
    if unit and unit not in ("count",):
        s += f" {unit}"
    return s


# ---------------------------------------------------------------------------------------------------
# Layout rules shared by every figure: the legend never covers the data (vertical list or one horizontal row
# BELOW the plot, anchored to the bottom of the figure with a margin sized for it), axis titles carry their
# unit, and a curve plot says in one line (the title's subtitle) how to read it.

LEGEND_ROW_PX = 21
CAPTION_CHARS = 75  # a caption line, in characters (11 px font: about 450 px)
LEGEND_ONE_ROW_CHARS = 50  # entries that fit one horizontal row in a half-width column
AXIS_TITLE_PX = 58  # x tick labels and the x-axis title, below the plotting area

# Units for the axis labels the built-in modules use (matched on the lowercased label; a label that already
# has a parenthesised part keeps it).
AXIS_UNITS: tuple[tuple[str, str], ...] = (
    (r"^(false|true) positive rate", "fraction"),
    (r"^fraction of features", "fraction"),
    (r"accuracy", "fraction"),
    (r"^confidence$", "probability"),
    (r"^step$", "optimizer steps"),
    (r"^epsilon lower bound$", "ε, nats"),
    (r"^epsilon$", "ε, nats"),
    (r"^number of guesses", "guesses"),
    (r"^auc$", "fraction"),
)


def axis_title(label: str | None, unit: str | None = None) -> str:
    """'robust accuracy (fraction)': the label with its unit (given, or known for the label), unless it has one."""
    import re

    label = (label or "").strip()
    if not label or "(" in label:
        return label
    if unit is None:
        low = label.lower()
        unit = next((u for pat, u in AXIS_UNITS if re.search(pat, low)), None)
    return f"{label} ({unit})" if unit else label


def legend_below(fig: go.Figure, names: Sequence[str] | None = None) -> go.Figure:
    """Put the legend under the plotting area: one horizontal row when the entries are short, else one entry per
    line; the bottom margin (and the height) grow with it so nothing overlaps the axis or the curves."""
    if names is None:
        names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    names = [str(n) for n in names]
    if not names or (len(names) == 1 and fig.layout.showlegend is not True):  # plotly shows no legend for one trace
        fig.update_layout(showlegend=False)
        return fig
    one_row = sum(len(n) + 6 for n in names) <= LEGEND_ONE_ROW_CHARS
    rows = 1 if one_row else len(names)
    legend_px = rows * LEGEND_ROW_PX + 8
    height = (fig.layout.height or 380) + legend_px
    margin = fig.layout.margin
    fig.update_layout(
        height=height,
        legend=dict(
            orientation="h" if one_row else "v",
            yref="container",
            y=0.0,
            yanchor="bottom",
            x=0.0,
            xanchor="left",
            xref="paper",
            bgcolor="rgba(255,255,255,0)",
            traceorder="normal",
        ),
        margin=dict(
            l=margin.l if margin.l is not None else 60,
            r=margin.r if margin.r is not None else 20,
            t=margin.t if margin.t is not None else 50,
            b=AXIS_TITLE_PX + legend_px,
        ),
    )
    return fig


def set_caption(fig: go.Figure, caption: str | None) -> go.Figure:
    """A one-line 'how to read' under the title (plotly's title subtitle), kept in layout.meta['caption'] too."""
    import textwrap

    if not caption:
        return fig
    title = fig.layout.title.text or " "
    # plotly does not wrap a subtitle: break it so it fits a half-width column.
    lines = textwrap.wrap(caption, width=CAPTION_CHARS) or [caption]
    fig.update_layout(
        title=dict(
            text=title, subtitle=dict(text="<br>".join(html.escape(x) for x in lines), font=dict(size=11, color="#666"))
        ),
        meta={"caption": caption},
    )
    margin = fig.layout.margin
    fig.update_layout(
        margin=dict(t=max(margin.t or 0, 52 + 15 * len(lines))), height=(fig.layout.height or 380) + 15 * len(lines)
    )
    return fig


def _layout(
    fig: go.Figure,
    title: str | None,
    x_label: str,
    y_label: str,
    log_x: bool,
    log_y: bool,
    height: int = 380,
    *,
    caption: str | None = None,
    legend: bool = True,
) -> go.Figure:
    fig.update_layout(
        title=title,
        height=height,
        margin=dict(l=60, r=20, t=50 if title else 20, b=AXIS_TITLE_PX),
        template="plotly_white",
    )
    # Only force log axes: forcing "linear" would turn a categorical axis (bars, intervals) into an empty one.
    fig.update_xaxes(title_text=axis_title(x_label), **({"type": "log"} if log_x else {}))
    fig.update_yaxes(title_text=axis_title(y_label), **({"type": "log"} if log_y else {}))
    if legend and fig.layout.showlegend is not False:
        legend_below(fig)
    set_caption(fig, caption)
    return fig


def _clean_xy(x: Sequence[float | None], y: Sequence[float | None], log_x: bool, log_y: bool):
    xs, ys = [], []
    for a, b in zip(x, y):
        if a is None or b is None:
            continue
        if (log_x and a <= 0) or (log_y and b <= 0):
            continue
        xs.append(a)
        ys.append(b)
    return xs, ys


# ---------------------------------------------------------------------------------------------------
# Curves


def how_to_read(series: Sequence[tuple[str, Curve]]) -> str | None:
    """One line saying how to read a curve plot, from the curves' axes (the built-in modules' curves), else
    the first curve's own description."""
    if not series:
        return None
    c = series[0][1]
    x, y = c.x_label.lower(), c.y_label.lower()
    if x.startswith("epsilon (") and "accuracy" in y:
        return (
            "Accuracy as the attack budget ε grows (ε = 0: clean accuracy); the lower and sooner a curve "
            "falls, the more easily the model is fooled."
        )
    if x == "step" and y.startswith("epsilon"):
        return "Privacy spent as training proceeds: the accountant's ε (upper bound at its δ); lower = more private."
    if x.startswith("fraction of features removed"):
        return (
            "Deletion: output as the most-attributed features are removed first; dropping faster than "
            "'random' = a more faithful explanation."
        )
    if x.startswith("fraction of features inserted"):
        return (
            "Insertion: output as the most-attributed features are inserted first; rising faster than "
            "'random' = a more faithful explanation."
        )
    if x.startswith("number of guesses"):
        return "The audit's ε lower bound for each number of guesses r; the highest point is the bound it reports."
    if is_reliability(c):
        return "Accuracy per confidence bin: on the diagonal = calibrated, below it = over-confident."
    if "false positive rate" in x:
        return ROC_CAPTION
    d = next((cv.description for _, cv in series if cv.description), None)
    if d:
        return d if len(d) <= 140 else d[:139] + "…"
    return f"{c.y_label} against {c.x_label}."


def is_reliability(c: Curve) -> bool:
    """A reliability diagram: accuracy per confidence bin (the utility module's calibration curve)."""
    return c.x_label.lower() == "confidence" and "accuracy" in c.y_label.lower()


ROC_CAPTION = (
    "Members found (TPR) vs non-members wrongly flagged (FPR), log-log: above the dashed diagonal = "
    "better than chance; read TPR at low FPR (left)."
)


def curves_figure(
    series: list[tuple[str, Curve]],
    title: str | None = None,
    *,
    log_x: bool | None = None,
    log_y: bool | None = None,
    diagonal: bool = False,
    mode: str = "lines",
    caption: str | None = None,
) -> go.Figure:
    """Several curves that share axes. Log axes come from the curves unless forced; on a log axis points
    at or below 0 are dropped (they cannot be drawn), which the hover of the trace states. Axis titles carry
    units, the legend sits under the plot, and the subtitle says how to read it (`caption`, else
    `how_to_read`)."""
    fig = go.Figure()
    first = series[0][1] if series else Curve(x=[], y=[])
    lx = first.log_x if log_x is None else log_x
    ly = first.log_y if log_y is None else log_y
    colours = series_colours([n for n, _ in series])
    for i, (name, c) in enumerate(series):
        xs, ys = _clean_xy(c.x, c.y, lx, ly)
        dropped = len(c.x) - len(xs)
        hover = (
            f"{html.escape(axis_title(c.x_label))}: %{{x:.4g}}<br>{html.escape(axis_title(c.y_label))}: "
            "%{y:.4g}"
            + (f"<br><i>{html.escape(c.description)}</i>" if c.description else "")
            + (f"<br>({dropped} point(s) at 0 not drawable on a log axis)" if dropped else "")
            + "<extra>%{fullData.name}</extra>"
        )
        dash = "dot" if name == "random" else None  # explain.attribution's reference ordering
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                name=name,
                mode=mode if len(xs) > 1 else "markers",  # 1 point: no line
                line=dict(color="#7f7f7f" if name == "random" else colours[i], dash=dash),
                hovertemplate=hover,
            )
        )
    fig.update_layout(showlegend=True)  # name the attack / method even when there is one curve
    calibration = is_reliability(first)  # its caption reads "on the diagonal = calibrated": draw that diagonal
    if diagonal or calibration:
        lo = 1e-5 if (lx or ly) else 0.0
        fig.add_trace(
            go.Scatter(
                x=[lo, 1],
                y=[lo, 1],
                mode="lines",
                name="perfectly calibrated" if calibration else "chance",
                line=dict(dash="dash", color="#999"),
                hoverinfo="skip",
            )
        )
    return _layout(
        fig,
        title,
        first.x_label,
        first.y_label,
        lx,
        ly,
        caption=caption if caption is not None else how_to_read(series),
    )


def tpr_at_fpr(curve: Curve, fpr: float) -> float | None:
    """Largest TPR at a false-positive rate <= fpr on an ROC curve (x = FPR, y = TPR)."""
    best = None
    for a, b in zip(curve.x, curve.y):
        if a is None or b is None:
            continue
        if a <= fpr + 1e-12 and (best is None or b > best):
            best = b
    return best


def roc_figure(series: list[tuple[str, Curve, dict[str, float | None]]], title: str | None = None) -> go.Figure:
    """Membership-inference ROC curves on log-log axes with the chance diagonal; each legend entry (under the
    plot) carries TPR at 1% and 0.1% FPR (from the module's metrics when given, else read off the curve) and
    the AUC."""
    fig = go.Figure()
    lowest = 1.0
    for i, (name, c, stats) in enumerate(series):
        t1 = stats.get("tpr@1%") if stats.get("tpr@1%") is not None else tpr_at_fpr(c, 0.01)
        t01 = stats.get("tpr@0.1%") if stats.get("tpr@0.1%") is not None else tpr_at_fpr(c, 0.001)
        auc = stats.get("auc")

        def f3(v: float | None) -> str:
            return "—" if v is None else f"{v:.3f}"

        label = f"{name} — TPR@1%FPR {f3(t1)}, TPR@0.1%FPR {f3(t01)}" + (f", AUC {auc:.3f}" if auc is not None else "")
        xs, ys = _clean_xy(c.x, c.y, True, True)
        lowest = min([lowest, *xs, *ys])
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                name=label,
                mode="lines",
                line=dict(color=PALETTE[i % len(PALETTE)], shape="hv"),
                hovertemplate="FPR %{x:.2e}<br>TPR %{y:.3f}<br><i>fraction of non-members (x) / members (y) "
                "flagged as members</i><extra>" + html.escape(name) + "</extra>",
            )
        )
    lo = min(1e-3, 10 ** math.floor(math.log10(lowest))) if lowest > 0 else 1e-5
    fig.add_trace(
        go.Scatter(
            x=[lo, 1],
            y=[lo, 1],
            mode="lines",
            name="chance (TPR = FPR)",
            line=dict(dash="dash", color="#999"),
            hoverinfo="skip",
        )
    )
    return _layout(fig, title, "false positive rate", "true positive rate", True, True, height=440, caption=ROC_CAPTION)


def interval_figure(
    rows: list[dict[str, Any]],
    title: str | None,
    value_label: str,
    reference: float | None = None,
    reference_label: str = "",
) -> go.Figure:
    """Points with confidence intervals, one per row: {'label', 'value', 'lo', 'hi', 'unit', 'help'}."""
    fig = go.Figure()
    colours = series_colours([str(r.get("label", "")) for r in rows], distinct=False)
    for i, r in enumerate(rows):
        v = r.get("value")
        if v is None:
            continue
        lo, hi = r.get("lo"), r.get("hi")
        err = None
        if lo is not None and hi is not None:
            err = dict(type="data", symmetric=False, array=[max(hi - v, 0)], arrayminus=[max(v - lo, 0)])
        ci = f"<br>CI [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        fig.add_trace(
            go.Scatter(
                x=[r["label"]],
                y=[v],
                error_y=err,
                mode="markers",
                marker=dict(size=11, color=colours[i]),
                name=r["label"],
                showlegend=False,
                hovertemplate=f"%{{x}}<br>{html.escape(value_label)}: %{{y:.4g}} {html.escape(r.get('unit') or '')}{ci}"
                + (f"<br><i>{html.escape(r['help'])}</i>" if r.get("help") else "")
                + "<extra></extra>",
            )
        )
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dash", line_color="#999", annotation_text=reference_label)
    return _layout(fig, title, "", value_label, False, False, height=340)


def bar_figure(rows: list[dict[str, Any]], title: str | None, y_label: str, group_key: str = "group") -> go.Figure:
    """Grouped bars: rows of {'x', 'y', 'group', 'unit', 'help'}."""
    fig = go.Figure()
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group_key, "")), []).append(r)
    colours = series_colours(list(groups))
    for i, (g, rs) in enumerate(groups.items()):
        fig.add_trace(
            go.Bar(
                x=[r["x"] for r in rs],
                y=[r["y"] for r in rs],
                name=g,
                marker_color=colours[i],
                texttemplate="%{y:.3g}",
                textposition="outside",
                cliponaxis=False,
                customdata=[[r.get("unit") or "", r.get("help") or ""] for r in rs],
                hovertemplate="%{x}<br>%{y:.4g} %{customdata[0]}<br><i>%{customdata[1]}</i><extra>"
                + html.escape(g)
                + "</extra>",
            )
        )
    fig.update_layout(barmode="group")
    return _layout(fig, title, "", y_label, False, False, height=340)


EXPOSURE_CAPTION = (
    "Each point is one planted secret: its exposure (bits; higher = the model ranks it nearer the top of all "
    "possible secrets). Secrets left out of training show the chance level; a leak is the trained-on ones "
    "sitting higher."
)


def exposure_figure(series: list[tuple[str, list[float], list[float]]], title: str | None) -> go.Figure:
    """Secret exposure per target, `series` of (target label, included secrets' bits, excluded secrets' bits):
    every secret as a point over a box, trained-on and left-out side by side."""
    fig = go.Figure()
    colours = series_colours(["trained on", "left out"], distinct=True)
    for name, included, colour in (("trained on", True, colours[0]), ("left out", False, colours[1])):
        xs: list[str] = []
        ys: list[float] = []
        for label, inc, exc in series:
            bits = inc if included else exc
            xs += [label] * len(bits)
            ys += list(bits)
        fig.add_trace(
            go.Box(
                x=xs,
                y=ys,
                name=name,
                marker_color=colour,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                hovertemplate="%{x}<br>%{y:.2f} bits<extra>" + html.escape(name) + "</extra>",
            )
        )
    fig.update_layout(boxmode="group")
    return _layout(fig, title, "", "exposure (bits)", False, False, height=340, caption=EXPOSURE_CAPTION)


def matrix_figure(
    matrix: Sequence[Sequence[float]],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    title: str | None,
    x_title: str,
    y_title: str,
) -> go.Figure:
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=[str(v) for v in x_labels],
            y=[str(v) for v in y_labels],
            colorscale="Blues",
            text=matrix,
            texttemplate="%{text}",
            hovertemplate=f"{html.escape(y_title)}: %{{y}}<br>{html.escape(x_title)}: %{{x}}"
            "<br>count: %{z}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, x_title, y_title, False, False, height=340)


def image_figure(
    pixels: Sequence[Sequence[Any]], title: str | None = None, *, diverging: bool = False, height: int = 220
) -> go.Figure:
    """A small image (H x W grayscale, or H x W x C in [0, 1] or [0, 255]) as a heatmap."""
    import numpy as np

    arr = np.asarray(pixels, dtype=float)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        scale = 255.0 if arr.max() > 1.0 else 1.0
        fig = go.Figure(go.Image(z=np.clip(arr / scale * 255.0, 0, 255)))
    else:
        m = float(np.nanmax(np.abs(arr))) or 1.0
        fig = go.Figure(
            go.Heatmap(
                z=arr,
                colorscale="RdBu_r" if diverging else "gray",
                zmin=-m if diverging else None,
                zmax=m if diverging else None,
                showscale=diverging,
                hovertemplate="row %{y}, col %{x}: %{z:.3g}<extra></extra>",
            )
        )
        fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=title, height=height, margin=dict(l=5, r=5, t=30 if title else 5, b=5), template="plotly_white"
    )
    fig.update_xaxes(visible=False, scaleanchor="y")
    fig.update_yaxes(visible=False)
    return fig


def diff_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Relative change (B − A) / |A| of the metrics both runs have, green when better, red when worse."""
    colour = {"better in B": "#2ca02c", "worse in B": "#d62728"}
    labels = [f"{r['module']} @ {r['target']} · {r['metric']}" for r in rows]
    fig = go.Figure(
        go.Bar(
            x=[r["relative"] for r in rows],
            y=labels,
            orientation="h",
            marker_color=[colour.get(r["verdict"], "#ff7f0e") for r in rows],
            customdata=[[r["A"], r["B"], r["unit"], r["verdict"], r["description"]] for r in rows],
            hovertemplate="%{y}<br>A %{customdata[0]:.4g} → B %{customdata[1]:.4g} %{customdata[2]}"
            "<br>relative change %{x:+.1%} (%{customdata[3]})<br><i>%{customdata[4]}</i><extra></extra>",
        )
    )
    fig.update_xaxes(tickformat="+.0%")
    fig.update_yaxes(autorange="reversed")
    return _layout(
        fig,
        "Relative change, B vs A (green better, red worse, orange no direction)",
        "(B − A) / |A|",
        "",
        False,
        False,
        height=max(220, 60 + 26 * len(rows)),
    )
