"""Pre-flight check of a model for DP-SGD (Opacus' ModuleValidator plus our own), run on a copy before
training so that every problem is listed at once, and the resolution of clipping="auto": book-keeping clipping
(one backward pass) when it handles every trainable layer, else ghost clipping (two), else (trainable tensors
shared between modules) per-sample gradient hooks."""

from __future__ import annotations

from typing import Any

from fmaudit.privacy.dp.errors import DPConfigError
from fmaudit.privacy.dp.trainable import apply_trainable


def preflight(
    target: Any,
    *,
    trainable: str = "all",
    n_layers: int = 2,
    lora: dict[str, Any] | None = None,
    clipping: str = "auto",
) -> tuple[list[str], list[str], str]:
    """Check that DP-SGD can train `target` as asked, without changing it.

    Returns (problems, notes, clipping_mode): problems block training; notes are informational;
    clipping_mode is "ghost", "bookkeeping" or "hooks" (what will run: `clipping="auto"` resolves to
    book-keeping, or ghost for layers book-keeping does not cover, and an explicit "bookkeeping" falls back to
    hooks for them).
    """
    import inspect

    notes: list[str] = []
    work = target.copy()
    try:
        apply_trainable(work, trainable, n_layers, lora)
    except DPConfigError as exc:
        return list(exc.problems), notes, "hooks"
    except Exception as exc:  # TargetError (e.g. no trainable parameter), peft errors
        return [f"trainable={trainable!r}: {exc}"], notes, "hooks"
    model = work.model
    problems: list[str] = []
    if not any(p.requires_grad for p in model.parameters()):
        problems.append(f"trainable={trainable!r} leaves no trainable parameter")
    problems += _layer_problems(model)

    # BERT-style position embeddings need explicit position_ids (ENVIRONMENT.md).
    fwd = inspect.signature(model.forward).parameters
    if "position_ids" in fwd and hasattr(work, "_pass_position_ids") and not work._pass_position_ids:
        problems.append(
            "the model takes position_ids but the target does not pass them; per-sample gradients of "
            "position embeddings need them (built with arange().repeat())"
        )

    from fmaudit.privacy.dp.bookkeeping import fallback_note, unsupported_layers

    bad = unsupported_layers(model)
    mode = clipping
    if clipping == "auto":
        mode = "ghost" if bad else "bookkeeping"
    tied = _tied_trainable(model)
    if tied:
        msg = (
            f"trainable parameters shared between modules ({'; '.join(tied[:3])}): ghost clipping computes "
            "per-module norms and would clip them wrongly"
        )
        if clipping == "ghost":
            problems.append(msg + "; use clipping='hooks' or freeze them (trainable='lora')")
        elif mode == "ghost":
            notes.append(msg + "; using per-sample gradient hooks")
            mode = "hooks"
    if clipping == "bookkeeping" and bad:
        notes.append(fallback_note(bad))
        mode = "hooks"
    if clipping == "auto" and mode == "bookkeeping":
        notes.append("book-keeping clipping (one backward pass; per-example norms from the layers' stored tensors)")
    elif clipping == "auto" and mode == "ghost":
        notes.append(
            f"ghost clipping (two backward passes): book-keeping does not cover {len(bad)} trainable layer(s) "
            f"({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''})"
        )
    return problems, notes, mode


def _layer_problems(model: Any) -> list[str]:
    """Layers DP-SGD cannot train: Opacus' validators (BatchNorm, InstanceNorm with running stats, LSTM...), run
    per module so the message can name the layers, and trainable layers holding buffers."""
    from opacus.validators import ModuleValidator
    from torch import nn

    # BatchNorm is reported even when frozen: in training mode it still mixes the examples of a batch, so one
    # example's clipped gradient depends on the others.
    problems: list[str] = []
    by_kind: dict[str, list[str]] = {}
    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    for name, m in model.named_modules():
        trainable_here = any(p.requires_grad for p in m.parameters(recurse=False))
        errs = []
        if isinstance(m, batchnorms):
            errs = ["BatchNorm"]
        elif trainable_here and type(m) in ModuleValidator.VALIDATORS:
            errs = ModuleValidator.VALIDATORS[type(m)](m)
        if errs:
            by_kind.setdefault(type(m).__name__, []).append(name or "<root>")
    for kind, where in by_kind.items():
        if "BatchNorm" in kind:
            fix = (
                "replace them with GroupNorm (opacus.validators.ModuleValidator.fix(model) does this) or "
                "LayerNorm, and train the non-private baseline the same way"
            )
        else:
            fix = (
                "replace them with Opacus' DP layers (opacus.validators.ModuleValidator.fix(model)), or freeze "
                "them (trainable='last_n_layers' / 'lora')"
            )
        problems.append(
            f"unsupported layers for DP-SGD: {len(where)} {kind} "
            f"({', '.join(where[:6])}{', ...' if len(where) > 6 else ''}): {fix}"
        )
    # Trainable layers holding buffers (GradSampleModule.validate: buffers are not private).
    reported = {n for where in by_kind.values() for n in where}
    for name, m in model.named_modules():
        if name in reported or not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        bufs = [b for b, _ in m.named_buffers(recurse=False)]
        if bufs and not isinstance(m, nn.Embedding):
            problems.append(
                f"trainable layer {name} ({type(m).__name__}) holds buffers {bufs[:3]} that DP-SGD "
                "does not protect: freeze it (trainable='last_n_layers' / 'lora') or remove the buffers"
            )
    return problems


def _tied_trainable(model: Any) -> list[str]:
    """Trainable parameters held by more than one module, as "a.weight = b.weight"."""
    ids: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None and p.requires_grad:
                ids.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return [" = ".join(v) for v in ids.values() if len(v) > 1]
