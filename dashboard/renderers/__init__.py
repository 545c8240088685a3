"""Module renderers: the plots an auditor expects for one module, registered by module name.

A category view (Privacy, Robustness, Explainability) calls the renderer of each module it has results of, in
the order of `RENDERERS`, then shows every result generically (`dashboard.generic.render_generic`): expanded for
a module with no renderer here, collapsed ("more details") for one that has one, without the curves its
renderer already drew. Adding a renderer for a new module is one function plus one line in `RENDERERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dashboard.renderers.explain import render_attribution
from dashboard.renderers.privacy import render_canary, render_dp, render_membership
from dashboard.renderers.robustness import render_certify, render_image_attack, render_text_attack
from dashboard.runs import RunEntry
from dashboard.sinks import Sink
from fmaudit.report import AuditResult

RenderFn = Callable[[Sink, RunEntry, list[AuditResult]], None]


@dataclass(frozen=True)
class ModuleRenderer:
    """How one module's results are drawn: `render(sink, entry, results)` gets every finished result of the
    module in the run; `curves` names the curves it draws (exact names, prefixes ending in '.' or suffixes
    starting with '.'), which the generic details then leave out."""

    render: RenderFn
    curves: tuple[str, ...] = ()

    def draws(self, curve: str) -> bool:
        """True when this renderer already drew the curve named `curve`."""
        return any(
            curve == d or (d.endswith(".") and curve.startswith(d)) or (d.startswith(".") and curve.endswith(d))
            for d in self.curves
        )


RENDERERS: dict[str, ModuleRenderer] = {
    "privacy.dp_finetune": ModuleRenderer(render_dp, curves=("epsilon_ledger",)),
    "privacy.membership": ModuleRenderer(render_membership, curves=("roc.",)),
    "privacy.canary_audit": ModuleRenderer(render_canary),
    "robustness.image_attack": ModuleRenderer(render_image_attack, curves=("robust_accuracy.",)),
    "robustness.text_attack": ModuleRenderer(render_text_attack),
    "robustness.certify": ModuleRenderer(render_certify),
    "explain.attribution": ModuleRenderer(render_attribution, curves=(".deletion", ".insertion")),
}


def renderers_for(category: str) -> dict[str, ModuleRenderer]:
    """The renderers of one category's modules ('privacy' -> privacy.*), in registry order."""
    return {m: r for m, r in RENDERERS.items() if m.split(".")[0] == category}
