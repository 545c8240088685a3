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
import re
import time
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import Field, field_validator, model_validator

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, select_examples
from fmaudit.audits.robustness.image_checks import image_data_problems

ATTACK_NAMES = ("fgsm", "pgd", "cw", "deepfool", "square", "autoattack")
NORMED = ("pgd", "square", "autoattack")  # attacks with a `norm:` choice
WHITE_BOX = ("fgsm", "pgd", "cw", "deepfool")
BLACK_BOX = ("square",)
MIN_NORM = ("cw", "deepfool")  # unbounded: one run, evaluated at every L2 budget
SINGLE_STEP = ("fgsm",)
ITERATIVE = ("pgd", "autoattack")  # iterative gradient attacks with a fixed budget (compared with single-step)
SHORTHANDS = (tuple(ATTACK_NAMES) + tuple(f"{a}_{n}" for a in NORMED for n in ("linf", "l2"))
              + ("autoattack_fast", "autoattack_fast_linf", "autoattack_fast_l2"))
LARGE_BUDGET_STEPS = 50  # the automatic large-budget PGD run
CI_NOTE = ("95% Clopper-Pearson interval over the attacked examples (n = 32 gives about +/-15 points, "
           "n = 100 about +/-10)")

# Float tolerance of the norm-ball check: eps * REL_TOL + ABS_TOL (Linf) or eps * REL_TOL + ABS_TOL * sqrt(d) (L2).
REL_TOL = 1e-5
ABS_TOL = 1e-6

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _parse_eps(v: Any) -> Any:
    """Budgets may be written as fractions in YAML ("8/255")."""
    if isinstance(v, str):
        m = _FRACTION.match(v)
        if m and float(m.group(2)) > 0:
            return float(m.group(1)) / float(m.group(2))
    return v


def _eps_list(values: list[float], norm: str, where: str) -> list[float]:
    if not values:
        raise ValueError(f"{where}: give at least one epsilon")
    if len(values) > 32:
        raise ValueError(f"{where}: at most 32 epsilons (got {len(values)})")
    for e in values:
        if not math.isfinite(e) or e <= 0:
            raise ValueError(f"{where}: every epsilon must be > 0 (got {e:g})")
        if norm == "Linf" and e > 1:
            hint = f"; did you mean {e:g}/255 = {e / 255:.4g}?" if e <= 255 else ""
            raise ValueError(f"{where}: an Linf epsilon must be in (0, 1] because pixels are in [0, 1] "
                             f"(got {e:g}){hint}")
    return sorted(set(float(e) for e in values))


# ---------------------------------------------------------------------------------------------------
# Attack specs (one pydantic model per attack, chosen by `name`)


class _Attack(AuditParams):
    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$",
                              description="Name used in metrics and curves (default: name, plus _linf / _l2 "
                                          "for attacks with a norm choice).")
    epsilons: list[float] | None = Field(default=None, description="This attack's budgets (default: the module's "
                                                                    "`epsilons` for Linf, `l2_epsilons` for L2).")

    @field_validator("epsilons", mode="before")
    @classmethod
    def _fractions(cls, v: Any) -> Any:
        return [_parse_eps(e) for e in v] if isinstance(v, list) else v

    @property
    def norm_(self) -> str:
        return getattr(self, "norm", "L2" if self.name in MIN_NORM else "Linf")  # type: ignore[attr-defined]

    @property
    def default_label(self) -> str:
        name = self.name  # type: ignore[attr-defined]
        return self.label or (f"{name}_{self.norm_.lower()}" if name in NORMED else name)

    @model_validator(mode="after")
    def _check_eps(self):
        if self.epsilons is not None:
            self.epsilons = _eps_list(self.epsilons, self.norm_, "epsilons")
        return self


class FGSMSpec(_Attack):
    """Fast gradient sign method (Linf, one step)."""

    name: Literal["fgsm"]


class PGDSpec(_Attack):
    """Projected gradient descent (torchattacks PGD for Linf, PGDL2 for L2)."""

    name: Literal["pgd"]
    norm: Literal["Linf", "L2"] = "Linf"
    steps: int = Field(default=20, ge=1, le=10_000)
    alpha: float | None = Field(default=None, gt=0, description="Step size as a fraction of epsilon "
                                                                "(default 2.5 / steps, as in Madry et al.).")
    restarts: int = Field(default=1, ge=1, le=100, description="Random restarts (torchattacks.MultiAttack keeps "
                                                               "the first success).")
    random_start: bool = True


class CWSpec(_Attack):
    """Carlini-Wagner L2 (minimum-norm; one run, read at every L2 budget): fmaudit's implementation with the
    paper's margin loss and binary search over c (torchattacks' CW loss stalls when every other logit is
    negative)."""

    name: Literal["cw"]
    c: float = Field(default=1e-3, gt=0, description="Initial c of the binary search (paper: 1e-3).")
    kappa: float = Field(default=0.0, ge=0)
    steps: int = Field(default=1000, ge=1, le=100_000, description="Adam steps per binary-search round "
                                                                  "(paper: 10,000, with abort-early).")
    lr: float = Field(default=0.01, gt=0)
    binary_steps: int = Field(default=9, ge=1, le=50, description="Rounds of the binary search over c (paper: 9).")
    abort_early: bool = True


class DeepFoolSpec(_Attack):
    """DeepFool (L2, minimum-norm; one run, read at every L2 budget)."""

    name: Literal["deepfool"]
    steps: int = Field(default=50, ge=1, le=10_000)
    overshoot: float = Field(default=0.02, ge=0)


class SquareSpec(_Attack):
    """Square attack: score-based black-box (queries only outputs, no gradients)."""

    name: Literal["square"]
    norm: Literal["Linf", "L2"] = "Linf"
    n_queries: int = Field(default=1000, ge=1, le=100_000)
    p_init: float = Field(default=0.8, gt=0, le=1)
    restarts: int = Field(default=1, ge=1, le=100)


class AutoAttackSpec(_Attack):
    """AutoAttack. `standard`: the reference evaluation (fra31/auto-attack: APGD-CE, APGD-T with 9 target
    classes, FAB-T, each 100 iterations, Square with 5,000 queries). `fast`: torchattacks 3.3.0's version
    (the same stages with 10 iterations), labelled autoattack_fast_*."""

    name: Literal["autoattack"]
    norm: Literal["Linf", "L2"] = "Linf"
    version: Literal["standard", "fast"] = "standard"

    @property
    def default_label(self) -> str:
        if self.label:
            return self.label
        return f"autoattack{'_fast' if self.version == 'fast' else ''}_{self.norm.lower()}"


AttackSpec = Annotated[Union[FGSMSpec, PGDSpec, CWSpec, DeepFoolSpec, SquareSpec, AutoAttackSpec],
                       Field(discriminator="name")]


def _normalize_attack_item(item: Any, i: int) -> Any:
    from fmaudit.registry import suggest

    if isinstance(item, str):
        key = item.strip().lower()
        if key in SHORTHANDS:
            out: dict[str, Any] = {}
            if key.startswith("autoattack_fast"):
                out["version"] = "fast"
                key = "autoattack" + key[len("autoattack_fast"):]
            name, _, norm = key.partition("_")
            out["name"] = name
            if norm:
                out["norm"] = "Linf" if norm == "linf" else "L2"
            return out
        close = suggest(key, SHORTHANDS)
        raise ValueError(f"unknown attack {item!r} (attacks[{i}])" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (attacks: {', '.join(SHORTHANDS)})")
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        name = item["name"].strip().lower()
        if name not in ATTACK_NAMES:
            close = suggest(name, ATTACK_NAMES)
            raise ValueError(f"unknown attack {item['name']!r} (attacks[{i}].name)"
                             + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (attacks: {', '.join(ATTACK_NAMES)})")
        return {**item, "name": name}
    return item


class ImageAttackAudit(AuditModule):
    name = "robustness.image_attack"
    category = "robustness"
    description = ("Adversarial robustness of image classifiers (FGSM, PGD Linf/L2, Carlini-Wagner L2, DeepFool, "
                   "Square, reference AutoAttack): clean and robust accuracy with Clopper-Pearson intervals over an "
                   "epsilon grid, every adversarial example verified, gradient-masking checks (Carlini et al. "
                   "2019), example images.")
    requires = frozenset({"image", "classifier", "logits"})
    metric_names = ("clean_accuracy", "robust_accuracy.*", "worst_robust_accuracy.*", "median_l2_perturbation.*",
                    "attack_seconds.*", "num_examples", "num_invalid_adversarials", "zero_gradient_fraction")

    class Params(AuditParams):
        attacks: list[AttackSpec] = Field(
            default_factory=lambda: [FGSMSpec(name="fgsm"), PGDSpec(name="pgd")], min_length=1,
            description="Attacks to run: names (fgsm, pgd, pgd_l2, cw, deepfool, square, square_l2, autoattack, "
                        "autoattack_l2, autoattack_fast, autoattack_fast_l2) or mappings with `name:` and that "
                        "attack's settings.")
        epsilons: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1],
                                      description="Linf budgets in (0, 1] (pixel scale; '8/255' is accepted).")
        l2_epsilons: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0],
                                         description="L2 budgets (> 0) for L2 attacks and minimum-norm attacks.")
        num_examples: int = Field(default=100, gt=0, le=100_000,
                                  description="Attack a seeded sample of at most this many examples.")
        split: Literal["auto", "nonmembers", "members", "all"] = Field(
            default="auto", description="auto = held-out non-members when the target was fine-tuned on this data.")
        batch_size: int = Field(default=128, gt=0, le=100_000)
        num_images: int = Field(default=3, ge=0, le=50,
                                description="Example PNGs (clean | adversarial | amplified perturbation) per attack; "
                                            "written only when the recipe sets store_examples.")
        check_gradients: bool = Field(default=True, description="Flag zero / non-finite input gradients.")
        large_budget: float | None = Field(
            default=0.5, ge=0.5, le=1,
            description="Linf budget of the automatic large-budget check (one PGD-50 run from the clean image, no "
                        "random start): from 0.5 up every image can be turned mid-gray, so a working attack leaves "
                        "at most chance accuracy. null turns the check off.")

        @field_validator("attacks", mode="before")
        @classmethod
        def _names(cls, v: Any) -> Any:
            if isinstance(v, (str, dict)):
                v = [v]
            if isinstance(v, list):
                return [_normalize_attack_item(item, i) for i, item in enumerate(v)]
            return v

        @field_validator("epsilons", "l2_epsilons", mode="before")
        @classmethod
        def _fractions(cls, v: Any) -> Any:
            return [_parse_eps(e) for e in v] if isinstance(v, list) else v

        @field_validator("epsilons")
        @classmethod
        def _linf(cls, v: list[float]) -> list[float]:
            return _eps_list(v, "Linf", "epsilons")

        @field_validator("l2_epsilons")
        @classmethod
        def _l2(cls, v: list[float]) -> list[float]:
            return _eps_list(v, "L2", "l2_epsilons")

        @model_validator(mode="after")
        def _unique_labels(self):
            seen: dict[str, int] = {}
            for i, a in enumerate(self.attacks):
                lab = a.default_label
                if lab in seen:
                    raise ValueError(f"attacks[{seen[lab]}] and attacks[{i}] are both labelled {lab!r}; give one "
                                     "of them a `label:`")
                seen[lab] = i
            return self

        def grid(self, spec: _Attack) -> list[float]:
            if spec.epsilons is not None:
                return spec.epsilons
            return self.epsilons if spec.norm_ == "Linf" else self.l2_epsilons

    # -- pre-flight ----------------------------------------------------------------------------------
    def check(self, target, data) -> list[str]:
        problems: list[str] = []
        if "image" not in target.capabilities or not hasattr(target, "normalized_inside"):
            return [f"robustness.image_attack attacks image classifiers; target {target.name!r} is a "
                    f"{getattr(target, 'task', type(target).__name__)} target (use robustness.text_attack for text)"]
        if target.num_labels is None:
            problems.append(f"the number of classes of target {target.name!r} is unknown; set num_labels on it")
        else:
            from fmaudit.robustness.autoattack import MIN_CLASSES

            for a in self.params.attacks:
                if a.name == "autoattack" and target.num_labels < MIN_CLASSES:
                    problems.append(
                        f"attack {a.default_label!r}: AutoAttack needs at least {MIN_CLASSES} classes (its APGD-T "
                        f"stage uses the targeted DLR loss, which sorts 4 logits and is undefined below 4 classes); "
                        f"target {target.name!r} has {target.num_labels}. Use pgd, square, cw or deepfool instead")
        if target.normalized_inside:
            hint = (f"attacks and budgets work in [0, 1] pixel space and target {target.name!r} already normalizes "
                    "inside, so give the data unnormalized, scaled to [0, 1]")
        else:
            hint = (f"target {target.name!r} declares no normalization; attacks work in [0, 1] pixel space: scale "
                    "the images to [0, 1] and declare the model's normalization on the target (normalize_mean / "
                    "normalize_std, or the checkpoint's preprocessor_config.json)")
        return problems + image_data_problems(target, data, split=self.params.split, purpose="robust accuracy",
                                              pixel_hint=hint)

    # -- run -----------------------------------------------------------------------------------------
    def run(self, target, ctx: AuditContext) -> Outcome:
        import torch

        from fmaudit.robustness.devices import model_device

        p = self.params
        data, choice = select_examples(ctx, p.split, p.num_examples)
        model = target.model
        # The device the model is on now (a target's `device` string can be stale if the model was moved);
        # every attack is built below, after this point, so none is bound to an old device.
        device = model_device(model, target.device)
        n_classes = int(target.num_labels)
        x = torch.as_tensor(np.ascontiguousarray(data.images), dtype=torch.float32)
        y = torch.as_tensor(data.labels, dtype=torch.long)
        n = len(x)
        out = Outcome()
        out.tables["evaluated_on"] = {"dataset": ctx.data.name, "subset": choice, "num_examples": n,
                                      "num_classes": n_classes, "image_shape": list(x.shape[1:]),
                                      "normalization_inside_model": bool(target.normalized_inside),
                                      "device": str(device), "ids": list(data.ids)}
        was_training = model.training
        # CW, DeepFool and FAB call .backward(), which fills the parameters' .grad: put back what was there.
        # (Freezing the parameters instead was measured ~15% slower for AutoAttack.)
        saved_grads = [(q, q.grad) for q in model.parameters()]
        model.eval()
        probe = None
        try:
            # One clean pass gives the logits and (for the sanity flag) the input gradients together.
            clean_logits, grad_norms = self._clean_pass(model, x, y, device, p.check_gradients, n_classes)
            if clean_logits.ndim != 2 or clean_logits.shape != (n, n_classes):
                raise ValueError(f"the model must return one (N, {n_classes}) logits tensor; got shape "
                                 f"{tuple(clean_logits.shape)}")
            clean_pred = clean_logits.argmax(1)
            clean_correct = (clean_pred == y).numpy()
            clean_acc = float(clean_correct.mean())
            out.metric("clean_accuracy", clean_acc, higher_is_better=True, unit="fraction",
                       ci=_ci(int(clean_correct.sum()), n), ci_level=0.95,
                       description=f"Accuracy on the unperturbed examples that are attacked; {CI_NOTE}.")
            out.metric("num_examples", n, unit="examples", description="Examples attacked.")
            self._sanity_outputs(clean_logits, out)
            if grad_norms is not None:
                self._sanity_gradients(grad_norms, out)
            runs = [self._run_attack(spec, model, x, y, clean_correct, n_classes, device, ctx) for spec in p.attacks]
            if p.large_budget is not None:
                spec = PGDSpec(name="pgd", label="large_budget_pgd_linf", steps=LARGE_BUDGET_STEPS,
                               random_start=False, epsilons=[p.large_budget])
                probe = self._run_attack(spec, model, x, y, clean_correct, n_classes, device, ctx)
                probe["examples"] = {}
        finally:
            for q, g in saved_grads:
                q.grad = g
            model.train(was_training)
        self._report(runs, clean_acc, clean_correct, out)
        self._sanity_attacks(runs, clean_acc, n, out)
        if probe is not None:
            self._large_budget(probe, clean_acc, y.numpy(), n_classes, out)
        self._examples(runs, x, y, clean_pred, data, ctx, out)
        return out

    @staticmethod
    def _logits(model, x, device, batch_size: int = 256):
        import torch

        with torch.no_grad():
            outs = [model(x[i: i + batch_size].to(device)).detach().float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(outs) if outs else torch.zeros((0, 0))

    # -- attacks -------------------------------------------------------------------------------------
    def _build(self, spec, model, eps: float | None, n_classes: int, seed: int, device=None):
        """Build one attack now, for the model where it is now (attacks fix their device when built)."""
        import torchattacks

        name = spec.name
        if name == "fgsm":
            return torchattacks.FGSM(model, eps=eps), {}
        if name == "pgd":
            alpha = (spec.alpha if spec.alpha is not None else 2.5 / spec.steps) * eps
            cls = torchattacks.PGD if spec.norm == "Linf" else torchattacks.PGDL2
            atks = [cls(model, eps=eps, alpha=alpha, steps=spec.steps, random_start=spec.random_start)
                    for _ in range(spec.restarts)]
            used = {"alpha": alpha, "steps": spec.steps, "restarts": spec.restarts, "random_start": spec.random_start}
            return (atks[0] if len(atks) == 1 else torchattacks.MultiAttack(atks)), used
        if name == "cw":
            from fmaudit.robustness.cw import CarliniWagnerL2

            atk = CarliniWagnerL2(model, c=spec.c, kappa=spec.kappa, steps=spec.steps, lr=spec.lr,
                                  binary_steps=spec.binary_steps, abort_early=spec.abort_early)
            return atk, {"implementation": "fmaudit.robustness.cw", **atk.settings}
        if name == "deepfool":
            return (torchattacks.DeepFool(model, steps=spec.steps, overshoot=spec.overshoot),
                    {"steps": spec.steps, "overshoot": spec.overshoot, "restarts": 1})
        if name == "square":
            return (torchattacks.Square(model, norm=spec.norm, eps=eps, n_queries=spec.n_queries,
                                        n_restarts=spec.restarts, p_init=spec.p_init, seed=seed),
                    {"n_queries": spec.n_queries, "p_init": spec.p_init, "restarts": spec.restarts, "seed": seed})
        if name == "autoattack":
            from fmaudit.robustness import autoattack as aa

            if spec.version == "standard":
                return aa.reference(model, norm=spec.norm, eps=eps, n_classes=n_classes, seed=seed,
                                    batch_size=self.params.batch_size, device=device)
            return aa.fast(model, norm=spec.norm, eps=eps, n_classes=n_classes, seed=seed)
        raise ValueError(f"unknown attack {name!r}")  # pragma: no cover - Params rejects it

    def _attack_once(self, spec, model, x, y, eps, n_classes, device, seed):
        """Run one attack over all examples (in batches); returns (adv, seconds, settings)."""
        import torch

        torch.manual_seed(seed)  # torchattacks' random starts draw from the global generator
        atk, used = self._build(spec, model, eps, n_classes, seed, device)
        bs = self.params.batch_size
        advs = []
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            adv = atk(x[i: i + bs].to(device), y[i: i + bs].to(device))
            advs.append(adv.detach().float().cpu())
        seconds = time.perf_counter() - t0
        return torch.cat(advs), seconds, used

    def _run_attack(self, spec, model, x, y, clean_correct, n_classes, device, ctx) -> dict[str, Any]:
        import torch

        norm = spec.norm_
        grid = self.params.grid(spec)
        d = int(np.prod(x.shape[1:]))
        flat_x = x.double().flatten(1)
        res: dict[str, Any] = {"spec": spec, "label": spec.default_label, "name": spec.name, "norm": norm,
                               "epsilons": grid, "robust": [], "invalid": [], "seconds": 0.0, "examples": {},
                               "dist": None}
        if spec.name in MIN_NORM:
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
            res["fooled"] = (fooled.numpy() & clean_correct)
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
            cis = [_ci(int(rb.sum()), len(rb)) for rb in r["robust"]]
            r["ci"] = cis
            for eps, acc, rb, ci in zip(grid, accs, r["robust"], cis):
                out.metric(f"robust_accuracy.{lab}@{eps:g}", acc, higher_is_better=True, unit="fraction",
                           ci=ci, ci_level=0.95,
                           description=f"Accuracy under {lab} ({norm}, epsilon {eps:g}); counts only verified "
                                       f"adversarial examples as errors; {CI_NOTE}.")
                by_point.setdefault((norm, eps), []).append(rb)
            out.curve(f"robust_accuracy.{lab}", [0.0] + list(grid), [clean_acc] + accs,
                      x_label=f"epsilon ({norm})", y_label="robust accuracy",
                      description=f"Accuracy against {lab} as the {norm} budget grows (epsilon 0 = clean accuracy).")
            out.metric(f"attack_seconds.{lab}", r["seconds"], unit="seconds",
                       description=f"Wall time of the {lab} attack over all budgets.")
            runs_count = 1 if r["name"] in MIN_NORM else len(grid)
            n = len(clean_correct)
            invalid = int(sum(r["invalid"]))
            total_invalid += invalid
            row = {"label": lab, "attack": r["name"], "norm": norm, "epsilons": list(grid),
                   "robust_accuracy": accs, "robust_accuracy_ci95": [list(c) if c else None for c in cis],
                   "settings": r.get("settings", {}),
                   "seconds": round(r["seconds"], 4),
                   "images_per_second": round(n * runs_count / r["seconds"], 2) if r["seconds"] > 0 else None,
                   "invalid_adversarials": [int(v) for v in r["invalid"]],
                   "kind": "black-box" if r["name"] in BLACK_BOX else
                           ("ensemble" if r["name"] == "autoattack" else "white-box"),
                   "bounded": r["name"] not in MIN_NORM}
            if r["dist"] is not None:
                fooled = r["fooled"]
                med = float(np.median(r["dist"][fooled])) if fooled.any() else None
                out.metric(f"median_l2_perturbation.{lab}", med, higher_is_better=True, unit="L2",
                           description=f"Median L2 size of successful {lab} perturbations (examples correct when "
                                       "clean).")
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
                out.metric(key, acc, higher_is_better=True, unit="fraction",
                           ci=_ci(int(alive.sum()), len(alive)), ci_level=0.95,
                           description=f"Examples that survive every {norm} attack at epsilon {eps:g} "
                                       f"(per-example worst case over the attacks); {CI_NOTE}.")
        out.metric("num_invalid_adversarials", total_invalid, higher_is_better=False, unit="examples",
                   description="Adversarial examples the target misclassified but that were outside [0, 1], "
                               "outside their norm ball or non-finite: not counted as errors.")
        if total_invalid:
            out.finding("high", "Attacks returned adversarial examples outside their threat model",
                        f"{total_invalid} misclassified adversarial examples were outside [0, 1], outside the norm "
                        "ball or non-finite; they were not counted as errors. This points to a bug in the attack "
                        "or the model wrapper.", metric="num_invalid_adversarials")

    # -- sanity flags --------------------------------------------------------------------------------
    def _sanity_outputs(self, logits, out: Outcome) -> None:
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
            out.finding("high", "The model returns non-finite outputs on clean examples",
                        "NaN or infinite logits: gradients and robust accuracy are meaningless until fixed.")
        if probs_like:
            out.finding("high", "Model outputs look like probabilities, not logits",
                        "Every output row is in [0, 1] and sums to 1: the model ends with a softmax. Cross-entropy "
                        "on probabilities saturates and gives vanishing gradients, so gradient attacks understate "
                        "the vulnerability (gradient masking). Audit the model without its final softmax.")

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
                xb = x[i: i + bs].to(device).clone().requires_grad_(True)
                lg = model(xb)
                if not isinstance(lg, torch.Tensor) or tuple(lg.shape) != (len(xb), n_classes):
                    return torch.as_tensor(lg).detach().float().cpu(), None  # run() reports the bad shape
                loss = torch.nn.functional.cross_entropy(lg, y[i: i + bs].to(device), reduction="sum")
                (g,) = torch.autograd.grad(loss, xb)
                g = g.detach().double().flatten(1)
                norms.append(torch.where(torch.isfinite(g).all(1), g.norm(dim=1),
                                         torch.full_like(g[:, 0], float("nan"))).cpu())
                logits.append(lg.detach().float().cpu())
        return torch.cat(logits), torch.cat(norms).numpy()

    def _sanity_gradients(self, gn: np.ndarray, out: Outcome) -> None:
        n = max(1, len(gn))
        nonfinite = float(np.isnan(gn).sum() / n)
        zero = float((gn == 0).sum() / n)
        out.tables.setdefault("sanity", {}).update({"zero_gradient_fraction": zero, "nonfinite_gradient_fraction": nonfinite,
                                                     "median_input_gradient_l2": float(np.nanmedian(gn)) if len(gn) and
                                                     not np.isnan(gn).all() else None})
        out.metric("zero_gradient_fraction", zero, higher_is_better=False, unit="fraction",
                   description="Clean examples whose cross-entropy input gradient is exactly zero.")
        if nonfinite > 0:
            out.finding("high", "Non-finite input gradients",
                        f"{nonfinite:.1%} of clean examples have NaN or infinite input gradients: gradient attacks "
                        "cannot work on them, so their robust accuracy is not evidence of robustness.")
        if zero > 0:
            out.finding("high" if zero >= 0.5 else "medium", "Zero input gradients (possible gradient masking)",
                        f"{zero:.1%} of clean examples have an exactly zero loss gradient with respect to the input "
                        "(saturated softmax, non-differentiable or quantized layers). Gradient attacks stall on them; "
                        "trust the black-box attack (Square) and AutoAttack for these.",
                        metric="zero_gradient_fraction")

    def _sanity_attacks(self, runs, clean_acc: float, n: int, out: Outcome) -> None:
        """Carlini et al. 2019 (arXiv:1902.06705) checklist items that compare attacks and budgets, plus
        AutoAttack's black-box check. A difference must exceed max(1 example, 1%) to count."""
        slack = max(1, math.ceil(0.01 * n)) / n
        sanity = out.tables.setdefault("sanity", {})
        # robust accuracy non-monotone in epsilon (rises), or never falls, as epsilon grows
        for r in runs:
            if r["name"] in MIN_NORM or len(r["acc"]) < 2:
                continue
            accs, grid, lab = r["acc"], r["epsilons"], r["label"]
            rises = [(grid[i], grid[j]) for i in range(len(accs)) for j in range(i + 1, len(accs))
                     if accs[j] > accs[i] + slack]
            if rises:
                a, b = max(rises, key=lambda t: accs[grid.index(t[1])] - accs[grid.index(t[0])])
                sanity.setdefault("non_monotone", []).append({"attack": lab, "from": a, "to": b})
                out.finding("high", f"Robust accuracy under {lab} rises with epsilon (non-monotone)",
                            f"accuracy goes from {accs[grid.index(a)]:.3f} at epsilon {a:g} to "
                            f"{accs[grid.index(b)]:.3f} at {b:g}: a larger budget includes every smaller one, so a "
                            "working attack can only do better. Suspect gradient masking (the attack's random "
                            "start or steps leave the region where gradients are informative) or too few steps / "
                            "restarts (Carlini et al. 2019, section 5).",
                            metric=f"robust_accuracy.{lab}@{b:g}")
            elif accs[-1] >= accs[0] and accs[-1] > 0 and clean_acc > 0 and grid[-1] >= 2 * grid[0]:
                out.finding("medium", f"Robust accuracy under {lab} does not fall as epsilon grows",
                            f"{accs[0]:.3f} at epsilon {grid[0]:g} and {accs[-1]:.3f} at {grid[-1]:g}: budgets this "
                            "different should matter. Suspect gradient masking, or budgets far too small.",
                            metric=f"robust_accuracy.{lab}@{grid[-1]:g}")
        # unbounded (minimum-norm) attacks must break every correctly classified example
        correct = round(clean_acc * n)
        for r in runs:
            rate = r.get("success_rate_unbounded")
            if rate is None or correct == 0:
                continue
            missed = correct - round(rate * correct)
            if missed > max(1, math.ceil(0.01 * correct)):
                out.finding("medium", f"Unbounded {r['label']} does not break every example",
                            f"{r['label']} has no L2 budget, yet it broke only {rate:.1%} of the correctly classified "
                            f"examples ({missed} left). An attack without a budget must reach 100% (Carlini et al. "
                            "2019): give it more steps (CW: `steps`, `binary_steps`, a larger initial `c`; DeepFool: "
                            "`steps`), or suspect masked gradients. Its robust accuracies understate the "
                            "vulnerability.", metric=f"median_l2_perturbation.{r['label']}")
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
                    out.finding("high", f"Black-box attack beats every white-box attack ({norm}, epsilon {eps:g})",
                                f"{best_black['label']} leaves {best_black['acc']:.3f} robust accuracy vs "
                                f"{best_white['acc']:.3f} for the best gradient attack ({best_white['label']}). "
                                "Gradients mislead the attacks: a classic sign of gradient masking. Report the worst "
                                "case, not the white-box numbers.",
                                metric=f"robust_accuracy.{best_black['label']}@{eps:g}")
            # a single-step attack beating an iterative one
            for one in (q for q in pt if q["name"] in SINGLE_STEP):
                for it in (q for q in pt if q["name"] in ITERATIVE):
                    if one["acc"] < it["acc"] - slack:
                        sanity.setdefault("single_step_beats_iterative", []).append(
                            {"norm": norm, "epsilon": eps, "single_step": one["label"], "iterative": it["label"]})
                        out.finding("high", f"Single-step {one['label']} beats iterative {it['label']} ({norm}, "
                                            f"epsilon {eps:g})",
                                    f"{one['label']}: {one['acc']:.3f} vs {it['label']}: {it['acc']:.3f}. An iterative "
                                    "attack with the same budget should do at least as well as one step; when it does "
                                    "not, its gradients away from the clean point are masked or misleading (Carlini "
                                    "et al. 2019, section 5). Trust neither number.",
                                    metric=f"robust_accuracy.{it['label']}@{eps:g}")
            # AutoAttack weaker than any other attack at the same budget
            for aa in (q for q in pt if q["name"] == "autoattack"):
                for other in (q for q in pt if q is not aa):
                    if aa["acc"] > other["acc"] + slack:
                        sanity.setdefault("autoattack_weaker", []).append(
                            {"norm": norm, "epsilon": eps, "autoattack": aa["label"], "other": other["label"]})
                        out.finding("high", f"AutoAttack ({aa['label']}) is weaker than {other['label']} ({norm}, "
                                            f"epsilon {eps:g})",
                                    f"{aa['label']}: {aa['acc']:.3f} vs {other['label']}: {other['acc']:.3f}. AutoAttack "
                                    "should be at least as strong as any single attack at its budget; check the model "
                                    "for randomness, gradient obfuscation, or outputs tuned against AutoAttack's "
                                    "losses, and report the worst case.",
                                    metric=f"robust_accuracy.{aa['label']}@{eps:g}")

    def _large_budget(self, probe, clean_acc: float, y: np.ndarray, n_classes: int, out: Outcome) -> None:
        """Carlini et al. 2019: at a large enough budget every attack must reach chance. At Linf 0.5 every
        image can be moved to the same mid-gray image, so a working attack leaves at most the share of the
        commonest label (`chance`)."""
        eps = probe["epsilons"][0]
        rb = probe["robust"][0]
        n = len(rb)
        acc = float(rb.mean())
        ci = _ci(int(rb.sum()), n)
        counts = np.bincount(y, minlength=n_classes) if n else np.zeros(1)
        chance = float(counts.max() / max(1, n))
        key = f"robust_accuracy.large_budget_pgd_linf@{eps:g}"
        out.metric(key, acc, higher_is_better=None, unit="fraction", ci=ci, ci_level=0.95,
                   description=f"Accuracy under PGD-{LARGE_BUDGET_STEPS} (Linf, epsilon {eps:g}, from the clean image, no "
                               f"random start), the automatic large-budget check: a working attack leaves at most "
                               f"chance ({chance:.3f}, the commonest label's share); {CI_NOTE}.")
        out.tables.setdefault("sanity", {})["large_budget"] = {
            "epsilon": eps, "norm": "Linf", "attack": f"PGD-{LARGE_BUDGET_STEPS}, alpha 2.5 * eps / steps, no random start",
            "robust_accuracy": acc, "ci95": list(ci) if ci else None, "chance": chance,
            "seconds": round(probe["seconds"], 4), "invalid_adversarials": int(sum(probe["invalid"]))}
        if ci is not None and ci[0] > chance and clean_acc > chance:
            out.finding("high", f"Accuracy does not reach chance at Linf epsilon {eps:g}",
                        f"PGD leaves {acc:.3f} accuracy (95% interval {ci[0]:.3f}-{ci[1]:.3f}) at a budget where every "
                        f"image can be turned mid-gray, so a working attack leaves at most {chance:.3f}. The gradient "
                        "attacks do not work on this model (gradient masking, a non-differentiable or quantized "
                        "layer); robust accuracies at small budgets are not evidence of robustness (Carlini et al. "
                        "2019).", metric=key)

    # -- example images ------------------------------------------------------------------------------
    def _keep_examples(self, res: dict[str, Any], gi: int, robust: np.ndarray, clean_correct: np.ndarray,
                       adv, pred) -> None:
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
                item = {"id": data.ids[i], "attack": r["label"], "norm": r["norm"], "epsilon": eps,
                        "true_label": int(y[i]), "clean_prediction": int(clean_pred[i]),
                        "adversarial_prediction": adv_pred, "linf": float(delta.abs().max()),
                        "l2": float(delta.norm())}
                if folder is not None:
                    path = folder / f"{r['label']}_eps{eps:g}_{_safe(data.ids[i])}.png"
                    _write_png(path, _strip(x[i].numpy(), adv.numpy()))
                    rel = ctx.relative(path)
                    item["image"] = rel
                    item["image_panels"] = ["clean", "adversarial", "perturbation (amplified)"]
                    out.artifacts.append(rel)
                out.evidence.append(item)


# ---------------------------------------------------------------------------------------------------
# Small PNG writer (stdlib only: zlib + struct), so example images need no imaging library.


def _ci(successes: int, n: int) -> tuple[float, float] | None:
    from fmaudit.robustness.intervals import clopper_pearson

    return clopper_pearson(successes, n)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:60]


def _strip(clean: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """(C, H, W) clean and adversarial images -> one uint8 (H', W', C) strip: clean | adversarial |
    perturbation amplified to full range (gray = no change)."""
    c, h, w = clean.shape
    delta = adv.astype(np.float64) - clean.astype(np.float64)
    m = float(np.abs(delta).max())
    pert = 0.5 + 0.5 * delta / m if m > 0 else np.full_like(delta, 0.5)
    scale = max(1, min(8, math.ceil(96 / max(h, w))))
    gap = np.full((c, h * scale, 2 * scale), 1.0)

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(np.clip(a, 0, 1), scale, axis=1), scale, axis=2)

    img = np.concatenate([up(clean), gap, up(adv), gap, up(pert)], axis=2)
    img = np.round(img * 255).astype(np.uint8).transpose(1, 2, 0)
    if c not in (1, 3):
        img = img[:, :, :1]
    return img


def _write_png(path, img: np.ndarray) -> None:
    import struct
    import zlib

    h, w, c = img.shape
    color = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)
