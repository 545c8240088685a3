"""fmaudit: privacy and robustness auditing for foundation models.

The public API is imported lazily so `import fmaudit` (and the CLI's --help) stays fast:

    report = fmaudit.run_recipe("recipes/quickstart.yaml")
    report = fmaudit.load_report("reports/<run-id>")
    target = fmaudit.load_target(model="bundled:minilm", num_labels=2)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "run_recipe": ("fmaudit.runner", "run_recipe"),
    "load_report": ("fmaudit.report", "load_report"),
    "load_recipe": ("fmaudit.recipe", "load_recipe"),
    "load_target": ("fmaudit.targets", "load_target"),
    "load_dataset": ("fmaudit.data", "load_dataset"),
    "registry": ("fmaudit.registry", "registry"),
    "AuditModule": ("fmaudit.audits.base", "AuditModule"),
    "AuditParams": ("fmaudit.audits.base", "AuditParams"),
    "AuditContext": ("fmaudit.audits.base", "AuditContext"),
    "Outcome": ("fmaudit.audits.base", "Outcome"),
    "RunReport": ("fmaudit.report", "RunReport"),
    "RecipeError": ("fmaudit.recipe", "RecipeError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'fmaudit' has no attribute {name!r}")
