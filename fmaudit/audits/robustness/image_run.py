"""What the image modules (robustness.image_attack, robustness.certify) start a run with: the seeded example
sample as float32 pixels and int64 labels, the model on the device it actually lives on, the
`evaluated_on` table, and eval mode that puts the model's training flag and parameter gradients back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmaudit.audits.base import AuditContext, select_examples


@dataclass(frozen=True)
class ImageRun:
    """The examples a run works on and where the model is (read from its parameters: a target's `device`
    string can be stale, and attacks fix their device when built, so they are built after this)."""

    data: Any  # the chosen examples (a Dataset)
    choice: Any  # which subset `select_examples` chose
    model: Any
    device: Any
    n_classes: int
    x: Any  # (N, C, H, W) float32 torch tensor, pixels in [0, 1]
    y: np.ndarray  # (N,) int64 labels

    def evaluated_on(self, ctx: AuditContext, target: Any) -> dict[str, Any]:
        """The `evaluated_on` table both modules report."""
        return {
            "dataset": ctx.require_data().name,
            "subset": self.choice,
            "num_examples": len(self.x),
            "num_classes": self.n_classes,
            "image_shape": list(self.x.shape[1:]),
            "normalization_inside_model": bool(target.normalized_inside),
            "device": str(self.device),
            "ids": list(self.data.ids),
        }


def prepare_images(target: Any, ctx: AuditContext, *, split: str, num_examples: int) -> ImageRun:
    """The seeded sample of at most `num_examples` examples of `split`, and the model where it is now."""
    import torch

    from fmaudit.robustness.devices import model_device

    data, choice = select_examples(ctx, split, num_examples)
    model = target.model
    return ImageRun(
        data=data,
        choice=choice,
        model=model,
        device=model_device(model, target.device),
        n_classes=int(target.num_labels),
        x=torch.as_tensor(np.ascontiguousarray(data.images), dtype=torch.float32),
        y=np.asarray(data.labels, dtype=np.int64),
    )


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """The model in eval mode for the block; afterwards its training flag and every parameter's `.grad` as
    they were (CW, DeepFool, FAB and the smoothing attack call `.backward()`, which fills `.grad`; freezing
    the parameters instead was measured ~15% slower for AutoAttack)."""
    was_training = model.training
    saved_grads = [(q, q.grad) for q in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        for q, g in saved_grads:
            q.grad = g
        model.train(was_training)
