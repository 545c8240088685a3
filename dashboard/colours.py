"""Colours: one hue per target, the same in every view of a run; a DP twin gets its source's hue, lighter.

`colour_scope(report)` sets the run's colours for the figures built inside it (`series_colours` reads them), so
the views need not pass colours around.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

_SCOPE: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("fmaudit_target_colours", default=None)


def lighten(colour: str, amount: float = 0.5) -> str:
    """'#1f77b4' mixed with white (amount 0 = unchanged, 1 = white)."""
    c = colour.lstrip("#")
    r, g, b = (int(c[i : i + 2], 16) for i in (0, 2, 4))
    mix = [round(v + (255 - v) * amount) for v in (r, g, b)]
    return "#" + "".join(f"{v:02x}" for v in mix)


def target_colours(report: Any) -> dict[str, str]:
    """target name -> colour for a run: its source targets take the palette in the report's order; a target
    produced by DP fine-tuning takes its source's colour, lightened."""
    if report is None:
        return {}
    from fmaudit.verdict import dp_twins

    twins = dp_twins(report)
    names = list(getattr(report, "targets", {}) or {})
    for r in getattr(report, "audits", []):
        for n in (r.target, r.produces):
            if n and n not in names:
                names.append(n)
    out: dict[str, str] = {}
    for n in names:
        if n not in twins:
            out[n] = PALETTE[len(out) % len(PALETTE)]
    for twin, src in twins.items():
        root = src
        while root in twins:  # a twin of a twin keeps the first source's hue
            root = twins[root]
        out[twin] = lighten(out.get(root, PALETTE[len(out) % len(PALETTE)]), 0.5)
    return out


@contextlib.contextmanager
def colour_scope(report: Any) -> Iterator[dict[str, str]]:
    """Within this block every figure colours a trace that names a target of `report` with that target's colour."""
    colours = target_colours(report)
    token = _SCOPE.set(colours)
    try:
        yield colours
    finally:
        _SCOPE.reset(token)


def target_of(name: str, targets: Iterable[str]) -> str | None:
    """The target a trace / bar group / label names: the longest target name it starts with as a word."""
    import re

    best = None
    for t in targets:
        if re.match(re.escape(t) + r"($|[\s(·:,@—-])", name) and (best is None or len(t) > len(best)):
            best = t
    return best


def series_colours(names: Sequence[str], *, distinct: bool = True) -> list[str]:
    """Colours for traces named `names`: the targets' colours (in a colour_scope) when every name maps to a
    target (a different one for each name, when `distinct`: legend entries must stay apart), else the
    palette in order (one target's attacks or methods)."""
    scope = _SCOPE.get()
    if scope:
        ts = [target_of(str(n), scope) for n in names]
        if all(ts) and (not distinct or len(set(ts)) == len(ts)):
            return [scope[t] for t in ts]  # type: ignore[index]
    return [PALETTE[i % len(PALETTE)] for i in range(len(names))]
