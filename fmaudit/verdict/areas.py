"""The verdicts: every unit of an area through its rule (`rules.RULES`), parts merged per module and target,
failed gates and errored units added, the worst part deciding the area's level and headline."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from fmaudit.report import AuditResult, RunReport
from fmaudit.verdict.levels import AREAS, LEVEL_RANK, LEVELS, Part, Verdict, worse
from fmaudit.verdict.reading import area_of, dp_twins
from fmaudit.verdict.rules import DEFAULT_HEADLINES, RULES, generic_part


def _order_key(report: RunReport, r: AuditResult) -> tuple[int, int, str]:
    # DP twins after their source; modules in RULES order.
    mods = list(RULES)
    return (mods.index(r.module) if r.module in mods else len(mods), 1 if r.target in dp_twins(report) else 0, r.target)


def _merge(parts: list[Part]) -> list[Part]:
    """One part per key (module, target[, attack]): the worst (level, then weight), saying how many it stands for."""
    groups: dict[tuple[str, ...], list[Part]] = {}
    for p in parts:
        groups.setdefault(p.key, []).append(p)
    out = []
    for key, ps in groups.items():
        if len(ps) == 1 or not key:
            out.extend(ps)
            continue
        w = min(ps, key=lambda p: (LEVEL_RANK[p.level], -p.weight))
        out.append(replace(w, text=f"{w.text} (worst of {len(ps)} units)", units=tuple(u for p in ps for u in p.units)))
    return out


def area_verdict(report: RunReport, area: str) -> Verdict:
    units = [r for r in report.audits if area_of(r) == area]
    if not units:
        name = {"explainability": "explain"}.get(area, area)
        mod = "utility module" if area == "utility" else f"{name}.* module"
        return Verdict(area, "none", "Not assessed", f"Not assessed: no {mod} in this run")
    ok = sorted((r for r in units if r.status == "ok"), key=lambda r: _order_key(report, r))
    errored = [r for r in units if r.status == "error"]
    parts = []
    for r in ok:
        p = RULES.get(r.module, generic_part)(report, r)
        parts.append(p if p.key else replace(p, key=(r.module, r.target)))
    parts = _merge(parts)
    # Failed gates, named.
    for r in units:
        for g in r.gates:
            if not g.passed:
                parts.append(
                    Part("high", f"gate failed: {r.module}@{r.target} {g.message}", "Gate failed", (r.unit_id,))
                )
    if errored:
        names = ", ".join(f"{r.module}@{r.target}" + (f" ({r.error.type})" if r.error else "") for r in errored)
        parts.append(Part("error", f"incomplete: {names} errored", "Not assessed", tuple(r.unit_id for r in errored)))
    if not ok:
        level = worse("error", *[p.level for p in parts])
        head = next((p.headline for p in parts if p.level == level and p.headline), "Not assessed")
        return Verdict(area, level, head, f"{head}: " + "; ".join(p.text for p in parts), tuple(parts))
    assessed = [p for p in parts if p.level != "error"]
    level = worse("ok", *[p.level for p in assessed])
    headline = next((p.headline for p in assessed if p.level == level and p.headline), None) or DEFAULT_HEADLINES[area]
    if area == "privacy" and level == "ok" and all(r.module == "privacy.dp_finetune" for r in ok):
        headline = "No privacy attack run"  # DP training alone tests nothing
    if level == "ok" and errored:
        level, headline = "low", DEFAULT_HEADLINES[area] + " (incomplete)"  # "ok" would hide the errored units
    # The worst parts first (module order within a level), the errored units last.
    ordered = sorted(parts, key=lambda p: LEVEL_RANK[p.level] if p.level != "error" else len(LEVELS))
    return Verdict(area, level, headline, f"{headline}: " + "; ".join(p.text for p in ordered), tuple(ordered))


def verdicts(report: RunReport) -> list[Verdict]:
    """One verdict per area, in AREAS order."""
    return [area_verdict(report, a) for a in AREAS]


@dataclass
class _Results:
    """What the rules read from a report, for a run that has only results (an interrupted run's events)."""

    audits: list[AuditResult]
    targets: dict = field(default_factory=dict)


def verdicts_from_results(results: Iterable[AuditResult], targets: dict | None = None) -> list[Verdict]:
    """The verdicts of the results that exist (a run without report.json: the units that finished)."""
    view = _Results(list(results), dict(targets or {}))
    return [area_verdict(view, a) for a in AREAS]  # type: ignore[arg-type]
