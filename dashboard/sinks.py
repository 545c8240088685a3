"""Where views write: the live Streamlit page or a static HTML document.

Views call the same small set of methods on a `Sink`, so the HTML export shows exactly what the dashboard
shows. Text coming from reports is always escaped before it reaches HTML (a report is data, not markup).
"""

from __future__ import annotations

import base64
import html
import itertools
import re
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd

NOTICE_KINDS = ("info", "warning", "error", "success")
_counter = itertools.count()


@dataclass
class Card:
    """A headline number: label, formatted value (with unit) and the one-line explanation shown on hover."""

    label: str
    value: str
    help: str | None = None


def md_escape(text: Any) -> str:
    """Text from a report, safe inside Streamlit markdown (no accidental emphasis, links or headings)."""
    return re.sub(r"([\\`*_\[\]#|<>~$:])", r"\\\1", str(text))


class Sink(Protocol):  # pragma: no cover - interface
    def header(self, text: str, level: int = 2) -> None: ...
    def text(self, text: str) -> None: ...
    def caption(self, text: str) -> None: ...
    def notice(self, kind: str, text: str) -> None: ...
    def cards(self, cards: list[Card], *, per_row: int = 5) -> None: ...
    def table(self, df: pd.DataFrame, *, help: dict[str, str] | None = None, key: str | None = None) -> None: ...
    def figure(self, fig: Any, key: str | None = None) -> None: ...
    def html(self, fragment: str) -> None: ...
    def image(self, png: bytes, caption: str = "") -> None: ...
    def code(self, text: str) -> None: ...
    def columns(self, n: int) -> list[Sink]: ...
    def section(self, title: str, expanded: bool = True) -> Sink: ...


# ---------------------------------------------------------------------------------------------------
# Streamlit


class StreamlitSink(Sink):
    def __init__(self, container: Any = None):
        import streamlit as st

        self.st = st
        self.c = container if container is not None else st

    def header(self, text: str, level: int = 2) -> None:
        if level <= 1:
            self.c.header(text, anchor=False)
        elif level == 2:
            self.c.subheader(text, anchor=False)
        else:
            self.c.markdown(f"**{md_escape(text)}**")

    def text(self, text: str) -> None:
        self.c.markdown(md_escape(text))

    def caption(self, text: str) -> None:
        self.c.caption(md_escape(text))

    def notice(self, kind: str, text: str) -> None:
        getattr(self.c, kind if kind in NOTICE_KINDS else "info")(md_escape(text))

    def cards(self, cards: list[Card], *, per_row: int = 5) -> None:
        if not cards:
            return
        for row_start in range(0, len(cards), per_row):  # a narrow column takes fewer, so no value is cut off
            row = cards[row_start : row_start + per_row]
            cols = self.c.columns(len(row))
            for col, card in zip(cols, row):
                col.metric(card.label, card.value, help=card.help)

    def table(self, df: pd.DataFrame, *, help: dict[str, str] | None = None, key: str | None = None) -> None:
        cfg = {c: self.st.column_config.Column(c, help=h) for c, h in (help or {}).items() if c in df.columns}
        df = df.copy()
        df.attrs = {}  # hover texts for the HTML export; Arrow cannot serialize their tuple keys
        self.c.dataframe(df, hide_index=True, column_config=cfg or None, width="stretch")

    def figure(self, fig: Any, key: str | None = None) -> None:
        self.c.plotly_chart(fig, key=key or f"fig-{next(_counter)}", config={"displaylogo": False})

    def html(self, fragment: str) -> None:
        # Fragments are built by dashboard.figures from escaped report text only.
        self.c.markdown(fragment, unsafe_allow_html=True)

    def image(self, png: bytes, caption: str = "") -> None:
        self.c.image(png, caption=caption or None)

    def code(self, text: str) -> None:
        self.c.code(text, language=None)

    def columns(self, n: int) -> list[Sink]:
        return [StreamlitSink(col) for col in self.c.columns(n)]

    def section(self, title: str, expanded: bool = True) -> Sink:
        return StreamlitSink(self.c.expander(title, expanded=expanded))


# ---------------------------------------------------------------------------------------------------
# Static HTML


class HtmlSink(Sink):
    """Collects HTML parts; `render()` returns the fragment. Plotly figures are embedded as divs that the
    page's single inline copy of plotly.js draws."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.figures = 0

    def render(self) -> str:
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
            else:
                kind, payload = p
                if kind == "columns":
                    cells = "".join(f'<div class="col">{s.render()}</div>' for s in payload)
                    out.append(f'<div class="cols">{cells}</div>')
                elif kind == "section":
                    title, sink, expanded = payload
                    out.append(
                        f"<details{' open' if expanded else ''}><summary>{html.escape(title)}</summary>"
                        f"{sink.render()}</details>"
                    )
        return "".join(out)

    def header(self, text: str, level: int = 2) -> None:
        tag = {1: "h2", 2: "h3"}.get(level, "h4")
        self.parts.append(f"<{tag}>{html.escape(text)}</{tag}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def caption(self, text: str) -> None:
        self.parts.append(f'<p class="caption">{html.escape(text)}</p>')

    def notice(self, kind: str, text: str) -> None:
        kind = kind if kind in NOTICE_KINDS else "info"
        self.parts.append(f'<div class="notice {kind}">{html.escape(text)}</div>')

    def cards(self, cards: list[Card], *, per_row: int = 5) -> None:
        if not cards:  # the cards wrap to the page's width: `per_row` is the live app's
            return
        items = "".join(
            f'<div class="card" title="{html.escape(c.help or "")}"><div class="label">{html.escape(c.label)}'
            f'{" (?)" if c.help else ""}</div><div class="value">{html.escape(c.value)}</div></div>'
            for c in cards
        )
        self.parts.append(f'<div class="cards">{items}</div>')

    def table(self, df: pd.DataFrame, *, help: dict[str, str] | None = None, key: str | None = None) -> None:
        help = help or {}
        head = "".join(
            f'<th title="{html.escape(help.get(str(c), "click to sort"))}">{html.escape(str(c))}</th>'
            for c in df.columns
        )
        rows = []
        tips = df.attrs.get("tooltips") or {}
        for i, (_, row) in enumerate(df.iterrows()):
            cells = []
            for c in df.columns:
                v = row[c]
                tip = tips.get((i, str(c)))
                title = f' title="{html.escape(tip)}"' if tip else ""
                sort = ""
                if isinstance(v, (int, float)) and not isinstance(v, bool) and pd.notna(v):
                    sort = f' data-sort="{float(v)!r}"'
                cells.append(f"<td{title}{sort}>{html.escape(_cell(v))}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        self.parts.append(
            f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        )

    def figure(self, fig: Any, key: str | None = None) -> None:
        self.figures += 1
        self.parts.append(
            '<div class="fig">'
            + fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
            + "</div>"
        )

    def html(self, fragment: str) -> None:
        self.parts.append(fragment)

    def image(self, png: bytes, caption: str = "") -> None:
        data = base64.b64encode(png).decode("ascii")
        self.parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def columns(self, n: int) -> list[Sink]:
        sinks: list[Sink] = [HtmlSink() for _ in range(n)]
        self.parts.append(("columns", sinks))
        return sinks

    def section(self, title: str, expanded: bool = True) -> Sink:
        sink = HtmlSink()
        self.parts.append(("section", (title, sink, expanded)))
        return sink


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    try:
        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
