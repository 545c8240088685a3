"""Inter-process locks for shared caches (the fine-tune cache under $FMAUDIT_CACHE_DIR).

Two `fmaudit run` processes on the same cache must not interleave "is the entry there? train, write it":
without a lock both train, and one may delete the folder the other is loading (`rmtree` + `os.replace`).
`entry_lock` serializes that critical section per cache entry with an advisory lock on a side file
(`fcntl.flock` on POSIX, `msvcrt.locking` on Windows). The lock is released when the process dies, so a
killed run never leaves a stale lock behind. Readers that do not take the lock stay safe because entries
are published with an atomic rename and verified by their weights hash before use.

Use:

    with entry_lock(cache_dir / kind, key[:32]):
        ... check the entry, train if missing or damaged, publish with os.replace ...
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


class CacheLockTimeout(TimeoutError):
    """Another process held the cache entry's lock for longer than the timeout."""


def _lock_file(fd: int, blocking: bool) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def _unlock_file(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def entry_lock(
    parent: str | os.PathLike[str], name: str, *, timeout: float | None = None, poll: float = 0.1
) -> Iterator[Path]:
    """Hold an exclusive lock for cache entry `parent/name` (lock file `parent/.name.lock`).

    Blocks until the lock is free (another process is building the same entry: waiting is cheaper than
    training twice), or raises CacheLockTimeout after `timeout` seconds. Yields the lock file's path."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            _lock_file(fd, blocking=True)
        else:
            deadline = time.monotonic() + timeout
            while not _lock_file(fd, blocking=False):
                if time.monotonic() >= deadline:
                    raise CacheLockTimeout(
                        f"cache entry {parent / name} is locked by another process "
                        f"(waited {timeout:g} s; lock file {path})"
                    )
                time.sleep(poll)
        try:
            yield path
        finally:
            _unlock_file(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move a fully written folder `tmp` to `final`, replacing an existing entry with no moment at which
    `final` holds a half-written entry: the old one is first renamed aside (atomic), then removed."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, aside)
    os.replace(tmp, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


__all__ = ["entry_lock", "publish_dir", "CacheLockTimeout"]
