"""The Ray executor: independent units run as Ray tasks, on this machine or a cluster.

`pip install fmaudit[ray]`. Ray is imported only when an executor starts, so nothing else pays for it.

How a `map(fn, items)` runs:
- `fn` with everything it captures (models, datasets, the run's Session) is pickled ONCE into Ray's
  object store (`ray.put`); each task receives a reference to it plus its item. A worker process keeps
  the function it last deserialized, so further items of the same map on that worker reuse it (like the
  local executor, where every item shares the one `fn`). Nothing heavy is pickled per task. Function and
  results travel as pickled bytes, so arrays arrive writable, as in a local run.
- Each task asks for `num_cpus_per_task` CPUs and `num_gpus_per_task` GPUs. Ray sets OMP_NUM_THREADS to
  the CPUs a task holds, so torch in a 1-CPU task uses one thread.
- A task whose worker dies (killed, out of memory, node lost) is retried up to `max_retries` times.
  Exceptions raised by `fn` are not retried (the same input fails the same way); after the retries, the
  failure goes to `on_error(item, TaskFailed)`, or is raised once every other item has finished.
- Inside a task, the executor is still a RayExecutor (it pickles as its settings), so nested maps
  (reference models trained by an audit that itself runs as a task) fan out on the same cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fmaudit.executor import RAY_EXTRA_HINT, ExecutorUnavailable, NotSendable, OnError, TaskFailed

T = TypeVar("T")
R = TypeVar("R")

# Per worker process: (object-ref hex, function) of the map this worker served last.
_WORKER_FN: tuple[str, Any] | None = None
_REMOTE: dict[str, Any] = {}


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ExecutorUnavailable(f"the ray executor needs Ray, which is not installed; {RAY_EXTRA_HINT}") from exc
    return ray


def _dumps(obj: Any) -> bytes:
    from ray import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)


def _loads(blob: bytes) -> Any:
    # Only blobs made by _dumps in this run's own driver and workers travel here (never files or
    # user-supplied bytes); Ray itself moves every task argument with the same pickler.
    from ray import cloudpickle

    return cloudpickle.loads(blob)


def _call(box: list, item: Any) -> bytes:
    """The Ray task: fetch the map's function once per worker (by reference), apply it to one item.

    The function and the result travel as pickled bytes: unpickled, every array is an ordinary writable
    copy, as in a local run (Ray's zero-copy arrays are read-only views of the object store, which code
    that updates arrays or tensors in place must not get)."""
    global _WORKER_FN
    ref = box[0]
    key = ref.hex()
    if _WORKER_FN is None or _WORKER_FN[0] != key:
        import ray

        _WORKER_FN = None  # let the previous map's function go before loading the next one
        _WORKER_FN = (key, _loads(ray.get(ref)))
    return _dumps(_WORKER_FN[1](item))


def _remote_call(ray):
    job = ray.get_runtime_context().get_job_id()  # one remote function per Ray session
    fn = _REMOTE.get(job)
    if fn is None:
        _REMOTE.clear()
        fn = _REMOTE[job] = ray.remote(_call)
    return fn


class RayExecutor:
    """Runs `map` items as Ray tasks. `address`: None starts (or joins) a Ray instance on this machine;
    "auto" joins a cluster started with `ray start`; "ray://host:10001" connects through Ray Client."""

    name = "ray"
    remote = True

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus_per_task: float = 1.0,
        num_gpus_per_task: float = 0.0,
        max_retries: int = 3,
        init_kwargs: dict[str, Any] | None = None,
        task_options: dict[str, Any] | None = None,
    ):
        if num_cpus_per_task <= 0:
            raise ValueError("num_cpus_per_task must be positive")
        if num_gpus_per_task < 0 or max_retries < 0:
            raise ValueError("num_gpus_per_task and max_retries must not be negative")
        self.address = address
        self.num_cpus_per_task = num_cpus_per_task
        self.num_gpus_per_task = num_gpus_per_task
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})  # more ray.init arguments, when this executor starts Ray
        self.task_options = dict(task_options or {})  # more task options (custom resources, scheduling strategy)
        self._started_ray = False

    @classmethod
    def from_spec(cls, spec: Any) -> RayExecutor:
        return cls(
            address=getattr(spec, "address", None),
            num_cpus_per_task=getattr(spec, "num_cpus_per_task", 1.0),
            num_gpus_per_task=getattr(spec, "num_gpus_per_task", 0.0),
            max_retries=getattr(spec, "max_retries", 3),
        )

    def settings(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "num_cpus_per_task": self.num_cpus_per_task,
            "num_gpus_per_task": self.num_gpus_per_task,
            "max_retries": self.max_retries,
            "task_options": self.task_options,
        }

    def __repr__(self) -> str:
        return "RayExecutor(" + ", ".join(f"{k}={v!r}" for k, v in self.settings().items()) + ")"

    def __reduce__(self):
        # Sent to a worker (captured by a mapped function): the same settings, joining the running cluster.
        return (_rebuild, (self.settings(),))

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self):
        """Connect to Ray (once). Joins an already initialized Ray (tests, notebooks, inside a task) as is."""
        ray = _import_ray()
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "logging_level": "WARNING", **self.init_kwargs}
            try:
                ray.init(address=self.address, **kwargs)
            except Exception as exc:
                where = self.address or "a new local instance"
                raise ConnectionError(f"cannot start or reach Ray ({where}): {type(exc).__name__}: {exc}") from exc
            self._started_ray = True
        return ray

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    # -- work ----------------------------------------------------------------------------------------
    def map(self, fn: Callable[[T], R], items: Sequence[T], *, on_error: OnError | None = None) -> list[R]:
        items = list(items)
        if not items:
            return []
        ray = self.start()
        try:
            fn_ref = ray.put(_dumps(fn))
        except Exception as exc:
            raise NotSendable(
                f"the Ray executor could not send {getattr(fn, '__qualname__', fn)!r} to its workers: {exc}. "
                "Everything a mapped function captures is pickled; wrap process-local helpers (progress bars, "
                "loggers) in fmaudit.executor.LocalOnly"
            ) from exc
        task = _remote_call(ray).options(
            num_cpus=self.num_cpus_per_task,
            num_gpus=self.num_gpus_per_task,
            max_retries=self.max_retries,
            retry_exceptions=False,
            **self.task_options,
        )
        refs = [task.remote([fn_ref], item) for item in items]
        where = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(items)
        failures: dict[int, TaskFailed] = {}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = where[ref]
                    try:
                        results[i] = _loads(ray.get(ref))
                    except ray.exceptions.RayError as exc:
                        failures[i] = self._failure(ray, i, items[i], exc)
        except BaseException:
            for ref in pending:  # interrupted: stop what is still queued or running
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass
            raise
        finally:
            del fn_ref
        for i in sorted(failures):
            if on_error is None:
                raise failures[i]
            results[i] = on_error(items[i], failures[i])
        return results

    def _failure(self, ray, i: int, item: Any, exc: BaseException) -> TaskFailed:
        attempts = self.max_retries + 1
        if isinstance(exc, ray.exceptions.RayTaskError):  # fn raised: not retried
            cause = exc.cause
            return TaskFailed(
                i,
                item,
                f"{type(cause).__name__}: {cause}",
                cause=cause,
                attempts=1,
                remote_traceback=getattr(exc, "traceback_str", None),
            )
        crashed = isinstance(
            exc,
            (
                ray.exceptions.WorkerCrashedError,
                ray.exceptions.OutOfMemoryError,
                ray.exceptions.NodeDiedError,
                ray.exceptions.LocalRayletDiedError,
            ),
        )
        what = "its worker process died" if crashed else "Ray could not complete it"
        msg = f"task {i} failed: {what} on each of {attempts} attempt(s) ({type(exc).__name__}: {str(exc).strip()})"
        return TaskFailed(i, item, msg, cause=exc, crashed=crashed, attempts=attempts)


def _rebuild(settings: dict[str, Any]) -> RayExecutor:
    return RayExecutor(**settings)
