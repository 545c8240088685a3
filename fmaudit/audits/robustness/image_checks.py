"""Pre-flight checks shared by the image modules (robustness.image_attack, robustness.certify): labelled
images in (N, C, H, W), labels within the target's classes, pixels in [0, 1], and a member / non-member
choice that the target's split supports."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def image_data_problems(
    target: Any, data: Any, *, split: str, purpose: str, pixel_hint: str, verb: str = "attack"
) -> list[str]:
    """Problems with `data` for an image module on `target`. `purpose` names what needs labels ("robust
    accuracy"); `pixel_hint` says what to do about pixels outside [0, 1]; `verb` what the module does."""
    if data is None or len(data) == 0:
        return [f"no examples to {verb}"]
    if data.images is None:
        return [f"dataset {data.name!r} has no images"]
    problems: list[str] = []
    if data.labels is None:
        problems.append(f"dataset {data.name!r} has no labels; {purpose} needs them")
    elif target.num_labels is not None and int(data.labels.max()) >= target.num_labels:
        problems.append(
            f"dataset {data.name!r} has labels up to {int(data.labels.max())} but target "
            f"{target.name!r} has {target.num_labels} classes"
        )
    if data.images.ndim != 4:
        problems.append(f"dataset {data.name!r}: images must be (N, C, H, W), got shape {data.images.shape}")
    lo, hi = float(np.min(data.images)), float(np.max(data.images))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        problems.append(
            f"dataset {data.name!r} has pixel values in [{lo:.3g}, {hi:.3g}], outside [0, 1]; " + pixel_hint
        )
    sp = getattr(target, "split", None)
    same = sp is not None and sp.dataset.fingerprint == data.fingerprint
    if split in ("members", "nonmembers") and not same:
        problems.append(f"split: {split} needs a target fine-tuned on dataset {data.name!r}; use split: all")
    return problems
