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
from fmaudit.audits.robustness.certify_report import (
    ABS_TOL,
    KEY_ATTACK_NOISE,
    KEY_ESTIMATE,
    KEY_PREDICT_ADV,
    KEY_PREDICT_CLEAN,
    KEY_SELECT,
    REL_TOL,
    report_certify,
)
from fmaudit.audits.robustness.image_checks import image_data_problems
from fmaudit.audits.robustness.image_run import eval_mode, prepare_images
from fmaudit.batching import batched_forward


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
        report_certify(
            p,
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
