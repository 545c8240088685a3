"""Functions and a module that Ray workers import by name in tests/test_ray.py (the fixture puts this
folder on the workers' PYTHONPATH, as a real deployment installs plugins on every node)."""

from __future__ import annotations

import os
from pathlib import Path

from fmaudit.audits.base import AuditModule, AuditParams, Outcome


def in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def _log_attempt(folder: Path, item) -> int:
    log = folder / f"attempts-{item}"
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return len(log.read_text().split())


def _die() -> None:
    if not in_ray_worker():  # never take down the test process itself
        raise RuntimeError("would have killed the process")
    os._exit(17)


class CrashOnce:
    """Kills its worker process on the first attempt at each item (a marker file remembers), then works."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def __call__(self, x: int) -> int:
        _log_attempt(self.folder, x)
        marker = self.folder / f"crashed-{x}"
        if not marker.exists():
            marker.write_text("1")
            _die()
        return x * 10


class CrashOn:
    """Kills its worker on every attempt at `bad`; other items work."""

    def __init__(self, folder: str, bad: int):
        self.folder = Path(folder)
        self.bad = bad

    def __call__(self, x: int) -> int:
        _log_attempt(self.folder, x)
        if x == self.bad:
            _die()
        return x + 1


class RaiseOn:
    """Raises ValueError at `bad` (an ordinary exception: reported, not retried)."""

    def __init__(self, folder: str, bad: int):
        self.folder = Path(folder)
        self.bad = bad

    def __call__(self, x: int) -> int:
        _log_attempt(self.folder, x)
        if x == self.bad:
            raise ValueError(f"bad item {x}")
        return x


class Nested:
    """Maps inner work through the executor it captured (runs inside a task: nested tasks)."""

    def __init__(self, executor):
        self.executor = executor

    def __call__(self, x: int) -> list[int]:
        return self.executor.map(square, list(range(x)))


def square(x: int) -> int:
    return x * x


def pid(_: int) -> int:
    return os.getpid()


def warm_up(_: int) -> int:
    """Import what the recipe tests need, so a fresh worker pays it once, early."""
    import torch  # noqa: F401
    from transformers import BertForSequenceClassification  # noqa: F401

    import fmaudit.audits.privacy.membership  # noqa: F401
    import fmaudit.targets.text  # noqa: F401
    import fmaudit.training  # noqa: F401

    return os.getpid()


class CrashWorker(AuditModule):
    """An audit whose process dies (out-of-memory kill, segfault) every time it runs under Ray."""

    name = "test.crash_worker"
    category = "utility"
    description = "Kills its worker process (Ray retry tests)."

    class Params(AuditParams):
        pass

    def run(self, target, ctx):
        _die()
        return Outcome()  # pragma: no cover


def locked_cnn(num_labels: int = 10):
    """A digits CNN holding a lock: it works here but cannot be pickled to a worker."""
    import threading

    from fmaudit.targets.vision import digits_cnn

    model = digits_cnn(num_labels)
    model.lock = threading.Lock()
    return model


class WriteInPlace:
    """Updates a captured array in place (as training updates weights) and returns a fresh one."""

    def __init__(self, array):
        self.array = array

    def __call__(self, x: int):
        import numpy as np

        self.array[0] = x  # raises on a read-only (zero-copy) array
        return np.full(4096, float(x))
