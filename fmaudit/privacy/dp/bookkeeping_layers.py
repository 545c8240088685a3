"""Per-layer rules of book-keeping clipping (Bu et al., "Differentially Private Optimization on Large Model at
Small Cost", ICML 2023), as a registry by layer type: LAYER_RULES[nn.Linear] etc.

Each rule runs its layer through one autograd function that computes the layer's output and, in the backward
pass, the gradient of the layer's INPUT only (autograd never forms the weight gradient), and records the layer's
input and output gradient (its "book"). After the one backward pass, from the book alone:

- `norms(layer, calls, grams)`: each example's squared gradient norm over the layer's trainable tensors, as (B,)
  plus a state (`grams`: activation Gram matrices of this backward pass by input memory, so that layers reading
  the same input, e.g. attention's query / key / value, share one). Linear and Conv2d use the ghost norm, ||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s), where it
  costs less than instantiating the per-example gradient (T (p + d) <= p d for T positions, d inputs, p outputs),
  else instantiate (the paper's hybrid); Embedding uses the ghost norm with token equality in place of a_t . a_s;
  LayerNorm instantiates (its per-example gradients are only 2 x width).
- `grads(layer, state, c)`: the clipped sum sum_i c_i grad_i for per-example factors c, as the layer's ordinary
  weight gradient with each example's output gradient scaled by c_i (one matmul / index_add / conv backward, the
  cost of a non-DP weight gradient), or c-weighted per-example gradients where they were instantiated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Call = tuple[Any, torch.Tensor]  # (what the forward saved, the output gradient) for one call of a layer
Grads = dict[str, torch.Tensor]  # parameter name on the layer ("weight", "bias") -> clipped summed gradient
Grams = dict[tuple, tuple[torch.Tensor, torch.Tensor]]  # activation Gram matrices of one backward pass (`_gram`)


class _Tap(torch.autograd.Function):
    """out = rule.run(layer, x); backward: the input gradient only, and (saved, g) appended to the layer's book.
    The trainable tensors are inputs so that the output requires grad; their gradient is returned as None."""

    @staticmethod
    def forward(
        ctx: Any, rule: LayerRule, layer: nn.Module, book: list[Call], x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        out, saved = rule.run(layer, x)
        ctx.rule, ctx.layer, ctx.book, ctx.saved, ctx.n_params = rule, layer, book, saved, len(params)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        ctx.book.append((ctx.saved, g))
        gx = ctx.rule.input_grad(ctx.layer, ctx.saved, g) if ctx.needs_input_grad[3] else None
        return (None, None, None, gx, *([None] * ctx.n_params))


def tap(rule: LayerRule, layer: nn.Module, book: list[Call], x: torch.Tensor) -> torch.Tensor:
    """Run `layer` on `x` through the rule's autograd function (its trainable tensors as inputs)."""
    params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
    return _Tap.apply(rule, layer, book, x, *params)


def _trainable(layer: nn.Module, name: str) -> bool:
    p = getattr(layer, name, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


def _ghost(a: torch.Tensor, g: torch.Tensor, aa: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{t,s} (a_t . a_s)(g_t . g_s) per example, for a: (B, T, d), g: (B, T, p): ||g^T a||_F^2 without it
    (`aa`: a a^T when already known)."""
    aa = torch.bmm(a, a.transpose(1, 2)) if aa is None else aa
    return (aa * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def _gram(a: torch.Tensor, grams: Grams) -> torch.Tensor:
    """a a^T per example, shared through `grams` between layers that read the same memory as input. The entry
    holds `a` itself, so its memory cannot be freed and reused by another input while the entry exists."""
    key = (a.data_ptr(), tuple(a.shape), tuple(a.stride()), a.dtype)
    if key not in grams:
        grams[key] = (a, torch.bmm(a, a.transpose(1, 2)))
    return grams[key][1]


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def use_ghost(positions: int, d: int, p: int) -> bool:
    """The hybrid's choice: ghost norm when its cost, T^2 (d + p) per example, is at most instantiation's, T d p."""
    return positions * (d + p) <= d * p


@dataclass(frozen=True)
class LayerRule:
    """How book-keeping clipping handles one layer type (see the module docstring). `unsupported(layer)` is why a
    layer of this type cannot be handled (None when it can): such a layer sends the model to Opacus' hooks."""

    run: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]]
    input_grad: Callable[[Any, Any, torch.Tensor], torch.Tensor | None]
    norms: Callable[[Any, list[Call], Grams], tuple[torch.Tensor, Any]]
    grads: Callable[[Any, Any, torch.Tensor], Grads]
    unsupported: Callable[[Any], str | None]


# --- Linear: x (B, ..., d) -> (B, ..., p) -----------------------------------------------------------------------


def _linear_run(layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return F.linear(x, layer.weight, layer.bias), x


def _linear_input_grad(layer: nn.Linear, _x: Any, g: torch.Tensor) -> torch.Tensor:
    return g.matmul(layer.weight)


def _linear_norms(layer: nn.Linear, calls: list[Call], grams: Grams) -> tuple[torch.Tensor, Any]:
    b, d, p = calls[0][1].shape[0], layer.in_features, layer.out_features
    a = _cat([x.reshape(b, -1, d) for x, _ in calls], 1).to(calls[0][1].dtype)
    g = _cat([go.reshape(b, -1, p) for _, go in calls], 1)
    sq = torch.zeros(b, dtype=g.dtype, device=g.device)
    per_example = None
    if _trainable(layer, "weight"):
        if use_ghost(a.shape[1], d, p):
            sq += _ghost(a, g, _gram(a, grams))
        else:
            per_example = torch.bmm(g.transpose(1, 2), a)  # (B, p, d), kept for the clipped sum
            sq += per_example.pow(2).sum((1, 2))
    bias_per_example = g.sum(1) if _trainable(layer, "bias") else None
    if bias_per_example is not None:
        sq += bias_per_example.pow(2).sum(1)
    return sq, (a, g, per_example, bias_per_example)


def _linear_grads(layer: nn.Linear, state: Any, c: torch.Tensor) -> Grads:
    a, g, per_example, bias_per_example = state
    out: Grads = {}
    if _trainable(layer, "weight"):
        if per_example is not None:
            out["weight"] = torch.einsum("b,bpd->pd", c, per_example)
        else:
            gc = g * c[:, None, None]
            out["weight"] = gc.reshape(-1, g.shape[-1]).t().matmul(a.reshape(-1, a.shape[-1]))
    if bias_per_example is not None:
        out["bias"] = c.matmul(bias_per_example)
    return out


# --- Embedding: ids (B, ...) -> (B, ..., d) --------------------------------------------------------------------


def _embedding_unsupported(layer: nn.Embedding) -> str | None:
    if layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse:
        return "an Embedding with max_norm, scale_grad_by_freq or sparse gradients"
    return None


def _embedding_run(layer: nn.Embedding, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return F.embedding(ids, layer.weight, layer.padding_idx), ids


def _embedding_norms(layer: nn.Embedding, calls: list[Call], _grams: Any) -> tuple[torch.Tensor, Any]:
    b, d = calls[0][1].shape[0], layer.embedding_dim
    ids = _cat([i.reshape(b, -1) for i, _ in calls], 1)
    g = _cat([go.reshape(b, -1, d) for _, go in calls], 1)
    if layer.padding_idx is not None:  # the padding row gets no gradient (as in F.embedding's backward)
        g = g * (ids != layer.padding_idx).unsqueeze(-1).to(g.dtype)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    return (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)), (ids, g)


def _embedding_grads(layer: nn.Embedding, state: Any, c: torch.Tensor) -> Grads:
    ids, g = state
    w = layer.weight
    gc = (g * c[:, None, None]).reshape(-1, w.shape[1])
    return {"weight": torch.zeros_like(w).index_add_(0, ids.reshape(-1), gc)}


# --- LayerNorm: x (B, ..., *shape) -> same ---------------------------------------------------------------------


def _layernorm_run(layer: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    out, mean, rstd = torch.native_layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
    return out, (x, mean, rstd)


def _layernorm_input_grad(layer: nn.LayerNorm, saved: Any, g: torch.Tensor) -> torch.Tensor:
    x, mean, rstd = saved
    return torch.ops.aten.native_layer_norm_backward(
        g, x, list(layer.normalized_shape), mean, rstd, layer.weight, layer.bias, [True, False, False]
    )[0]


def _layernorm_norms(layer: nn.LayerNorm, calls: list[Call], _grams: Any) -> tuple[torch.Tensor, Any]:
    b, shape = calls[0][1].shape[0], tuple(layer.normalized_shape)
    per_example: dict[str, torch.Tensor] = {}
    for (x, mean, rstd), g in calls:
        parts = {}
        if _trainable(layer, "weight"):
            parts["weight"] = (g * ((x - mean) * rstd)).reshape(b, -1, *shape).sum(1)
        if _trainable(layer, "bias"):
            parts["bias"] = g.reshape(b, -1, *shape).sum(1)
        for k, v in parts.items():
            per_example[k] = per_example[k] + v if k in per_example else v
    sq = torch.stack([v.reshape(b, -1).pow(2).sum(1) for v in per_example.values()]).sum(0)
    return sq, per_example


def _layernorm_grads(_layer: nn.LayerNorm, per_example: Any, c: torch.Tensor) -> Grads:
    return {k: torch.tensordot(c, v, dims=1) for k, v in per_example.items()}


# --- Conv2d: x (B, C, H, W) -> (B, P, H', W') ------------------------------------------------------------------


def _conv_unsupported(layer: nn.Conv2d) -> str | None:
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return "a Conv2d with groups, a padding mode other than zeros, or string padding"
    return None


def _padding(layer: nn.Conv2d) -> tuple[int, ...]:
    """The conv's padding as ints (string padding is unsupported: `_conv_unsupported`)."""
    return tuple(int(v) for v in layer.padding)


def _conv_run(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups), x


def _conv_backward(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, mask: list[bool]) -> tuple[Any, ...]:
    bias_sizes = [layer.out_channels] if layer.bias is not None else None
    return torch.ops.aten.convolution_backward(
        g,
        x,
        layer.weight,
        bias_sizes,
        list(layer.stride),
        list(_padding(layer)),
        list(layer.dilation),
        False,
        [0, 0],
        layer.groups,
        mask,
    )


def _conv_input_grad(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _conv_backward(layer, x, g, [True, False, False])[0]


def _conv_norms(layer: nn.Conv2d, calls: list[Call], _grams: Any) -> tuple[torch.Tensor, Any]:
    b, p = calls[0][1].shape[0], layer.out_channels
    g = _cat([go.reshape(b, p, -1) for _, go in calls], 2).transpose(1, 2)  # (B, L, P)
    sq = torch.zeros(b, dtype=g.dtype, device=g.device)
    per_example = None
    if _trainable(layer, "weight"):
        a = _cat(
            [F.unfold(x, layer.kernel_size, layer.dilation, _padding(layer), layer.stride) for x, _ in calls], 2
        ).transpose(1, 2)  # (B, L, C k k)
        if use_ghost(a.shape[1], a.shape[2], p):
            sq += _ghost(a, g)
        else:
            per_example = torch.bmm(g.transpose(1, 2), a)  # (B, P, C k k)
            sq += per_example.pow(2).sum((1, 2))
    bias_per_example = g.sum(1) if _trainable(layer, "bias") else None
    if bias_per_example is not None:
        sq += bias_per_example.pow(2).sum(1)
    return sq, (list(calls), per_example, bias_per_example)  # a copy: the book is cleared after the norms


def _conv_grads(layer: nn.Conv2d, state: Any, c: torch.Tensor) -> Grads:
    calls, per_example, bias_per_example = state
    out: Grads = {}
    if _trainable(layer, "weight"):
        if per_example is not None:
            out["weight"] = torch.einsum("b,bpk->pk", c, per_example).reshape(layer.weight.shape)
        else:  # the conv's own weight gradient, each example's output gradient scaled by its factor
            cc = c[:, None, None, None]
            out["weight"] = sum(_conv_backward(layer, x, g * cc, [False, True, False])[1] for x, g in calls)
    if bias_per_example is not None:
        out["bias"] = c.matmul(bias_per_example)
    return out


def _none(_layer: Any) -> None:
    return None


def _no_input_grad(_layer: Any, _saved: Any, _g: torch.Tensor) -> None:
    return None


LAYER_RULES: dict[type, LayerRule] = {
    nn.Linear: LayerRule(_linear_run, _linear_input_grad, _linear_norms, _linear_grads, _none),
    nn.Embedding: LayerRule(_embedding_run, _no_input_grad, _embedding_norms, _embedding_grads, _embedding_unsupported),
    nn.LayerNorm: LayerRule(_layernorm_run, _layernorm_input_grad, _layernorm_norms, _layernorm_grads, _none),
    nn.Conv2d: LayerRule(_conv_run, _conv_input_grad, _conv_norms, _conv_grads, _conv_unsupported),
}


def rule_for(layer: nn.Module) -> LayerRule | None:
    """The rule for `layer`: its type's, or a registered base type's when the subclass keeps the base forward."""
    for kind in type(layer).__mro__:
        rule = LAYER_RULES.get(kind)
        if rule is not None:
            return rule if type(layer).forward is kind.__dict__.get("forward") else None
    return None
