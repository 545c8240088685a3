"""One batched forward pass: run a model (or any tensor -> tensor function) over a stack of inputs in slices
and collect its outputs on the CPU (a leaf module: imports nothing from fmaudit, torch only when called)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def batched_forward(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_size: int,
    *,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`fn` on `x[i: i + batch_size]` for each slice in order, without gradients, outputs concatenated on the
    CPU. Each slice is moved to `device` first (None: left where it is) and each output is cast to `dtype`
    (None: kept). An empty `x` gives an empty tensor."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            out = fn(xb if device is None else xb.to(device)).detach()
            outs.append((out if dtype is None else out.to(dtype)).cpu())
    return torch.cat(outs) if outs else torch.zeros(0)
