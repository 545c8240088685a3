"""Reading recipe YAML safely: `yaml.safe_load` semantics within size, depth and expansion limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fmaudit.recipe.problems import Lines, Problem, RecipeError, line_map

# Limits on recipe files, checked before anything is built from them (PyYAML itself has none: a "billion
# laughs" document of nested aliases expands to 9**9 nodes, and deeply nested flow collections exhaust the
# recursion limit). Anchors and aliases stay allowed (they are handy for repeated params), but the document
# as expanded must stay small: a real recipe has a few hundred nodes.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB
MAX_YAML_DEPTH = 32  # nested mappings / sequences
MAX_YAML_NODES = 20_000  # scalars + collections, counting every alias as the node it repeats


def _line(event: yaml.Event) -> int | None:
    """The 1-based line an event starts on (None when the parser gave no position)."""
    return event.start_mark.line + 1 if event.start_mark is not None else None


def _yaml_loader() -> type:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check_yaml_limits(text: str) -> Problem | None:
    """Walk the YAML event stream once (no objects built, no recursion) and return a problem when the
    document nests deeper than MAX_YAML_DEPTH or expands (aliases included) to more than MAX_YAML_NODES
    nodes, or holds a recursive alias (one inside the collection it names: the document would contain itself,
    and everything that walks it would recurse forever). Stops at the first limit exceeded, so hostile input
    costs at most one linear scan."""
    if len(text) > MAX_RECIPE_BYTES:
        return Problem(
            "",
            f"the recipe is {len(text):,} characters; recipes are limited to "
            f"{MAX_RECIPE_BYTES:,} bytes (a real recipe is a few KiB)",
        )
    stack: list[list[Any]] = [[0, None, None]]  # per open collection: [expanded size, anchor, start line]
    anchors: dict[str, int | None] = {}  # None: the anchored collection is still open
    for ev in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) > MAX_YAML_DEPTH:
                return Problem(
                    "",
                    f"the recipe nests deeper than {MAX_YAML_DEPTH} levels; recipes are limited to that depth",
                    _line(ev),
                )
            stack.append([1, ev.anchor, _line(ev)])
            if ev.anchor is not None:
                anchors[ev.anchor] = None
            continue
        if isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            size, anchor, _ = stack.pop()
            if anchor is not None:
                anchors[anchor] = size
        elif isinstance(ev, yaml.ScalarEvent):
            size = 1
            if ev.anchor is not None:
                anchors[ev.anchor] = 1
        elif isinstance(ev, yaml.AliasEvent):
            if ev.anchor in anchors and anchors[ev.anchor] is None:
                return Problem(
                    "",
                    f"the alias *{ev.anchor} is inside the collection &{ev.anchor} it repeats: a "
                    "recursive document, refused (a recipe cannot contain itself)",
                    _line(ev),
                )
            size = (
                anchors.get(ev.anchor) if ev.anchor is not None else None
            ) or 1  # an unknown anchor: the composer reports it
        else:
            continue
        stack[-1][0] += size
        if stack[-1][0] > MAX_YAML_NODES or sum(s[0] for s in stack) > MAX_YAML_NODES:
            return Problem(
                "",
                f"the recipe expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases "
                "count as the nodes they repeat); refused to protect against alias bombs "
                '("billion laughs")',
                getattr(ev.start_mark, "line", -1) + 1 or None,
            )
    return None


def parse_yaml(text: str, source: str = "<recipe>") -> tuple[Any, Lines]:
    """`yaml.safe_load` semantics (no tags that build objects), within the limits above."""
    try:
        limit = check_yaml_limits(text)
        if limit is not None:
            raise RecipeError([limit], source)
        node = yaml.compose(text, Loader=_yaml_loader())
        raw = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([Problem("", f"malformed YAML: {problem}", line)], source) from None
    lines = line_map(node) if node is not None else {}
    return raw, lines


def read_recipe_file(path: Path, label: str) -> str:
    """The text of a recipe file; a RecipeError when it is missing, unreadable or over MAX_RECIPE_BYTES."""
    try:
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(
                [
                    Problem(
                        "",
                        f"the recipe file is {path.stat().st_size:,} bytes; recipes are "
                        f"limited to {MAX_RECIPE_BYTES:,} bytes",
                    )
                ],
                label,
            )
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem("", f"recipe file {path} does not exist")], label) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem("", f"cannot read recipe: {exc}")], label) from None
