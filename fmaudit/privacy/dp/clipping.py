"""Per-example clipping modes as a registry: "ghost" (Opacus' fast gradient clipping: two backward passes, no
per-sample gradients stored), "hooks" (per-sample gradients from Opacus' hooks) and "bookkeeping" (book-keeping
clipping, `bookkeeping`: one backward pass, norms and the clipped sum from the layers' stored activations and
output gradients; a model with layers it does not handle falls back to hooks, with a warning). "auto" is
resolved by `preflight`: book-keeping when it covers every trainable layer, else ghost, else (trainable tensors
shared between modules) hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _ghost_private(engine: Any, kw: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch

    gsm, opt, _criterion, dl = engine.make_private(criterion=torch.nn.CrossEntropyLoss(), **kw)
    return gsm, opt, dl


def _hooks_private(engine: Any, kw: dict[str, Any]) -> tuple[Any, Any, Any]:
    gsm, opt, dl = engine.make_private(**kw)
    return gsm, opt, dl


def _ghost_loss(gsm: Any, opt: Any, per_example: Any) -> Any:
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    return DPTensorFastGradientClipping(gsm, opt, per_example, "mean")


def _hooks_loss(_gsm: Any, _opt: Any, per_example: Any) -> Any:
    return per_example.mean()


def _ghost_empty(p: Any) -> None:
    import torch

    p.grad = torch.zeros_like(p)


def _hooks_empty(p: Any) -> None:
    import torch

    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _bookkeeping_private(engine: Any, kw: dict[str, Any]) -> tuple[Any, Any, Any]:
    from fmaudit.privacy.dp import bookkeeping

    return bookkeeping.make_private(engine, kw)


def _bookkeeping_loss(gsm: Any, opt: Any, per_example: Any) -> Any:
    from fmaudit.privacy.dp import bookkeeping

    return bookkeeping.loss(gsm, opt, per_example)


def _bookkeeping_empty(p: Any) -> None:
    from fmaudit.privacy.dp import bookkeeping

    bookkeeping.empty_grad(p)


@dataclass(frozen=True)
class ClippingMode:
    """One clipping mode: how Opacus makes the model private (`make_private(engine, kwargs)` -> (module,
    optimizer, loader)), the loss the loop backpropagates from per-example losses (`loss(module, optimizer,
    per_example)`), and the gradient an empty batch leaves on a parameter (`empty_grad(p)`)."""

    make_private: Callable[[Any, dict[str, Any]], tuple[Any, Any, Any]]
    loss: Callable[[Any, Any, Any], Any]
    empty_grad: Callable[[Any], None]


CLIPPING_MODES: dict[str, ClippingMode] = {
    "ghost": ClippingMode(_ghost_private, _ghost_loss, _ghost_empty),
    "hooks": ClippingMode(_hooks_private, _hooks_loss, _hooks_empty),
    "bookkeeping": ClippingMode(_bookkeeping_private, _bookkeeping_loss, _bookkeeping_empty),
}
CLIPPING = ("auto", *CLIPPING_MODES)


def noise_only_step(optimizer: Any, clipping: str) -> None:
    """One DP-SGD step on an empty Poisson batch: the update is noise only, and the accountant counts it
    (Opacus' optimizer does both, from an empty set of per-example gradients)."""
    empty_grad = CLIPPING_MODES[clipping].empty_grad
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        empty_grad(p)
    optimizer.step()  # pops the sampler's end-of-logical-batch signal, adds noise, steps the accountant
