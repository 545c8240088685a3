"""Signals during a run: SIGINT / SIGTERM become KeyboardInterrupt, held inside critical sections (an event
line, the report's write) so a kill never leaves a half-written file."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fmaudit.report import EventLog


class Interrupts:
    """SIGINT and SIGTERM, both as KeyboardInterrupt, except inside `critical()` sections (an event line, the
    report's write, the run folder's claim), where the signal is held until the section ends: a kill never
    leaves half a line in events.jsonl or a run folder without its run_started event. Installed only in the
    main thread (the only one Python delivers signals to); a signal that was ignored (SIG_IGN, e.g. `nohup`)
    stays ignored."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            try:
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN:
                    continue
                signal.signal(sig, self._handle)
                self._old[sig] = old
            except (ValueError, OSError):  # not allowed here (embedded interpreter)
                pass
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth > 0:
            self.pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def critical(self, honour: bool = True) -> Iterator[None]:
        """Hold SIGINT / SIGTERM while the block runs; a held signal is raised when it ends (`honour`), or
        left in `pending` for the caller to decide."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if honour and self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)


class GuardedEventLog(EventLog):
    """An EventLog whose lines are written whole: signals wait until the line is on disk."""

    def __init__(self, path: str | os.PathLike[str], interrupts: Interrupts):
        super().__init__(path)
        self.interrupts = interrupts

    def emit(self, entry_type: str, **payload: Any) -> None:
        with self.interrupts.critical():
            super().emit(entry_type, **payload)

    def __reduce__(self):  # travels (e.g. to Ray workers) as a plain EventLog
        return (EventLog, (self.path,))
