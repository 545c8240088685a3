"""The verdicts as terminal text (the run summary): one wrapped line per area, the level word optionally
coloured with rich markup."""

from __future__ import annotations

import re
import textwrap

from fmaudit.report import RunReport
from fmaudit.verdict.areas import verdicts
from fmaudit.verdict.levels import LEVEL_WORDS, TERMINAL_STYLES


def verdict_lines(report: RunReport, width: int | None = None, *, markup: bool = False) -> list[str]:
    """The verdicts as text for the terminal summary: '<LEVEL> <area>: <headline>: <numbers>'.

    One line per area; with `width`, each is wrapped to that many columns (continuation lines indented).
    With `markup`, the level word carries rich markup for its colour (print with rich, not plain print)."""
    lines: list[str] = []
    for v in verdicts(report):
        word = LEVEL_WORDS[v.level]
        prefix = f"{word:<8} {v.area:<14} "
        body = prefix + v.text
        if width:
            # An interval "[8, 16]" is never cut in two: its space is held while wrapping.
            held = re.sub(r"\[[^\]\s]*, [^\]\s]*\]", lambda m: m.group(0).replace(" ", "\x00"), body)
            wrapped = [
                w.replace("\x00", " ")
                for w in textwrap.wrap(held, width=width, subsequent_indent=" " * 9, break_on_hyphens=False)
            ]
        else:
            wrapped = [body]
        if markup:
            from rich.markup import escape

            style = TERMINAL_STYLES[v.level]
            wrapped = [escape(w) for w in wrapped]
            wrapped[0] = f"[{style}]{escape(word)}[/]" + wrapped[0][len(word) :]
        lines.extend(wrapped)
    return lines
