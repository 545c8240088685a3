"""`robustness.certify`: certified L2 robustness of image classifiers by randomized smoothing.

Cohen, Rosenfeld & Kolter (ICML 2019): the smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)
of a base classifier f (the target) is certified, per example, by CERTIFY: n0 noisy copies guess the top
class, n further copies give a one-sided Clopper-Pearson lower bound pA_lower at level 1 - alpha, and
g is constant within L2 radius R = sigma * Phi^-1(pA_lower) (abstain when pA_lower <= 1/2). Reported:
certified accuracy at every radius of a grid with 95% Clopper-Pearson intervals, the abstention rate, the
smoothed classifier's clean accuracy (PREDICT), and, for the other side, the *empirical* robust accuracy
of the same smoothed classifier under an expectation-over-noise PGD-L2 (Salman et al., NeurIPS 2019:
the gradient of the soft smoothed classifier's cross-entropy averaged over k noise draws) at the same
radii, each adversarial point judged by PREDICT. Attacks give an upper bound on robustness, certification
a lower bound, so certified accuracy at r may never exceed the empirical robust accuracy at r (up to the
certificate's failure probability alpha): the module checks this invariant per radius and reports any
violation as a high finding.

Noise lives in [0, 1] pixel space (the target's `PixelClassifier` normalizes inside), so radii are in the
same units as `robustness.image_attack`'s `l2_epsilons`; noisy copies are not clipped (as in the paper).

Randomness (all from the unit's seed, `fmaudit.seeds`): every draw uses a torch CPU generator seeded with
`derive(seed, Stream.EXAMPLE_SAMPLE, key, crc32(example id)[, radius index])`, so an example gets the same
noise whichever other examples are chosen. Keys: 100 CERTIFY selection (n0), 101 CERTIFY estimation (n),
102 PREDICT on the clean image, 103 the PGD's noise draws, 104 PREDICT on the adversarial image. The
example sample itself is `select_examples`' (Stream.EXAMPLE_SAMPLE without keys).

No torch import at module level.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome
from fmaudit.audits.robustness.image_checks import image_data_problems
from fmaudit.audits.robustness.image_run import ImageRun, eval_mode, prepare_images
from fmaudit.batching import batched_forward

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


class CertifyAudit(AuditModule):
    name = "robustness.certify"
    category = "robustness"
    description = (
        "Certified L2 robustness by randomized smoothing (Cohen et al. 2019, CERTIFY with n0 / n / alpha): "
        "certified accuracy vs radius with Clopper-Pearson intervals, abstentions, the smoothed "
        "classifier's clean accuracy, and its empirical robust accuracy under expectation-over-noise "
        "PGD-L2 at the same radii (upper bound vs lower bound, checked)."
    )
    requires = frozenset({"image", "classifier", "logits"})
    metric_names = (
        "certified_accuracy@*",
        "empirical_robust_accuracy@*",
        "smoothed_clean_accuracy",
        "base_clean_accuracy",
        "abstention_rate",
        "predict_abstention_rate",
        "median_certified_radius",
        "average_certified_radius",
        "num_examples",
        "num_invariant_violations",
        "certify_seconds",
        "attack_seconds",
    )

    class Params(AuditParams):
        sigma: float = Field(
            default=0.25, gt=0, le=10, description="Standard deviation of the Gaussian noise, in [0, 1] pixel units."
        )
        n0: int = Field(
            default=100, ge=1, le=10_000_000, description="Noisy copies that choose the top class (paper: 100)."
        )
        n: int = Field(
            default=10_000,
            ge=1,
            le=100_000_000,
            description="Noisy copies that bound its probability (paper: 100,000); the largest "
            "certifiable radius is sigma * Phi^-1(alpha^(1/n)).",
        )
        alpha: float = Field(
            default=0.001,
            gt=0,
            lt=0.5,
            description="Failure probability of each certificate (and of each PREDICT answer).",
        )
        predict_n: int = Field(
            default=1_000,
            ge=1,
            le=100_000_000,
            description="Noisy copies for PREDICT (clean accuracy of the smoothed classifier, "
            "and its answer at every adversarial point).",
        )
        batch_size: int = Field(default=1_000, gt=0, le=1_000_000, description="Noisy copies per forward pass.")
        num_examples: int = Field(
            default=100, gt=0, le=100_000, description="Certify a seeded sample of at most this many examples."
        )
        split: Literal["auto", "nonmembers", "members", "all"] = Field(
            default="auto", description="auto = held-out non-members when the target was fine-tuned on this data."
        )
        radii: list[float] = Field(
            default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
            description="L2 radii (pixel space) at which accuracies are reported; 0 is always included.",
        )
        attack: bool = Field(
            default=True,
            description="Run the expectation-over-noise PGD-L2 against the smoothed "
            "classifier at every radius > 0 (the empirical upper bound).",
        )
        attack_steps: int = Field(default=20, ge=1, le=10_000, description="PGD steps.")
        attack_noise_samples: int = Field(
            default=8, ge=1, le=10_000, description="Noise draws k averaged per gradient step (Salman et al.)."
        )
        attack_step_size: float | None = Field(
            default=None, gt=0, description="Step as a fraction of the radius (default 2.5 / steps)."
        )
        attack_restarts: int = Field(
            default=1,
            ge=1,
            le=100,
            description="Independent runs per radius (the first from the clean image, the "
            "others from a random point of the ball); an example counts as "
            "broken when any run breaks it.",
        )
        invariant_quantile: float = Field(
            default=0.999,
            gt=0.5,
            lt=1,
            description="Allowance of the invariant check: this quantile of Binomial(certified examples, 2 alpha).",
        )

        @field_validator("radii")
        @classmethod
        def _radii(cls, v: list[float]) -> list[float]:
            if not v:
                raise ValueError("radii: give at least one radius")
            if len(v) > 64:
                raise ValueError(f"radii: at most 64 radii (got {len(v)})")
            for r in v:
                if not math.isfinite(r) or r < 0:
                    raise ValueError(f"radii: every radius must be finite and >= 0 (got {r:g})")
            return sorted(set(float(r) for r in v) | {0.0})

        @model_validator(mode="after")
        def _sizes(self):
            if self.n0 + self.n > 100_000_000:
                raise ValueError("n0 + n is too large (at most 1e8 noisy copies per example)")
            return self

        @property
        def max_radius(self) -> float:
            """The largest radius CERTIFY can give with these n and alpha (every copy votes for the class)."""
            from fmaudit.robustness.smoothing import certified_radius, pa_lower_bound

            return certified_radius(pa_lower_bound(self.n, self.n, self.alpha), self.sigma) or 0.0

    params: Params

    # -- pre-flight ----------------------------------------------------------------------------------
    def check(self, target, data) -> list[str]:
        problems: list[str] = []
        if "image" not in getattr(target, "capabilities", ()) or not hasattr(target, "normalized_inside"):
            return [
                f"robustness.certify certifies image classifiers (randomized smoothing adds Gaussian noise to "
                f"pixels); target {target.name!r} is a {getattr(target, 'task', type(target).__name__)} target "
                "(for text, use robustness.text_attack)"
            ]
        if target.num_labels is None:
            problems.append(f"the number of classes of target {target.name!r} is unknown; set num_labels on it")
        elif target.num_labels < 2:
            problems.append(f"target {target.name!r} has {target.num_labels} class; certification needs at least 2")
        return problems + image_data_problems(
            target,
            data,
            split=self.params.split,
            purpose="certified accuracy",
            verb="certify",
            pixel_hint="sigma and the radii are in [0, 1] pixel units: give the images scaled to [0, 1] and declare "
            "the model's normalization on the target",
        )

    # -- run -----------------------------------------------------------------------------------------
    def run(self, target, ctx: AuditContext) -> Outcome:
        import torch

        from fmaudit.robustness import smoothing as sm

        p = self.params
        images = prepare_images(target, ctx, split=p.split, num_examples=p.num_examples)
        model, device, n_classes, x, y = images.model, images.device, images.n_classes, images.x, images.y
        n = len(x)
        keys = [zlib.crc32(str(i).encode("utf-8")) for i in images.data.ids]
        out = Outcome()
        out.tables["evaluated_on"] = images.evaluated_on(ctx, target)
        with eval_mode(model):
            base_logits = batched_forward(model, x, p.batch_size, device=device, dtype=torch.float32)
            if base_logits.shape != (n, n_classes):
                raise ValueError(
                    f"the model must return one (N, {n_classes}) logits tensor; got shape {tuple(base_logits.shape)}"
                )
            base_correct = base_logits.argmax(1).numpy() == y
            t0 = time.perf_counter()
            cert_pred = np.full(n, sm.ABSTAIN, dtype=np.int64)
            cert_radius: list[float | None] = [None] * n
            pa_lower = np.zeros(n)
            counts_top = np.zeros(n, dtype=np.int64)
            clean_pred = np.full(n, sm.ABSTAIN, dtype=np.int64)
            with ctx.progress_bar("certifying (randomized smoothing)", n) as bar:
                for i in range(n):
                    c0 = self._counts(model, x[i], p.n0, self._gen(ctx.seed, KEY_SELECT, keys[i]), n_classes, device)
                    c1 = self._counts(model, x[i], p.n, self._gen(ctx.seed, KEY_ESTIMATE, keys[i]), n_classes, device)
                    cert_pred[i], cert_radius[i], pa_lower[i] = sm.certify_from_counts(c0, c1, p.sigma, p.alpha)
                    counts_top[i] = int(c1[int(np.argmax(c0))])
                    cp = self._counts(
                        model, x[i], p.predict_n, self._gen(ctx.seed, KEY_PREDICT_CLEAN, keys[i]), n_classes, device
                    )
                    clean_pred[i] = sm.predict_from_counts(cp, p.alpha)[0]
                    bar.advance()
            certify_seconds = time.perf_counter() - t0
            radii = p.radii
            smoothed_correct = clean_pred == y
            attack = None
            if p.attack:
                t1 = time.perf_counter()
                attack = self._attack(model, x, y, smoothed_correct, keys, radii, n_classes, device, ctx)
                attack["seconds"] = time.perf_counter() - t1
        self._report(
            images,
            ctx,
            base_correct,
            cert_pred,
            cert_radius,
            pa_lower,
            counts_top,
            clean_pred,
            attack,
            certify_seconds,
            out,
        )
        return out

    # -- sampling ------------------------------------------------------------------------------------
    @staticmethod
    def _gen(seed: int, *keys: int):
        import torch

        from fmaudit.seeds import Stream, derive

        g = torch.Generator(device="cpu")
        g.manual_seed(derive(seed, Stream.EXAMPLE_SAMPLE, *keys))
        return g

    def _counts(self, model, x1, num: int, gen, n_classes: int, device) -> np.ndarray:
        """Class counts of the base classifier on `num` noisy copies of one image (noise drawn on the CPU
        from `gen`, so the numbers do not depend on the device)."""
        from fmaudit.robustness.smoothing_noise import noisy_counts

        return noisy_counts(
            model,
            x1,
            num,
            gen,
            n_classes=n_classes,
            sigma=self.params.sigma,
            batch_size=self.params.batch_size,
            device=device,
        )

    # -- empirical side: expectation-over-noise PGD-L2 on the smoothed classifier, judged by PREDICT --
    def _attack(self, model, x, y, smoothed_correct, keys, radii, n_classes, device, ctx) -> dict[str, Any]:
        import torch

        from fmaudit.robustness import smoothing as sm

        p = self.params
        n = len(x)
        d = int(np.prod(x.shape[1:]))
        # per radius: PREDICT's answer at the adversarial point (ABSTAIN, a class), robust flags (cumulative:
        # a point found inside a smaller ball is inside every larger one), invalid adversarials
        robust = {0.0: smoothed_correct.copy()}
        # PREDICT named a class other than the label at some point within the radius (cumulative; at radius 0
        # the clean image itself): what contradicts a certificate, unlike an abstention
        wrong_class = {0.0: np.zeros(n, dtype=bool)}
        invalid: dict[float, int] = {0.0: 0}
        alive = smoothed_correct.copy()
        wrong = np.zeros(n, dtype=bool)
        per_batch = max(1, p.batch_size // p.attack_noise_samples)
        with ctx.progress_bar("attacking the smoothed classifier (PGD-L2)", sum(1 for r in radii if r > 0)) as bar:
            for ri, r in enumerate(radii):
                if r <= 0:
                    continue
                bad = 0
                idx = np.flatnonzero(alive)
                broken = np.zeros(n, dtype=bool)
                for restart in range(p.attack_restarts):
                    todo = idx[~broken[idx]]
                    for s in range(0, len(todo), per_batch):
                        part = todo[s : s + per_batch]
                        adv = self._pgd(
                            model,
                            x[part],
                            torch.as_tensor(y[part]),
                            r,
                            [keys[i] for i in part],
                            ri,
                            restart,
                            device,
                            ctx.seed,
                        )
                        delta = adv.double().flatten(1) - x[part].double().flatten(1)
                        dd = delta.norm(dim=1).numpy()
                        ok = (
                            torch.isfinite(delta).all(1).numpy()
                            & (dd <= r + r * REL_TOL + ABS_TOL * math.sqrt(d))
                            & ((adv >= 0) & (adv <= 1)).flatten(1).all(1).numpy()
                        )
                        for j, i in enumerate(part):
                            if not ok[j]:
                                bad += 1
                                continue
                            gen = self._gen(ctx.seed, KEY_PREDICT_ADV, keys[i], ri, restart)
                            c = self._counts(model, adv[j], p.predict_n, gen, n_classes, device)
                            a = sm.predict_from_counts(c, p.alpha)[0]
                            if a != y[i]:
                                broken[i] = True
                                wrong[i] |= a != sm.ABSTAIN
                alive = alive & ~broken
                robust[r] = alive.copy()
                wrong_class[r] = wrong.copy()
                invalid[r] = bad
                bar.advance()
        return {"robust": robust, "wrong_class": wrong_class, "invalid": invalid}

    def _pgd(self, model, xb, yb, radius: float, keys: list[int], ri: int, restart: int, device, seed: int):
        """Expectation-over-noise PGD-L2 on the soft smoothed classifier within `radius` (steps a fraction of
        the radius); restarts after the first start from a random point of the ball. Each example's noise comes
        from its own generator (KEY_ATTACK_NOISE, its key, the radius index, the restart)."""
        from fmaudit.robustness.smoothing_noise import smoothed_pgd_l2

        p = self.params
        step = (p.attack_step_size if p.attack_step_size is not None else 2.5 / p.attack_steps) * radius
        gens = [self._gen(seed, KEY_ATTACK_NOISE, key, ri, restart) for key in keys]
        return smoothed_pgd_l2(
            model,
            xb,
            yb,
            radius,
            gens,
            sigma=p.sigma,
            steps=p.attack_steps,
            noise_samples=p.attack_noise_samples,
            step_size=step,
            random_start=restart > 0,
            device=device,
        )

    # -- report --------------------------------------------------------------------------------------
    def _report(
        self,
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

        p = self.params
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
