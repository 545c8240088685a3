"""What can stop a target or a run before a module runs, and how it is reported (cause, next step)."""

from __future__ import annotations

import traceback
from typing import Any

from fmaudit.report import ErrorInfo


class PreparationError(ValueError):
    """Data or a model could not be prepared as the recipe asks (an input problem: exit 2)."""


class TargetUnavailable(RuntimeError):
    """A recipe target failed to load or fine-tune in this run: the units that need it are errors
    (exit 3), the others still run. `info` holds the one-line cause, the next step and the traceback."""

    def __init__(self, name: str, info: ErrorInfo):
        super().__init__(info.message)
        self.name = name
        self.info = info


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join((str(exc) or type(exc).__name__).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def target_error_info(name: str, spec: Any, phase: str, exc: BaseException) -> ErrorInfo:
    """The report entry for a target that could not be prepared: one-line cause and the next step."""
    if isinstance(exc, TargetUnavailable):
        return exc.info
    cause = one_line(exc)
    if phase == "load":
        message = f"target {name!r} could not be loaded from {spec.model}: {cause}"
        hint = (
            "check the checkpoint: config.json, complete weights (model.safetensors / pytorch_model.bin, not "
            "truncated), and tokenizer files for text models; re-save it with save_pretrained and run "
            "`fmaudit validate` again"
        )
    elif phase == "finetune":
        data = spec.finetune.data if spec.finetune is not None else "?"
        message = f"target {name!r} failed while fine-tuning on {data!r}: {cause}"
        hint = (
            "check that the data matches what the model expects (image channels: `grayscale: true` for "
            "1-channel models; image size; vocabulary; num_labels), then re-run with --resume"
        )
    else:
        message = f"target {name!r} could not be prepared: {cause}"
        hint = "fix the target or its data in the recipe, then re-run with --resume"
    return ErrorInfo(
        type=type(exc).__name__,
        message=message,
        hint=hint,
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=20)),
    )


def run_error_info(exc: BaseException) -> ErrorInfo:
    """The report entry of an exception that stopped the run outside any unit (a bug, or a fault the
    per-unit isolation does not cover)."""
    return ErrorInfo(
        type=type(exc).__name__,
        message=one_line(exc),
        hint="results completed before the failure are kept; re-run with --resume, and report this "
        "with the traceback (`--debug`) if it persists",
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=30)),
    )
