"""Plotly figures and small HTML fragments built from report data (pure functions, no Streamlit).

Every hover shows the unit and what the number means; report text is escaped before it becomes HTML.
"""

from __future__ import annotations

import difflib
import html
import math
from typing import Any, Sequence

import plotly.graph_objects as go

from fmaudit.report import Curve

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


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


def _layout(fig: go.Figure, title: str | None, x_label: str, y_label: str, log_x: bool, log_y: bool,
            height: int = 380) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=50 if title else 20, b=50),
                      legend=dict(orientation="v", x=1.0, xanchor="right", y=0.0, yanchor="bottom",
                                  bgcolor="rgba(255,255,255,0.7)"),
                      template="plotly_white")
    # Only force log axes: forcing "linear" would turn a categorical axis (bars, intervals) into an empty one.
    fig.update_xaxes(title_text=x_label, **({"type": "log"} if log_x else {}))
    fig.update_yaxes(title_text=y_label, **({"type": "log"} if log_y else {}))
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


def curves_figure(series: list[tuple[str, Curve]], title: str | None = None, *, log_x: bool | None = None,
                  log_y: bool | None = None, diagonal: bool = False, mode: str = "lines") -> go.Figure:
    """Several curves that share axes. Log axes come from the curves unless forced; on a log axis points
    at or below 0 are dropped (they cannot be drawn), which the hover of the trace states."""
    fig = go.Figure()
    first = series[0][1] if series else Curve(x=[], y=[])
    lx = first.log_x if log_x is None else log_x
    ly = first.log_y if log_y is None else log_y
    for i, (name, c) in enumerate(series):
        xs, ys = _clean_xy(c.x, c.y, lx, ly)
        dropped = len(c.x) - len(xs)
        hover = (f"{html.escape(c.x_label)}: %{{x:.4g}}<br>{html.escape(c.y_label)}: %{{y:.4g}}"
                 + (f"<br><i>{html.escape(c.description)}</i>" if c.description else "")
                 + (f"<br>({dropped} point(s) at 0 not drawable on a log axis)" if dropped else "")
                 + "<extra>%{fullData.name}</extra>")
        fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode=mode, line=dict(color=PALETTE[i % len(PALETTE)]),
                                 hovertemplate=hover))
    fig.update_layout(showlegend=True)  # name the attack / method even when there is one curve
    if diagonal:
        lo = 1e-5 if (lx or ly) else 0.0
        fig.add_trace(go.Scatter(x=[lo, 1], y=[lo, 1], mode="lines", name="chance",
                                 line=dict(dash="dash", color="#999"), hoverinfo="skip"))
    return _layout(fig, title, first.x_label, first.y_label, lx, ly)


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
    """Membership-inference ROC curves on log-log axes; each legend entry carries TPR at 1% and 0.1% FPR
    (from the module's metrics when given, else read off the curve) and the AUC."""
    fig = go.Figure()
    for i, (name, c, stats) in enumerate(series):
        t1 = stats.get("tpr@1%") if stats.get("tpr@1%") is not None else tpr_at_fpr(c, 0.01)
        t01 = stats.get("tpr@0.1%") if stats.get("tpr@0.1%") is not None else tpr_at_fpr(c, 0.001)
        auc = stats.get("auc")
        def f3(v: float | None) -> str:
            return "—" if v is None else f"{v:.3f}"

        label = f"{name} — TPR@1%FPR {f3(t1)}, TPR@0.1%FPR {f3(t01)}" + (f", AUC {auc:.3f}" if auc is not None
                                                                          else "")
        xs, ys = _clean_xy(c.x, c.y, True, True)
        fig.add_trace(go.Scatter(
            x=xs, y=ys, name=label, mode="lines", line=dict(color=PALETTE[i % len(PALETTE)], shape="hv"),
            hovertemplate="FPR %{x:.2e}<br>TPR %{y:.3f}<br><i>fraction of non-members (x) / members (y) "
                          "flagged as members</i><extra>" + html.escape(name) + "</extra>"))
    fig.add_trace(go.Scatter(x=[1e-5, 1], y=[1e-5, 1], mode="lines", name="chance (TPR = FPR)",
                             line=dict(dash="dash", color="#999"), hoverinfo="skip"))
    _layout(fig, title, "false positive rate (log)", "true positive rate (log)", True, True, height=420)
    fig.update_layout(legend=dict(orientation="v", y=-0.22, x=0, xanchor="left", yanchor="top"), height=520,
                      margin=dict(l=60, r=20, t=50 if title else 20, b=150))
    return fig


def interval_figure(rows: list[dict[str, Any]], title: str | None, value_label: str,
                    reference: float | None = None, reference_label: str = "") -> go.Figure:
    """Points with confidence intervals, one per row: {'label', 'value', 'lo', 'hi', 'unit', 'help'}."""
    fig = go.Figure()
    for i, r in enumerate(rows):
        v = r.get("value")
        if v is None:
            continue
        lo, hi = r.get("lo"), r.get("hi")
        err = None
        if lo is not None and hi is not None:
            err = dict(type="data", symmetric=False, array=[max(hi - v, 0)], arrayminus=[max(v - lo, 0)])
        ci = f"<br>CI [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        fig.add_trace(go.Scatter(
            x=[r["label"]], y=[v], error_y=err, mode="markers", marker=dict(size=11, color=PALETTE[i % len(PALETTE)]),
            name=r["label"], showlegend=False,
            hovertemplate=f"%{{x}}<br>{html.escape(value_label)}: %{{y:.4g}} {html.escape(r.get('unit') or '')}{ci}"
                          + (f"<br><i>{html.escape(r['help'])}</i>" if r.get("help") else "") + "<extra></extra>"))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dash", line_color="#999", annotation_text=reference_label)
    return _layout(fig, title, "", value_label, False, False, height=340)


def bar_figure(rows: list[dict[str, Any]], title: str | None, y_label: str, group_key: str = "group") -> go.Figure:
    """Grouped bars: rows of {'x', 'y', 'group', 'unit', 'help'}."""
    fig = go.Figure()
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group_key, "")), []).append(r)
    for i, (g, rs) in enumerate(groups.items()):
        fig.add_trace(go.Bar(
            x=[r["x"] for r in rs], y=[r["y"] for r in rs], name=g, marker_color=PALETTE[i % len(PALETTE)],
            texttemplate="%{y:.3g}", textposition="outside", cliponaxis=False,
            customdata=[[r.get("unit") or "", r.get("help") or ""] for r in rs],
            hovertemplate="%{x}<br>%{y:.4g} %{customdata[0]}<br><i>%{customdata[1]}</i><extra>" + html.escape(g)
                          + "</extra>"))
    fig.update_layout(barmode="group")
    return _layout(fig, title, "", y_label, False, False, height=340)


def matrix_figure(matrix: Sequence[Sequence[float]], x_labels: Sequence[str], y_labels: Sequence[str],
                  title: str | None, x_title: str, y_title: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix, x=[str(v) for v in x_labels], y=[str(v) for v in y_labels],
                               colorscale="Blues", text=matrix, texttemplate="%{text}",
                               hovertemplate=f"{html.escape(y_title)}: %{{y}}<br>{html.escape(x_title)}: %{{x}}"
                                             "<br>count: %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, x_title, y_title, False, False, height=340)


def image_figure(pixels: Sequence[Sequence[Any]], title: str | None = None, *, diverging: bool = False,
                 height: int = 220) -> go.Figure:
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
        fig = go.Figure(go.Heatmap(z=arr, colorscale="RdBu_r" if diverging else "gray",
                                   zmin=-m if diverging else None, zmax=m if diverging else None, showscale=diverging,
                                   hovertemplate="row %{y}, col %{x}: %{z:.3g}<extra></extra>"))
        fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=height, margin=dict(l=5, r=5, t=30 if title else 5, b=5),
                      template="plotly_white")
    fig.update_xaxes(visible=False, scaleanchor="y")
    fig.update_yaxes(visible=False)
    return fig


# ---------------------------------------------------------------------------------------------------
# HTML fragments (escaped)


def token_heatmap_html(tokens: Sequence[Any], scores: Sequence[Any], title: str = "") -> str:
    """Tokens coloured by attribution: red pushes towards the predicted class, blue against it."""
    vals = [float(s) if isinstance(s, (int, float)) and math.isfinite(s) else 0.0 for s in scores]
    m = max((abs(v) for v in vals), default=0.0) or 1.0
    spans = []
    for tok, v in zip(tokens, vals):
        a = min(abs(v) / m, 1.0)
        rgb = "214,39,40" if v >= 0 else "31,119,180"
        spans.append(f'<span class="tok" style="background: rgba({rgb},{a:.2f}); padding:1px 3px; margin:1px; '
                     f'border-radius:3px; display:inline-block" title="attribution {v:+.4g}">'
                     f"{html.escape(str(tok))}</span>")
    head = f'<div class="caption">{html.escape(title)}</div>' if title else ""
    return f'<div class="tokens" style="line-height:1.9">{head}{"".join(spans)}</div>'


def word_diff_html(original: str, adversarial: str) -> tuple[str, str, int]:
    """Both texts with the words that differ highlighted; returns (original_html, adversarial_html, changed)."""
    a, b = str(original).split(), str(adversarial).split()
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    out_a, out_b, changed = [], [], 0
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        wa, wb = [html.escape(w) for w in a[i1:i2]], [html.escape(w) for w in b[j1:j2]]
        if op == "equal":
            out_a += wa
            out_b += wb
        else:
            changed += max(i2 - i1, j2 - j1)
            out_a += [f'<del style="background:#fdd; text-decoration:line-through">{w}</del>' for w in wa]
            out_b += [f'<mark style="background:#fbd38d">{w}</mark>' for w in wb]
    return " ".join(out_a), " ".join(out_b), changed


def marked_or_diff_html(original: str, adversarial: str) -> tuple[str, str, int]:
    """Texts whose changed words are marked [[like this]] (robustness.text_attack's evidence) are shown with
    those words highlighted; unmarked texts fall back to a word diff."""
    import re

    mark = re.compile(r"\[\[(.+?)\]\]")
    if not (mark.search(original) or mark.search(adversarial)):
        return word_diff_html(original, adversarial)

    def render(text: str, style: str, tag: str) -> tuple[str, int]:
        parts, last, n = [], 0, 0
        for m in mark.finditer(text):
            parts.append(html.escape(text[last:m.start()]))
            parts.append(f'<{tag} style="{style}">{html.escape(m.group(1))}</{tag}>')
            last, n = m.end(), n + 1
        parts.append(html.escape(text[last:]))
        return "".join(parts), n

    a, na = render(original, "background:#fdd; text-decoration:line-through", "del")
    b, nb = render(adversarial, "background:#fbd38d", "mark")
    return a, b, max(na, nb)


def diff_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Relative change (B − A) / |A| of the metrics both runs have, green when better, red when worse."""
    colour = {"better in B": "#2ca02c", "worse in B": "#d62728"}
    labels = [f"{r['module']} @ {r['target']} · {r['metric']}" for r in rows]
    fig = go.Figure(go.Bar(
        x=[r["relative"] for r in rows], y=labels, orientation="h",
        marker_color=[colour.get(r["verdict"], "#ff7f0e") for r in rows],
        customdata=[[r["A"], r["B"], r["unit"], r["verdict"], r["description"]] for r in rows],
        hovertemplate="%{y}<br>A %{customdata[0]:.4g} → B %{customdata[1]:.4g} %{customdata[2]}"
                      "<br>relative change %{x:+.1%} (%{customdata[3]})<br><i>%{customdata[4]}</i><extra></extra>"))
    fig.update_xaxes(tickformat="+.0%")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Relative change, B vs A (green better, red worse, orange no direction)", "(B − A) / |A|", "",
                   False, False, height=max(220, 60 + 26 * len(rows)))


# ---------------------------------------------------------------------------------------------------
# Verdicts (fmaudit.verdict): one coloured line per area


def _level_badge(level: str) -> str:
    from fmaudit.verdict import COLOURS, LEVEL_WORDS

    c = COLOURS.get(level, "#8c8c8c")
    return (f'<span class="vlevel" style="display:inline-block; min-width:64px; text-align:center; background:{c}; '
            f'color:#fff; border-radius:4px; padding:1px 6px; font-size:0.8em; font-weight:600">'
            f"{html.escape(LEVEL_WORDS.get(level, level))}</span>")


def verdict_block_html(verdicts: Sequence[Any]) -> str:
    """The verdict block: per area a coloured badge, the area, and its line (headline, then the numbers)."""
    rows = []
    for v in verdicts:
        head, _, rest = v.text.partition(": ")
        rows.append(
            f'<div class="verdict {html.escape(v.level)}" data-area="{html.escape(v.area)}" data-level="'
            f'{html.escape(v.level)}" style="border-left:5px solid {v.colour}; padding:5px 10px; margin:4px 0; '
            f'background:#fafafa">{_level_badge(v.level)} <b style="display:inline-block; min-width:110px">'
            f"{html.escape(v.area)}</b> <b>{html.escape(head)}</b>{': ' + html.escape(rest) if rest else ''}</div>")
    return '<div class="verdicts">' + "".join(rows) + "</div>"


def verdict_compare_html(rows: Sequence[tuple[str, tuple[str, str], tuple[str, str]]]) -> str:
    """Verdicts of two runs side by side: rows of (area, (level A, text A), (level B, text B))."""
    from fmaudit.verdict import COLOURS

    body = []
    for area, (la, ta), (lb, tb) in rows:
        cells = "".join(f'<td style="border-left:5px solid {COLOURS.get(lvl, "#8c8c8c")}">{_level_badge(lvl)} '
                        f"{html.escape(t)}</td>" for lvl, t in ((la, ta), (lb, tb)))
        body.append(f"<tr><td><b>{html.escape(area)}</b></td>{cells}</tr>")
    return ('<table class="verdicts-compare" style="width:100%"><thead><tr><th>area</th><th>verdict in A</th>'
            "<th>verdict in B</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>")
