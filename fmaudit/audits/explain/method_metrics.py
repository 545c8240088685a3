"""explain.attribution's per-method metrics: the mean and bootstrap interval over examples of every score the
quality steps collected, the counts, and the findings of methods that do no better than a random ordering."""

from __future__ import annotations

from fmaudit.audits.explain.quality import QualityRun, mean_ci

# Per-method metric suffix -> (unit, higher is better, description); the deletion / insertion unit is the space's.
_METRICS: dict[str, tuple[str | None, bool | None, str]] = {
    "deletion_aopc": (
        None,
        True,
        "Mean drop of the explained output as the most-attributed features are removed "
        "first (AOPC; compare with random.deletion_aopc).",
    ),
    "insertion_auc": (
        None,
        True,
        "Mean explained output as the most-attributed features are inserted first into "
        "the baseline (compare with random.insertion_auc).",
    ),
    "infidelity": (
        None,
        False,
        "Captum infidelity (normalized): squared error between attributions x dropped "
        "features and the output change, random subsets dropped to the baseline.",
    ),
    "sensitivity_max": (
        "relative",
        False,
        "Captum sensitivity_max: largest relative change of the attributions under small uniform input noise.",
    ),
    "randomization_spearman": (
        "rank correlation",
        False,
        "Mean Spearman correlation between attributions of the trained model and of a copy "
        "after the deepest step of the randomization cascade (layer groups re-initialized "
        "from the top down; low = depends on the weights).",
    ),
    "randomization_spearman_abs": ("rank correlation", False, "Same, on absolute attribution values."),
    "randomization_ssim": ("SSIM", False, "Same, SSIM of the absolute attribution maps (images)."),
    "road_morf": (
        "probability",
        False,
        "ROAD (Rong et al. 2022): mean probability of the explained class as the most-attributed features "
        "are removed first and re-imputed from their neighbours (lower = better; compare with "
        "random.road).",
    ),
    "road_lerf": ("probability", True, "ROAD: the same, least-attributed features removed first (higher = better)."),
    "seconds_per_example": ("seconds", False, "Wall time of the attribution call per example."),
}


def report_methods(q: QualityRun) -> None:
    """Per-method metrics (mean and bootstrap interval over examples), the counts, and the findings of methods
    that do no better than a random ordering."""
    p, out = q.params, q.out
    curve_units = {"deletion_aopc": q.space.curve_unit, "insertion_auc": q.space.curve_unit}
    for m, alist in q.attrs.items():
        q.per_method[m]["seconds_per_example"] = [a.seconds for a in alist]
        for key, vals in q.per_method[m].items():
            unit, better, desc = _METRICS[key]
            v, ci = mean_ci(
                vals, rounds=p.bootstrap if key != "seconds_per_example" else 0, level=p.confidence, seed=q.seed
            )
            out.metric(
                f"{m}.{key}",
                v,
                higher_is_better=better,
                ci=ci,
                ci_level=p.confidence,
                unit=curve_units.get(key, unit),
                description=desc,
            )
    out.metric("num_examples", len(q.examples), unit="examples", description="Examples explained.")
    if "randomization" in p.quality:
        out.metric(
            "methods_failing_randomization",
            len(q.failing),
            higher_is_better=False,
            unit="methods",
            description="Methods whose attributions barely change when the layers are re-initialized "
            "(cascade from the top).",
        )
    for m in q.attrs:
        if "deletion_aopc" in q.per_method[m] and "random.deletion_aopc" in out.metrics:
            dm, rm = out.metrics[f"{m}.deletion_aopc"].value, out.metrics["random.deletion_aopc"].value
            if dm is not None and rm is not None and dm <= rm:
                out.finding(
                    "low",
                    f"{m}: deleting its top features hurts no more than a random order",
                    f"deletion AOPC {dm:.4g} vs random {rm:.4g}: its ranking carries no signal about "
                    "what the model uses",
                    metric=f"{m}.deletion_aopc",
                )
        if "road_morf" in q.per_method[m] and "random.road" in out.metrics:
            dm, rm = out.metrics[f"{m}.road_morf"].value, out.metrics["random.road"].value
            if dm is not None and rm is not None and dm >= rm:
                out.finding(
                    "low",
                    f"{m}: removing its top features (ROAD imputation) hurts no more than a random order",
                    f"ROAD MoRF {dm:.4g} vs random {rm:.4g}, with removed pixels imputed from their "
                    "neighbours rather than set to the baseline",
                    metric=f"{m}.road_morf",
                )
