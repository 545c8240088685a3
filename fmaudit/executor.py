"""The executor seam: independent units of work go through one small interface.

The runner hands an executor a batch of independent units (audits over different targets in one wave);
modules hand it theirs (reference-model trainings, shards of a large example set). The local executor
runs them in this process, in order. The Ray executor (`fmaudit.ray_executor`, `pip install fmaudit[ray]`)
runs them as Ray tasks on a local machine or a cluster; no module changes.

Rules for a mapped function, so that it runs the same everywhere:
- it returns its result (no reliance on side effects in the caller's objects); files go to shared storage
  (the fine-tune cache, the run folder);
- it isolates its own errors (returns an error value) or lets them raise: then the caller's `on_error`
  gives that item's result, or the error propagates (remote executors: as `TaskFailed`, once the other
  items have finished);
- what it captures is pickled once per `map` call when it runs elsewhere: wrap process-local helpers
  (progress bars, loggers) in `LocalOnly`, which pickles as None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

RAY_EXTRA_HINT = "install it with: pip install 'fmaudit[ray]'"


class ExecutorUnavailable(ValueError):
    """The recipe or command line asks for an executor whose optional dependency is not installed."""


class TaskFailed(RuntimeError):
    """One item of a `map` could not be completed: `fn` raised, or (remote executors) its worker process
    died more often than the retries allow. `cause` is the original exception when there is one."""

    def __init__(
        self,
        index: int,
        item: Any,
        message: str,
        *,
        cause: BaseException | None = None,
        crashed: bool = False,
        attempts: int = 1,
        remote_traceback: str | None = None,
    ):
        super().__init__(message)
        self.index = index
        self.item = item
        self.cause = cause
        self.crashed = crashed
        self.attempts = attempts
        self.remote_traceback = remote_traceback

    @property
    def error_type(self) -> str:
        """The name to report: the original exception's type, or `WorkerCrashed`."""
        if self.crashed or self.cause is None:
            return "WorkerCrashed" if self.crashed else type(self).__name__
        return type(self.cause).__name__


class NotSendable(TypeError):
    """A remote executor could not pickle the mapped function (or what it captures); nothing was started."""


OnError = Callable[[Any, TaskFailed], Any]


class Executor(Protocol):
    name: str
    remote: bool  # True: items run in other processes, so `fn` and what it captures are pickled

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, on_error: OnError | None = None) -> list[R]:
        """Apply `fn` to every item; results in item order. When an item fails, `on_error(item, TaskFailed)`
        gives its result; without `on_error` the failure propagates."""
        ...


class LocalExecutor:
    name = "local"
    remote = False

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, on_error: OnError | None = None) -> list[R]:
        if on_error is None:
            return [fn(item) for item in items]
        out = []
        for i, item in enumerate(items):
            try:
                out.append(fn(item))
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                out.append(on_error(item, TaskFailed(i, item, f"{type(exc).__name__}: {exc}", cause=exc)))
        return out


def _none() -> None:
    return None


class LocalOnly:
    """A callable that only makes sense in this process (a progress-bar factory, a logger). Calls pass
    through; pickled (work sent to another process captured it) it becomes None, which every user of
    progress / log treats as "nobody is watching"."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return (_none, ())


def local_only(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    if fn is None or isinstance(fn, LocalOnly):
        return fn
    return LocalOnly(fn)


def shards(items: Sequence[T], shard_size: int) -> list[list[T]]:
    """Consecutive chunks of at most `shard_size` items."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    items = list(items)
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)]


def map_sharded(
    executor: Executor, fn: Callable[[list[T]], Sequence[R]], items: Sequence[T], *, shard_size: int
) -> list[R]:
    """Sharded work: `fn(chunk) -> one result per item of chunk`, run over consecutive chunks through
    `executor`; results flattened back into item order. For modules that attack or score many examples:
    each shard is one task, what `fn` captures (the model) travels once."""
    chunks = shards(items, shard_size)
    out: list[R] = []
    for chunk, res in zip(chunks, executor.map(fn, chunks)):
        res = list(res)
        if len(res) != len(chunk):
            raise ValueError(f"a shard of {len(chunk)} item(s) returned {len(res)} result(s)")
        out.extend(res)
    return out
