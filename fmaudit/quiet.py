"""Quiet libraries: what third-party libraries print while fmaudit prepares a target or runs a unit goes to
the run's log file (`reports/<run>/run.log`), not the terminal.

Inside `library_output_to_log(path)`:
- `sys.stdout` and `sys.stderr` write to the log: tqdm bars (transformers' GGUF conversion, TextAttack,
  datasets, autoattack), `print` chatter, Python warnings (their default display writes to `sys.stderr`),
  and logging's last-resort handler;
- logging handlers that write to the terminal (e.g. TextAttack's own `StreamHandler`, transformers' handler)
  write to the log instead, at the levels the libraries set (nothing is dropped, only moved);
- except: text that says a guarantee may not hold (`GUARANTEE_PATTERNS`: Opacus' "Secure RNG turned off"
  and "GDP accounting is experimental", any `fmaudit.privacy.dp.DPPrivacyWarning`) also reaches the
  terminal, as well as the log.

fmaudit's own progress (rich) must write to a console pinned to the real terminal stream (the CLI does),
so it is the only progress shown. Warnings recorded by `warnings.catch_warnings(record=True)` (pytest.warns,
the modules' own handling) are untouched: nothing here replaces `warnings.showwarning`.

Not covered: output written by native code straight to file descriptors 1 / 2 (it never passes through
Python's streams).
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

# Text that says a privacy or robustness guarantee may not hold: shown on the terminal even inside a unit.
GUARANTEE_PATTERNS = (
    r"Secure RNG turned off",  # Opacus: noise from a non-cryptographic generator
    r"GDP accounting is experimental",  # Opacus: the GDP accountant can underestimate epsilon
    r"\bDPPrivacyWarning\b",  # fmaudit.privacy.dp's own guarantee warnings
)
_GUARANTEE = re.compile("|".join(GUARANTEE_PATTERNS))

_state = threading.local()


def is_guarantee_text(text: str) -> bool:
    return bool(_GUARANTEE.search(text))


class LogWriter(io.TextIOBase):
    """A text stream that appends to the run log; guarantee text is also copied to `terminal`. After the
    capture ends it passes writes through to the stream it replaced (a library keeps a reference to it,
    e.g. a logging handler created inside a unit), so nothing is written to a closed file."""

    def __init__(self, log: TextIO, terminal: TextIO | None, replaced: TextIO | None):
        super().__init__()
        self._log = log
        self._terminal = terminal
        self._replaced = replaced
        self.active = True

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]  # tqdm and others look at it
        return "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            s = str(s)
        if not self.active:
            target = self._replaced
            if target is not None and target is not self:
                try:
                    return target.write(s)
                except (ValueError, OSError):
                    return len(s)
            return len(s)
        try:
            # tqdm redraws its bar with carriage returns: one line per redraw reads better in a file
            self._log.write(s.replace("\r", "\n") if "\r" in s else s)
        except (ValueError, OSError):
            pass
        if self._terminal is not None and is_guarantee_text(s):
            try:
                self._terminal.write(s if s.endswith("\n") else s + "\n")
                self._terminal.flush()
            except (ValueError, OSError):
                pass
        return len(s)

    def flush(self) -> None:
        try:
            (self._log if self.active else self._replaced).flush()  # type: ignore[union-attr]
        except (ValueError, OSError, AttributeError):
            pass


def _terminal_streams() -> list[Any]:
    return [s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None]


def _handlers_to_move() -> list[logging.StreamHandler]:
    """Logging handlers that write to the terminal (or to an earlier capture's writer)."""
    streams = _terminal_streams()
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    out = []
    for lg in loggers:
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                stream = getattr(h, "stream", None)
                if isinstance(stream, LogWriter) or any(stream is s for s in streams):
                    out.append(h)
    return out


@contextmanager
def library_output_to_log(log_path: str | Path | None, label: str | None = None) -> Iterator[None]:
    """Send library output (stdout, stderr, terminal logging handlers) to `log_path` for the block; guarantee
    warnings still reach the terminal. Re-entrant (an inner block is a no-op) and best-effort: when the log
    cannot be opened, or outside the main thread, the block runs unchanged."""
    if (
        log_path is None
        or getattr(_state, "active", False)
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    try:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8", errors="replace", buffering=1)
    except OSError:
        yield
        return
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    log.write(f"\n===== {label or 'library output'} ({stamp}) =====\n")
    old_out, old_err = sys.stdout, sys.stderr
    out_w = LogWriter(log, terminal=None, replaced=old_out)
    err_w = LogWriter(log, terminal=old_err, replaced=old_err)
    moved: list[tuple[logging.StreamHandler, Any]] = []
    for h in _handlers_to_move():
        old_stream = h.stream
        h.acquire()
        try:
            h.stream = err_w  # not setStream(): that flushes, and the old stream may be a closed writer
        except AttributeError:  # a read-only stream (logging's _StderrHandler: it follows sys.stderr anyway)
            continue
        finally:
            h.release()
        moved.append((h, old_stream))
    _state.active = True
    sys.stdout, sys.stderr = out_w, err_w
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        for h, old_stream in moved:
            h.acquire()
            try:
                # a writer from an earlier capture passes through to what it replaced
                h.stream = old_stream
            finally:
                h.release()
        _state.active = False
        out_w.active = err_w.active = False
        try:
            log.close()
        except OSError:
            pass
