"""Image classifiers (pixels in [0, 1]): features are pixels, or the model's patches for ViT-style models (the
config's patch_size); the explained output is the logit of the explained class.

Methods (Captum): IntegratedGradients, Saliency, GradientShap, Occlusion (one ViT patch at a time when features
are patches), InputXGradient. A feature's score is the sum of its pixels' attributions over channels.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fmaudit.batching import batched_forward
from fmaudit.explain.space import Attribution, AttributionMethod, ClassifierSpace, Example, NoisyInput, SpaceOptions
from fmaudit.seeds import Stream, derive
from fmaudit.tasks import IMAGE_CLASSIFICATION

if TYPE_CHECKING:
    import torch


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of (N, C, H, W) images over H and W (a common 'uninformative' IG baseline)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(images, dtype=np.float32), sigma=(0, 0, sigma, sigma), mode="nearest")


def patch_grid(target: Any, h: int, w: int) -> tuple[int, int, int, int] | None:
    """ViT-style models: (model patch height, width, grid rows, grid cols) in the model's own input size, from
    its config's `patch_size` / `image_size`; None for models without patches (CNNs, `python:` models)."""
    inner = getattr(target.model, "inner", target.model)
    cfg = getattr(inner, "config", None)
    ps = getattr(cfg, "patch_size", None) if cfg is not None else None
    if not ps:
        return None
    ph, pw = (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))
    size = getattr(target.model, "image_size", None) or getattr(cfg, "image_size", None) or (h, w)
    sh, sw = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return ph, pw, -(-sh // ph), -(-sw // pw)


def patch_feature_map(h: int, w: int, grid: tuple[int, int, int, int], model_size: tuple[int, int]) -> np.ndarray:
    """(h, w) int map: the patch (row-major in the patch grid) each input pixel falls into once the model
    resizes the (h, w) input to `model_size` (pixel centres mapped to the model's input)."""
    ph, pw, rows, cols = grid
    sh, sw = model_size
    r = np.minimum(((np.arange(h) + 0.5) * sh / h // ph).astype(int), rows - 1)
    c = np.minimum(((np.arange(w) + 0.5) * sw / w // pw).astype(int), cols - 1)
    return r[:, None] * cols + c[None, :]


# ---------------------------------------------------------------------------------------------------
# Methods: (space, model, inputs (B, C, H, W), baselines, explained class, seed) -> (attributions, delta | None)


def _integrated_gradients(
    space: ImageSpace, model: Any, x: Any, baseline: Any, target: int | None, seed: int
) -> tuple[Any, float | None]:
    from captum.attr import IntegratedGradients

    a, d = IntegratedGradients(model).attribute(
        x,
        baselines=baseline,
        target=target,
        n_steps=space.options.n_steps,
        internal_batch_size=space.options.internal_batch_size,
        return_convergence_delta=True,
    )
    return a, float(d.abs().max())


def _saliency(
    space: ImageSpace, model: Any, x: Any, baseline: Any, target: int | None, seed: int
) -> tuple[Any, float | None]:
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=target), None


def _gradient_shap(
    space: ImageSpace, model: Any, x: Any, baseline: Any, target: int | None, seed: int
) -> tuple[Any, float | None]:
    import torch
    from captum.attr import GradientShap

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, Stream.ATTRIBUTION_SHAP))
        return GradientShap(model).attribute(
            x,
            baselines=baseline[:1],
            target=target,
            n_samples=space.options.gradient_shap_samples,
            stdevs=space.options.gradient_shap_stdevs,
        ), None


def _occlusion(
    space: ImageSpace, model: Any, x: Any, baseline: Any, target: int | None, seed: int
) -> tuple[Any, float | None]:
    from captum.attr import FeatureAblation, Occlusion

    c, h, w = x.shape[1:]
    per_eval = space.options.internal_batch_size or 1
    if space.patch_occlusion(h, w):
        # one ViT patch at a time (= Occlusion with window = stride = patch when the grid is aligned)
        mask = space.fmap(h, w).view(1, 1, h, w).expand(x.shape[0], c, h, w)
        return FeatureAblation(model).attribute(
            x, baselines=baseline, target=target, feature_mask=mask, perturbations_per_eval=per_eval
        ), None
    win = space.options.occlusion_window or max(1, min(h, w) // 4)
    stride = max(1, win // 2)
    return Occlusion(model).attribute(
        x,
        sliding_window_shapes=(c, win, win),
        strides=(c, stride, stride),
        baselines=baseline,
        target=target,
        perturbations_per_eval=per_eval,
    ), None


def _gradient_x_input(
    space: ImageSpace, model: Any, x: Any, baseline: Any, target: int | None, seed: int
) -> tuple[Any, float | None]:
    from captum.attr import InputXGradient

    return InputXGradient(model).attribute(x, target=target), None


IMAGE_METHODS: dict[str, AttributionMethod] = {
    "integrated_gradients": AttributionMethod("IntegratedGradients", _integrated_gradients),
    "saliency": AttributionMethod("Saliency", _saliency),
    "gradient_shap": AttributionMethod("GradientShap", _gradient_shap),
    "occlusion": AttributionMethod("Occlusion", _occlusion),
    "gradient_x_input": AttributionMethod("InputXGradient", _gradient_x_input),
}
PATCH_OCCLUSION = "FeatureAblation(patch mask: one ViT patch at a time)"


# ---------------------------------------------------------------------------------------------------
# The space


class ImageSpace(ClassifierSpace):
    """Pixel or patch features of an image classifier's input (see the module docstring)."""

    model_task = IMAGE_CLASSIFICATION
    data_field = "images"
    methods = IMAGE_METHODS
    defaults = ("integrated_gradients", "saliency", "gradient_shap", "occlusion")

    def __init__(self, target: Any, options: SpaceOptions, device: Any):
        super().__init__(target, options, device)
        self._fmaps: dict[tuple[int, int], Any] = {}

    def _grid(self, h: int, w: int) -> tuple[int, int, int, int] | None:
        return patch_grid(self.target, h, w) if self.options.image_features != "pixels" else None

    def feature_unit(self, h: int, w: int) -> dict[str, Any]:
        """What a feature of an (h, w) input is: a pixel, or a patch of the model's grid."""
        grid = self._grid(h, w)
        if grid is None:
            return {"unit": "pixel", "num_features": h * w}
        return {
            "unit": "patch",
            "patch_size": [grid[0], grid[1]],
            "grid": [grid[2], grid[3]],
            "num_features": grid[2] * grid[3],
            "source": "the model config's patch_size",
        }

    def fmap(self, h: int, w: int) -> torch.Tensor:
        """Feature id of every pixel (flattened, torch long on the device): pixels, or ViT patches."""
        import torch

        if (h, w) not in self._fmaps:
            grid = self._grid(h, w)
            if grid is None:
                m = np.arange(h * w)
            else:
                size = getattr(self.target.model, "image_size", None) or (grid[0] * grid[2])
                m = patch_feature_map(
                    h,
                    w,
                    grid,
                    (int(size), int(size)) if not isinstance(size, (tuple, list)) else (int(size[0]), int(size[1])),
                ).ravel()
            self._fmaps[(h, w)] = torch.as_tensor(m, dtype=torch.long, device=self.device)
        return self._fmaps[(h, w)]

    def patches(self, h: int, w: int) -> bool:
        return self.feature_unit(h, w)["unit"] == "patch"

    def patch_occlusion(self, h: int, w: int) -> bool:
        """Occlusion removes one patch at a time (patch features and no explicit window)."""
        return self.options.occlusion_window is None and self.patches(h, w)

    def example(self, pos: int, ex_id: str, raw: np.ndarray) -> Example:
        import torch

        x = torch.as_tensor(np.asarray(raw, dtype=np.float32)[None], device=self.device)
        if self.options.image_baseline == "black":
            b = torch.zeros_like(x)
        else:
            b = torch.as_tensor(blurred(raw[None], self.options.blur_sigma), device=self.device)
        fm = self.fmap(*x.shape[-2:])
        return Example(pos=pos, ex_id=ex_id, x=x, baseline=b, n_features=int(fm.max()) + 1)

    def compose(self, ex: Example, keep: Any) -> torch.Tensor:
        import torch

        keep = torch.as_tensor(keep, device=ex.x.device).bool()
        k = keep.shape[0]
        h, w = ex.x.shape[-2:]
        m = keep[:, self.fmap(h, w)].view(k, 1, h, w).to(ex.x.dtype)  # features (pixels / patches) -> pixels
        return ex.x * m + ex.baseline * (1 - m)

    def logits(self, model: Any, ex: Example, x: Any) -> torch.Tensor:
        return batched_forward(model, x, self.options.internal_batch_size or 64)

    def raw(
        self, method: str, model: Any, x: Any, baseline: Any, target: int | None, seed: int = 0
    ) -> tuple[Any, float | None]:
        """The method's attributions of a batch of inputs, in input shape, and IG's convergence delta."""
        return self.method(method).attribute(self, model, x, baseline, target, seed)

    def attribute(self, method: str, model: Any, ex: Example) -> Attribution:
        t0 = time.perf_counter()
        a, delta = self.raw(method, model, ex.x, ex.baseline, ex.explained, seed=ex.pos)
        full = a.detach()[0].double().cpu().numpy()  # (C, H, W)
        fm = self.fmap(*full.shape[-2:]).cpu().numpy()
        feats = np.bincount(fm, weights=full.sum(0).ravel(), minlength=int(fm.max()) + 1)  # per pixel / patch
        return Attribution(method, feats, full, delta, time.perf_counter() - t0)

    def noise_input(self, method: str, model: Any, ex: Example, radius: float, seed: int) -> NoisyInput:
        """Pixels, noise of `radius`; the attributions summed over channels."""

        def explain(inputs: torch.Tensor) -> torch.Tensor:
            a, _ = self.raw(
                method, model, inputs, ex.baseline.expand(inputs.shape[0], -1, -1, -1), ex.explained, seed=seed
            )
            return a.sum(1)

        return NoisyInput(inputs=ex.x, radius=radius, explain=explain, stream=2)

    def captum_name(self, method: str, ex: Example) -> str:
        if method == "occlusion" and self.patch_occlusion(*ex.x.shape[-2:]):
            return PATCH_OCCLUSION
        return super().captum_name(method, ex)

    def describe_baseline(self) -> str:
        return self.options.image_baseline

    def describe_features(self, ex: Example) -> dict[str, Any]:
        return self.feature_unit(*ex.x.shape[-2:])
