"""Did-you-mean hints for unknown names (a leaf module: imports nothing from fmaudit)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` candidates that look like `name` (difflib ratio >= 0.5), best first."""
    return difflib.get_close_matches(str(name), sorted(str(c) for c in candidates), n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: Iterable[str], n: int = 1) -> str:
    """'; did you mean 'x'?' (or 'x' or 'y' when n > 1), or '' when nothing is close."""
    close = close_matches(name, candidates, n=n)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
