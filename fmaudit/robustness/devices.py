"""Where a model actually is.

torchattacks' `Attack.__init__` reads `next(model.parameters()).device` once, and fra31's AutoAttack takes a
`device` argument (default 'cuda'): an attack built before the model moves runs on the wrong device. So
attacks are built per run, after the model is on its final device, with the device read from the model
itself (a target's `device` string can be stale).
"""

from __future__ import annotations

from typing import Any


def model_device(model: Any, fallback: Any = "cpu"):
    """The device of the model's first parameter (or buffer); `fallback` for a module with neither."""
    import torch

    for it in (model.parameters, model.buffers):
        try:
            t = next(iter(it()))
        except (StopIteration, AttributeError, TypeError):
            continue
        return t.device
    return torch.device(str(fallback))
