"""What robustness.certify reports: certified accuracy per radius with intervals, the smoothed classifier's
clean accuracy and abstentions, the attack side (empirical robust accuracy of the same smoothed classifier)
and the invariant between them (certified <= empirical, up to alpha), the settings and the noise keys."""

from __future__ import annotations

from typing import Any

import numpy as np

from fmaudit.audits.base import AuditContext, Outcome
from fmaudit.audits.robustness.image_run import ImageRun

# Keys under Stream.EXAMPLE_SAMPLE (documented above and in docs/modules/robustness.certify.md).
KEY_SELECT = 100
KEY_ESTIMATE = 101
KEY_PREDICT_CLEAN = 102
KEY_ATTACK_NOISE = 103
KEY_PREDICT_ADV = 104

CI_NOTE = (
    "95% Clopper-Pearson interval over the certified examples (n = 32 gives about +/-15 points, n = 100 about +/-10)"
)
# Float tolerance of the L2-ball check of an adversarial point: r * REL_TOL + ABS_TOL * sqrt(d).
REL_TOL = 1e-5
ABS_TOL = 1e-6


def report_certify(
    p: Any,
    images: ImageRun,
    ctx: AuditContext,
    base_correct,
    cert_pred,
    cert_radius,
    pa_lower,
    counts_top,
    clean_pred,
    attack,
    certify_seconds,
    out: Outcome,
) -> None:
    from fmaudit.robustness import smoothing as sm
    from fmaudit.robustness.intervals import clopper_pearson

    data, y = images.data, images.y
    n = len(y)
    radii = p.radii
    max_r = p.max_radius
    out.tables["settings"] = {
        "sigma": p.sigma,
        "n0": p.n0,
        "n": p.n,
        "alpha": p.alpha,
        "predict_n": p.predict_n,
        "batch_size": p.batch_size,
        "radii": radii,
        "max_certifiable_radius": max_r,
        "confidence_bound": "one-sided Clopper-Pearson lower bound at level 1 - alpha (Beta(alpha; k, n-k+1))",
        "attack": {
            "enabled": p.attack,
            "kind": "PGD-L2 on the soft smoothed classifier, expectation over noise "
            "(Salman et al. 2019), judged by PREDICT",
            "steps": p.attack_steps,
            "noise_samples": p.attack_noise_samples,
            "step_size": (p.attack_step_size if p.attack_step_size is not None else 2.5 / p.attack_steps),
            "step_size_unit": "fraction of the radius",
            "restarts": p.attack_restarts,
        },
        "seeds": {
            "stream": "EXAMPLE_SAMPLE",
            "keys": {
                "certify_selection": KEY_SELECT,
                "certify_estimation": KEY_ESTIMATE,
                "predict_clean": KEY_PREDICT_CLEAN,
                "attack_noise": KEY_ATTACK_NOISE,
                "predict_adversarial": KEY_PREDICT_ADV,
            },
            "per_example_key": "crc32 of the example id",
            "seed": ctx.seed,
        },
    }
    ci = clopper_pearson
    abstain = cert_pred == sm.ABSTAIN
    out.metric("num_examples", n, unit="examples", description="Examples certified.")
    out.metric(
        "base_clean_accuracy",
        float(base_correct.mean()),
        higher_is_better=True,
        unit="fraction",
        ci=ci(int(base_correct.sum()), n),
        ci_level=0.95,
        description=f"Accuracy of the base classifier (the target, no noise); {CI_NOTE}.",
    )
    smoothed_correct = clean_pred == y
    out.metric(
        "smoothed_clean_accuracy",
        float(smoothed_correct.mean()),
        higher_is_better=True,
        unit="fraction",
        ci=ci(int(smoothed_correct.sum()), n),
        ci_level=0.95,
        description=f"Accuracy of the smoothed classifier by PREDICT ({p.predict_n} noisy copies, "
        f"abstention = wrong) at sigma {p.sigma:g}; {CI_NOTE}.",
    )
    pab = float((clean_pred == sm.ABSTAIN).mean())
    out.metric(
        "predict_abstention_rate",
        pab,
        higher_is_better=False,
        unit="fraction",
        ci=ci(int((clean_pred == sm.ABSTAIN).sum()), n),
        ci_level=0.95,
        description="Clean examples on which PREDICT abstains (top two classes not separable at alpha).",
    )
    out.metric(
        "abstention_rate",
        float(abstain.mean()),
        higher_is_better=False,
        unit="fraction",
        ci=ci(int(abstain.sum()), n),
        ci_level=0.95,
        description="Examples CERTIFY abstains on (pA_lower <= 1/2): certified at no radius.",
    )
    cert_rows = []
    certified = {}
    for r in radii:
        ok = sm.certified_accuracy(cert_pred, cert_radius, y, r)
        certified[r] = ok
        out.metric(
            f"certified_accuracy@{r:g}",
            float(ok.mean()),
            higher_is_better=True,
            unit="fraction",
            ci=ci(int(ok.sum()), n),
            ci_level=0.95,
            description=f"Examples whose smoothed prediction is the label and certified constant within "
            f"L2 radius {r:g} (each certificate holds with probability >= 1 - {p.alpha:g}); "
            f"{CI_NOTE}."
            + (
                f" Above the largest certifiable radius {max_r:.3g} (n = {p.n}, "
                f"alpha = {p.alpha:g}): 0 by construction."
                if r > max_r
                else ""
            ),
        )
    good = np.array([r is not None for r in cert_radius]) & (cert_pred == y)
    radii_ok = np.array([cert_radius[i] for i in np.flatnonzero(good)], dtype=np.float64)
    out.metric(
        "median_certified_radius",
        float(np.median(radii_ok)) if len(radii_ok) else None,
        higher_is_better=True,
        unit="L2",
        description="Median certified radius over the examples certified with the correct class.",
    )
    acr = float(np.where(good, [r or 0.0 for r in cert_radius], 0.0).mean()) if n else None
    out.metric(
        "average_certified_radius",
        acr,
        higher_is_better=True,
        unit="L2",
        description="Average certified radius (Zhai et al. 2020): the certified radius of correct "
        "certificates, 0 for wrong or abstained ones, averaged over all examples.",
    )
    out.metric(
        "certify_seconds",
        certify_seconds,
        unit="seconds",
        description="Wall time of CERTIFY and PREDICT on the clean examples.",
    )
    out.curve(
        "certified_accuracy",
        radii,
        [float(certified[r].mean()) for r in radii],
        x_label="L2 radius",
        y_label="accuracy",
        description="Certified accuracy vs L2 radius (randomized smoothing, a LOWER bound on the smoothed "
        "classifier's robust accuracy); plotted with empirical_robust_accuracy, an UPPER bound.",
    )
    # empirical side and the invariant
    violations = 0
    emp = {}
    if attack is not None:
        robust = attack["robust"]
        for r in radii:
            rb = robust[r]
            emp[r] = rb
            if r > 0:
                out.metric(
                    f"empirical_robust_accuracy@{r:g}",
                    float(rb.mean()),
                    higher_is_better=True,
                    unit="fraction",
                    ci=ci(int(rb.sum()), n),
                    ci_level=0.95,
                    description=f"Accuracy of the smoothed classifier (PREDICT, abstention = wrong) on "
                    f"points found by expectation-over-noise PGD-L2 within radius {r:g} "
                    f"(an UPPER bound on its robust accuracy); {CI_NOTE}.",
                )
        out.curve(
            "empirical_robust_accuracy",
            radii,
            [float(emp[r].mean()) for r in radii],
            x_label="L2 radius",
            y_label="accuracy",
            description="Accuracy of the smoothed classifier under expectation-over-noise PGD-L2 vs radius "
            "(radius 0: its clean accuracy by PREDICT), an UPPER bound; plotted with "
            "certified_accuracy, a LOWER bound.",
        )
        out.metric(
            "attack_seconds",
            attack["seconds"],
            unit="seconds",
            description="Wall time of the PGD-L2 runs and PREDICT at the adversarial points.",
        )
        inv_rows = []
        for r in radii:
            cert_ok = certified[r]
            n_cert = int(cert_ok.sum())
            n_emp = int(emp[r].sum())
            # certified at r, yet PREDICT named another class on the clean image or at a point within r (a
            # contradiction), or abstained there (none: the smoothed class may still be the label)
            clean_wrong = (clean_pred != sm.ABSTAIN) & (clean_pred != y)
            contra = cert_ok & ~emp[r] & (clean_wrong | attack["wrong_class"][r])
            inconclusive = cert_ok & ~emp[r] & ~contra
            allowance = sm.failure_allowance(n_cert, 2 * p.alpha, p.invariant_quantile)
            excess = n_cert - n_emp
            violated = excess > allowance + int(inconclusive.sum())
            violations += int(violated)
            inv_rows.append(
                {
                    "radius": r,
                    "certified": n_cert,
                    "empirically_robust": n_emp,
                    "excess": excess,
                    "allowance": allowance,
                    "certified_but_abstained": int(inconclusive.sum()),
                    "contradictions": int(contra.sum()),
                    "contradiction_ids": [data.ids[i] for i in np.flatnonzero(contra)][:20],
                    "holds": not violated,
                }
            )
            if violated:
                out.finding(
                    "high",
                    f"Certified accuracy above the empirical robust accuracy at radius {r:g}",
                    f"{n_cert} of {n} examples are certified at L2 radius {r:g} but only {n_emp} survive "
                    f"the PGD-L2 attack on the smoothed classifier ({int(contra.sum())} certified examples "
                    f"were answered with another class within the radius, "
                    f"{int(inconclusive.sum())} with an abstention). A certificate is a lower bound and "
                    f"an attack an upper bound, so this can happen only with probability about alpha per "
                    f"example (allowance {allowance} examples): the certificate is wrong here (noise not "
                    "what the certificate assumes, a randomized or stateful model, a bug).",
                    metric=f"certified_accuracy@{r:g}",
                )
        out.tables["invariant"] = inv_rows
        inv_invalid = int(sum(attack["invalid"].values()))
        if inv_invalid:
            out.finding(
                "high",
                "The PGD attack returned points outside its L2 ball or [0, 1]",
                f"{inv_invalid} adversarial points failed the threat-model check and were not counted.",
            )
    out.metric(
        "num_invariant_violations",
        violations if attack is not None else None,
        higher_is_better=False,
        unit="radii",
        description="Radii at which certified accuracy exceeds the empirical robust accuracy by more than "
        "the certificates' failure allowance (and PREDICT's abstentions); empty when the "
        "attack is off (nothing to compare with).",
    )
    for r in radii:
        row = {
            "radius": r,
            "certified_accuracy": float(certified[r].mean()),
            "certified_accuracy_ci95": list(ci(int(certified[r].sum()), n) or ()),
        }
        if attack is not None:
            row["empirical_robust_accuracy"] = float(emp[r].mean())
            row["empirical_robust_accuracy_ci95"] = list(ci(int(emp[r].sum()), n) or ())
        cert_rows.append(row)
    out.tables["curve"] = cert_rows
    for i in range(n):
        out.evidence.append(
            {
                "id": data.ids[i],
                "label": int(y[i]),
                "certified_class": None if cert_pred[i] == sm.ABSTAIN else int(cert_pred[i]),
                "radius": cert_radius[i],
                "pa_lower": float(pa_lower[i]),
                "top_count": int(counts_top[i]),
                "predict_clean": None if clean_pred[i] == sm.ABSTAIN else int(clean_pred[i]),
                "base_correct": bool(base_correct[i]),
            }
        )
    # readings an auditor needs
    if abstain.mean() >= 0.5:
        out.finding(
            "medium",
            "CERTIFY abstains on most examples",
            f"{abstain.mean():.1%} of examples get no certificate at sigma {p.sigma:g}: the base classifier "
            "is not confident under this noise (Cohen et al. train it with Gaussian noise augmentation at "
            "the same sigma). Certified accuracies are low because of that, not because of an attack.",
            metric="abstention_rate",
        )
    gap = float(base_correct.mean() - smoothed_correct.mean())
    if gap > 0.2:
        out.finding(
            "medium",
            "Smoothing costs much clean accuracy",
            f"the base classifier is right on {base_correct.mean():.1%}, the smoothed one (sigma {p.sigma:g}) "
            f"on {smoothed_correct.mean():.1%}: the model was likely not trained under Gaussian noise; "
            "a smaller sigma or noise-augmented training certifies more.",
            metric="smoothed_clean_accuracy",
        )
    beyond = [r for r in radii if r > max_r]
    if beyond:
        out.finding(
            "info",
            "Radii beyond what n can certify",
            f"with n = {p.n} and alpha = {p.alpha:g} no radius above {max_r:.3g} can be certified (pA_lower "
            f"is at most alpha^(1/n)); certified accuracy at {', '.join(f'{r:g}' for r in beyond)} is 0 by "
            "construction. Raise n to certify further.",
        )
