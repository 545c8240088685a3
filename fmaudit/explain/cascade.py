"""Cascading model-parameter randomization (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

The layers of a COPY of the model are re-initialized from the top (logits) down, one named layer group at a
time and cumulatively; after each step the attributions are recomputed and compared with the trained model's.

- Layer groups: when the model has repeated blocks (the largest `nn.ModuleList`: transformer layers), each
  block is one group and every other module with parameters outside them (embeddings, final norm, pooler,
  classification / LM head) is one group. Without blocks (the digits CNN, plain `python:` models) every module
  that owns parameters (each conv / linear / norm layer) is one group. Groups are ordered by when the forward
  pass first calls them (registration order as a fallback); groups the forward pass never calls are listed
  and skipped (re-initializing them cannot change anything).
- Shared parameters are untied in the copy first (a tied LM head and input embedding become two tensors with
  the same values), so re-initializing the head leaves the input embeddings alone.
- Re-initialization per module that owns parameters: the Hugging Face model's own `_init_weights` when the
  model is (or wraps) a `PreTrainedModel`, else the layer's `reset_parameters()`; a parameter neither touched
  is re-drawn by a documented fallback (1-D `bias` -> 0, 1-D `weight` -> 1, others N(0, 0.02)).

The check itself (attributions recomputed after each step and compared) is `randomization.py`; the similarity
measures are `similarity.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerGroup:
    name: str
    owners: list[Any]  # modules whose own (direct) parameters belong to the group
    num_parameters: int = 0
    kind: str = ""  # class name of the group's module
    init: list[str] = field(default_factory=list)  # how each owner was re-initialized


# ---------------------------------------------------------------------------------------------------
# untying


def untie_parameters(model: Any) -> list[dict[str, str]]:
    """Give every module its own tensor for each parameter it shares with a module seen earlier (a tied LM
    head and input embedding, ALBERT-style shared layers). Values are unchanged; the sharing is gone. The
    Hugging Face config is told so (`tie_word_embeddings = False`) so nothing re-ties them later."""
    from torch import nn

    seen: dict[int, str] = {}
    untied: list[dict[str, str]] = []
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen:
                mod._parameters[pname] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                untied.append({"kept": seen[id(p)], "untied": full})
            else:
                seen[id(p)] = full
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return untied


# ---------------------------------------------------------------------------------------------------
# layer groups


def _has_own_params(mod: Any) -> bool:
    return any(p is not None for p in mod._parameters.values())


def _block_list(model: Any) -> Any | None:
    from torch import nn

    best = None
    for mod in model.modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) > 0
            and any(True for _ in mod.parameters())
            and (best is None or len(mod) > len(best))
        ):
            best = mod
    return best


def layer_groups(model: Any) -> list[LayerGroup]:
    """Named layer groups in registration order (see the module docstring)."""
    blocks = _block_list(model)
    groups: list[LayerGroup] = []

    def owners(mod: Any) -> list[Any]:
        return [m for m in mod.modules() if _has_own_params(m)]

    def visit(mod: Any, name: str) -> None:
        if blocks is not None and mod is blocks:
            for cname, child in mod.named_children():
                groups.append(
                    LayerGroup(f"{name}.{cname}" if name else cname, owners(child), kind=type(child).__name__)
                )
            return
        contains = blocks is not None and any(m is blocks for m in mod.modules())
        if blocks is not None and not contains:
            if any(True for _ in mod.parameters()):
                groups.append(LayerGroup(name or "(model)", owners(mod), kind=type(mod).__name__))
            return
        if _has_own_params(mod):
            if contains:  # a container of the blocks that also owns parameters: those alone are one group
                groups.append(LayerGroup(f"{name or '(model)'} (own parameters)", [mod], kind=type(mod).__name__))
            else:  # no blocks anywhere: a layer (and whatever it contains) is one group
                groups.append(LayerGroup(name or "(model)", owners(mod), kind=type(mod).__name__))
                return
        for cname, child in mod.named_children():
            visit(child, f"{name}.{cname}" if name else cname)

    visit(model, "")
    for g in groups:
        g.num_parameters = sum(p.numel() for o in g.owners for p in o._parameters.values() if p is not None)
    return groups


def forward_order(model: Any, groups: list[LayerGroup], probe: Callable[[], Any]) -> tuple[list[LayerGroup], list[str]]:
    """Groups sorted by when the forward pass (`probe()`) first runs one of their modules; returns the used
    groups (bottom first) and the names of the groups it never runs."""
    import torch

    first: dict[int, int] = {}
    counter = [0]
    handles = []
    for gi, g in enumerate(groups):
        for o in g.owners:

            def hook(_m, _inp, gi=gi):
                if gi not in first:
                    first[gi] = counter[0]
                counter[0] += 1

            handles.append(o.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in handles:
            h.remove()
    used = sorted(first, key=lambda gi: first[gi])
    return [groups[gi] for gi in used], [g.name for gi, g in enumerate(groups) if gi not in first]


# ---------------------------------------------------------------------------------------------------
# re-initialization


def hf_model(model: Any) -> Any | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    return None


def reinitialize(group: LayerGroup, hf: Any | None) -> None:
    """Re-initialize every parameter of the group in place (global torch RNG: seed it around the call)."""
    import torch

    inits = []
    with torch.no_grad():
        for o in group.owners:
            params = {n: p for n, p in o._parameters.items() if p is not None}
            before = {n: p.detach().clone() for n, p in params.items()}
            how = None
            if hf is not None:
                hf._init_weights(o)
                if any(not torch.equal(before[n], p) for n, p in params.items()):
                    how = "_init_weights"
            if how is None and callable(getattr(o, "reset_parameters", None)):
                o.reset_parameters()
                if any(not torch.equal(before[n], p) for n, p in params.items()):
                    how = "reset_parameters"
            fallback = []
            for n, p in params.items():
                if torch.equal(before[n], p) and (how is None or p.dim() >= 2):
                    if p.dim() == 1 and n.endswith("bias"):
                        p.zero_()
                    elif p.dim() == 1 and n.endswith("weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02)
                    fallback.append(n)
            if how is None and all(torch.equal(before[n], p) for n, p in params.items()):
                how = "already at its initial values"  # e.g. an untrained norm layer: ones and zeros
            extra = f" (+fallback {fallback})" if how and fallback else ""
            inits.append(f"{type(o).__name__}: {how or 'fallback'}{extra}")
    group.init = inits
