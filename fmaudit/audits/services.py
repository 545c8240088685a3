"""What a module may ask of the run it is part of, beyond its own target: the `RunServices` protocol.

Modules that train from the same start as the target (reference models, DP twins, canary runs) or compare
with another target of the run use `ctx.services`. The runner's `Session` implements it; `FixedServices`
serves modules run outside a recipe (tests, known-answer scenarios, notebooks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fmaudit.targets.base import Target


@runtime_checkable
class RunServices(Protocol):
    def base_target(self, name: str) -> Target:
        """A fresh copy of recipe target `name` before its fine-tune (its pre-trained weights)."""
        ...

    def target(self, name: str) -> Target:
        """Target `name` of this run (a recipe target, loaded and fine-tuned once, or a produced one)."""
        ...

    def source_of(self, target: Target) -> str | None:
        """The recipe target `target` is, or was produced from (following `produced_by`); None if neither."""
        ...


class FixedServices:
    """RunServices outside a recipe: every target was fine-tuned from `base` (copied on each call), and
    `targets` are the other targets a module may name (e.g. membership's calibration_model)."""

    def __init__(self, *, base: Target | None = None, targets: Mapping[str, Target] | None = None):
        self._base = base
        self._targets = dict(targets or {})

    def base_target(self, name: str) -> Target:
        if self._base is None:
            raise KeyError(f"no base weights were given for target {name!r}")
        return self._base.copy(name=f"{name}-base")

    def target(self, name: str) -> Target:
        if name not in self._targets:
            raise KeyError(f"no target {name!r} (known: {sorted(self._targets)})")
        return self._targets[name]

    def source_of(self, target: Target) -> str | None:
        return target.name if self._base is not None else None
