"""Problems found in a recipe: each with its path (`audits[2].params.eps`) and YAML line."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fmaudit.hints import did_you_mean

Lines = dict[tuple[Any, ...], int]  # path tuple -> 1-based YAML line


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path or '<recipe>'}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


class RecipeError(ValueError):
    """A recipe with problems. `problems` lists every one of them."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def format_path(loc: tuple[Any, ...]) -> str:
    """('audits', 2, 'params', 'eps') -> 'audits[2].params.eps'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def line_map(node: yaml.Node, prefix: tuple[Any, ...] = (), out: Lines | None = None) -> Lines:
    """YAML node tree -> {path tuple: 1-based line}. Built with the safe composer: no objects made."""
    out = {} if out is None else out
    out.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[prefix + (key,)] = key_node.start_mark.line + 1
            line_map(value_node, prefix + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            line_map(item, prefix + (i,), out)
    return out


def line_for(lines: Lines, loc: tuple[Any, ...]) -> int | None:
    """The YAML line of `loc`, else of its nearest parent that has one."""
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def problem_at(loc: tuple[Any, ...], message: str, lines: Lines) -> Problem:
    """A Problem at path `loc`, with its YAML line."""
    return Problem(format_path(loc), message, line_for(lines, loc))


def dedupe(problems: list[Problem]) -> list[Problem]:
    """The problems in order, each (path, message) once."""
    seen, out = set(), []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


def _unwrap_optional(t: Any) -> Any:
    while typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) != 1:
            return None
        t = args[0]
    return t


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str] | None:
    """Field names of the pydantic model that sits at `loc` inside `model` (for near-miss hints)."""
    current: Any = model
    for part in loc:
        current = _unwrap_optional(current)
        if typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]  # `part` is a key or an index
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return None
    current = _unwrap_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return None


def _unknown_key(err: Any, model: type[BaseModel]) -> str:
    fields = _fields_at(model, tuple(err["loc"])[:-1]) or set()
    msg = "unknown key" + did_you_mean(str(err["loc"][-1]), fields)
    return msg + (f" (allowed: {', '.join(sorted(fields))})" if fields else "")


def _missing_key(err: Any, model: type[BaseModel]) -> str:
    return "required key is missing"


def _not_a_choice(err: Any, model: type[BaseModel]) -> str:
    expected = (err.get("ctx") or {}).get("expected", "").replace("'", "").split(" or ")
    return err["msg"] + did_you_mean(str(err.get("input")), expected)


# pydantic error type -> its message in recipe words; other types keep pydantic's message. Every message but
# those of the _NO_VALUE types then ends with the offending value (when it is a scalar).
ERROR_MESSAGES: dict[str, Callable[[Any, type[BaseModel]], str]] = {
    "extra_forbidden": _unknown_key,
    "missing": _missing_key,
    "literal_error": _not_a_choice,
}
_NO_VALUE = ("extra_forbidden", "missing")


def pydantic_problems(
    exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...], lines: Lines
) -> list[Problem]:
    """One Problem per pydantic error of `model` validated at path `prefix`, in recipe words (unknown key,
    required key is missing) with did-you-mean hints."""
    out = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        explain = ERROR_MESSAGES.get(err["type"])
        msg = explain(err, model) if explain is not None else err["msg"]
        if "input" in err and err["type"] not in _NO_VALUE and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        out.append(problem_at(loc, msg, lines))
    return out
