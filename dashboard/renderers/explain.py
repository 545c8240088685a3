"""Explainability renderer: explanation quality per method, deletion / insertion curves, the randomization
sanity check, token heatmaps, most influential tokens and image overlays."""

from __future__ import annotations

from typing import Any

import pandas as pd

from dashboard import figures as F
from dashboard.fragments import token_heatmap_html
from dashboard.generic import render_images, table_frame, target_label
from dashboard.runs import RunEntry
from dashboard.sinks import Sink
from fmaudit.report import AuditResult, Metric


def render_attribution(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Attributions", level=2)
    for r in results:
        sink.header(f"{target_label(entry, r.target)}", level=3)
        methods = list((r.tables.get("methods") or {}).keys()) if isinstance(r.tables.get("methods"), dict) else []
        # Quality metrics: one row per method ('<method>.<metric>'), random ordering as the reference.
        quality = _quality_frame(r.metrics, methods + ["random"])
        if quality is not None:
            sink.caption(
                "Explanation quality per method (hover a column for its meaning; compare deletion / "
                "insertion with the random ordering)."
            )
            sink.table(quality, help={k: v for k, v in _QUALITY_HELP.items()}, key=f"expl-q-{r.unit_id}")
        # Deletion / insertion curves.
        for kind in ("deletion", "insertion"):
            series = [(n.rsplit(".", 1)[0], c) for n, c in r.curves.items() if n.endswith(f".{kind}")]
            if series:
                sink.figure(
                    F.curves_figure(series, title=f"{kind.title()} curves", mode="lines+markers"),
                    key=f"expl-{kind}-{r.unit_id}",
                )
        # Randomization sanity check.
        rand = r.tables.get("randomization")
        rows = []
        for m in methods:
            met = r.metrics.get(f"{m}.randomization_spearman")
            if met is not None and met.value is not None:
                rows.append(
                    {
                        "label": m,
                        "value": met.value,
                        "lo": met.ci_low,
                        "hi": met.ci_high,
                        "unit": met.unit,
                        "help": met.description,
                    }
                )
        if rows:
            thr = rand.get("threshold") if isinstance(rand, dict) else None
            sink.figure(
                F.interval_figure(
                    rows,
                    "Model-parameter randomization check (Adebayo et al. 2018)",
                    "Spearman vs randomized model",
                    reference=thr,
                    reference_label=f"fail above {thr}" if thr is not None else "",
                ),
                key=f"expl-rand-{r.unit_id}",
            )
            failing = (rand or {}).get("failing_methods") if isinstance(rand, dict) else None
            if failing:
                sink.notice(
                    "error",
                    f"Fails the randomization check: {', '.join(map(str, failing))} — these "
                    "attributions barely depend on the trained weights.",
                )
            elif isinstance(rand, dict):
                sink.notice(
                    "success",
                    "Every method passes the randomization check (attributions change when the "
                    "top layers are re-initialized).",
                )
        # Token heatmaps.
        shown = 0
        for ev in r.evidence:
            if shown >= 12:
                break
            attrs = ev.get("attributions")
            if isinstance(attrs, dict):
                title = " · ".join(
                    f"{k}: {ev[k]}"
                    for k in ("id", "true_label", "predicted_label", "explained_label")
                    if ev.get(k) is not None
                )
                if isinstance(ev.get("text"), str):
                    sink.caption(ev["text"])
                for m, toks in list(attrs.items())[:3]:
                    if isinstance(toks, list) and toks and all(isinstance(t, dict) for t in toks):
                        words = [
                            t.get("token") if t.get("token") is not None else f"#{t.get('token_id')}" for t in toks
                        ]
                        sink.html(token_heatmap_html(words, [t.get("score", 0.0) for t in toks], f"{title} · {m}"))
                shown += 1
        if shown and not any(
            "token" in t
            for ev in r.evidence
            for toks in (ev.get("attributions") or {}).values()
            if isinstance(toks, list)
            for t in toks
            if isinstance(t, dict)
        ):
            sink.caption("Tokens are shown as ids: set store_examples: true in the recipe to keep the text.")
        top = r.tables.get("top_tokens")
        if isinstance(top, dict):
            cols = sink.columns(2)
            for col, key in zip(cols, ("towards_explained", "against_explained")):
                df = table_frame(top.get(key))
                if df is not None:
                    col.caption(f"Most influential tokens — {key.replace('_', ' ')} ({top.get('method', '')})")
                    col.table(df, key=f"expl-top-{key}-{r.unit_id}")
        # Image overlays: heatmap PNGs written by the module into the run folder.
        heatmaps = [
            (
                ev["heatmap"],
                " · ".join(f"{k}: {ev[k]}" for k in ("id", "true_label", "predicted_label") if ev.get(k) is not None),
            )
            for ev in r.evidence
            if isinstance(ev.get("heatmap"), str)
        ]
        if heatmaps:
            sink.caption("Attribution overlays (input, then one panel per method; red = towards the explained class)")
        render_images(sink, entry, heatmaps, per_row=3)


_QUALITY_HELP = {
    "deletion_aopc": "Drop of the output as top features are removed (higher = more faithful).",
    "insertion_auc": "Output as top features are inserted (higher = more faithful).",
    "infidelity": "Captum infidelity (lower is better).",
    "sensitivity_max": "Captum sensitivity_max: change under small noise (lower is better).",
    "randomization_spearman": "Rank correlation with a randomized model (low = depends on the weights).",
    "randomization_spearman_abs": "Same, on absolute values.",
    "seconds_per_example": "Attribution time per example, seconds.",
    "convergence_delta": "Integrated gradients convergence delta.",
}


def _quality_frame(metrics: dict[str, Metric], methods: list[str]) -> pd.DataFrame | None:
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m}
        for n, met in metrics.items():
            if n.startswith(f"{m}.") and met.value is not None:
                row[n[len(m) + 1 :]] = met.value
        if len(row) > 1:
            rows.append(row)
    return pd.DataFrame(rows) if rows else None
