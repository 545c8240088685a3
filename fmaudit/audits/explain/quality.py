"""explain.attribution's quality steps: each runs one metric family from `fmaudit.explain` over the feature
space and writes its metrics, curves, tables and findings into the outcome (the math lives there; the report
lives here). `QUALITY_STEPS` runs them in report order; `method_metrics.report_methods` then writes the
per-method metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fmaudit.audits.base import Outcome
from fmaudit.explain.curves import CURVE_KINDS, removal_curves
from fmaudit.explain.faithfulness import completeness, infidelity, sensitivity
from fmaudit.explain.image import ImageSpace
from fmaudit.explain.randomization import randomization_cascade
from fmaudit.explain.road import road_curves
from fmaudit.explain.space import Attribution, Example, FeatureSpace
from fmaudit.seeds import Stream
from fmaudit.seeds import rng as stream_rng

if TYPE_CHECKING:
    from fmaudit.audits.explain.attribution import AttributionAudit


def mean_ci(
    values: Sequence[float | None], *, rounds: int, level: float, seed: int
) -> tuple[float, tuple[float, float] | None]:
    """Mean of the finite values and its bootstrap interval over examples (None with < 2 values or no rounds)."""
    from fmaudit.stats import bootstrap_ci

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), None
    ci = (
        bootstrap_ci(lambda idx: float(v[idx].mean()), len(v), rounds=rounds, level=level, seed=seed)
        if rounds and len(v) > 1
        else None
    )
    return float(v.mean()), ci


@dataclass
class QualityRun:
    """What the quality steps read (the explained examples and their attributions) and write."""

    params: AttributionAudit.Params
    target: Any
    space: FeatureSpace
    model: Any
    examples: list[Example]
    attrs: dict[str, list[Attribution]]  # method -> one attribution per example
    seed: int
    out: Outcome
    per_method: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # method -> metric -> per example
    failing: list[str] = field(default_factory=list)  # methods failing the randomization check

    def __post_init__(self) -> None:
        self.per_method = {m: {} for m in self.attrs}

    def ci(self, values: Sequence[float | None]) -> tuple[float, tuple[float, float] | None]:
        return mean_ci(values, rounds=self.params.bootstrap, level=self.params.confidence, seed=self.seed)


_VERB = {"deletion": "removed", "insertion": "inserted"}


def _removal_curves(q: QualityRun) -> None:
    p, unit = q.params, q.space.curve_unit
    kinds = [k for k in CURVE_KINDS if k in p.quality]
    curves = removal_curves(
        q.space,
        q.model,
        q.examples,
        q.attrs,
        kinds=kinds,
        steps=p.curve_steps,
        orderings=p.random_orderings,
        rng=stream_rng(q.seed, Stream.ATTRIBUTION_CURVES),
    )
    for k, c in curves.items():
        v, ci = q.ci(c.random.scores)
        q.out.metric(
            f"random.{CURVE_KINDS[k].metric}",
            v,
            higher_is_better=True,
            ci=ci,
            ci_level=p.confidence,
            unit=unit,
            description=f"The {k} metric for a random ordering of the same features (the reference).",
        )
        q.out.curve(
            f"random.{k}",
            c.fractions,
            c.random.curve,
            x_label=f"fraction of features {_VERB[k]}",
            y_label=f"explained output ({unit})",
            description=f"{k.capitalize()} curve, random ordering (mean over examples).",
        )
    for m in q.attrs:
        for k, c in curves.items():
            q.per_method[m][CURVE_KINDS[k].metric] = c.methods[m].scores
            q.out.curve(
                f"{m}.{k}",
                c.fractions,
                c.methods[m].curve,
                x_label=f"fraction of features {_VERB[k]}",
                y_label=f"explained output ({unit})",
                description=f"{k.capitalize()} curve: most-attributed features {_VERB[k]} first (mean over examples).",
            )


def _road(q: QualityRun) -> None:
    """ROAD (Rong et al. 2022), images only: removal by imputation instead of the baseline (`explain/road.py`)."""
    if not isinstance(q.space, ImageSpace):
        return
    p = q.params
    r = road_curves(
        q.space,
        q.model,
        q.examples,
        q.attrs,
        steps=p.curve_steps,
        orderings=p.random_orderings,
        noise=p.road_noise,
        rng=stream_rng(q.seed, Stream.ATTRIBUTION_CURVES, 1),
    )
    v, ci = q.ci(r.random.scores)
    q.out.metric(
        "random.road",
        v,
        higher_is_better=None,
        ci=ci,
        ci_level=p.confidence,
        unit="probability",
        description="ROAD with random orderings of the same features (the reference for road_morf and road_lerf).",
    )
    x_label, y_label = "fraction of features removed (imputed)", "probability of the explained class"
    q.out.curve(
        "random.road",
        r.fractions,
        r.random.curve,
        x_label=x_label,
        y_label=y_label,
        description="ROAD, random ordering.",
    )
    for m, by_order in r.methods.items():
        for name, s in by_order.items():
            q.per_method[m][f"road_{name}"] = s.scores
        for name, s in by_order.items():
            q.out.curve(
                f"{m}.road_{name}",
                r.fractions,
                s.curve,
                x_label=x_label,
                y_label=y_label,
                description=f"ROAD, {'most' if name == 'morf' else 'least'}-attributed features removed "
                "first, re-imputed from their neighbours (mean over examples).",
            )


def _infidelity(q: QualityRun) -> None:
    p = q.params
    for m, alist in q.attrs.items():
        q.per_method[m]["infidelity"] = [
            infidelity(
                q.space,
                q.model,
                ex,
                a,
                perturbations=p.perturbations,
                drop=p.infidelity_drop,
                batch_size=p.internal_batch_size or 64,
                seed=q.seed + ex.pos,
            )
            for ex, a in zip(q.examples, alist)
        ]


def _sensitivity(q: QualityRun) -> None:
    p = q.params
    if not q.space.has_noise or p.sensitivity_examples <= 0:
        return
    for m in q.attrs:
        q.per_method[m]["sensitivity_max"] = [
            sensitivity(
                q.space, m, q.model, ex, samples=p.perturbations, radius=p.sensitivity_radius, seed=q.seed + ex.pos
            )
            for ex in q.examples[: p.sensitivity_examples]
        ]


_SIMILARITY_LABELS = {"spearman": "Spearman (signed)", "spearman_abs": "Spearman (absolute)", "ssim": "SSIM"}


def _randomization(q: QualityRun) -> None:
    """Adebayo et al.'s cascade (`explain/randomization.py`): similarity per step, the gate on the deepest step."""
    p, out = q.params, q.out
    exs = q.examples[: p.randomization_examples] if p.randomization_examples else q.examples
    res = randomization_cascade(q.target, q.space, exs, q.attrs, depth=p.randomization_depth, seed=q.seed)
    steps, threshold = np.arange(1, len(res.steps) + 1), p.randomization_threshold
    similarity: dict[str, list[dict[str, Any]]] = {}
    for m in q.attrs:
        sims = res.similarity[m]
        rows = []
        for i, g in enumerate(res.steps):
            row: dict[str, Any] = {"step": i + 1, "group": g.name}
            for k in res.keys:
                v, ci = q.ci(sims[k][i])
                row[k], row[f"{k}_ci"] = v, list(ci) if ci else None
            rows.append(row)
        similarity[m] = rows
        for k in res.keys:
            suffix = "" if k == "spearman" else "_" + k.replace("spearman_", "")
            out.curve(
                f"{m}.randomization_cascade{suffix}",
                steps,
                [r[k] for r in rows],
                x_label="cascade step (layer groups re-initialized from the top)",
                y_label=f"{_SIMILARITY_LABELS[k]} vs trained model",
                description=f"Cascading randomization (Adebayo et al. 2018): {_SIMILARITY_LABELS[k]} between "
                "the trained model's attributions and those after re-initializing the top "
                "k layer groups (groups in tables.randomization.cascade).",
            )
        for k in res.keys:  # the gated numbers: after the deepest step of the cascade
            q.per_method[m][f"randomization_{k}"] = sims[k][-1]
        last = sims["spearman"][-1]
        mean = float(np.nanmean(last)) if np.isfinite(last).any() else float("nan")
        above = sum(
            1 for r in rows if r["spearman"] is not None and np.isfinite(r["spearman"]) and r["spearman"] > threshold
        )
        if np.isfinite(mean) and mean <= threshold and len(rows) > 1 and 2 * above >= len(rows):
            out.finding(
                "low",
                f"{m} changes only once the lower layers are re-initialized",
                f"its attributions keep a rank correlation above {threshold} for {above} of "
                f"{len(rows)} cascade steps (top first): they depend on the input layers more than on "
                "what the upper layers learned (Adebayo et al. 2018, Fig. 2)",
                metric=f"{m}.randomization_spearman",
            )
        if np.isfinite(mean) and mean > threshold:
            q.failing.append(m)
            out.finding(
                "high",
                f"{m} fails the model-parameter randomization check",
                f"its attributions keep a mean rank correlation of {mean:.3f} (> {threshold}) after "
                f"re-initializing {len(res.steps)} layer group(s) from the top down to {res.steps[-1].name}: "
                "they barely depend on what the model learned, so they cannot explain its decisions "
                "(Adebayo et al. 2018)",
                metric=f"{m}.randomization_spearman",
            )
    out.tables["randomization"] = {
        "procedure": "cascading model-parameter randomization (Adebayo et al. 2018): layer groups of a copy "
        "re-initialized from the top down, cumulatively; attributions recomputed after each step",
        "cascade": [
            {"step": i + 1, "group": g.name, "module": g.kind, "parameters": g.num_parameters, "init": g.init}
            for i, g in enumerate(res.steps)
        ],
        "reinitialized_modules": [g.name for g in res.steps],
        "complete": res.complete,
        "not_in_forward": res.unused,
        "untied": res.untied,
        "similarity": similarity,
        "threshold": threshold,
        "failing_methods": q.failing,
        "num_examples": res.num_examples,
        "statistic": "Spearman rank correlation of signed attributions after the deepest cascade step, mean "
        "over examples (gated); absolute-value Spearman"
        + (" and SSIM of the absolute maps" if "ssim" in res.keys else "")
        + " reported",
    }


def _completeness(q: QualityRun) -> None:
    """Integrated gradients' sum vs F(x) - F(baseline) (causal LMs: F = continuation log-prob, and Captum's LLM
    wrapper reports no delta, so only the gap is checked). Where F(x) ~ F(baseline) the relative error is
    undefined: those examples are judged on the absolute gap only, never told to raise n_steps."""
    if "integrated_gradients" not in q.attrs:
        return
    p, out, unit, level = q.params, q.out, q.space.output_unit, q.params.confidence
    c = completeness(q.examples, q.attrs["integrated_gradients"], min_difference=p.completeness_min_difference)
    if c.has_delta:
        v, ci = q.ci(c.deltas)
        out.metric(
            "integrated_gradients.convergence_delta",
            v,
            higher_is_better=False,
            ci=ci,
            ci_level=level,
            unit=unit,
            description="Mean |convergence delta| reported by Captum.",
        )
    v, ci = q.ci(c.gaps)
    out.metric(
        "integrated_gradients.completeness_gap",
        v,
        higher_is_better=False,
        ci=ci,
        ci_level=level,
        unit=unit,
        description="Mean |sum of attributions - (F(x) - F(baseline))|, F measured separately.",
    )
    out.metric(
        "integrated_gradients.completeness_abs_gap",
        float(np.max(c.gaps)),
        higher_is_better=False,
        unit=unit,
        description="Largest |sum of attributions - (F(x) - F(baseline))| over the examples (defined "
        "even where F(x) = F(baseline)).",
    )
    worst = float(np.max(c.relative)) if c.relative else None
    out.metric(
        "integrated_gradients.completeness_relative_error",
        worst,
        higher_is_better=False,
        unit="fraction",
        description="Largest gap / |F(x) - F(baseline)| over the examples where F(x) and F(baseline) "
        "differ by at least completeness_min_difference (null when none does).",
    )
    agree = c.gap_matches_delta
    out.tables["completeness"] = {
        "examples": c.rows,
        "gap_matches_delta": agree,
        "tolerance": p.completeness_tolerance,
        "min_difference": p.completeness_min_difference,
        "relative_error_undefined": c.undefined,
    }
    if worst is not None and worst > p.completeness_tolerance:
        out.finding(
            "medium",
            "Integrated gradients are not complete on some examples",
            f"sum of attributions misses F(x) - F(baseline) by up to {worst:.1%} (tolerance "
            f"{p.completeness_tolerance:.1%}); raise n_steps",
            metric="integrated_gradients.completeness_relative_error",
        )
    if c.undefined:
        flat_gap = max(g for g, r in zip(c.gaps, c.rows) if r["relative_error"] is None)
        out.finding(
            "low",
            f"F(x) = F(baseline) on {len(c.undefined)} of {len(c.rows)} example(s): completeness is "
            "uninformative there",
            f"the explained output differs by less than {p.completeness_min_difference:g} {unit} between "
            "the input and the baseline, so integrated gradients must sum to about zero and the relative "
            f"error is undefined (absolute gaps up to {flat_gap:.3g} {unit}); the "
            "attributions only say how contributions cancel. A baseline the model scores differently "
            "(e.g. blur instead of black, another baseline token) explains more",
            metric="integrated_gradients.completeness_abs_gap",
        )
    if agree is False:
        out.finding(
            "medium",
            "Integrated gradients' convergence delta disagrees with the measured gap",
            "the reported delta does not match sum(attr) - (F(x) - F(baseline)) measured separately",
            metric="integrated_gradients.completeness_gap",
        )


# Quality names -> the step computing them, in the order the report lists their results.
QUALITY_STEPS: dict[tuple[str, ...], Callable[[QualityRun], None]] = {
    ("deletion", "insertion"): _removal_curves,
    ("road",): _road,
    ("infidelity",): _infidelity,
    ("sensitivity",): _sensitivity,
    ("randomization",): _randomization,
    ("completeness",): _completeness,
}


def run_quality(q: QualityRun) -> None:
    """Every step whose quality names the params ask for."""
    wanted = set(q.params.quality)
    for names, step in QUALITY_STEPS.items():
        if wanted.intersection(names):
            step(q)
