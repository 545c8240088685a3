"""Privacy tools as a Python API (imported lazily: `import fmaudit.privacy` stays cheap).

from fmaudit.privacy import dp_finetune
result = dp_finetune(model=target, train_data=data, target_epsilon=8, epochs=2, batch_size=16, lr=5e-4)
result = dp_finetune(model=my_module, train_data=TensorDataset(x, y), validation_data=..., target_epsilon=2)
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "dp_finetune": ("fmaudit.privacy.dp", "dp_finetune"),
    "DPResult": ("fmaudit.privacy.dp", "DPResult"),
    "DPConfigError": ("fmaudit.privacy.dp", "DPConfigError"),
    "DPPrivacyWarning": ("fmaudit.privacy.dp", "DPPrivacyWarning"),
    "DPTrainingError": ("fmaudit.privacy.dp", "DPTrainingError"),
    "dp_defaults": ("fmaudit.privacy.dp", "dp_defaults"),
    "dp_preflight": ("fmaudit.privacy.dp", "preflight"),
    "epsilon_for": ("fmaudit.privacy.dp", "epsilon_for"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'fmaudit.privacy' has no attribute {name!r}")
