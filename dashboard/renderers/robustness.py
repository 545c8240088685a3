"""Robustness renderers: accuracy vs attack budget with example images, certified vs attacked accuracy, and
adversarial texts with the changed words marked."""

from __future__ import annotations

import html
from typing import Any

from dashboard import figures as F
from dashboard.fragments import marked_or_diff_html
from dashboard.generic import metric_card, render_images, target_label
from dashboard.runs import RunEntry
from dashboard.sinks import Sink
from fmaudit.report import AuditResult, Curve


def render_image_attack(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Adversarial images", level=2)
    for r in results:
        label = target_label(entry, r.target)
        sink.header(label, level=3)
        sink.cards(
            [
                metric_card(n, r.metrics[n])
                for n in ("clean_accuracy", "num_invalid_adversarials", "zero_gradient_fraction", "num_examples")
                if n in r.metrics
            ]
        )
        # One plot per norm (Linf and L2 budgets are not on the same scale).
        groups: dict[str, list[tuple[str, Curve]]] = {}
        for n, c in r.curves.items():
            if "epsilon" in f"{n} {c.x_label}".lower():
                name = n.split(".", 1)[1] if n.startswith("robust_accuracy.") else n
                groups.setdefault(c.x_label, []).append((name, c))
        for i, (x_label, series) in enumerate(groups.items()):
            sink.figure(
                F.curves_figure(series, title=f"Accuracy vs {x_label} per attack — {r.target}", mode="lines+markers"),
                key=f"img-acc-{r.unit_id}-{i}",
            )
        items = []
        for ev in r.evidence:
            if isinstance(ev.get("image"), str):
                panels = " | ".join(map(str, ev.get("image_panels") or []))
                eps = ev.get("epsilon")
                items.append(
                    (
                        ev["image"],
                        f"{ev.get('attack', '')} ε={eps:g} · true {ev.get('true_label')} → "
                        f"{ev.get('adversarial_prediction')}"
                        if isinstance(eps, (int, float))
                        else str(ev.get("id", "")),
                        panels,
                    )
                )
        if items:
            panels = items[0][2]
            sink.caption(f"Example images ({panels})" if panels else "Example images")
            render_images(sink, entry, [(p, c) for p, c, _ in items], per_row=3)
        elif r.evidence:
            sink.caption("The evidence holds example ids only (set store_examples: true in the recipe to keep images).")


def render_certify(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    """robustness.certify: certified accuracy (a lower bound on robustness) and the smoothed classifier's
    accuracy under attack (an upper bound) on one plot, one per target."""
    sink.header("Certified robustness (randomized smoothing)", level=2)
    for r in results:
        sink.header(target_label(entry, r.target), level=3)
        sink.cards(
            [
                metric_card(n, r.metrics[n])
                for n in (
                    "smoothed_clean_accuracy",
                    "abstention_rate",
                    "median_certified_radius",
                    "num_invariant_violations",
                )
                if n in r.metrics
            ]
        )
        series = [(name, c) for name, c in r.curves.items() if "radius" in (c.x_label or "").lower()]
        if series:
            sink.figure(
                F.curves_figure(
                    series,
                    title=f"Certified vs attacked accuracy — {r.target}",
                    mode="lines+markers",
                    caption="The true robust accuracy lies between the two curves: "
                    "certification proves the lower one, attacks show the upper one.",
                ),
                key=f"certify-{r.unit_id}",
            )


def render_text_attack(sink: Sink, entry: RunEntry, results: list[AuditResult]) -> None:
    sink.header("Adversarial text", level=2)
    rate, cost = [], []
    for r in results:
        attack = str(r.params.get("attack") or "attack")
        label = f"{r.target} · {attack}"
        sink.header(label, level=3)
        sink.cards(
            [
                metric_card(n, r.metrics[n])
                for n in (
                    "clean_accuracy",
                    "accuracy_under_attack",
                    "attack_success_rate",
                    "avg_perturbed_word_pct",
                    "avg_queries",
                    "wall_time_per_example_s",
                    "num_verified",
                    "num_unverified",
                )
                if n in r.metrics
            ]
        )
        for n in ("clean_accuracy", "accuracy_under_attack", "attack_success_rate"):
            m = r.metrics.get(n)
            if m is not None and m.value is not None:
                rate.append({"x": n, "y": m.value, "group": label, "unit": m.unit, "help": m.description})
        for n in ("avg_queries",):
            m = r.metrics.get(n)
            if m is not None and m.value is not None:
                cost.append({"x": label, "y": m.value, "group": n, "unit": m.unit, "help": m.description})
    if rate or cost:
        cols = sink.columns(2)
        if rate:
            cols[0].figure(F.bar_figure(rate, "Accuracy and attack success rate", "fraction"), key="txt-rate")
        if cost:
            cols[1].figure(F.bar_figure(cost, "Query cost per attacked example", "queries"), key="txt-cost")
    for r in results:
        texts = [ev for ev in r.evidence if _text_pair(ev) is not None]
        if texts:
            sink.header(f"Adversarial examples — {r.target} · {r.params.get('attack', '')}", level=3)
        for ev in texts[:20]:
            pair = _text_pair(ev)
            assert pair is not None  # kept above
            orig, adv = pair
            a, b, changed = marked_or_diff_html(orig, adv)
            meta = ", ".join(
                f"{k}: {ev[k]}"
                for k in (
                    "id",
                    "status",
                    "verified",
                    "label",
                    "original_prediction",
                    "adversarial_prediction",
                    "queries",
                )
                if k in ev
            )
            sink.html(
                f'<div class="advpair" style="border-left:3px solid #fbd38d; padding:4px 8px; margin:6px 0">'
                f"<div><b>original</b>: {a}</div><div><b>adversarial</b>: {b}</div>"
                f'<div style="color:#666; font-size:0.85em">{changed} word(s) changed · {html.escape(meta)}'
                "</div></div>"
            )
        if r.evidence and not texts:
            sink.caption(
                f"{r.target}: the evidence holds example ids only (set store_examples: true in the recipe "
                "to keep the texts)."
            )


def _text_pair(ev: dict[str, Any]) -> tuple[str, str] | None:
    for a, b in (
        ("original_text", "adversarial_text"),
        ("original_text", "perturbed_text"),
        ("original", "adversarial"),
    ):
        if isinstance(ev.get(a), str) and isinstance(ev.get(b), str):
            return ev[a], ev[b]
    return None
