"""The errors and the warning that DP fine-tuning raises (a leaf: every other dp module may import it)."""

from __future__ import annotations

from collections.abc import Sequence


class DPConfigError(ValueError):
    """Invalid DP settings or a model / dataset that DP-SGD cannot train; lists every problem found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"DP fine-tuning cannot start ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}):\n{lines}"
        )


class DPPrivacyWarning(UserWarning):
    """A setting that weakens the privacy guarantee (e.g. delta >= 1/N)."""


class DPTrainingError(RuntimeError):
    """DP training ran but did not train what it was asked to: trainable tensors that did not move."""

    def __init__(self, stuck: Sequence[str], steps: int):
        self.tensors = list(stuck)
        shown = "; ".join(self.tensors[:8]) + (f"; ... ({len(self.tensors)} in all)" if len(self.tensors) > 8 else "")
        super().__init__(
            f"DP training took {steps} noisy steps, but {len(self.tensors)} trainable tensor"
            f"{'s' if len(self.tensors) != 1 else ''} did not move: {shown}. Every trainable tensor gets clipped "
            "gradient plus noise at each step, so an unchanged one means its updates went to another tensor: "
            "typically the model's parameters were replaced after the optimizer and Opacus' hooks captured them "
            "(lazy device placement; PEFT + Opacus, opacus#820: move the model to its device before "
            "get_peft_model). The trained model would be the starting model while epsilon was spent; nothing is "
            "returned."
        )
