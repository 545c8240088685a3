"""Sanity flags of `robustness.image_attack` (findings), after AutoAttack's checks and Carlini et al. 2019's
checklist (arXiv:1902.06705): outputs that look like probabilities, zero or non-finite input gradients, a
black-box attack beating every white-box one, a single-step attack beating an iterative one, accuracy not
reaching chance at a large budget, an unbounded attack not breaking every example, AutoAttack weaker than
another attack at the same budget, robust accuracy non-monotone (or flat) in epsilon.

Functions over the module's per-attack run records (dicts with label, name, norm, epsilons, robust, acc, ...);
no torch import at module level.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fmaudit.audits.base import Outcome
from fmaudit.audits.robustness.image_attack_specs import BLACK_BOX, ITERATIVE, MIN_NORM, SINGLE_STEP, WHITE_BOX
from fmaudit.robustness.intervals import clopper_pearson

LARGE_BUDGET_STEPS = 50  # the automatic large-budget PGD run
CI_NOTE = (
    "95% Clopper-Pearson interval over the attacked examples (n = 32 gives about +/-15 points, n = 100 about +/-10)"
)


def sanity_outputs(logits: Any, out: Outcome) -> None:
    """Flag clean outputs that are non-finite or look like probabilities (a final softmax masks gradients)."""
    import torch

    lg = logits.double()
    finite = bool(torch.isfinite(lg).all())
    probs_like = False
    if finite and len(lg):
        in_unit = bool(((lg >= 0) & (lg <= 1)).all())
        sums_to_one = bool(((lg.sum(1) - 1).abs() < 1e-3).float().mean() >= 0.95)
        probs_like = in_unit and sums_to_one
    out.tables.setdefault("sanity", {})["outputs_look_like_probabilities"] = probs_like
    out.tables["sanity"]["outputs_finite"] = finite
    if not finite:
        out.finding(
            "high",
            "The model returns non-finite outputs on clean examples",
            "NaN or infinite logits: gradients and robust accuracy are meaningless until fixed.",
        )
    if probs_like:
        out.finding(
            "high",
            "Model outputs look like probabilities, not logits",
            "Every output row is in [0, 1] and sums to 1: the model ends with a softmax. Cross-entropy "
            "on probabilities saturates and gives vanishing gradients, so gradient attacks understate "
            "the vulnerability (gradient masking). Audit the model without its final softmax.",
        )


def sanity_gradients(gn: np.ndarray, out: Outcome) -> None:
    """Flag zero or non-finite clean input-gradient norms `gn` (NaN = not finite): gradient attacks stall there."""
    n = max(1, len(gn))
    nonfinite = float(np.isnan(gn).sum() / n)
    zero = float((gn == 0).sum() / n)
    out.tables.setdefault("sanity", {}).update(
        {
            "zero_gradient_fraction": zero,
            "nonfinite_gradient_fraction": nonfinite,
            "median_input_gradient_l2": float(np.nanmedian(gn)) if len(gn) and not np.isnan(gn).all() else None,
        }
    )
    out.metric(
        "zero_gradient_fraction",
        zero,
        higher_is_better=False,
        unit="fraction",
        description="Clean examples whose cross-entropy input gradient is exactly zero.",
    )
    if nonfinite > 0:
        out.finding(
            "high",
            "Non-finite input gradients",
            f"{nonfinite:.1%} of clean examples have NaN or infinite input gradients: gradient attacks "
            "cannot work on them, so their robust accuracy is not evidence of robustness.",
        )
    if zero > 0:
        out.finding(
            "high" if zero >= 0.5 else "medium",
            "Zero input gradients (possible gradient masking)",
            f"{zero:.1%} of clean examples have an exactly zero loss gradient with respect to the input "
            "(saturated softmax, non-differentiable or quantized layers). Gradient attacks stall on them; "
            "trust the black-box attack (Square) and AutoAttack for these.",
            metric="zero_gradient_fraction",
        )


def sanity_attacks(runs: list[dict[str, Any]], clean_acc: float, n: int, out: Outcome) -> None:
    """Carlini et al. 2019 (arXiv:1902.06705) checklist items that compare attacks and budgets, plus
    AutoAttack's black-box check. A difference must exceed max(1 example, 1%) to count."""
    slack = max(1, math.ceil(0.01 * n)) / n
    sanity = out.tables.setdefault("sanity", {})
    # robust accuracy non-monotone in epsilon (rises), or never falls, as epsilon grows
    for r in runs:
        if r["name"] in MIN_NORM or len(r["acc"]) < 2:
            continue
        accs, grid, lab = r["acc"], r["epsilons"], r["label"]
        rises = [
            (grid[i], grid[j]) for i in range(len(accs)) for j in range(i + 1, len(accs)) if accs[j] > accs[i] + slack
        ]
        if rises:
            a, b = max(rises, key=lambda t: accs[grid.index(t[1])] - accs[grid.index(t[0])])
            sanity.setdefault("non_monotone", []).append({"attack": lab, "from": a, "to": b})
            out.finding(
                "high",
                f"Robust accuracy under {lab} rises with epsilon (non-monotone)",
                f"accuracy goes from {accs[grid.index(a)]:.3f} at epsilon {a:g} to "
                f"{accs[grid.index(b)]:.3f} at {b:g}: a larger budget includes every smaller one, so a "
                "working attack can only do better. Suspect gradient masking (the attack's random "
                "start or steps leave the region where gradients are informative) or too few steps / "
                "restarts (Carlini et al. 2019, section 5).",
                metric=f"robust_accuracy.{lab}@{b:g}",
            )
        elif accs[-1] >= accs[0] and accs[-1] > 0 and clean_acc > 0 and grid[-1] >= 2 * grid[0]:
            out.finding(
                "medium",
                f"Robust accuracy under {lab} does not fall as epsilon grows",
                f"{accs[0]:.3f} at epsilon {grid[0]:g} and {accs[-1]:.3f} at {grid[-1]:g}: budgets this "
                "different should matter. Suspect gradient masking, or budgets far too small.",
                metric=f"robust_accuracy.{lab}@{grid[-1]:g}",
            )
    # unbounded (minimum-norm) attacks must break every correctly classified example
    correct = round(clean_acc * n)
    for r in runs:
        rate = r.get("success_rate_unbounded")
        if rate is None or correct == 0:
            continue
        missed = correct - round(rate * correct)
        if missed > max(1, math.ceil(0.01 * correct)):
            out.finding(
                "medium",
                f"Unbounded {r['label']} does not break every example",
                f"{r['label']} has no L2 budget, yet it broke only {rate:.1%} of the correctly classified "
                f"examples ({missed} left). An attack without a budget must reach 100% (Carlini et al. "
                "2019): give it more steps (CW: `steps`, `binary_steps`, a larger initial `c`; DeepFool: "
                "`steps`), or suspect masked gradients. Its robust accuracies understate the "
                "vulnerability.",
                metric=f"median_l2_perturbation.{r['label']}",
            )
    points: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        for eps, acc in zip(r["epsilons"], r["acc"]):
            points.setdefault((r["norm"], eps), []).append({"label": r["label"], "name": r["name"], "acc": acc})
    for (norm, eps), pt in sorted(points.items()):
        white = [q for q in pt if q["name"] in WHITE_BOX]
        black = [q for q in pt if q["name"] in BLACK_BOX]
        # a black-box attack beating every white-box one
        if black and white:
            best_white = min(white, key=lambda q: q["acc"])
            best_black = min(black, key=lambda q: q["acc"])
            if best_black["acc"] < best_white["acc"] - slack:
                out.finding(
                    "high",
                    f"Black-box attack beats every white-box attack ({norm}, epsilon {eps:g})",
                    f"{best_black['label']} leaves {best_black['acc']:.3f} robust accuracy vs "
                    f"{best_white['acc']:.3f} for the best gradient attack ({best_white['label']}). "
                    "Gradients mislead the attacks: a classic sign of gradient masking. Report the worst "
                    "case, not the white-box numbers.",
                    metric=f"robust_accuracy.{best_black['label']}@{eps:g}",
                )
        # a single-step attack beating an iterative one
        for one in (q for q in pt if q["name"] in SINGLE_STEP):
            for it in (q for q in pt if q["name"] in ITERATIVE):
                if one["acc"] < it["acc"] - slack:
                    sanity.setdefault("single_step_beats_iterative", []).append(
                        {"norm": norm, "epsilon": eps, "single_step": one["label"], "iterative": it["label"]}
                    )
                    out.finding(
                        "high",
                        f"Single-step {one['label']} beats iterative {it['label']} ({norm}, epsilon {eps:g})",
                        f"{one['label']}: {one['acc']:.3f} vs {it['label']}: {it['acc']:.3f}. An iterative "
                        "attack with the same budget should do at least as well as one step; when it does "
                        "not, its gradients away from the clean point are masked or misleading (Carlini "
                        "et al. 2019, section 5). Trust neither number.",
                        metric=f"robust_accuracy.{it['label']}@{eps:g}",
                    )
        # AutoAttack weaker than any other attack at the same budget
        for aa in (q for q in pt if q["name"] == "autoattack"):
            for other in (q for q in pt if q is not aa):
                if aa["acc"] > other["acc"] + slack:
                    sanity.setdefault("autoattack_weaker", []).append(
                        {"norm": norm, "epsilon": eps, "autoattack": aa["label"], "other": other["label"]}
                    )
                    out.finding(
                        "high",
                        f"AutoAttack ({aa['label']}) is weaker than {other['label']} ({norm}, epsilon {eps:g})",
                        f"{aa['label']}: {aa['acc']:.3f} vs {other['label']}: {other['acc']:.3f}. AutoAttack "
                        "should be at least as strong as any single attack at its budget; check the model "
                        "for randomness, gradient obfuscation, or outputs tuned against AutoAttack's "
                        "losses, and report the worst case.",
                        metric=f"robust_accuracy.{aa['label']}@{eps:g}",
                    )


def large_budget(probe: dict[str, Any], clean_acc: float, y: np.ndarray, n_classes: int, out: Outcome) -> None:
    """Carlini et al. 2019: at a large enough budget every attack must reach chance. At Linf 0.5 every
    image can be moved to the same mid-gray image, so a working attack leaves at most the share of the
    commonest label (`chance`)."""
    eps = probe["epsilons"][0]
    rb = probe["robust"][0]
    n = len(rb)
    acc = float(rb.mean())
    ci = clopper_pearson(int(rb.sum()), n)
    counts = np.bincount(y, minlength=n_classes) if n else np.zeros(1)
    chance = float(counts.max() / max(1, n))
    key = f"robust_accuracy.large_budget_pgd_linf@{eps:g}"
    out.metric(
        key,
        acc,
        higher_is_better=None,
        unit="fraction",
        ci=ci,
        ci_level=0.95,
        description=f"Accuracy under PGD-{LARGE_BUDGET_STEPS} (Linf, epsilon {eps:g}, from the clean image, no "
        f"random start), the automatic large-budget check: a working attack leaves at most "
        f"chance ({chance:.3f}, the commonest label's share); {CI_NOTE}.",
    )
    out.tables.setdefault("sanity", {})["large_budget"] = {
        "epsilon": eps,
        "norm": "Linf",
        "attack": f"PGD-{LARGE_BUDGET_STEPS}, alpha 2.5 * eps / steps, no random start",
        "robust_accuracy": acc,
        "ci95": list(ci) if ci else None,
        "chance": chance,
        "seconds": round(probe["seconds"], 4),
        "invalid_adversarials": int(sum(probe["invalid"])),
    }
    if ci is not None and ci[0] > chance and clean_acc > chance:
        out.finding(
            "high",
            f"Accuracy does not reach chance at Linf epsilon {eps:g}",
            f"PGD leaves {acc:.3f} accuracy (95% interval {ci[0]:.3f}-{ci[1]:.3f}) at a budget where every "
            f"image can be turned mid-gray, so a working attack leaves at most {chance:.3f}. The gradient "
            "attacks do not work on this model (gradient masking, a non-differentiable or quantized "
            "layer); robust accuracies at small budgets are not evidence of robustness (Carlini et al. "
            "2019).",
            metric=key,
        )
