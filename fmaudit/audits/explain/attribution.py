"""`explain.attribution`: why the model decides, and whether that explanation can be trusted.

Attributions come from Captum (its methods are called, never re-implemented):

- text classifiers: LayerIntegratedGradients on the input embedding layer (with convergence delta),
  LayerGradientXActivation on it (gradient x input), FeatureAblation and Occlusion over token ids;
- image classifiers (pixels in [0, 1]): IntegratedGradients, Saliency, GradientShap, Occlusion, InputXGradient;
  features are pixels, or the model's patches for ViT-style models (the config's patch_size);
- causal LMs: `LLMAttribution(FeatureAblation)` and `LLMGradientAttribution(LayerIntegratedGradients)` over
  the prompt tokens, for a target continuation (the text's own next tokens, or the model's greedy one).

Quality of each explanation, cheap by default:

- deletion / insertion curves (AOPC) against a random ordering of the same features;
- Captum's `infidelity` (in the features' presence space: random subsets dropped to the baseline) and
  `sensitivity_max` (uniform input noise; in word-embedding space for text);
- the cascading model-parameter randomization sanity check (Adebayo et al. 2018): the layer groups of a COPY
  of the model are re-initialized from the top down, one at a time and cumulatively (`cascade.py`), and the
  similarity curve (Spearman signed / absolute, SSIM for images) with the trained model's attributions is
  reported; a method whose attributions barely change after the deepest step is flagged;
- integrated-gradients completeness: sum of attributions vs F(x) - F(baseline), within the convergence delta
  (absolute and relative gaps; the relative one is undefined where F(x) ~ F(baseline));
- images, opt-in: ROAD (Rong et al. 2022), removal with noisy linear imputation instead of the baseline (`road.py`).

Heavy imports (torch, captum, matplotlib) happen inside functions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, select_examples
from fmaudit.seeds import Stream, derive
from fmaudit.seeds import rng as stream_rng

Method = Literal["integrated_gradients", "gradient_x_input", "feature_ablation", "occlusion", "saliency",
                 "gradient_shap"]
MetricName = Literal["deletion", "insertion", "infidelity", "sensitivity", "randomization", "completeness", "road"]

TEXT_CLS, IMAGE_CLS, CAUSAL_LM = "text-classification", "image-classification", "causal-lm"

# Which methods each task supports, and the defaults (first = the "primary" method of the aggregates).
SUPPORTED: dict[str, tuple[str, ...]] = {
    TEXT_CLS: ("integrated_gradients", "gradient_x_input", "feature_ablation", "occlusion"),
    IMAGE_CLS: ("integrated_gradients", "saliency", "gradient_shap", "occlusion", "gradient_x_input"),
    CAUSAL_LM: ("feature_ablation", "integrated_gradients"),
}
DEFAULTS: dict[str, tuple[str, ...]] = {
    TEXT_CLS: ("integrated_gradients", "gradient_x_input", "feature_ablation"),
    IMAGE_CLS: ("integrated_gradients", "saliency", "gradient_shap", "occlusion"),
    CAUSAL_LM: ("feature_ablation", "integrated_gradients"),
}
CAPTUM_NAMES: dict[str, dict[str, str]] = {
    TEXT_CLS: {"integrated_gradients": "LayerIntegratedGradients(embeddings)",
               "gradient_x_input": "LayerGradientXActivation(embeddings)",
               "feature_ablation": "FeatureAblation(token ids)", "occlusion": "Occlusion(token ids)"},
    IMAGE_CLS: {"integrated_gradients": "IntegratedGradients", "saliency": "Saliency", "gradient_shap": "GradientShap",
                "occlusion": "Occlusion", "gradient_x_input": "InputXGradient"},
    CAUSAL_LM: {"feature_ablation": "LLMAttribution(FeatureAblation)",
                "integrated_gradients": "LLMGradientAttribution(LayerIntegratedGradients(embeddings))"},
}


# ---------------------------------------------------------------------------------------------------
# Small numeric helpers (numpy only)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; identical vectors (constant ones included) correlate 1, a constant vs a
    varying vector 0."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 2:
        return float("nan")
    if np.allclose(a, b, rtol=1e-6, atol=1e-12):
        return 1.0
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def keep_masks(order: np.ndarray, n: int, steps: int, *, insertion: bool) -> np.ndarray:
    """(steps + 1, n) boolean masks of features kept from the input: deletion removes the first
    round(f * n) features of `order` for f = 0, 1/steps, ..., 1; insertion keeps only them."""
    masks = np.zeros((steps + 1, n), dtype=bool) if insertion else np.ones((steps + 1, n), dtype=bool)
    for j in range(steps + 1):
        k = int(round(j / steps * n))
        masks[j, order[:k]] = insertion
    return masks


def mean_ci(values: Sequence[float], *, rounds: int, level: float, seed: int) -> tuple[float, tuple[float, float] | None]:
    from fmaudit.stats import bootstrap_ci

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), None
    ci = bootstrap_ci(lambda idx: float(v[idx].mean()), len(v), rounds=rounds, level=level, seed=seed) \
        if rounds and len(v) > 1 else None
    return float(v.mean()), ci


# ---------------------------------------------------------------------------------------------------
# Per-example state shared by the three tasks


@dataclass
class Example:
    pos: int  # index into the explained subset
    ex_id: str
    x: Any  # model input (1, ...): token ids or pixels
    baseline: Any  # same shape as x
    n_features: int
    explained: int | None = None  # class index explained (classifiers)
    true_label: int | None = None
    predicted: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # text: attention mask etc.; LM: prompt input, continuation
    feat_pos: np.ndarray | None = None  # text: token positions of the features (specials excluded)
    meta: dict[str, Any] = field(default_factory=dict)  # data index, F(x), F(baseline), probability


@dataclass
class Attribution:
    """One method's explanation of one example: `features` is one score per interpretable feature (tokens
    without special tokens; pixels summed over channels); `full` keeps the method's own shape."""

    method: str
    features: np.ndarray
    full: np.ndarray
    delta: float | None = None  # integrated gradients' convergence delta
    seconds: float = 0.0


class _Task:
    """What the audit needs from a task: examples, attributions, scores of composed inputs."""

    task: str
    curve_unit = "probability"

    def __init__(self, target: Any, params: "AttributionAudit.Params", device: Any):
        self.target = target
        self.p = params
        self.device = device

    # model output explained by the attributions (logit of the explained class / continuation log-prob)
    def explained_output(self, model, ex: Example, keep) -> Any:  # (K, n_features) bool tensor -> (K,)
        raise NotImplementedError

    def curve_output(self, model, ex: Example, keep) -> Any:
        raise NotImplementedError

    def attribute(self, method: str, model, ex: Example) -> Attribution:
        raise NotImplementedError

    def sensitivity(self, method: str, model, ex: Example, n: int, radius: float, seed: int) -> float | None:
        return None


def _forward_batches(fn, keep, bs: int):
    import torch

    outs = [fn(keep[i: i + bs]) for i in range(0, keep.shape[0], bs)]
    return torch.cat(outs) if outs else torch.zeros(0)


# ---------------------------------------------------------------------------------------------------
# Text classifiers


class _TextForward:
    """input_ids (+ attention mask, position / token type ids) -> logits, through `target.forward_logits`.
    Extra inputs of batch 1 are expanded to the batch of `input_ids` (Captum expands them too)."""

    def __init__(self, target: Any, model: Any, keys: Sequence[str], *, embeds: bool = False):
        self.target, self.model, self.keys, self.embeds = target, model, tuple(keys), embeds

    def __call__(self, inputs, *extra):
        n = inputs.shape[0]
        batch = {k: (v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v) for k, v in zip(self.keys, extra)}
        batch["inputs_embeds" if self.embeds else "input_ids"] = inputs
        return self.target.forward_logits(self.model, batch)


class _TextTask(_Task):
    task = TEXT_CLS

    def __init__(self, target, params, device):
        super().__init__(target, params, device)
        tok = target.tokenizer
        self.base_id = baseline_token_id(tok, params.text_baseline)
        self.special = sorted(set(int(i) for i in tok.all_special_ids))

    def example(self, pos: int, ex_id: str, text: str) -> Example:
        import torch

        batch = self.target.encode_texts([text])
        ids = batch.pop("input_ids")
        special = torch.isin(ids, torch.tensor(self.special, device=ids.device))
        baseline = torch.where(special, ids, torch.full_like(ids, self.base_id))  # [CLS] pad ... pad [SEP]
        feat_pos = np.flatnonzero(~special[0].cpu().numpy())
        return Example(pos=pos, ex_id=ex_id, x=ids, baseline=baseline, n_features=len(feat_pos), extra=batch,
                       feat_pos=feat_pos)

    def _fwd(self, model, ex: Example, *, embeds: bool = False) -> _TextForward:
        return _TextForward(self.target, model, list(ex.extra), embeds=embeds)

    def _compose(self, ex: Example, keep):
        import torch

        keep = torch.as_tensor(keep, device=ex.x.device).bool()
        k = keep.shape[0]
        ids = ex.x.expand(k, -1).clone()
        fp = torch.as_tensor(ex.feat_pos, device=ids.device)
        sub = ids[:, fp]
        ids[:, fp] = torch.where(keep, sub, torch.full_like(sub, self.base_id))
        return ids

    def logits(self, model, ex: Example, ids):
        import torch

        with torch.no_grad():
            return _forward_batches(lambda b: self._fwd(model, ex)(b, *ex.extra.values()), ids,
                                    self.p.internal_batch_size or 64)

    def explained_output(self, model, ex, keep):
        return self.logits(model, ex, self._compose(ex, keep))[:, ex.explained]

    def curve_output(self, model, ex, keep):
        return self.logits(model, ex, self._compose(ex, keep)).softmax(-1)[:, ex.explained]

    def attribute(self, method, model, ex) -> Attribution:
        from captum.attr import FeatureAblation, LayerGradientXActivation, LayerIntegratedGradients, Occlusion

        fwd = self._fwd(model, ex)
        extra = tuple(ex.extra.values())
        layer = model.get_input_embeddings()
        t0 = time.perf_counter()
        delta = None
        if method == "integrated_gradients":
            attr, d = LayerIntegratedGradients(fwd, layer).attribute(
                ex.x, baselines=ex.baseline, target=ex.explained, additional_forward_args=extra,
                n_steps=self.p.n_steps, internal_batch_size=self.p.internal_batch_size, return_convergence_delta=True)
            attr, delta = attr.sum(-1), float(d.abs().max())
        elif method == "gradient_x_input":
            attr = LayerGradientXActivation(fwd, layer).attribute(ex.x, target=ex.explained,
                                                                  additional_forward_args=extra).sum(-1)
        elif method == "feature_ablation":
            attr = FeatureAblation(fwd).attribute(ex.x, baselines=ex.baseline, target=ex.explained,
                                                  additional_forward_args=extra,
                                                  perturbations_per_eval=self.p.internal_batch_size or 1)
        elif method == "occlusion":
            w = self.p.occlusion_window or 3
            attr = Occlusion(fwd).attribute(ex.x, sliding_window_shapes=(w,), strides=(1,), baselines=ex.baseline,
                                            target=ex.explained, additional_forward_args=extra,
                                            perturbations_per_eval=self.p.internal_batch_size or 1)
        else:  # pragma: no cover - check() rejects it
            raise ValueError(f"method {method!r} is not available for text classifiers")
        full = attr.detach()[0].double().cpu().numpy()
        return Attribution(method, full[ex.feat_pos], full, delta, time.perf_counter() - t0)

    def sensitivity(self, method, model, ex, n, radius, seed) -> float | None:
        """Captum's sensitivity_max in word-embedding space, with the embedding-space twin of each method
        (exactly the same attributions as the layer / token-id versions, since word embeddings are a lookup)."""
        import torch
        from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients, Occlusion
        from captum.metrics import sensitivity_max

        emb = model.get_input_embeddings()
        with torch.no_grad():
            e, eb = emb(ex.x).detach(), emb(ex.baseline).detach()
        fwd = self._fwd(model, ex, embeds=True)
        extra = tuple(ex.extra.values())
        length, dim = e.shape[1], e.shape[2]
        r = radius * float(e.pow(2).mean().sqrt())  # relative to the embeddings' scale
        gen = torch.Generator(device="cpu").manual_seed(derive(seed, Stream.ATTRIBUTION_PERTURB, 1))

        def perturb(inputs: torch.Tensor) -> torch.Tensor:
            noise = (torch.rand(inputs.shape, generator=gen) * 2 - 1) * r
            return inputs + noise.to(inputs.device)

        def explain(inputs: torch.Tensor) -> torch.Tensor:
            inputs = inputs[0] if isinstance(inputs, tuple) else inputs
            b = inputs.shape[0]
            base = eb.expand(b, -1, -1)
            if method == "integrated_gradients":
                a = IntegratedGradients(fwd).attribute(inputs, baselines=base, target=ex.explained,
                                                       additional_forward_args=extra, n_steps=self.p.n_steps,
                                                       internal_batch_size=self.p.internal_batch_size)
            elif method == "gradient_x_input":
                a = InputXGradient(fwd).attribute(inputs, target=ex.explained, additional_forward_args=extra)
            elif method == "feature_ablation":
                mask = torch.arange(length, device=inputs.device).view(1, length, 1).expand(b, length, dim)
                a = FeatureAblation(fwd).attribute(inputs, baselines=base, target=ex.explained, feature_mask=mask,
                                                   additional_forward_args=extra,
                                                   perturbations_per_eval=self.p.internal_batch_size or 1)
            elif method == "occlusion":
                w = self.p.occlusion_window or 3
                a = Occlusion(fwd).attribute(inputs, sliding_window_shapes=(w, dim), strides=(1, dim), baselines=base,
                                             target=ex.explained, additional_forward_args=extra,
                                             perturbations_per_eval=self.p.internal_batch_size or 1)
            else:  # pragma: no cover
                raise ValueError(method)
            return (a.sum(-1),)  # a tuple: Captum 0.9 iterates a bare tensor of original explanations row by row

        s = sensitivity_max(explain, e, perturb_func=perturb, n_perturb_samples=n, max_examples_per_batch=1)
        return float(s.max())


def baseline_token_id(tokenizer: Any, kind: str) -> int:
    tid = {"pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id, "mask": tokenizer.mask_token_id}[kind]
    if tid is None:
        raise ValueError(f"the tokenizer has no {kind} token to use as the attribution baseline; "
                         "choose another text_baseline (pad | unk | mask)")
    return int(tid)


# ---------------------------------------------------------------------------------------------------
# Image classifiers


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


class _ImageTask(_Task):
    task = IMAGE_CLS

    def __init__(self, target, params, device):
        super().__init__(target, params, device)
        self._fmaps: dict[tuple[int, int], Any] = {}

    def feature_unit(self, h: int, w: int) -> dict[str, Any]:
        grid = patch_grid(self.target, h, w) if self.p.image_features != "pixels" else None
        if grid is None:
            return {"unit": "pixel", "num_features": h * w}
        return {"unit": "patch", "patch_size": [grid[0], grid[1]], "grid": [grid[2], grid[3]],
                "num_features": grid[2] * grid[3], "source": "the model config's patch_size"}

    def fmap(self, h: int, w: int):
        """Feature id of every pixel (flattened, torch long on the device): pixels, or ViT patches."""
        import torch

        if (h, w) not in self._fmaps:
            grid = patch_grid(self.target, h, w) if self.p.image_features != "pixels" else None
            if grid is None:
                m = np.arange(h * w)
            else:
                size = getattr(self.target.model, "image_size", None) or (grid[0] * grid[2])
                m = patch_feature_map(h, w, grid, (int(size), int(size)) if not isinstance(size, (tuple, list))
                                      else (int(size[0]), int(size[1]))).ravel()
            self._fmaps[(h, w)] = torch.as_tensor(m, dtype=torch.long, device=self.device)
        return self._fmaps[(h, w)]

    def patches(self, h: int, w: int) -> bool:
        return self.feature_unit(h, w)["unit"] == "patch"

    def example(self, pos: int, ex_id: str, image: np.ndarray) -> Example:
        import torch

        x = torch.as_tensor(np.asarray(image, dtype=np.float32)[None], device=self.device)
        if self.p.image_baseline == "black":
            b = torch.zeros_like(x)
        else:
            b = torch.as_tensor(blurred(image[None], self.p.blur_sigma), device=self.device)
        fm = self.fmap(*x.shape[-2:])
        return Example(pos=pos, ex_id=ex_id, x=x, baseline=b, n_features=int(fm.max()) + 1)

    def _compose(self, ex, keep):
        import torch

        keep = torch.as_tensor(keep, device=ex.x.device).bool()
        k = keep.shape[0]
        h, w = ex.x.shape[-2:]
        m = keep[:, self.fmap(h, w)].view(k, 1, h, w).to(ex.x.dtype)  # features (pixels / patches) -> pixels
        return ex.x * m + ex.baseline * (1 - m)

    def logits(self, model, x):
        import torch

        with torch.no_grad():
            return _forward_batches(model, x, self.p.internal_batch_size or 64)

    def explained_output(self, model, ex, keep):
        return self.logits(model, self._compose(ex, keep))[:, ex.explained]

    def curve_output(self, model, ex, keep):
        return self.logits(model, self._compose(ex, keep)).softmax(-1)[:, ex.explained]

    def _raw(self, method, model, x, baseline, target, seed: int = 0):
        import torch
        from captum.attr import (FeatureAblation, GradientShap, InputXGradient, IntegratedGradients, Occlusion,
                                 Saliency)

        delta = None
        if method == "integrated_gradients":
            a, d = IntegratedGradients(model).attribute(x, baselines=baseline, target=target, n_steps=self.p.n_steps,
                                                        internal_batch_size=self.p.internal_batch_size,
                                                        return_convergence_delta=True)
            delta = float(d.abs().max())
        elif method == "saliency":
            a = Saliency(model).attribute(x, target=target)
        elif method == "gradient_x_input":
            a = InputXGradient(model).attribute(x, target=target)
        elif method == "gradient_shap":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive(seed, Stream.ATTRIBUTION_SHAP))
                a = GradientShap(model).attribute(x, baselines=baseline[:1], target=target,
                                                  n_samples=self.p.gradient_shap_samples,
                                                  stdevs=self.p.gradient_shap_stdevs)
        elif method == "occlusion" and self.p.occlusion_window is None and self.patches(*x.shape[-2:]):
            # one ViT patch at a time (= Occlusion with window = stride = patch when the grid is aligned)
            c, h, w = x.shape[1:]
            mask = self.fmap(h, w).view(1, 1, h, w).expand(x.shape[0], c, h, w)
            a = FeatureAblation(model).attribute(x, baselines=baseline, target=target, feature_mask=mask,
                                                 perturbations_per_eval=self.p.internal_batch_size or 1)
        elif method == "occlusion":
            c, h, w = x.shape[1:]
            win = self.p.occlusion_window or max(1, min(h, w) // 4)
            stride = max(1, win // 2)
            a = Occlusion(model).attribute(x, sliding_window_shapes=(c, win, win), strides=(c, stride, stride),
                                           baselines=baseline, target=target,
                                           perturbations_per_eval=self.p.internal_batch_size or 1)
        else:  # pragma: no cover
            raise ValueError(f"method {method!r} is not available for image classifiers")
        return a, delta

    def attribute(self, method, model, ex) -> Attribution:
        t0 = time.perf_counter()
        a, delta = self._raw(method, model, ex.x, ex.baseline, ex.explained, seed=ex.pos)
        full = a.detach()[0].double().cpu().numpy()  # (C, H, W)
        fm = self.fmap(*full.shape[-2:]).cpu().numpy()
        feats = np.bincount(fm, weights=full.sum(0).ravel(), minlength=int(fm.max()) + 1)  # per pixel / patch
        return Attribution(method, feats, full, delta, time.perf_counter() - t0)

    def sensitivity(self, method, model, ex, n, radius, seed) -> float | None:
        import torch
        from captum.metrics import sensitivity_max

        gen = torch.Generator(device="cpu").manual_seed(derive(seed, Stream.ATTRIBUTION_PERTURB, 2))

        def perturb(inputs):
            noise = (torch.rand(inputs.shape, generator=gen) * 2 - 1) * radius
            return inputs + noise.to(inputs.device)

        def explain(inputs):
            inputs = inputs[0] if isinstance(inputs, tuple) else inputs
            a, _ = self._raw(method, model, inputs, ex.baseline.expand(inputs.shape[0], -1, -1, -1),
                             ex.explained, seed=seed)
            return (a.sum(1),)  # a tuple: Captum 0.9 iterates a bare tensor of original explanations row by row

        return float(sensitivity_max(explain, ex.x, perturb_func=perturb, n_perturb_samples=n,
                                     max_examples_per_batch=1).max())


# ---------------------------------------------------------------------------------------------------
# Causal LMs


class _LMTask(_Task):
    task = CAUSAL_LM
    curve_unit = "nats"

    def __init__(self, target, params, device):
        super().__init__(target, params, device)
        tok = target.tokenizer
        self.base_id = baseline_token_id(tok, params.text_baseline)
        self.special = sorted(set(int(i) for i in tok.all_special_ids))

    def example(self, pos: int, ex_id: str, text: str) -> Example | None:
        import torch
        from captum.attr import TextTokenInput

        tok, p = self.target.tokenizer, self.p
        ids = tok(text, add_special_tokens=False)["input_ids"]
        c = p.continuation_tokens
        if p.continuation == "text":
            ids = ids[: p.max_prompt_tokens + c]
            if len(ids) < c + 1:
                return None
            prompt, cont = tok.decode(ids[:-c]), torch.tensor(ids[-c:], dtype=torch.long)
        else:
            if not ids:
                return None
            prompt, cont = tok.decode(ids[: p.max_prompt_tokens]), None
        inp = TextTokenInput(prompt, tok, baselines=self.base_id, skip_tokens=list(self.special) or None)
        if inp.n_itp_features == 0:
            return None
        x = inp.inp_tensor.to(self.device)
        if cont is None:
            with torch.no_grad():
                out = self.target.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=c,
                                                 do_sample=False, pad_token_id=tok.pad_token_id)
            cont = out[0, x.shape[1]:].cpu()
            if len(cont) == 0:
                return None
        mask = inp.itp_mask[0].numpy() if inp.itp_mask is not None else np.ones(x.shape[1], dtype=bool)
        feat_pos = np.flatnonzero(mask)
        baseline = x.clone()
        baseline[0, torch.as_tensor(feat_pos, device=x.device)] = self.base_id
        return Example(pos=pos, ex_id=ex_id, x=x, baseline=baseline, n_features=len(feat_pos), feat_pos=feat_pos,
                       extra={"input": inp, "continuation": cont.to(self.device)})

    def _compose(self, ex, keep):
        import torch

        keep = torch.as_tensor(keep, device=ex.x.device).bool()
        ids = ex.x.expand(keep.shape[0], -1).clone()
        fp = torch.as_tensor(ex.feat_pos, device=ids.device)
        sub = ids[:, fp]
        ids[:, fp] = torch.where(keep, sub, torch.full_like(sub, self.base_id))
        return ids

    def continuation_logprob(self, model, ex, prompts):
        """Sum over the continuation of log p(token | prompt, earlier continuation): the quantity both
        Captum LLM wrappers attribute (teacher-forced, one forward per prompt)."""
        import torch

        cont = ex.extra["continuation"]

        def one(b):
            ids = torch.cat([b, cont.view(1, -1).expand(b.shape[0], -1)], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            p_len = b.shape[1]
            lp = logits[:, p_len - 1: p_len - 1 + len(cont)].log_softmax(-1)
            return lp.gather(-1, cont.view(1, -1, 1).expand(b.shape[0], -1, 1)).squeeze(-1).sum(-1)

        with torch.no_grad():
            return _forward_batches(one, prompts, self.p.internal_batch_size or 16)

    def explained_output(self, model, ex, keep):
        return self.continuation_logprob(model, ex, self._compose(ex, keep))

    curve_output = explained_output

    def attribute(self, method, model, ex) -> Attribution:
        from captum.attr import FeatureAblation, LayerIntegratedGradients, LLMAttribution, LLMGradientAttribution

        tok = self.target.tokenizer
        t0 = time.perf_counter()
        inp, cont = ex.extra["input"], ex.extra["continuation"]
        if method == "feature_ablation":
            res = LLMAttribution(FeatureAblation(model), tok).attribute(
                inp, target=cont, forward_in_tokens=False,
                perturbations_per_eval=1)  # LLMAttribution's forward takes one perturbation at a time
        elif method == "integrated_gradients":
            lig = LayerIntegratedGradients(model, model.get_input_embeddings())
            res = LLMGradientAttribution(lig, tok).attribute(inp, target=cont, n_steps=self.p.n_steps,
                                                             internal_batch_size=self.p.internal_batch_size)
        else:  # pragma: no cover
            raise ValueError(f"method {method!r} is not available for causal LMs")
        seq = res.seq_attr.detach().double().cpu().numpy()
        full = res.token_attr.detach().double().cpu().numpy() if res.token_attr is not None else seq[None]
        return Attribution(method, seq, full, None, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# Public helpers (notebooks, the benchmark)


def explain_texts(target: Any, texts: Sequence[str], *, method: str = "integrated_gradients",
                  labels: Sequence[int] | None = None, n_steps: int = 50, internal_batch_size: int | None = None,
                  baseline: str = "pad") -> list[tuple[Example, Attribution]]:
    """Attribute each text's logit of `labels[i]` (default: the predicted class) to its tokens, with the
    same code the audit runs. Returns (example, attribution) pairs; `attribution.full` has one score per
    token position (special tokens included), `attribution.features` skips special tokens."""
    import torch

    params = AttributionAudit.Params(methods=[method], n_steps=n_steps, internal_batch_size=internal_batch_size,
                                     text_baseline=baseline)
    task = _TextTask(target, params, target.device)
    out = []
    for i, text in enumerate(texts):
        ex = task.example(i, str(i), text)
        if labels is None:
            with torch.no_grad():
                ex.explained = int(task.logits(target.model, ex, ex.x).argmax(-1)[0])
        else:
            ex.explained = int(labels[i])
        out.append((ex, task.attribute(method, target.model, ex)))
    return out


# ---------------------------------------------------------------------------------------------------
# The module


class AttributionAudit(AuditModule):
    name = "explain.attribution"
    category = "explain"
    description = ("Feature attributions via Captum (integrated gradients, gradient x input, ablation, occlusion, "
                   "saliency, GradientShap; LLM attribution for causal LMs) with explanation-quality metrics: "
                   "deletion / insertion AOPC vs random, infidelity, max-sensitivity, the model-parameter "
                   "randomization sanity check and integrated-gradients completeness.")
    requires = frozenset()
    tasks = (TEXT_CLS, IMAGE_CLS, CAUSAL_LM)
    metric_names = ("*.deletion_aopc", "*.insertion_auc", "*.infidelity", "*.sensitivity_max",
                    "*.randomization_spearman", "*.randomization_spearman_abs", "*.randomization_ssim",
                    "*.seconds_per_example", "integrated_gradients.convergence_delta",
                    "integrated_gradients.completeness_gap", "integrated_gradients.completeness_abs_gap",
                    "integrated_gradients.completeness_relative_error", "random.deletion_aopc",
                    "*.road_morf", "*.road_lerf", "random.road",
                    "random.insertion_auc", "methods_failing_randomization", "num_examples")

    class Params(AuditParams):
        methods: list[Method] | None = Field(
            default=None, description="Attribution methods; default per task: text ig, gradient_x_input, "
                                      "feature_ablation; images ig, saliency, gradient_shap, occlusion; causal LMs "
                                      "feature_ablation, integrated_gradients. The first one drives the aggregates.")
        num_examples: int = Field(default=8, gt=0, le=10_000, description="Examples explained (seeded sample).")
        split: Literal["auto", "nonmembers", "members", "all"] = Field(
            default="auto", description="auto = held-out non-members when the target was fine-tuned on this data.")
        explain_label: Literal["predicted", "true"] = Field(
            default="predicted", description="Classifiers: explain the predicted class or the true label.")
        n_steps: int = Field(default=50, gt=1, le=5000, description="Integrated gradients: Riemann steps.")
        internal_batch_size: int | None = Field(
            default=32, gt=0, description="Upper bound on the forward batch inside a Captum call (memory).")
        text_baseline: Literal["pad", "unk", "mask"] = Field(
            default="pad", description="Token that replaces removed tokens (special tokens are kept).")
        image_baseline: Literal["black", "blur"] = Field(default="black", description="Image baseline.")
        image_features: Literal["auto", "pixels", "patches"] = Field(
            default="auto", description="Features of images for occlusion / deletion / insertion / infidelity / "
                                        "rank correlations: auto = ViT patches (the config's patch_size) when the "
                                        "model has them, else pixels.")
        blur_sigma: float = Field(default=2.0, gt=0, description="Gaussian blur sigma (pixels) of the blur baseline.")
        occlusion_window: int | None = Field(
            default=None, gt=0, description="Occlusion window: tokens (default 3) or pixels (default side / 4).")
        gradient_shap_samples: int = Field(default=10, gt=0, le=1000)
        gradient_shap_stdevs: float = Field(default=0.1, ge=0)
        continuation: Literal["text", "generate"] = Field(
            default="text", description="Causal LMs: attribute the text's own last tokens, or the greedy continuation.")
        continuation_tokens: int = Field(default=3, gt=0, le=64)
        max_prompt_tokens: int = Field(default=32, gt=0, le=4096)
        quality: list[MetricName] = Field(
            default=["deletion", "insertion", "infidelity", "sensitivity", "randomization", "completeness"],
            description="Explanation-quality metrics to compute.")
        curve_steps: int = Field(default=10, ge=2, le=200, description="Points of the deletion / insertion curves - 1.")
        random_orderings: int = Field(default=3, ge=1, le=100, description="Random orderings averaged per example.")
        perturbations: int = Field(default=10, gt=0, le=1000, description="Infidelity / sensitivity perturbations.")
        infidelity_drop: float = Field(default=0.25, gt=0, lt=1,
                                       description="Probability that a feature is dropped in an infidelity perturbation.")
        sensitivity_radius: float = Field(
            default=0.02, gt=0, description="Uniform noise radius: pixels, or times the RMS of the word embeddings.")
        sensitivity_examples: int = Field(default=4, ge=0, description="Examples with max-sensitivity (costly).")
        randomization_examples: int | None = Field(default=None, gt=0, description="Examples for the randomization "
                                                                                    "check (default: all).")
        randomization_depth: int | None = Field(
            default=None, gt=0, description="Cascade steps (layer groups re-initialized from the top, cumulatively); "
                                            "default: all of them, down to the embeddings / first layer.")
        randomization_threshold: float = Field(
            default=0.5, gt=-1, lt=1, description="A method fails when its mean rank correlation with the randomized "
                                                  "model's attributions is above this.")
        completeness_tolerance: float = Field(
            default=0.05, gt=0, description="Largest |sum(attr) - (F(x) - F(b))| / |F(x) - F(b)| accepted.")
        road_noise: float = Field(default=0.01, ge=0, description="ROAD (images): std of the Gaussian noise added to "
                                                                  "imputed pixels (Rong et al. 2022).")
        completeness_min_difference: float = Field(
            default=0.01, ge=0, description="|F(x) - F(baseline)| below this (logits / nats) counts as F(x) = "
                                            "F(baseline): the relative error is undefined there.")
        top_tokens: int = Field(default=15, ge=0, le=1000, description="Most influential tokens listed.")
        heatmaps: bool = Field(default=True, description="Images: write heatmap PNGs to the run's artifacts.")
        bootstrap: int = Field(default=1000, ge=0, le=100_000)
        confidence: float = Field(default=0.95, gt=0.5, lt=1.0)

        @model_validator(mode="after")
        def _unique(self):
            if self.methods is not None:
                if not self.methods:
                    raise ValueError("methods: give at least one method, or leave it out for the defaults")
                if len(set(self.methods)) != len(self.methods):
                    raise ValueError("methods: each method at most once")
            return self

    # -- pre-flight ----------------------------------------------------------------------------------
    def methods_for(self, task: str) -> list[str]:
        return list(self.params.methods) if self.params.methods is not None else list(DEFAULTS.get(task, ()))

    def check(self, target, data) -> list[str]:
        problems: list[str] = []
        task = getattr(target, "task", None)
        if task not in SUPPORTED:
            return [f"explain.attribution supports {', '.join(SUPPORTED)} targets, not {task!r}"]
        bad = [m for m in self.methods_for(task) if m not in SUPPORTED[task]]
        if bad:
            problems.append(f"methods {bad} are not available for {task} targets (available: {list(SUPPORTED[task])})")
        if data is None or len(data) == 0:
            problems.append("no examples to explain")
        elif task == IMAGE_CLS and data.images is None:
            problems.append(f"dataset {data.name!r} has no images")
        elif task == IMAGE_CLS and self.params.image_features == "patches" \
                and patch_grid(target, *np.asarray(data.images[0]).shape[-2:]) is None:
            problems.append("image_features: patches needs a model whose config has a patch_size (ViT); "
                            f"{getattr(target, 'architecture', '?')} has none (use auto or pixels)")
        elif task != IMAGE_CLS and data.texts is None:
            problems.append(f"dataset {data.name!r} has no texts")
        elif task != CAUSAL_LM and self.params.explain_label == "true" and data.labels is None:
            problems.append(f"explain_label: true needs labels, and dataset {data.name!r} has none")
        if "road" in self.params.quality and task != IMAGE_CLS:
            problems.append("quality: road (imputation of removed pixels) is for image classifiers only")
        if task in (TEXT_CLS, CAUSAL_LM):
            try:
                baseline_token_id(target.tokenizer, self.params.text_baseline)
            except ValueError as exc:
                problems.append(str(exc))
            if not hasattr(target.model, "get_input_embeddings"):
                problems.append("the model has no get_input_embeddings(); layer attributions need it")
        return problems

    def _select(self, ctx: AuditContext):
        data, choice = select_examples(ctx, self.params.split)
        order = stream_rng(ctx.seed, Stream.ATTRIBUTION_ORDER).permutation(len(data))
        return data, order, choice

    # -- run -----------------------------------------------------------------------------------------
    def run(self, target, ctx: AuditContext) -> Outcome:
        import torch

        p = self.params
        task_name = target.task
        methods = self.methods_for(task_name)
        task: _Task = {TEXT_CLS: _TextTask, IMAGE_CLS: _ImageTask, CAUSAL_LM: _LMTask}[task_name](target, p, target.device)
        data, order, choice = self._select(ctx)
        out = Outcome()
        model = target.model
        model.eval()
        hooks_before = _hook_count(model)
        sha_before = target.weights_sha256()

        # 1. examples
        examples: list[Example] = []
        for i in order:
            if len(examples) >= p.num_examples:
                break
            i = int(i)
            if task_name == IMAGE_CLS:
                ex = task.example(len(examples), data.ids[i], data.images[i])
            else:
                ex = task.example(len(examples), data.ids[i], data.texts[i])
            if ex is None or ex.n_features == 0:
                continue
            ex.meta["data_index"] = i
            if data.labels is not None:
                ex.true_label = int(data.labels[i])
            examples.append(ex)
        if not examples:
            raise ValueError("no example could be explained (texts too short for a prompt and continuation?)")
        if task_name != CAUSAL_LM:
            for ex in examples:
                with torch.no_grad():
                    x = torch.cat([ex.x, ex.baseline])
                    lg = task.logits(model, ex, x) if task_name == TEXT_CLS else task.logits(model, x)
                ex.predicted = int(lg[0].argmax())
                ex.explained = ex.predicted if p.explain_label == "predicted" or ex.true_label is None else ex.true_label
                ex.meta["f_x"], ex.meta["f_b"] = float(lg[0, ex.explained]), float(lg[1, ex.explained])
                ex.meta["prob"] = float(lg[0].softmax(-1)[ex.explained])
        else:
            for ex in examples:
                full = np.ones((1, ex.n_features), dtype=bool)
                ex.meta["f_x"] = float(task.explained_output(model, ex, full)[0])
                ex.meta["f_b"] = float(task.explained_output(model, ex, ~full)[0])

        # 2. attributions
        attrs: dict[str, list[Attribution]] = {m: [] for m in methods}
        with ctx.task("attributing", len(methods) * len(examples)) as bar:
            for m in methods:
                for ex in examples:
                    attrs[m].append(task.attribute(m, model, ex))
                    bar.advance()

        # 3. quality
        q = set(p.quality)
        level, rounds = p.confidence, p.bootstrap
        per_method: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
        if "deletion" in q or "insertion" in q:
            self._curves(task, model, examples, attrs, per_method, out, ctx.seed)
        if "road" in q and task_name == IMAGE_CLS:
            self._road(task, model, examples, attrs, per_method, out, ctx.seed)
        if "infidelity" in q:
            for m in methods:
                per_method[m]["infidelity"] = [self._infidelity(task, model, ex, a, ctx.seed + ex.pos)
                                               for ex, a in zip(examples, attrs[m])]
        if "sensitivity" in q and task_name != CAUSAL_LM and p.sensitivity_examples > 0:
            for m in methods:
                per_method[m]["sensitivity_max"] = [task.sensitivity(m, model, ex, p.perturbations,
                                                                     p.sensitivity_radius, ctx.seed + ex.pos)
                                                    for ex in examples[: p.sensitivity_examples]]
        failing: list[str] = []
        if "randomization" in q:
            failing = self._randomization(target, task, examples, attrs, per_method, out, ctx.seed)
        if "completeness" in q and "integrated_gradients" in methods:
            self._completeness(examples, attrs["integrated_gradients"], out, level, rounds, ctx.seed,
                               unit="nats" if task_name == CAUSAL_LM else "logit")

        # 4. metrics
        units = {"deletion_aopc": task.curve_unit, "insertion_auc": task.curve_unit, "infidelity": None,
                 "sensitivity_max": "relative", "randomization_spearman": "rank correlation",
                 "randomization_spearman_abs": "rank correlation", "randomization_ssim": "SSIM",
                 "road_morf": "probability", "road_lerf": "probability",
                 "seconds_per_example": "seconds"}
        better = {"deletion_aopc": True, "insertion_auc": True, "infidelity": False, "sensitivity_max": False,
                  "randomization_spearman": False, "randomization_spearman_abs": False, "randomization_ssim": False,
                  "road_morf": False, "road_lerf": True,
                  "seconds_per_example": False}
        desc = {
            "deletion_aopc": "Mean drop of the explained output as the most-attributed features are removed first "
                             "(AOPC; compare with random.deletion_aopc).",
            "insertion_auc": "Mean explained output as the most-attributed features are inserted first into the "
                             "baseline (compare with random.insertion_auc).",
            "infidelity": "Captum infidelity (normalized): squared error between attributions x dropped features "
                          "and the output change, random subsets dropped to the baseline.",
            "sensitivity_max": "Captum sensitivity_max: largest relative change of the attributions under small "
                               "uniform input noise.",
            "randomization_spearman": "Mean Spearman correlation between attributions of the trained model and "
                                      "of a copy after the deepest step of the randomization cascade (layer "
                                      "groups re-initialized from the top down; low = depends on the weights).",
            "randomization_spearman_abs": "Same, on absolute attribution values.",
            "randomization_ssim": "Same, SSIM of the absolute attribution maps (images).",
            "road_morf": "ROAD (Rong et al. 2022): mean probability of the explained class as the most-attributed "
                         "features are removed first and re-imputed from their neighbours (lower = better; compare "
                         "with random.road).",
            "road_lerf": "ROAD: the same, least-attributed features removed first (higher = better).",
            "seconds_per_example": "Wall time of the attribution call per example.",
        }
        for m in methods:
            per_method[m]["seconds_per_example"] = [a.seconds for a in attrs[m]]
            for key, vals in per_method[m].items():
                v, ci = mean_ci(vals, rounds=rounds if key != "seconds_per_example" else 0, level=level,
                                seed=ctx.seed)
                out.metric(f"{m}.{key}", v, higher_is_better=better.get(key), ci=ci, ci_level=level,
                           unit=units.get(key), description=desc.get(key))
        out.metric("num_examples", len(examples), unit="examples", description="Examples explained.")
        if "randomization" in q:
            out.metric("methods_failing_randomization", len(failing), higher_is_better=False, unit="methods",
                       description="Methods whose attributions barely change when the layers are re-initialized "
                                   "(cascade from the top).")
        for m in methods:
            if "deletion_aopc" in per_method[m] and "random.deletion_aopc" in out.metrics:
                dm, rm = out.metrics[f"{m}.deletion_aopc"].value, out.metrics["random.deletion_aopc"].value
                if dm is not None and rm is not None and dm <= rm:
                    out.finding("low", f"{m}: deleting its top features hurts no more than a random order",
                                f"deletion AOPC {dm:.4g} vs random {rm:.4g}: its ranking carries no signal about "
                                "what the model uses", metric=f"{m}.deletion_aopc")
            if "road_morf" in per_method[m] and "random.road" in out.metrics:
                dm, rm = out.metrics[f"{m}.road_morf"].value, out.metrics["random.road"].value
                if dm is not None and rm is not None and dm >= rm:
                    out.finding("low", f"{m}: removing its top features (ROAD imputation) hurts no more than a "
                                       "random order",
                                f"ROAD MoRF {dm:.4g} vs random {rm:.4g}, with removed pixels imputed from their "
                                "neighbours rather than set to the baseline", metric=f"{m}.road_morf")

        # 5. report
        out.tables["explained_on"] = {"dataset": ctx.data.name, "subset": choice, "num_examples": len(examples),
                                      "task": task_name, "explain_label": p.explain_label}
        out.tables["methods"] = {m: CAPTUM_NAMES[task_name][m] for m in methods}
        if task_name == IMAGE_CLS and "occlusion" in methods and p.occlusion_window is None \
                and task.patches(*examples[0].x.shape[-2:]):  # type: ignore[attr-defined]
            out.tables["methods"]["occlusion"] = "FeatureAblation(patch mask: one ViT patch at a time)"
        if task_name == IMAGE_CLS:
            out.tables["features"] = task.feature_unit(*examples[0].x.shape[-2:])  # type: ignore[attr-defined]
        out.tables["baseline"] = (p.image_baseline if task_name == IMAGE_CLS
                                  else {"token": p.text_baseline, "token_id": task.base_id})  # type: ignore[attr-defined]
        names = target.label_names or data.label_names
        if task_name == IMAGE_CLS and p.heatmaps:
            paths = self._heatmaps(examples, attrs, methods, ctx)
            out.artifacts.extend(paths)
        else:
            paths = [None] * len(examples)
        out.evidence = [self._evidence(task, ex, attrs, methods, names, ctx.store_examples, data, path)
                        for ex, path in zip(examples, paths)]
        if task_name != IMAGE_CLS and p.top_tokens:
            out.tables["top_tokens"] = self._top_tokens(task, examples, attrs[methods[0]], ctx.store_examples)
            out.tables["top_tokens"]["method"] = methods[0]

        # Invariants: no hook left behind, target weights untouched.
        if _hook_count(model) != hooks_before:
            raise RuntimeError("a Captum hook was left on the target model")
        target.weights_changed()
        if target.weights_sha256() != sha_before:
            raise RuntimeError("the target's weights changed while explaining it")
        return out

    # -- quality metrics -----------------------------------------------------------------------------
    def _curves(self, task, model, examples, attrs, per_method, out, seed) -> None:
        p = self.params
        steps = p.curve_steps
        fr = np.linspace(0, 1, steps + 1)
        rng = stream_rng(seed, Stream.ATTRIBUTION_CURVES)
        rand_del, rand_ins, rd_curve, ri_curve = [], [], [], []
        for ex in examples:
            n = ex.n_features
            dels, inss = [], []
            for _ in range(p.random_orderings):
                perm = rng.permutation(n)
                dels.append(task.curve_output(model, ex, keep_masks(perm, n, steps, insertion=False)).double().cpu().numpy())
                inss.append(task.curve_output(model, ex, keep_masks(perm, n, steps, insertion=True)).double().cpu().numpy())
            d, i = np.mean(dels, 0), np.mean(inss, 0)
            rd_curve.append(d)
            ri_curve.append(i)
            rand_del.append(float(np.mean(d[0] - d)))
            rand_ins.append(float(np.mean(i)))
        for name, vals, curve in (("deletion", rand_del, rd_curve), ("insertion", rand_ins, ri_curve)):
            if name not in p.quality:
                continue
            key = "deletion_aopc" if name == "deletion" else "insertion_auc"
            v, ci = mean_ci(vals, rounds=p.bootstrap, level=p.confidence, seed=seed)
            out.metric(f"random.{key}", v, higher_is_better=True, ci=ci, ci_level=p.confidence, unit=task.curve_unit,
                       description=f"The {name} metric for a random ordering of the same features (the reference).")
            out.curve(f"random.{name}", fr, np.mean(curve, 0), x_label="fraction of features "
                      + ("removed" if name == "deletion" else "inserted"), y_label=f"explained output ({task.curve_unit})",
                      description=f"{name.capitalize()} curve, random ordering (mean over examples).")
        for m, alist in attrs.items():
            d_vals, i_vals, d_curve, i_curve = [], [], [], []
            for ex, a in zip(examples, alist):
                order = np.argsort(-a.features, kind="stable")  # most positive (towards the output) first
                d = task.curve_output(model, ex, keep_masks(order, ex.n_features, steps, insertion=False)).double().cpu().numpy()
                i = task.curve_output(model, ex, keep_masks(order, ex.n_features, steps, insertion=True)).double().cpu().numpy()
                d_vals.append(float(np.mean(d[0] - d)))
                i_vals.append(float(np.mean(i)))
                d_curve.append(d)
                i_curve.append(i)
            if "deletion" in p.quality:
                per_method[m]["deletion_aopc"] = d_vals
                out.curve(f"{m}.deletion", fr, np.mean(d_curve, 0), x_label="fraction of features removed",
                          y_label=f"explained output ({task.curve_unit})",
                          description="Deletion curve: most-attributed features removed first (mean over examples).")
            if "insertion" in p.quality:
                per_method[m]["insertion_auc"] = i_vals
                out.curve(f"{m}.insertion", fr, np.mean(i_curve, 0), x_label="fraction of features inserted",
                          y_label=f"explained output ({task.curve_unit})",
                          description="Insertion curve: most-attributed features inserted first (mean over examples).")

    def _road(self, task, model, examples, attrs, per_method, out, seed) -> None:
        """ROAD (Rong et al. 2022), images: features removed most-attributed first (MoRF) and least first (LeRF),
        removed pixels re-imputed from their neighbours (noisy linear imputation, `road.py`) instead of being
        set to the baseline; fractions 0, 1/curve_steps, ..., (curve_steps - 1)/curve_steps (never all)."""
        import torch

        from fmaudit.audits.explain.road import noisy_linear_impute

        p = self.params
        steps = p.curve_steps
        fr = np.arange(steps) / steps
        rng = stream_rng(seed, Stream.ATTRIBUTION_CURVES, 1)

        def curve(ex: Example, order: np.ndarray) -> np.ndarray:
            h, w = ex.x.shape[-2:]
            fmap = task.fmap(h, w).cpu().numpy()
            x = ex.x[0].detach().double().cpu().numpy()
            keep = keep_masks(order, ex.n_features, steps, insertion=False)[:-1]
            imgs = np.stack([noisy_linear_impute(x, ~k[fmap].reshape(h, w), noise=p.road_noise, rng=rng)
                             for k in keep])
            xt = torch.as_tensor(imgs, dtype=ex.x.dtype, device=ex.x.device)
            return task.logits(model, xt).softmax(-1)[:, ex.explained].double().cpu().numpy()

        rand_vals, rand_curves = [], []
        for ex in examples:
            cs = [curve(ex, rng.permutation(ex.n_features)) for _ in range(p.random_orderings)]
            rand_curves.append(np.mean(cs, 0))
            rand_vals.append(float(np.mean(rand_curves[-1])))
        v, ci = mean_ci(rand_vals, rounds=p.bootstrap, level=p.confidence, seed=seed)
        out.metric("random.road", v, higher_is_better=None, ci=ci, ci_level=p.confidence, unit="probability",
                   description="ROAD with random orderings of the same features (the reference for road_morf and "
                               "road_lerf).")
        out.curve("random.road", fr, np.mean(rand_curves, 0), x_label="fraction of features removed (imputed)",
                  y_label="probability of the explained class", description="ROAD, random ordering.")
        for m, alist in attrs.items():
            morf, lerf, mc, lc = [], [], [], []
            for ex, a in zip(examples, alist):
                order = np.argsort(-a.features, kind="stable")
                c1, c2 = curve(ex, order), curve(ex, order[::-1].copy())
                mc.append(c1)
                lc.append(c2)
                morf.append(float(np.mean(c1)))
                lerf.append(float(np.mean(c2)))
            per_method[m]["road_morf"] = morf
            per_method[m]["road_lerf"] = lerf
            for name, cs in (("morf", mc), ("lerf", lc)):
                out.curve(f"{m}.road_{name}", fr, np.mean(cs, 0), x_label="fraction of features removed (imputed)",
                          y_label="probability of the explained class",
                          description=f"ROAD, {'most' if name == 'morf' else 'least'}-attributed features removed "
                                      "first, re-imputed from their neighbours (mean over examples).")

    def _infidelity(self, task, model, ex, a: Attribution, seed: int) -> float:
        import torch
        from captum.metrics import infidelity

        p = self.params
        gen = torch.Generator(device="cpu").manual_seed(derive(seed, Stream.ATTRIBUTION_PERTURB, 3))
        n = ex.n_features
        ones = torch.ones(1, n, dtype=torch.float64)

        def perturb(inputs):
            drop = (torch.rand(inputs.shape, generator=gen, dtype=torch.float64) < p.infidelity_drop).to(inputs.dtype)
            return drop, inputs - drop

        def forward(z):
            return task.explained_output(model, ex, (z > 0.5).cpu()).double().cpu()

        attributions = torch.as_tensor(a.features, dtype=torch.float64).view(1, n)
        val = infidelity(forward, perturb, ones, attributions, n_perturb_samples=p.perturbations,
                         max_examples_per_batch=min(p.internal_batch_size or 64, p.perturbations), normalize=True)
        return float(val[0])

    def _randomization(self, target, task, examples, attrs, per_method, out, seed) -> list[str]:
        """Adebayo et al.'s cascade on a copy of the target (see `cascade.py`): re-initialize layer groups from
        the top down, cumulatively, and compare the attributions with the trained model's after each step."""
        import torch

        from fmaudit.audits.explain.cascade import (forward_order, hf_model, layer_groups, map_ssim,
                                                     reinitialize, untie_parameters)

        p = self.params
        exs = examples[: p.randomization_examples] if p.randomization_examples else examples
        images = task.task == IMAGE_CLS
        keys = ("spearman", "spearman_abs") + (("ssim",) if images else ())
        rand_target = target.copy(name=f"{target.name}[randomized]")
        failing: list[str] = []
        try:
            model = rand_target.model
            model.eval()
            untied = untie_parameters(model)
            groups = layer_groups(model)
            probe_ex = exs[0]
            used, unused = forward_order(model, groups, lambda: task.explained_output(
                model, probe_ex, np.ones((1, probe_ex.n_features), dtype=bool)))
            cascade = list(reversed(used))[: p.randomization_depth or None]
            if not cascade:
                raise RuntimeError("the randomization check found no layer with parameters in the forward pass")
            hf = hf_model(model)
            # sims[m][key][step] = per-example values
            sims: dict[str, dict[str, list[list[float]]]] = {m: {k: [] for k in keys} for m in attrs}
            for step, g in enumerate(cascade):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive(seed, Stream.ATTRIBUTION_RANDOMIZE, step))
                    reinitialize(g, hf)
                rand_target.weights_changed()
                for m, alist in attrs.items():
                    vals: dict[str, list[float]] = {k: [] for k in keys}
                    for ex, a in zip(exs, alist):
                        r = task.attribute(m, model, ex)
                        vals["spearman"].append(spearman(a.features, r.features))
                        vals["spearman_abs"].append(spearman(np.abs(a.features), np.abs(r.features)))
                        if images:
                            vals["ssim"].append(map_ssim(a.full.sum(0), r.full.sum(0)))
                    for k in keys:
                        sims[m][k].append(vals[k])
        finally:
            del rand_target
        steps = np.arange(1, len(cascade) + 1)
        similarity: dict[str, list[dict[str, Any]]] = {}
        for m in attrs:
            rows = []
            for i, g in enumerate(cascade):
                row: dict[str, Any] = {"step": i + 1, "group": g.name}
                for k in keys:
                    v, ci = mean_ci(sims[m][k][i], rounds=p.bootstrap, level=p.confidence, seed=seed)
                    row[k], row[f"{k}_ci"] = v, list(ci) if ci else None
                rows.append(row)
            similarity[m] = rows
            labels = {"spearman": "Spearman (signed)", "spearman_abs": "Spearman (absolute)", "ssim": "SSIM"}
            for k in keys:
                suffix = "" if k == "spearman" else "_" + k.replace("spearman_", "")
                out.curve(f"{m}.randomization_cascade{suffix}", steps, [r[k] for r in rows],
                          x_label="cascade step (layer groups re-initialized from the top)",
                          y_label=f"{labels[k]} vs trained model",
                          description=f"Cascading randomization (Adebayo et al. 2018): {labels[k]} between the "
                                      "trained model's attributions and those after re-initializing the top "
                                      "k layer groups (groups in tables.randomization.cascade).")
            # the gated numbers: after the deepest step of the cascade
            for k in keys:
                per_method[m][f"randomization_{k}"] = sims[m][k][-1]
            last = sims[m]["spearman"][-1]
            mean = float(np.nanmean(last)) if np.isfinite(last).any() else float("nan")
            above = sum(1 for r in rows if r["spearman"] is not None and np.isfinite(r["spearman"])
                        and r["spearman"] > p.randomization_threshold)
            if np.isfinite(mean) and mean <= p.randomization_threshold and len(rows) > 1 and 2 * above >= len(rows):
                out.finding("low", f"{m} changes only once the lower layers are re-initialized",
                            f"its attributions keep a rank correlation above {p.randomization_threshold} for {above} of "
                            f"{len(rows)} cascade steps (top first): they depend on the input layers more than on "
                            "what the upper layers learned (Adebayo et al. 2018, Fig. 2)",
                            metric=f"{m}.randomization_spearman")
            if np.isfinite(mean) and mean > p.randomization_threshold:
                failing.append(m)
                out.finding("high", f"{m} fails the model-parameter randomization check",
                            f"its attributions keep a mean rank correlation of {mean:.3f} (> "
                            f"{p.randomization_threshold}) after re-initializing {len(cascade)} layer group(s) "
                            f"from the top down to {cascade[-1].name}: they barely depend on what the model "
                            "learned, so they cannot explain its decisions (Adebayo et al. 2018)",
                            metric=f"{m}.randomization_spearman")
        out.tables["randomization"] = {
            "procedure": "cascading model-parameter randomization (Adebayo et al. 2018): layer groups of a copy "
                         "re-initialized from the top down, cumulatively; attributions recomputed after each step",
            "cascade": [{"step": i + 1, "group": g.name, "module": g.kind, "parameters": g.num_parameters,
                         "init": g.init}
                        for i, g in enumerate(cascade)],
            "reinitialized_modules": [g.name for g in cascade],
            "complete": len(cascade) == len(used),
            "not_in_forward": unused, "untied": untied, "similarity": similarity,
            "threshold": p.randomization_threshold, "failing_methods": failing, "num_examples": len(exs),
            "statistic": "Spearman rank correlation of signed attributions after the deepest cascade step, mean "
                         "over examples (gated); absolute-value Spearman" + (" and SSIM of the absolute maps"
                                                                             if images else "") + " reported",
        }
        return failing

    def _completeness(self, examples, alist: list[Attribution], out, level, rounds, seed, unit: str) -> None:
        """Sum of IG attributions vs F(x) - F(baseline) measured separately (causal LMs: F = continuation
        log-prob; LLMGradientAttribution reports no delta there, so only the gap is checked). The relative
        error is undefined where F(x) ~ F(baseline) (|difference| < completeness_min_difference): those
        examples are judged on the absolute gap only, never told to raise n_steps."""
        p = self.params
        gaps, deltas, rel, rows, flat = [], [], [], [], []
        for ex, a in zip(examples, alist):
            total = float(a.full.sum())
            diff = ex.meta["f_x"] - ex.meta["f_b"]
            gap = abs(total - diff)
            gaps.append(gap)
            deltas.append(abs(a.delta) if a.delta is not None else float("nan"))
            defined = abs(diff) >= max(p.completeness_min_difference, 1e-12)
            r = gap / abs(diff) if defined else None
            if defined:
                rel.append(r)
            else:
                flat.append(ex.ex_id)
            rows.append({"id": ex.ex_id, "sum_attributions": total, "f_x": ex.meta["f_x"], "f_baseline": ex.meta["f_b"],
                         "gap": gap, "relative_error": r, "convergence_delta": a.delta})
        if np.isfinite(deltas).any():
            v, ci = mean_ci(deltas, rounds=rounds, level=level, seed=seed)
            out.metric("integrated_gradients.convergence_delta", v, higher_is_better=False, ci=ci, ci_level=level,
                       unit=unit, description="Mean |convergence delta| reported by Captum.")
        v, ci = mean_ci(gaps, rounds=rounds, level=level, seed=seed)
        out.metric("integrated_gradients.completeness_gap", v, higher_is_better=False, ci=ci, ci_level=level,
                   unit=unit, description="Mean |sum of attributions - (F(x) - F(baseline))|, F measured "
                                             "separately.")
        out.metric("integrated_gradients.completeness_abs_gap", float(np.max(gaps)), higher_is_better=False, unit=unit,
                   description="Largest |sum of attributions - (F(x) - F(baseline))| over the examples (defined "
                               "even where F(x) = F(baseline)).")
        worst = float(np.max(rel)) if rel else None
        out.metric("integrated_gradients.completeness_relative_error", worst, higher_is_better=False, unit="fraction",
                   description="Largest gap / |F(x) - F(baseline)| over the examples where F(x) and F(baseline) "
                               "differ by at least completeness_min_difference (null when none does).")
        agree = (all(abs(g - d) <= 1e-4 + 1e-3 * abs(r["f_x"] - r["f_baseline"])
                     for g, d, r in zip(gaps, deltas, rows) if np.isfinite(d))
                 if np.isfinite(deltas).any() else None)
        out.tables["completeness"] = {"examples": rows, "gap_matches_delta": agree, "tolerance": p.completeness_tolerance,
                                      "min_difference": p.completeness_min_difference,
                                      "relative_error_undefined": flat}
        if worst is not None and worst > p.completeness_tolerance:
            out.finding("medium", "Integrated gradients are not complete on some examples",
                        f"sum of attributions misses F(x) - F(baseline) by up to {worst:.1%} (tolerance "
                        f"{p.completeness_tolerance:.1%}); raise n_steps", metric="integrated_gradients.completeness_relative_error")
        if flat:
            out.finding("low", f"F(x) = F(baseline) on {len(flat)} of {len(rows)} example(s): completeness is "
                               "uninformative there",
                        f"the explained output differs by less than {p.completeness_min_difference:g} {unit} between "
                        "the input and the baseline, so integrated gradients must sum to about zero and the relative "
                        "error is undefined (absolute gaps up to "
                        f"{max(g for g, r in zip(gaps, rows) if r['relative_error'] is None):.3g} {unit}); the "
                        "attributions only say how contributions cancel. A baseline the model scores differently "
                        "(e.g. blur instead of black, another baseline token) explains more",
                        metric="integrated_gradients.completeness_abs_gap")
        if agree is False:
            out.finding("medium", "Integrated gradients' convergence delta disagrees with the measured gap",
                        "the reported delta does not match sum(attr) - (F(x) - F(baseline)) measured separately",
                        metric="integrated_gradients.completeness_gap")

    # -- report pieces -------------------------------------------------------------------------------
    def _evidence(self, task, ex: Example, attrs, methods, names, store: bool, data, path) -> dict[str, Any]:
        def lab(i):
            if i is None:
                return None
            return names[i] if names and i < len(names) else i

        ev: dict[str, Any] = {"id": ex.ex_id, "true_label": lab(ex.true_label), "predicted_label": lab(ex.predicted),
                              "explained_label": lab(ex.explained), "f_x": ex.meta.get("f_x"),
                              "f_baseline": ex.meta.get("f_b")}
        if ex.meta.get("prob") is not None:
            ev["explained_probability"] = ex.meta["prob"]
        i = ex.meta["data_index"]
        if task.task == IMAGE_CLS:
            ev["heatmap"] = path
            h, w = ex.x.shape[-2:]
            unit = task.feature_unit(h, w)
            cols = unit["grid"][1] if unit["unit"] == "patch" else w
            ev["top_patches" if unit["unit"] == "patch" else "top_pixels"] = {
                m: [{"row": int(k // cols), "col": int(k % cols), "score": float(a.features[k])}
                    for k in np.argsort(-np.abs(a.features))[:5]]
                for m, a in ((m, attrs[m][ex.pos]) for m in methods)}
            if store:
                ev["image_shape"] = list(np.asarray(data.images[i]).shape)
        else:
            tok = task.target.tokenizer
            ids = ex.x[0].tolist()
            ev["num_tokens"] = len(ids)
            ev["attributions"] = {}
            for m in methods:
                a = attrs[m][ex.pos]
                rows = []
                for k, pos in enumerate(ex.feat_pos):
                    row = {"position": int(pos), "token_id": int(ids[pos]), "score": float(a.features[k])}
                    if store:
                        row["token"] = tok.convert_ids_to_tokens(int(ids[pos]))
                    rows.append(row)
                ev["attributions"][m] = rows
                if a.delta is not None:
                    ev.setdefault("convergence_delta", {})[m] = a.delta
            if task.task == CAUSAL_LM:
                cont = ex.extra["continuation"].tolist()
                ev["continuation_token_ids"] = cont
                ev["continuation_logprob"] = ex.meta.get("f_x")
                if store:
                    ev["prompt"] = tok.decode(ids)
                    ev["continuation"] = tok.decode(cont)
            elif store:
                ev["text"] = data.texts[i]
        return ev

    def _top_tokens(self, task, examples, alist, store: bool) -> dict[str, Any]:
        """Tokens with the largest mean attribution across the set (scores L1-normalized per example so long
        or confident examples don't dominate)."""
        tok = task.target.tokenizer
        agg: dict[int, list[float]] = {}
        for ex, a in zip(examples, alist):
            s = a.features / max(float(np.abs(a.features).sum()), 1e-12)
            ids = ex.x[0].tolist()
            for k, pos in enumerate(ex.feat_pos):
                agg.setdefault(int(ids[pos]), []).append(float(s[k]))
        stats = [(tid, float(np.mean(v)), len(v)) for tid, v in agg.items()]

        def rows(items):
            out = []
            for tid, mean, count in items[: self.params.top_tokens]:
                r = {"token_id": tid, "mean_score": mean, "count": count}
                if store:
                    r["token"] = tok.convert_ids_to_tokens(tid)
                out.append(r)
            return out

        return {"towards_explained": rows(sorted(stats, key=lambda t: -t[1])),
                "against_explained": rows(sorted(stats, key=lambda t: t[1])),
                "normalization": "per-example L1"}

    def _heatmaps(self, examples, attrs, methods, ctx: AuditContext) -> list[str]:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        d = ctx.artifact_dir()
        paths = []
        for ex in examples:
            panels = ([("input", ex.x[0].detach().cpu().numpy().mean(0), "gray")] if ctx.store_examples else [])
            for m in methods:
                a = attrs[m][ex.pos]
                panels.append((m, a.full.sum(0), "bwr"))
            fig, axes = plt.subplots(1, len(panels), figsize=(1.7 * len(panels), 1.9), dpi=80)
            axes = np.atleast_1d(axes)
            for ax, (title, img, cmap) in zip(axes, panels):
                if cmap == "bwr":
                    lim = float(np.abs(img).max()) or 1.0
                    ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim)
                else:
                    ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
                ax.set_title(title.replace("_", " "), fontsize=7)
                ax.axis("off")
            fig.tight_layout()
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in ex.ex_id)
            path = d / f"heatmap_{ex.pos:03d}_{safe}.png"
            fig.savefig(path)
            plt.close(fig)
            paths.append(ctx.relative(path))
        return paths


def _hook_count(model: Any) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n
