"""Target tasks and the capabilities each one gives audit modules (no heavy imports here)."""

from __future__ import annotations

from typing import Literal

TEXT_CLASSIFICATION = "text-classification"
CAUSAL_LM = "causal-lm"
IMAGE_CLASSIFICATION = "image-classification"

TASKS: tuple[str, ...] = (TEXT_CLASSIFICATION, CAUSAL_LM, IMAGE_CLASSIFICATION)
# The same names as a type, for schemas (tests/test_tasks.py keeps the two in step).
ModelTask = Literal["text-classification", "causal-lm", "image-classification"]

# What a target of each task can do. Audit modules state what they need in `requires`.
CAPABILITIES: dict[str, frozenset[str]] = {
    TEXT_CLASSIFICATION: frozenset({"text", "classifier", "logits", "per_example_loss", "trainable", "embeddings"}),
    IMAGE_CLASSIFICATION: frozenset({"image", "classifier", "logits", "per_example_loss", "trainable"}),
    CAUSAL_LM: frozenset({"text", "causal_lm", "token_logprobs", "per_example_loss", "generate", "trainable"}),
}

# Which dataset modality each task consumes.
MODALITY: dict[str, str] = {TEXT_CLASSIFICATION: "text", CAUSAL_LM: "text", IMAGE_CLASSIFICATION: "image"}

BUNDLED_MODELS: dict[str, str] = {
    "bundled:minilm": TEXT_CLASSIFICATION,
    "bundled:smollm2": CAUSAL_LM,
    "bundled:digits-cnn": IMAGE_CLASSIFICATION,
    "bundled:digits-vit": IMAGE_CLASSIFICATION,
}

BUNDLED_DATA: tuple[str, ...] = ("bundled:tweets", "bundled:digits")
