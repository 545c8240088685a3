"""`robustness.image_attack`: adversarial robustness of image classifiers.

Attacks: torchattacks 3.3.0's FGSM, PGD / PGDL2, DeepFool and Square; the reference AutoAttack
(fra31/auto-attack, `fmaudit.robustness.autoattack`: APGD-CE and APGD-T with 100 iterations, 9 target
classes, FAB-T, Square with 5,000 queries) and, explicitly labelled `autoattack_fast`, torchattacks'
10-iteration AutoAttack; Carlini-Wagner L2 with a correct margin loss and the paper's binary search over c
(`fmaudit.robustness.cw`; torchattacks' CW loss is wrong when every other logit is negative). The module
chooses them from the recipe, runs them over an epsilon grid in [0, 1] pixel space (normalization lives
inside the target's `PixelClassifier`), and then *checks every adversarial example itself*: finite,
inside [0, 1], inside its norm ball (to float tolerance), and misclassified by the target on a fresh
forward pass. Only examples that pass all four count as errors. Every accuracy comes with a 95%
Clopper-Pearson interval.

Bounded attacks (FGSM, PGD, Square, AutoAttack) run once per epsilon. Minimum-norm attacks (CW,
DeepFool) run once; their robust accuracy at an L2 budget counts the examples whose adversarial
perturbation is larger than the budget (or that were not broken) as robust. Attacks are built per run,
after the model is on its final device, with the device read from the model's parameters.

Sanity flags (findings), after AutoAttack's checks and Carlini et al. 2019's checklist (arXiv:1902.06705):
outputs that look like probabilities, zero or non-finite input gradients, a black-box attack beating
every white-box one, a single-step attack beating an iterative one, accuracy not reaching chance at a
large budget (one Linf PGD run at epsilon 0.5 is added automatically), an unbounded (minimum-norm) attack
not breaking every example, AutoAttack weaker than any other attack at the same budget, robust accuracy
non-monotone (or flat) in epsilon.

No torch / torchattacks import at module level: `fmaudit validate` and `fmaudit list` stay fast.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome
from fmaudit.audits.robustness import image_attack_sanity as sanity
from fmaudit.audits.robustness.image_attack_sanity import CI_NOTE, LARGE_BUDGET_STEPS
from fmaudit.audits.robustness.image_attack_specs import (
    ABS_TOL,
    REL_TOL,
    AttackSpec,
    BaseAttackSpec,
    FGSMSpec,
    PGDSpec,
    eps_list,
    normalize_attack_item,
    parse_eps,
)
from fmaudit.audits.robustness.image_checks import image_data_problems
from fmaudit.audits.robustness.image_run import eval_mode, prepare_images
from fmaudit.audits.robustness.png import example_strip, safe_name, write_png
from fmaudit.batching import batched_forward
from fmaudit.robustness.intervals import clopper_pearson


def _default_attacks() -> list[AttackSpec]:
    return [FGSMSpec(name="fgsm"), PGDSpec(name="pgd")]


class ImageAttackAudit(AuditModule):
    name = "robustness.image_attack"
    category = "robustness"
    description = (
        "Adversarial robustness of image classifiers (FGSM, PGD Linf/L2, Carlini-Wagner L2, DeepFool, "
        "Square, reference AutoAttack): clean and robust accuracy with Clopper-Pearson intervals over an "
        "epsilon grid, every adversarial example verified, gradient-masking checks (Carlini et al. "
        "2019), example images."
    )
    requires = frozenset({"image", "classifier", "logits"})
    metric_names = (
        "clean_accuracy",
        "robust_accuracy.*",
        "worst_robust_accuracy.*",
        "median_l2_perturbation.*",
        "attack_seconds.*",
        "num_examples",
        "num_invalid_adversarials",
        "zero_gradient_fraction",
    )

    class Params(AuditParams):
        attacks: list[AttackSpec] = Field(
            default_factory=_default_attacks,
            min_length=1,
            description="Attacks to run: names (fgsm, pgd, pgd_l2, cw, deepfool, square, square_l2, autoattack, "
            "autoattack_l2, autoattack_fast, autoattack_fast_l2) or mappings with `name:` and that "
            "attack's settings.",
        )
        epsilons: list[float] = Field(
            default_factory=lambda: [0.01, 0.03, 0.1],
            description="Linf budgets in (0, 1] (pixel scale; '8/255' is accepted).",
        )
        l2_epsilons: list[float] = Field(
            default_factory=lambda: [0.25, 0.5, 1.0],
            description="L2 budgets (> 0) for L2 attacks and minimum-norm attacks.",
        )
        num_examples: int = Field(
            default=100, gt=0, le=100_000, description="Attack a seeded sample of at most this many examples."
        )
        split: Literal["auto", "nonmembers", "members", "all"] = Field(
            default="auto", description="auto = held-out non-members when the target was fine-tuned on this data."
        )
        batch_size: int = Field(default=128, gt=0, le=100_000)
        num_images: int = Field(
            default=3,
            ge=0,
            le=50,
            description="Example PNGs (clean | adversarial | amplified perturbation) per attack; "
            "written only when the recipe sets store_examples.",
        )
        check_gradients: bool = Field(default=True, description="Flag zero / non-finite input gradients.")
        large_budget: float | None = Field(
            default=0.5,
            ge=0.5,
            le=1,
            description="Linf budget of the automatic large-budget check (one PGD-50 run from the clean image, no "
            "random start): from 0.5 up every image can be turned mid-gray, so a working attack leaves "
            "at most chance accuracy. null turns the check off.",
        )

        @field_validator("attacks", mode="before")
        @classmethod
        def _names(cls, v: Any) -> Any:
            if isinstance(v, (str, dict)):
                v = [v]
            if isinstance(v, list):
                return [normalize_attack_item(item, i) for i, item in enumerate(v)]
            return v

        @field_validator("epsilons", "l2_epsilons", mode="before")
        @classmethod
        def _fractions(cls, v: Any) -> Any:
            return [parse_eps(e) for e in v] if isinstance(v, list) else v

        @field_validator("epsilons")
        @classmethod
        def _linf(cls, v: list[float]) -> list[float]:
            return eps_list(v, "Linf", "epsilons")

        @field_validator("l2_epsilons")
        @classmethod
        def _l2(cls, v: list[float]) -> list[float]:
            return eps_list(v, "L2", "l2_epsilons")

        @model_validator(mode="after")
        def _unique_labels(self):
            seen: dict[str, int] = {}
            for i, a in enumerate(self.attacks):
                lab = a.default_label
                if lab in seen:
                    raise ValueError(
                        f"attacks[{seen[lab]}] and attacks[{i}] are both labelled {lab!r}; give one of them a `label:`"
                    )
                seen[lab] = i
            return self

        def grid(self, spec: BaseAttackSpec) -> list[float]:
            if spec.epsilons is not None:
                return spec.epsilons
            return self.epsilons if spec.norm_ == "Linf" else self.l2_epsilons

    params: Params

    # -- pre-flight ----------------------------------------------------------------------------------
    def check(self, target, data) -> list[str]:
        problems: list[str] = []
        if "image" not in target.capabilities or not hasattr(target, "normalized_inside"):
            return [
                f"robustness.image_attack attacks image classifiers; target {target.name!r} is a "
                f"{getattr(target, 'task', type(target).__name__)} target (use robustness.text_attack for text)"
            ]
        if target.num_labels is None:
            problems.append(f"the number of classes of target {target.name!r} is unknown; set num_labels on it")
        else:
            for a in self.params.attacks:
                problems += a.target_problems(target.name, target.num_labels)
        if target.normalized_inside:
            hint = (
                f"attacks and budgets work in [0, 1] pixel space and target {target.name!r} already normalizes "
                "inside, so give the data unnormalized, scaled to [0, 1]"
            )
        else:
            hint = (
                f"target {target.name!r} declares no normalization; attacks work in [0, 1] pixel space: scale "
                "the images to [0, 1] and declare the model's normalization on the target (normalize_mean / "
                "normalize_std, or the checkpoint's preprocessor_config.json)"
            )
        return problems + image_data_problems(
            target, data, split=self.params.split, purpose="robust accuracy", pixel_hint=hint
        )

    # -- run -----------------------------------------------------------------------------------------
    def run(self, target, ctx: AuditContext) -> Outcome:
        import torch

        p = self.params
        # Every attack is built below, after the model's device is read, so none is bound to an old device.
        images = prepare_images(target, ctx, split=p.split, num_examples=p.num_examples)
        model, device, n_classes = images.model, images.device, images.n_classes
        x, y = images.x, torch.as_tensor(images.y)
        n = len(x)
        out = Outcome()
        out.tables["evaluated_on"] = images.evaluated_on(ctx, target)
        probe = None
        with eval_mode(model):
            # One clean pass gives the logits and (for the sanity flag) the input gradients together.
            clean_logits, grad_norms = self._clean_pass(model, x, y, device, p.check_gradients, n_classes)
            if clean_logits.ndim != 2 or clean_logits.shape != (n, n_classes):
                raise ValueError(
                    f"the model must return one (N, {n_classes}) logits tensor; got shape {tuple(clean_logits.shape)}"
                )
            clean_pred = clean_logits.argmax(1)
            clean_correct = (clean_pred == y).numpy()
            clean_acc = float(clean_correct.mean())
            out.metric(
                "clean_accuracy",
                clean_acc,
                higher_is_better=True,
                unit="fraction",
                ci=clopper_pearson(int(clean_correct.sum()), n),
                ci_level=0.95,
                description=f"Accuracy on the unperturbed examples that are attacked; {CI_NOTE}.",
            )
            out.metric("num_examples", n, unit="examples", description="Examples attacked.")
            sanity.sanity_outputs(clean_logits, out)
            if grad_norms is not None:
                sanity.sanity_gradients(grad_norms, out)
            runs = [self._run_attack(spec, model, x, y, clean_correct, n_classes, device, ctx) for spec in p.attacks]
            if p.large_budget is not None:
                spec = PGDSpec(
                    name="pgd",
                    label="large_budget_pgd_linf",
                    steps=LARGE_BUDGET_STEPS,
                    random_start=False,
                    epsilons=[p.large_budget],
                )
                probe = self._run_attack(spec, model, x, y, clean_correct, n_classes, device, ctx)
                probe["examples"] = {}
        self._report(runs, clean_acc, clean_correct, out)
        sanity.sanity_attacks(runs, clean_acc, n, out)
        if probe is not None:
            sanity.large_budget(probe, clean_acc, y.numpy(), n_classes, out)
        self._examples(runs, x, y, clean_pred, images.data, ctx, out)
        return out

    @staticmethod
    def _logits(model, x, device, batch_size: int = 256):
        """The model's float32 logits on `x`, on the CPU."""
        import torch

        return batched_forward(model, x, batch_size, device=device, dtype=torch.float32)

    # -- attacks -------------------------------------------------------------------------------------
    def _attack_once(self, spec, model, x, y, eps, n_classes, device, seed):
        """Run one attack over all examples (in batches); returns (adv, seconds, settings)."""
        import torch

        torch.manual_seed(seed)  # torchattacks' random starts draw from the global generator
        atk, used = spec.build(
            model, eps=eps, n_classes=n_classes, seed=seed, device=device, batch_size=self.params.batch_size
        )
        bs = self.params.batch_size
        advs = []
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            adv = atk(x[i : i + bs].to(device), y[i : i + bs].to(device))
            advs.append(adv.detach().float().cpu())
        seconds = time.perf_counter() - t0
        return torch.cat(advs), seconds, used

    def _run_attack(self, spec, model, x, y, clean_correct, n_classes, device, ctx) -> dict[str, Any]:
        import torch

        norm = spec.norm_
        grid = self.params.grid(spec)
        d = int(np.prod(x.shape[1:]))
        flat_x = x.double().flatten(1)
        res: dict[str, Any] = {
            "spec": spec,
            "label": spec.default_label,
            "name": spec.name,
            "norm": norm,
            "epsilons": grid,
            "robust": [],
            "invalid": [],
            "seconds": 0.0,
            "examples": {},
            "dist": None,
        }
        if spec.min_norm:
            adv, seconds, used = self._attack_once(spec, model, x, y, None, n_classes, device, ctx.seed)
            res["seconds"] = seconds
            res["settings"] = used
            pred = self._logits(model, adv, device).argmax(1)
            delta = adv.double().flatten(1) - flat_x
            finite = torch.isfinite(delta).all(1)
            in_box = ((adv >= 0) & (adv <= 1)).flatten(1).all(1)
            dist = torch.where(finite, delta.norm(dim=1), torch.full_like(delta[:, 0], float("inf")))
            fooled = (pred != y) & finite & in_box
            res["dist"] = dist.numpy()
            res["fooled"] = fooled.numpy() & clean_correct
            res["invalid"].append(int(((~finite | ~in_box) & (pred != y)).sum()))
            for eps in grid:
                tol = eps * REL_TOL + ABS_TOL * math.sqrt(d)
                broken = fooled & (dist <= eps + tol)
                res["robust"].append(clean_correct & ~broken.numpy())
                self._keep_examples(res, len(res["robust"]) - 1, res["robust"][-1], clean_correct, adv, pred)
            return res
        for eps in grid:
            adv, seconds, used = self._attack_once(spec, model, x, y, eps, n_classes, device, ctx.seed)
            res["seconds"] += seconds
            res["settings"] = used
            pred = self._logits(model, adv, device).argmax(1)
            delta = adv.double().flatten(1) - flat_x
            finite = torch.isfinite(delta).all(1)
            in_box = ((adv >= 0) & (adv <= 1)).flatten(1).all(1)
            if norm == "Linf":
                dist = delta.abs().max(1).values
                tol = eps * REL_TOL + ABS_TOL
            else:
                dist = delta.norm(dim=1)
                tol = eps * REL_TOL + ABS_TOL * math.sqrt(d)
            valid = finite & in_box & (dist <= eps + tol)
            wrong = pred != y
            res["robust"].append(clean_correct & ~(wrong & valid).numpy())
            res["invalid"].append(int((wrong & ~valid).sum()))
            self._keep_examples(res, len(res["robust"]) - 1, res["robust"][-1], clean_correct, adv, pred)
        return res

    # -- report --------------------------------------------------------------------------------------
    def _report(self, runs, clean_acc: float, clean_correct, out: Outcome) -> None:
        table = []
        total_invalid = 0
        by_point: dict[tuple[str, float], list[np.ndarray]] = {}
        for r in runs:
            lab, norm, grid = r["label"], r["norm"], r["epsilons"]
            accs = [float(rb.mean()) for rb in r["robust"]]
            r["acc"] = accs
            cis = [clopper_pearson(int(rb.sum()), len(rb)) for rb in r["robust"]]
            r["ci"] = cis
            for eps, acc, rb, ci in zip(grid, accs, r["robust"], cis):
                out.metric(
                    f"robust_accuracy.{lab}@{eps:g}",
                    acc,
                    higher_is_better=True,
                    unit="fraction",
                    ci=ci,
                    ci_level=0.95,
                    description=f"Accuracy under {lab} ({norm}, epsilon {eps:g}); counts only verified "
                    f"adversarial examples as errors; {CI_NOTE}.",
                )
                by_point.setdefault((norm, eps), []).append(rb)
            out.curve(
                f"robust_accuracy.{lab}",
                [0.0] + list(grid),
                [clean_acc] + accs,
                x_label=f"epsilon ({norm})",
                y_label="robust accuracy",
                description=f"Accuracy against {lab} as the {norm} budget grows (epsilon 0 = clean accuracy).",
            )
            out.metric(
                f"attack_seconds.{lab}",
                r["seconds"],
                unit="seconds",
                description=f"Wall time of the {lab} attack over all budgets.",
            )
            runs_count = 1 if r["spec"].min_norm else len(grid)
            n = len(clean_correct)
            invalid = int(sum(r["invalid"]))
            total_invalid += invalid
            row = {
                "label": lab,
                "attack": r["name"],
                "norm": norm,
                "epsilons": list(grid),
                "robust_accuracy": accs,
                "robust_accuracy_ci95": [list(c) if c else None for c in cis],
                "settings": r.get("settings", {}),
                "seconds": round(r["seconds"], 4),
                "images_per_second": round(n * runs_count / r["seconds"], 2) if r["seconds"] > 0 else None,
                "invalid_adversarials": [int(v) for v in r["invalid"]],
                "kind": r["spec"].kind,
                "bounded": not r["spec"].min_norm,
            }
            if r["dist"] is not None:
                fooled = r["fooled"]
                med = float(np.median(r["dist"][fooled])) if fooled.any() else None
                out.metric(
                    f"median_l2_perturbation.{lab}",
                    med,
                    higher_is_better=True,
                    unit="L2",
                    description=f"Median L2 size of successful {lab} perturbations (examples correct when clean).",
                )
                row["success_rate_unbounded"] = float(fooled.sum() / max(1, clean_correct.sum()))
                r["success_rate_unbounded"] = row["success_rate_unbounded"]
            table.append(row)
        out.tables["attacks"] = table
        worst = {}
        for (norm, eps), rbs in sorted(by_point.items()):
            if len(rbs) >= 2:
                alive = np.logical_and.reduce(rbs)
                acc = float(alive.mean())
                key = f"worst_robust_accuracy.{norm.lower()}@{eps:g}"
                worst[key] = acc
                out.metric(
                    key,
                    acc,
                    higher_is_better=True,
                    unit="fraction",
                    ci=clopper_pearson(int(alive.sum()), len(alive)),
                    ci_level=0.95,
                    description=f"Examples that survive every {norm} attack at epsilon {eps:g} "
                    f"(per-example worst case over the attacks); {CI_NOTE}.",
                )
        out.metric(
            "num_invalid_adversarials",
            total_invalid,
            higher_is_better=False,
            unit="examples",
            description="Adversarial examples the target misclassified but that were outside [0, 1], "
            "outside their norm ball or non-finite: not counted as errors.",
        )
        if total_invalid:
            out.finding(
                "high",
                "Attacks returned adversarial examples outside their threat model",
                f"{total_invalid} misclassified adversarial examples were outside [0, 1], outside the norm "
                "ball or non-finite; they were not counted as errors. This points to a bug in the attack "
                "or the model wrapper.",
                metric="num_invalid_adversarials",
            )

    def _clean_pass(self, model, x, y, device, with_grads: bool, n_classes: int):
        """Clean logits, and the L2 norm of each example's cross-entropy input gradient (NaN when not
        finite), from one forward (+ backward) pass per batch."""
        import torch

        if not with_grads:
            return self._logits(model, x, device), None
        bs = self.params.batch_size
        logits, norms = [], []
        with torch.enable_grad():
            for i in range(0, len(x), bs):
                xb = x[i : i + bs].to(device).clone().requires_grad_(True)
                lg = model(xb)
                if not isinstance(lg, torch.Tensor) or tuple(lg.shape) != (len(xb), n_classes):
                    return torch.as_tensor(lg).detach().float().cpu(), None  # run() reports the bad shape
                loss = torch.nn.functional.cross_entropy(lg, y[i : i + bs].to(device), reduction="sum")
                (g,) = torch.autograd.grad(loss, xb)
                g = g.detach().double().flatten(1)
                norms.append(
                    torch.where(torch.isfinite(g).all(1), g.norm(dim=1), torch.full_like(g[:, 0], float("nan"))).cpu()
                )
                logits.append(lg.detach().float().cpu())
        return torch.cat(logits), torch.cat(norms).numpy()

    # -- example images ------------------------------------------------------------------------------
    def _keep_examples(
        self, res: dict[str, Any], gi: int, robust: np.ndarray, clean_correct: np.ndarray, adv, pred
    ) -> None:
        """Keep the first `num_images` examples broken at the smallest budget (grid ascending)."""
        k = self.params.num_images
        chosen = res["examples"]
        for i in np.flatnonzero(clean_correct & ~robust):
            if len(chosen) >= k:
                return
            if int(i) not in chosen:
                chosen[int(i)] = (gi, adv[i].clone(), int(pred[i]))

    def _examples(self, runs, x, y, clean_pred, data, ctx: AuditContext, out: Outcome) -> None:
        folder = ctx.artifact_dir() if ctx.store_examples and self.params.num_images else None
        for r in runs:
            for i, (gi, adv, adv_pred) in sorted(r["examples"].items()):
                eps = r["epsilons"][gi]
                delta = adv.double() - x[i].double()
                item = {
                    "id": data.ids[i],
                    "attack": r["label"],
                    "norm": r["norm"],
                    "epsilon": eps,
                    "true_label": int(y[i]),
                    "clean_prediction": int(clean_pred[i]),
                    "adversarial_prediction": adv_pred,
                    "linf": float(delta.abs().max()),
                    "l2": float(delta.norm()),
                }
                if folder is not None:
                    path = folder / f"{r['label']}_eps{eps:g}_{safe_name(data.ids[i])}.png"
                    write_png(path, example_strip(x[i].numpy(), adv.numpy()))
                    rel = ctx.relative(path)
                    item["image"] = rel
                    item["image_panels"] = ["clean", "adversarial", "perturbation (amplified)"]
                    out.artifacts.append(rel)
                out.evidence.append(item)
