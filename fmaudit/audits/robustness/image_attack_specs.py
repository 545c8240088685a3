"""The attacks `robustness.image_attack` can run: one pydantic spec per attack, in the `ATTACKS` registry.

Each spec validates its own settings and builds its own attack (`build`), after the model is on its final
device; the module never branches on an attack's name. Class-level traits (`kind`, `min_norm`,
`single_step`, `iterative`) say how the module reads and cross-checks the attack's results. Recipe items
may be shorthands ("pgd_l2", "autoattack_fast") or mappings with `name:`; budgets may be fractions ("8/255").

No torch / torchattacks import at module level.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from fmaudit.audits.base import AuditParams
from fmaudit.hints import did_you_mean

# Float tolerance of the norm-ball check: eps * REL_TOL + ABS_TOL (Linf) or eps * REL_TOL + ABS_TOL * sqrt(d) (L2).
REL_TOL = 1e-5
ABS_TOL = 1e-6

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def parse_eps(v: Any) -> Any:
    """Budgets may be written as fractions in YAML ("8/255")."""
    if isinstance(v, str):
        m = _FRACTION.match(v)
        if m and float(m.group(2)) > 0:
            return float(m.group(1)) / float(m.group(2))
    return v


def eps_list(values: list[float], norm: str, where: str) -> list[float]:
    """A validated, sorted, de-duplicated budget grid (Linf budgets in (0, 1], pixel scale)."""
    if not values:
        raise ValueError(f"{where}: give at least one epsilon")
    if len(values) > 32:
        raise ValueError(f"{where}: at most 32 epsilons (got {len(values)})")
    for e in values:
        if not math.isfinite(e) or e <= 0:
            raise ValueError(f"{where}: every epsilon must be > 0 (got {e:g})")
        if norm == "Linf" and e > 1:
            hint = f"; did you mean {e:g}/255 = {e / 255:.4g}?" if e <= 255 else ""
            raise ValueError(
                f"{where}: an Linf epsilon must be in (0, 1] because pixels are in [0, 1] (got {e:g}){hint}"
            )
    return sorted(set(float(e) for e in values))


class BaseAttackSpec(AuditParams):
    """What every attack spec shares: its label, its own budgets, and the traits the sanity checks read."""

    kind: ClassVar[str] = "white-box"  # white-box | black-box | ensemble (the report's `kind` column)
    min_norm: ClassVar[bool] = False  # unbounded: one run, read at every L2 budget
    single_step: ClassVar[bool] = False  # compared with the iterative attacks at the same budget
    iterative: ClassVar[bool] = False  # iterative gradient attack with a fixed budget

    label: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Name used in metrics and curves (default: name, plus _linf / _l2 for attacks with a norm choice).",
    )
    epsilons: list[float] | None = Field(
        default=None,
        description="This attack's budgets (default: the module's `epsilons` for Linf, `l2_epsilons` for L2).",
    )

    @field_validator("epsilons", mode="before")
    @classmethod
    def _fractions(cls, v: Any) -> Any:
        return [parse_eps(e) for e in v] if isinstance(v, list) else v

    @property
    def norm_(self) -> str:
        return getattr(self, "norm", "L2" if self.min_norm else "Linf")

    @property
    def default_label(self) -> str:
        name = self.name  # type: ignore[attr-defined]
        return self.label or (f"{name}_{self.norm_.lower()}" if "norm" in type(self).model_fields else name)

    @model_validator(mode="after")
    def _check_eps(self):
        if self.epsilons is not None:
            self.epsilons = eps_list(self.epsilons, self.norm_, "epsilons")
        return self

    def build(
        self, model: Any, *, eps: float | None, n_classes: int, seed: int, device: Any, batch_size: int
    ) -> tuple[Any, dict[str, Any]]:
        """The attack on `model` at budget `eps` (None for minimum-norm attacks) and the settings it used."""
        raise NotImplementedError

    def target_problems(self, target_name: str, num_labels: int) -> list[str]:
        """Why this attack cannot run on a target with `num_labels` classes (pre-flight); none by default."""
        return []


class FGSMSpec(BaseAttackSpec):
    """Fast gradient sign method (Linf, one step)."""

    single_step: ClassVar[bool] = True
    name: Literal["fgsm"]

    def build(self, model, *, eps, n_classes, seed, device, batch_size):
        import torchattacks

        return torchattacks.FGSM(model, eps=eps), {}


class PGDSpec(BaseAttackSpec):
    """Projected gradient descent (torchattacks PGD for Linf, PGDL2 for L2)."""

    iterative: ClassVar[bool] = True
    name: Literal["pgd"]
    norm: Literal["Linf", "L2"] = "Linf"
    steps: int = Field(default=20, ge=1, le=10_000)
    alpha: float | None = Field(
        default=None, gt=0, description="Step size as a fraction of epsilon (default 2.5 / steps, as in Madry et al.)."
    )
    restarts: int = Field(
        default=1, ge=1, le=100, description="Random restarts (torchattacks.MultiAttack keeps the first success)."
    )
    random_start: bool = True

    def build(self, model, *, eps, n_classes, seed, device, batch_size):
        import torchattacks

        alpha = (self.alpha if self.alpha is not None else 2.5 / self.steps) * eps
        cls = torchattacks.PGD if self.norm == "Linf" else torchattacks.PGDL2
        atks = [
            cls(model, eps=eps, alpha=alpha, steps=self.steps, random_start=self.random_start)
            for _ in range(self.restarts)
        ]
        used = {"alpha": alpha, "steps": self.steps, "restarts": self.restarts, "random_start": self.random_start}
        return (atks[0] if len(atks) == 1 else torchattacks.MultiAttack(atks)), used


class CWSpec(BaseAttackSpec):
    """Carlini-Wagner L2 (minimum-norm; one run, read at every L2 budget): fmaudit's implementation with the
    paper's margin loss and binary search over c (torchattacks' CW loss stalls when every other logit is
    negative)."""

    min_norm: ClassVar[bool] = True
    name: Literal["cw"]
    c: float = Field(default=1e-3, gt=0, description="Initial c of the binary search (paper: 1e-3).")
    kappa: float = Field(default=0.0, ge=0)
    steps: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Adam steps per binary-search round (paper: 10,000, with abort-early).",
    )
    lr: float = Field(default=0.01, gt=0)
    binary_steps: int = Field(default=9, ge=1, le=50, description="Rounds of the binary search over c (paper: 9).")
    abort_early: bool = True

    def build(self, model, *, eps, n_classes, seed, device, batch_size):
        from fmaudit.robustness.cw import CarliniWagnerL2

        atk = CarliniWagnerL2(
            model,
            c=self.c,
            kappa=self.kappa,
            steps=self.steps,
            lr=self.lr,
            binary_steps=self.binary_steps,
            abort_early=self.abort_early,
        )
        return atk, {"implementation": "fmaudit.robustness.cw", **atk.settings}


class DeepFoolSpec(BaseAttackSpec):
    """DeepFool (L2, minimum-norm; one run, read at every L2 budget)."""

    min_norm: ClassVar[bool] = True
    name: Literal["deepfool"]
    steps: int = Field(default=50, ge=1, le=10_000)
    overshoot: float = Field(default=0.02, ge=0)

    def build(self, model, *, eps, n_classes, seed, device, batch_size):
        import torchattacks

        return (
            torchattacks.DeepFool(model, steps=self.steps, overshoot=self.overshoot),
            {"steps": self.steps, "overshoot": self.overshoot, "restarts": 1},
        )


class SquareSpec(BaseAttackSpec):
    """Square attack: score-based black-box (queries only outputs, no gradients)."""

    kind: ClassVar[str] = "black-box"
    name: Literal["square"]
    norm: Literal["Linf", "L2"] = "Linf"
    n_queries: int = Field(default=1000, ge=1, le=100_000)
    p_init: float = Field(default=0.8, gt=0, le=1)
    restarts: int = Field(default=1, ge=1, le=100)

    def build(self, model, *, eps, n_classes, seed, device, batch_size):
        import torchattacks

        return (
            torchattacks.Square(
                model,
                norm=self.norm,
                eps=eps,
                n_queries=self.n_queries,
                n_restarts=self.restarts,
                p_init=self.p_init,
                seed=seed,
            ),
            {"n_queries": self.n_queries, "p_init": self.p_init, "restarts": self.restarts, "seed": seed},
        )


class AutoAttackSpec(BaseAttackSpec):
    """AutoAttack. `standard`: the reference evaluation (fra31/auto-attack: APGD-CE, APGD-T with 9 target
    classes, FAB-T, each 100 iterations, Square with 5,000 queries). `fast`: torchattacks 3.3.0's version
    (the same stages with 10 iterations), labelled autoattack_fast_*."""

    kind: ClassVar[str] = "ensemble"
    iterative: ClassVar[bool] = True
    name: Literal["autoattack"]
    norm: Literal["Linf", "L2"] = "Linf"
    version: Literal["standard", "fast"] = "standard"

    @property
    def default_label(self) -> str:
        if self.label:
            return self.label
        return f"autoattack{'_fast' if self.version == 'fast' else ''}_{self.norm.lower()}"

    def target_problems(self, target_name: str, num_labels: int) -> list[str]:
        from fmaudit.robustness.autoattack import MIN_CLASSES

        if num_labels >= MIN_CLASSES:
            return []
        return [
            f"attack {self.default_label!r}: AutoAttack needs at least {MIN_CLASSES} classes (its APGD-T stage "
            f"uses the targeted DLR loss, which sorts 4 logits and is undefined below 4 classes); target "
            f"{target_name!r} has {num_labels}. Use pgd, square, cw or deepfool instead"
        ]

    def build(self, model, *, eps, n_classes, seed, device, batch_size):
        from fmaudit.robustness import autoattack as aa

        if self.version == "standard":
            return aa.reference(
                model, norm=self.norm, eps=eps, n_classes=n_classes, seed=seed, batch_size=batch_size, device=device
            )
        return aa.fast(model, norm=self.norm, eps=eps, n_classes=n_classes, seed=seed)


# The registry: attack name -> its spec. A new attack is one spec class above plus one line here and in
# `AttackSpec` (the discriminated union pydantic validates recipes with).
ATTACKS: dict[str, type[BaseAttackSpec]] = {
    "fgsm": FGSMSpec,
    "pgd": PGDSpec,
    "cw": CWSpec,
    "deepfool": DeepFoolSpec,
    "square": SquareSpec,
    "autoattack": AutoAttackSpec,
}
AttackSpec = Annotated[
    FGSMSpec | PGDSpec | CWSpec | DeepFoolSpec | SquareSpec | AutoAttackSpec, Field(discriminator="name")
]

ATTACK_NAMES = tuple(ATTACKS)
NORMED = tuple(n for n, s in ATTACKS.items() if "norm" in s.model_fields)  # attacks with a `norm:` choice
WHITE_BOX = tuple(n for n, s in ATTACKS.items() if s.kind == "white-box")
BLACK_BOX = tuple(n for n, s in ATTACKS.items() if s.kind == "black-box")
MIN_NORM = tuple(n for n, s in ATTACKS.items() if s.min_norm)
SINGLE_STEP = tuple(n for n, s in ATTACKS.items() if s.single_step)
ITERATIVE = tuple(n for n, s in ATTACKS.items() if s.iterative)
SHORTHANDS = (
    tuple(ATTACK_NAMES)
    + tuple(f"{a}_{n}" for a in NORMED for n in ("linf", "l2"))
    + ("autoattack_fast", "autoattack_fast_linf", "autoattack_fast_l2")
)


def normalize_attack_item(item: Any, i: int) -> Any:
    """One recipe item of `attacks:` (a shorthand or a mapping) as a mapping pydantic can validate."""
    if isinstance(item, str):
        key = item.strip().lower()
        if key in SHORTHANDS:
            out: dict[str, Any] = {}
            if key.startswith("autoattack_fast"):
                out["version"] = "fast"
                key = "autoattack" + key[len("autoattack_fast") :]
            name, _, norm = key.partition("_")
            out["name"] = name
            if norm:
                out["norm"] = "Linf" if norm == "linf" else "L2"
            return out
        raise ValueError(
            f"unknown attack {item!r} (attacks[{i}])"
            + did_you_mean(key, SHORTHANDS)
            + f" (attacks: {', '.join(SHORTHANDS)})"
        )
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        name = item["name"].strip().lower()
        if name not in ATTACKS:
            raise ValueError(
                f"unknown attack {item['name']!r} (attacks[{i}].name)"
                + did_you_mean(name, ATTACK_NAMES)
                + f" (attacks: {', '.join(ATTACK_NAMES)})"
            )
        return {**item, "name": name}
    return item
