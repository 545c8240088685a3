"""Small HTML fragments built from report text (pure functions): token heatmaps, adversarial text pairs and
the verdict blocks. Report text is escaped before it becomes HTML (a report is data, not markup)."""

from __future__ import annotations

import difflib
import html
import math
from collections.abc import Sequence
from typing import Any


def token_heatmap_html(tokens: Sequence[Any], scores: Sequence[Any], title: str = "") -> str:
    """Tokens coloured by attribution: red pushes towards the predicted class, blue against it."""
    vals = [float(s) if isinstance(s, (int, float)) and math.isfinite(s) else 0.0 for s in scores]
    m = max((abs(v) for v in vals), default=0.0) or 1.0
    spans = []
    for tok, v in zip(tokens, vals):
        a = min(abs(v) / m, 1.0)
        rgb = "214,39,40" if v >= 0 else "31,119,180"
        spans.append(
            f'<span class="tok" style="background: rgba({rgb},{a:.2f}); padding:1px 3px; margin:1px; '
            f'border-radius:3px; display:inline-block" title="attribution {v:+.4g}">'
            f"{html.escape(str(tok))}</span>"
        )
    head = f'<div class="caption">{html.escape(title)}</div>' if title else ""
    return f'<div class="tokens" style="line-height:1.9">{head}{"".join(spans)}</div>'


def word_diff_html(original: str, adversarial: str) -> tuple[str, str, int]:
    """Both texts with the words that differ highlighted; returns (original_html, adversarial_html, changed)."""
    a, b = str(original).split(), str(adversarial).split()
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    out_a, out_b, changed = [], [], 0
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        wa, wb = [html.escape(w) for w in a[i1:i2]], [html.escape(w) for w in b[j1:j2]]
        if op == "equal":
            out_a += wa
            out_b += wb
        else:
            changed += max(i2 - i1, j2 - j1)
            out_a += [f'<del style="background:#fdd; text-decoration:line-through">{w}</del>' for w in wa]
            out_b += [f'<mark style="background:#fbd38d">{w}</mark>' for w in wb]
    return " ".join(out_a), " ".join(out_b), changed


def marked_or_diff_html(original: str, adversarial: str) -> tuple[str, str, int]:
    """Texts whose changed words are marked [[like this]] (robustness.text_attack's evidence) are shown with
    those words highlighted; unmarked texts fall back to a word diff."""
    import re

    mark = re.compile(r"\[\[(.+?)\]\]")
    if not (mark.search(original) or mark.search(adversarial)):
        return word_diff_html(original, adversarial)

    def render(text: str, style: str, tag: str) -> tuple[str, int]:
        parts, last, n = [], 0, 0
        for m in mark.finditer(text):
            parts.append(html.escape(text[last : m.start()]))
            parts.append(f'<{tag} style="{style}">{html.escape(m.group(1))}</{tag}>')
            last, n = m.end(), n + 1
        parts.append(html.escape(text[last:]))
        return "".join(parts), n

    a, na = render(original, "background:#fdd; text-decoration:line-through", "del")
    b, nb = render(adversarial, "background:#fbd38d", "mark")
    return a, b, max(na, nb)


# ---------------------------------------------------------------------------------------------------
# Verdicts (fmaudit.verdict): one coloured line per area


def _level_badge(level: str) -> str:
    from fmaudit.verdict import COLOURS, LEVEL_WORDS

    c = COLOURS.get(level, "#8c8c8c")
    return (
        f'<span class="vlevel" style="display:inline-block; min-width:64px; text-align:center; background:{c}; '
        f'color:#fff; border-radius:4px; padding:1px 6px; font-size:0.8em; font-weight:600">'
        f"{html.escape(LEVEL_WORDS.get(level, level))}</span>"
    )


def _headline_html(text: str) -> str:
    """A verdict line with its headline (the part before the first ': ') in bold, then the numbers."""
    head, _, rest = text.partition(": ")
    return f"<b>{html.escape(head)}</b>" + (f": {html.escape(rest)}" if rest else "")


def verdict_block_html(verdicts: Sequence[Any]) -> str:
    """The verdict block: per area a coloured badge, the area, and its line (headline, then the numbers)."""
    rows = []
    for v in verdicts:
        rows.append(
            f'<div class="verdict {html.escape(v.level)}" data-area="{html.escape(v.area)}" data-level="'
            f'{html.escape(v.level)}" style="border-left:5px solid {v.colour}; padding:5px 10px; margin:4px 0; '
            f'background:#fafafa">{_level_badge(v.level)} <b style="display:inline-block; min-width:110px">'
            f"{html.escape(v.area)}</b> {_headline_html(v.text)}</div>"
        )
    return '<div class="verdicts">' + "".join(rows) + "</div>"


def verdict_compare_html(rows: Sequence[tuple[str, tuple[str, str], tuple[str, str]]]) -> str:
    """Verdicts of two runs side by side: rows of (area, (level A, text A), (level B, text B))."""
    from fmaudit.verdict import COLOURS

    body = []
    for area, (la, ta), (lb, tb) in rows:
        cells = "".join(
            f'<td style="border-left:5px solid {COLOURS.get(lvl, "#8c8c8c")}">{_level_badge(lvl)} '
            f"{_headline_html(t)}</td>"
            for lvl, t in ((la, ta), (lb, tb))
        )
        body.append(f"<tr><td><b>{html.escape(area)}</b></td>{cells}</tr>")
    return (
        '<table class="verdicts-compare" style="width:100%"><thead><tr><th>area</th><th>verdict in A</th>'
        "<th>verdict in B</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>"
    )
