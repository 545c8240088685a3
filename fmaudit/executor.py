"""The executor seam: independent units of work go through one small interface.

The runner hands an executor a batch of independent units (audits over different targets, later
reference-model trainings); the local executor runs them in this process, in order. A distributed
engine implements the same `map` and plugs in without any module changing.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Apply `fn` to every item; results in item order. `fn` isolates its own failures."""
        ...


class LocalExecutor:
    name = "local"

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(item) for item in items]


def make_executor(spec: Any) -> Executor:
    kind = getattr(spec, "kind", spec) or "local"
    if kind == "local":
        return LocalExecutor()
    raise ValueError(f"unknown executor {kind!r} (available: local)")
