"""Pass 2, section `audits`: each audit's module and params (against the module's own `Params`), its gates
(`fail_if` metrics the module reports), its targets (known, listed before, with the capabilities and model
task the module needs), its dataset, and the target it produces."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fmaudit.hints import did_you_mean
from fmaudit.recipe.checks.context import CheckContext
from fmaudit.recipe.problems import Lines, Problem, problem_at, pydantic_problems
from fmaudit.recipe.schema import AuditSpec
from fmaudit.registry import RegistryError, registry
from fmaudit.tasks import CAPABILITIES

if TYPE_CHECKING:  # pragma: no cover
    from fmaudit.audits.base import AuditModule


def check_gates(i: int, use: str, cls: type[AuditModule], fail_if: dict[Any, Any], lines: Lines) -> list[Problem]:
    """Each `fail_if` metric must be one the module reports (its `metric_names` patterns; none: any)."""
    if not cls.metric_names:
        return []
    problems = []
    for metric in fail_if:
        if not any(fnmatch.fnmatchcase(str(metric), pat) for pat in cls.metric_names):
            plain = [m for m in cls.metric_names if "*" not in m]
            problems.append(
                problem_at(
                    ("audits", i, "fail_if", metric),
                    f"module {use!r} reports no metric {metric!r}"
                    + did_you_mean(str(metric), plain)
                    + f" (metrics: {', '.join(cls.metric_names)})",
                    lines,
                )
            )
    return problems


def check_module_params(i: int, use: str, params: Any, fail_if: Any, lines: Lines) -> list[Problem]:
    """Audit `i`'s module name, its params against the module's `Params` and its gates. Works on raw
    values too, so a recipe that failed pass 1 elsewhere still gets its audits checked."""
    try:
        cls = registry.get(use)
    except RegistryError as exc:
        return [problem_at(("audits", i, "use"), str(exc), lines)]
    if not isinstance(params, dict):
        return []  # reported by pass 1
    problems = []
    try:
        cls.Params.model_validate(params)
    except ValidationError as exc:
        problems += pydantic_problems(exc, cls.Params, ("audits", i, "params"), lines)
    if isinstance(fail_if, dict):
        problems += check_gates(i, use, cls, fail_if, lines)
    return problems


def check_audits_loose(raw: dict[str, Any], lines: Lines) -> list[Problem]:
    """Module names, params and gates of the audits in a raw recipe that failed pass 1 elsewhere."""
    audits = raw.get("audits")
    if not isinstance(audits, list):
        return []
    problems = []
    for i, a in enumerate(audits):
        if isinstance(a, dict) and isinstance(a.get("use"), str):
            problems += check_module_params(i, a["use"], a.get("params") or {}, a.get("fail_if") or {}, lines)
    return problems


def _check_module(ctx: CheckContext, i: int, audit: AuditSpec, cls: type[AuditModule] | None) -> None:
    ctx.problems += check_module_params(i, audit.use, audit.params, audit.fail_if, ctx.lines)


def _check_targets(ctx: CheckContext, i: int, audit: AuditSpec, cls: type[AuditModule] | None) -> None:
    """Each target is known by now and has what the module needs (and data, when the module needs some)."""
    known = ctx.target_tasks
    for j, t in enumerate(audit.target):
        loc = ("audits", i, "target") + ((j,) if len(audit.target) > 1 else ())
        if t not in known:
            later = [k for k, a in enumerate(ctx.recipe.audits) if a.produces == t and k >= i]
            if later:
                ctx.add(
                    loc,
                    f"target {t!r} is produced by audits[{later[0]}], which runs after this one; "
                    "move this audit below it",
                )
            else:
                ctx.add(
                    loc, f"unknown target {t!r}" + did_you_mean(t, known) + f" (targets: {', '.join(known) or 'none'})"
                )
            continue
        model_task = known[t]
        if cls is not None and model_task is not None:
            missing = set(cls.requires) - CAPABILITIES[model_task]
            if missing:
                ctx.add(
                    loc,
                    f"module {audit.use!r} needs {', '.join(sorted(missing))}, which a {model_task} target "
                    f"({t!r}) does not have",
                )
            elif cls.tasks and model_task not in cls.tasks:
                ctx.add(loc, f"module {audit.use!r} works on {', '.join(cls.tasks)} targets, not {model_task} ({t!r})")
        if (
            audit.data is None
            and model_task is not None
            and t in ctx.recipe.targets
            and ctx.recipe.targets[t].finetune is None
            and cls is not None
            and cls.needs_data
        ):
            ctx.add(("audits", i, "data"), f"target {t!r} has no fine-tune data; name a dataset with `data:`")


def _check_data(ctx: CheckContext, i: int, audit: AuditSpec, cls: type[AuditModule] | None) -> None:
    if audit.data is not None and audit.data not in ctx.recipe.data:
        ctx.add(
            ("audits", i, "data"),
            f"no dataset named {audit.data!r} in `data`" + did_you_mean(audit.data, ctx.recipe.data),
        )


def _check_produces(ctx: CheckContext, i: int, audit: AuditSpec, cls: type[AuditModule] | None) -> None:
    """A produced target needs a module that produces one, a new name and one source target; later audits
    then know it (with its source's model task)."""
    if audit.produces is None:
        return
    known = ctx.target_tasks
    if cls is not None and not cls.produces_target:
        ctx.add(("audits", i, "produces"), f"module {audit.use!r} does not produce a target")
    elif audit.produces in known:
        ctx.add(("audits", i, "produces"), f"a target named {audit.produces!r} already exists; pick a new name")
    elif len(audit.target) != 1:
        ctx.add(("audits", i, "produces"), "an audit that produces a target must run on exactly one target")
    else:
        known[audit.produces] = known.get(audit.target[0])


AuditCheck = Callable[[CheckContext, int, AuditSpec, "type[AuditModule] | None"], None]

# What is checked of each audit, in order (the order problems are listed in).
AUDIT_CHECKS: tuple[AuditCheck, ...] = (_check_module, _check_targets, _check_data, _check_produces)


def check_audits(ctx: CheckContext) -> None:
    """Every audit, in recipe order: targets produced by an audit are known to the audits after it."""
    for i, audit in enumerate(ctx.recipe.audits):
        try:
            cls = registry.get(audit.use)
        except RegistryError:
            cls = None  # reported by _check_module
        for check in AUDIT_CHECKS:
            check(ctx, i, audit, cls)
