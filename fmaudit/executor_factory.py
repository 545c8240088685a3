"""Executors by name, for the composition root (the runner and the CLI): the recipe's `executor.kind` or
`--executor` picks one. Modules never build executors; they use `ctx.executor`."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from fmaudit.executor import RAY_EXTRA_HINT, Executor, ExecutorUnavailable, LocalExecutor


def ray_available() -> bool:
    """Whether Ray can be imported, without importing it (`fmaudit validate` stays fast)."""
    if "ray" in sys.modules:
        return sys.modules["ray"] is not None
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def _local(spec: Any) -> Executor:
    return LocalExecutor()


def _ray(spec: Any) -> Executor:
    if not ray_available():
        raise ExecutorUnavailable(
            f"the ray executor needs Ray, which is not installed; {RAY_EXTRA_HINT} (or run with --executor local)"
        )
    from fmaudit.ray_executor import RayExecutor

    return RayExecutor.from_spec(spec) if not isinstance(spec, str) else RayExecutor()


# kind -> builder from the recipe's `executor` block (an ExecutorSpec) or the bare kind name
EXECUTORS: dict[str, Callable[[Any], Executor]] = {"local": _local, "ray": _ray}
EXECUTOR_KINDS = tuple(EXECUTORS)


def make_executor(spec: Any) -> Executor:
    """An executor from a recipe's `executor` block (an `ExecutorSpec`) or a kind name."""
    kind = getattr(spec, "kind", spec) or "local"
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r} (available: {', '.join(EXECUTOR_KINDS)})")
    return EXECUTORS[kind](spec)
