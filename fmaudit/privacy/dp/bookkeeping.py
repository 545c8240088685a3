"""Book-keeping clipping (Bu et al., "Differentially Private Optimization on Large Model at Small Cost", ICML 2023):
per-example clipping with ONE backward pass and no per-sample gradients stored for large layers.

The backward pass of the per-example loss sum computes input gradients only; every trainable layer keeps its
input and output gradient (its book, `bookkeeping_layers`). From the books: each example's gradient norm (ghost
norm or instantiation, whichever is cheaper per layer), the clip factors c_i = min(1, C / (norm_i + 1e-6)) (as
Opacus computes them), and the clipped sum sum_i c_i grad_i as one weighted weight gradient per layer, left in
`p.grad`. Noise, accounting and gradient accumulation across physical batches are Opacus' fast-gradient-clipping
optimizer's (the same as ghost clipping's), so epsilon is computed exactly as for the other modes.

Handled layers: Linear, Embedding, LayerNorm, Conv2d. A model with any other trainable layer (or trainable
tensors shared between layers) is trained with Opacus' per-sample gradient hooks instead, with a warning that
says so (`unsupported_layers`, `fallback_note`)."""

from __future__ import annotations

import warnings
import weakref
from types import MethodType
from typing import Any

import torch
from torch import nn

from fmaudit.privacy.dp.bookkeeping_layers import Call, Grams, LayerRule, rule_for, tap

CLIP_EPS = 1e-6  # Opacus' clip factor: min(1, C / (norm + 1e-6))


def unsupported_layers(model: nn.Module) -> list[str]:
    """Layers with trainable tensors that book-keeping clipping cannot handle, as "name (Type: why)"."""
    out: list[str] = []
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        for p in own:
            owners.setdefault(id(p), []).append(name or "<root>")
        rule = rule_for(m)
        why = "no book-keeping rule for this layer type" if rule is None else rule.unsupported(m)
        if why:
            out.append(f"{name or '<root>'} ({type(m).__name__}: {why})")
    out += [
        f"{' = '.join(names)} (trainable tensor shared between layers)" for names in owners.values() if len(names) > 1
    ]
    return out


def fallback_note(bad: list[str]) -> str:
    """What is said when a model falls back from book-keeping clipping to Opacus' hooks."""
    return (
        f"book-keeping clipping handles Linear, Embedding, LayerNorm and Conv2d layers only; "
        f"{len(bad)} trainable layer(s) are not among them ({'; '.join(bad[:4])}{'; ...' if len(bad) > 4 else ''}"
        "): the whole model is trained with Opacus' per-sample gradient hooks instead (same clipping, noise "
        "and epsilon; slower, more memory)"
    )


class BookkeepingModule(nn.Module):
    """`module` with book-keeping layers: its forward is the module's; `clipped_backward(per_example, C)` runs
    the one backward pass and leaves the clipped summed gradient in each trainable tensor's `.grad`. Attributes
    the wrapper does not have are the wrapped module's (like Opacus' GradSampleModule). `cleanup()` restores the
    layers' own forwards."""

    def __init__(self, module: nn.Module):
        super().__init__()
        bad = unsupported_layers(module)
        if bad:
            raise ValueError(fallback_note(bad))
        self._module = module
        self._layers: list[tuple[str, nn.Module, LayerRule, list[Call]]] = []
        self._batch: int | None = None
        self._forbid_accumulation = False
        self._given: dict[int, weakref.ref] = {}  # the .grad tensors the last backward set (see _add_grad)
        self.last_norms: torch.Tensor | None = None  # per-example gradient norms of the last backward (for checks)
        for name, m in module.named_modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                rule = rule_for(m)
                assert rule is not None  # unsupported_layers checked it
                book: list[Call] = []
                m.forward = MethodType(self._layer_forward(name, rule, book), m)
                self._layers.append((name, m, rule, book))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_module":
                raise
            return getattr(self._module, name)

    def _layer_forward(self, name: str, rule: LayerRule, book: list[Call]) -> Any:
        def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if self._batch is not None and x.shape[0] != self._batch:
                raise RuntimeError(
                    f"book-keeping clipping needs the batch in dim 0 of every layer input: layer {name}"
                    f" got shape {tuple(x.shape)} in a batch of {self._batch}"
                )
            return tap(rule, layer, book, x)

        return forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.dim() >= 1), None)
        self._batch = int(first.shape[0]) if first is not None else None
        for *_, book in self._layers:
            book.clear()
        return self._module(*args, **kwargs)

    def forbid_grad_accumulation(self) -> None:
        """Under Poisson sampling every logical batch is one step: a second backward without the optimizer's
        zero_grad in between is an error (as in Opacus)."""
        self._forbid_accumulation = True

    def clipped_backward(self, per_example: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """One backward pass of `per_example.sum()`, then each trainable tensor's `.grad` += sum_i c_i grad_i
        (c_i = min(1, C / (||grad_i|| + 1e-6)), grad_i the example's full gradient). Returns the norms."""
        if per_example.dim() != 1:
            raise ValueError(
                f"book-keeping clipping needs one loss per example (shape [B]), got {tuple(per_example.shape)}"
            )
        per_example.sum().backward()
        sq = torch.zeros(per_example.shape[0], dtype=per_example.dtype, device=per_example.device)
        states = []
        grams: Grams = {}
        for _name, layer, rule, book in self._layers:
            if book:
                s, state = rule.norms(layer, book, grams)
                sq = sq + s
                states.append((layer, rule, state))
            book.clear()
        grams.clear()
        norms = sq.clamp(min=0).sqrt()
        c = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        done: set[int] = set()
        while states:  # popped: each layer's book is freed once its gradient is formed (peak memory)
            layer, rule, state = states.pop()
            for pname, grad in rule.grads(layer, state, c.to(_dtype(layer))).items():
                p = getattr(layer, pname)
                self._add_grad(p, grad)
                done.add(id(p))
            del state
        for _name, layer, _rule, _book in self._layers:  # trainable but unused in this forward: zero gradient
            for p in layer.parameters(recurse=False):
                if p.requires_grad and id(p) not in done:
                    self._add_grad(p, torch.zeros_like(p))
        self.last_norms = norms.detach()
        return self.last_norms

    def _add_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """p.grad += grad. Under `forbid_grad_accumulation`, a .grad that is still the one the previous backward
        set (the optimizer has not taken it) is an error."""
        if p.grad is None:
            p.grad = grad.detach().to(p.dtype)
        elif self._forbid_accumulation and p.grad is (self._given[id(p)]() if id(p) in self._given else None):
            raise ValueError(
                "book-keeping clipping: a second backward before optimizer.step() / zero_grad() "
                "accumulates gradients across Poisson batches, which the accountant does not allow for"
            )
        else:
            p.grad.add_(grad.detach())
        self._given[id(p)] = weakref.ref(p.grad)

    def cleanup(self) -> None:
        """Restore the layers' own forwards and drop the books."""
        for _name, layer, _rule, book in self._layers:
            book.clear()
            layer.__dict__.pop("forward", None)
        self._layers = []


def _dtype(layer: nn.Module) -> torch.dtype:
    return next(p for p in layer.parameters(recurse=False) if p.requires_grad).dtype


class BookkeepingLoss:
    """What the loop backpropagates: `backward()` is the one pass plus the clipping (with the optimizer's C);
    `detach()` / `item()` give the mean loss (as Opacus' ghost-clipping loss does)."""

    def __init__(self, module: BookkeepingModule, optimizer: Any, per_example: torch.Tensor):
        self.module, self.optimizer, self.per_example = module, optimizer, per_example

    def backward(self) -> None:
        self.module.clipped_backward(self.per_example, float(self.optimizer.max_grad_norm))

    def detach(self) -> torch.Tensor:
        return self.per_example.detach().mean()

    def item(self) -> float:
        return float(self.detach())


def _optimizer_class() -> type:
    """Opacus' fast-gradient-clipping DP optimizer (it noises and scales the clipped sum in `p.grad`, as for ghost
    clipping), without two full-model copies per step: it takes `p.grad` as the running sum instead of copying
    it, and adds the noise in place. The noise is Opacus' own (`_generate_noise`, same generator, same order), so
    the update is the parent's, bit for bit; the step needs one model-sized buffer less (peak memory) and skips
    the copy (time)."""
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    class BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):
        def accumulate(self) -> None:
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad)
                else:
                    p.summed_grad = p.grad
                p.grad = None  # owned by summed_grad now: a zero_grad() without set_to_none must not clear it

        def add_noise(self) -> None:
            std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = _generate_noise(
                    std=std, reference=p.summed_grad, generator=self.generator, secure_mode=self.secure_mode
                )
                p.grad = p.summed_grad.add_(noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    return BookkeepingDPOptimizer


def make_private_bookkeeping(engine: Any, kw: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Like Opacus' `make_private` for book-keeping clipping: the model wrapped in `BookkeepingModule`, Opacus'
    fast-gradient-clipping DP optimizer (`_optimizer_class`) with the engine's accountant hooked to its steps,
    and the data loader (Poisson when asked)."""
    from opacus.data_loader import DPDataLoader

    module, optimizer, loader = kw["module"], kw["optimizer"], kw["data_loader"]
    held = {id(p) for p in module.parameters()}
    if any(id(p) not in held for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("Module parameters are different than optimizer Parameters")
    wrapped = BookkeepingModule(module)
    if kw.get("poisson_sampling", True):
        loader = DPDataLoader.from_data_loader(loader, generator=engine.secure_rng if engine.secure_mode else None)
        wrapped.forbid_grad_accumulation()
    sample_rate = 1 / len(loader)
    dp_opt = _optimizer_class()(
        optimizer,
        noise_multiplier=kw["noise_multiplier"],
        max_grad_norm=kw["max_grad_norm"],
        expected_batch_size=int(len(loader.dataset) * sample_rate),
        loss_reduction=kw.get("loss_reduction", "mean"),
        generator=engine.secure_rng if engine.secure_mode else kw.get("noise_generator"),
        secure_mode=engine.secure_mode,
    )
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return wrapped, dp_opt, loader


def make_private(engine: Any, kw: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Book-keeping clipping when every trainable layer is handled; otherwise Opacus' hooks for the whole model,
    with a warning that says so (never silently)."""
    bad = unsupported_layers(kw["module"])
    if bad:
        warnings.warn(fallback_note(bad), UserWarning, stacklevel=3)
        gsm, opt, dl = engine.make_private(**{**kw, "grad_sample_mode": "hooks"})
        return gsm, opt, dl
    return make_private_bookkeeping(engine, kw)


def loss(module: Any, optimizer: Any, per_example: torch.Tensor) -> Any:
    """The loss the loop backpropagates: book-keeping's, or the per-example mean when the model fell back."""
    if isinstance(module, BookkeepingModule):
        return BookkeepingLoss(module, optimizer, per_example)
    return per_example.mean()


def empty_grad(p: Any) -> None:
    """An empty batch's gradient for either optimizer (fast-gradient-clipping reads .grad, hooks .grad_sample)."""
    p.grad = torch.zeros_like(p)
    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
