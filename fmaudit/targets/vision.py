"""Image targets: any model that maps [0, 1] pixels to logits, with normalization inside the wrapper
so attacks and attributions work in pixel space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fmaudit.data import Dataset
from fmaudit.targets.base import ClassifierTarget, TargetError
from fmaudit.tasks import IMAGE_CLASSIFICATION


class PixelClassifier(nn.Module):
    """[0, 1] pixels (N, C, H, W) -> one (N, num_classes) logits tensor.

    Normalizes with (mean, std) and resizes to the model's input size inside the forward pass, and
    unwraps Hugging Face outputs (`.logits`), so torchattacks, Captum and Opacus see a plain classifier.
    """

    def __init__(
        self,
        inner: nn.Module,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int | None = None,
        hf: bool = False,
    ):
        super().__init__()
        self.inner = inner
        self.hf = hf
        self.image_size = image_size
        if (mean is None) != (std is None):
            raise TargetError("give both normalization mean and std, or neither")
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        else:
            self.mean = None
            self.std = None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        if self.mean is not None:
            x = (x - self.mean) / self.std
        out = self.inner(pixel_values=x) if self.hf else self.inner(x)
        return out.logits if hasattr(out, "logits") else out


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        self.images = torch.as_tensor(images, dtype=torch.float32)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"pixels": self.images[i]}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


class ImageClassifier(ClassifierTarget):
    """HF image classifiers (ViT and others) and plain torch modules, behind a PixelClassifier."""

    task = IMAGE_CLASSIFICATION

    def __init__(
        self,
        *,
        name: str,
        model: PixelClassifier,
        source: str,
        kind: str = IMAGE_CLASSIFICATION,
        device: str = "cpu",
        label_names: list[str] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__(name=name, model=model, source=source, device=device, label_names=label_names)
        self.kind = kind
        self._num_classes = num_classes

    @property
    def num_labels(self) -> int | None:
        cfg = getattr(self.model.inner, "config", None)
        if cfg is not None and getattr(cfg, "num_labels", None):
            return int(cfg.num_labels)
        return self._num_classes or (len(self.label_names) if self.label_names else None)

    @property
    def architecture(self) -> str:
        return type(self.model.inner).__name__

    @property
    def normalized_inside(self) -> bool:
        return self.model.mean is not None

    def head_modules(self) -> list[nn.Module]:
        inner = self.model.inner
        assert isinstance(inner, nn.Module)
        prefix = getattr(inner, "base_model_prefix", None)
        if prefix and hasattr(inner, prefix):
            base = getattr(inner, prefix)
            return [m for _, m in inner.named_children() if m is not base]
        linears: list[nn.Module] = [m for m in inner.modules() if isinstance(m, nn.Linear)]
        return linears[-1:]

    def torch_dataset(self, data: Dataset) -> torch.utils.data.Dataset:
        if data.images is None:
            raise TargetError(f"dataset {data.name!r} has no images; an image target needs image data")
        return _ImageDataset(data.images, data.labels)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"pixels": torch.stack([it["pixels"] for it in items])}
        if items and "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return batch

    def forward_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["pixels"])

    def logits_images(self, images: torch.Tensor | np.ndarray, batch_size: int = 128) -> np.ndarray:
        from fmaudit.batching import batched_forward

        x = torch.as_tensor(images, dtype=torch.float32)
        if len(x) == 0:
            return np.zeros((0, self.num_labels or 0))
        self.model.eval()
        return batched_forward(self.model, x, batch_size, device=self.device, dtype=torch.float64).numpy()


def digits_cnn(num_labels: int = 10, in_channels: int = 1) -> nn.Module:
    """The bundled small CNN for 8x8 digits (about 20k parameters)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, num_labels),
    )


def digits_vit_config(num_labels: int = 10, image_size: int = 8, channels: int = 1) -> Any:
    """A small ViT for 8x8 digits (HF ViTForImageClassification, built from this config)."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=image_size,
        patch_size=2,
        num_channels=channels,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
