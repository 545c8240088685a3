"""Text classifiers: features are tokens (special tokens excluded), the explained output is the logit of the
explained class.

Methods (Captum): LayerIntegratedGradients and LayerGradientXActivation on the input embedding layer,
FeatureAblation and Occlusion over token ids. Max-sensitivity perturbs word embeddings and uses each method's
embedding-space twin (IntegratedGradients, InputXGradient, FeatureAblation / Occlusion per token), which gives
exactly the layer / token-id attributions since word embeddings are a lookup.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fmaudit.batching import batched_forward
from fmaudit.explain.space import (
    Attribution,
    AttributionMethod,
    ClassifierSpace,
    Example,
    NoisyInput,
    SpaceOptions,
    TextBaseline,
)
from fmaudit.explain.tokens import TokenBaseline
from fmaudit.tasks import TEXT_CLASSIFICATION

if TYPE_CHECKING:
    import torch


class TextForward:
    """input_ids (+ attention mask, position / token type ids) -> logits, through `target.forward_logits`.
    Extra inputs of batch 1 are expanded to the batch of `input_ids` (Captum expands them too)."""

    def __init__(self, target: Any, model: Any, keys: Sequence[str], *, embeds: bool = False):
        self.target, self.model, self.keys, self.embeds = target, model, tuple(keys), embeds

    def __call__(self, inputs: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        n = inputs.shape[0]
        batch = {k: (v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v) for k, v in zip(self.keys, extra)}
        batch["inputs_embeds" if self.embeds else "input_ids"] = inputs
        return self.target.forward_logits(self.model, batch)


# ---------------------------------------------------------------------------------------------------
# Methods on token ids: (space, model, example) -> (per-position attributions (1, length), delta | None)


def _integrated_gradients(space: TextSpace, model: Any, ex: Example) -> tuple[Any, float | None]:
    from captum.attr import LayerIntegratedGradients

    o = space.options
    attr, d = LayerIntegratedGradients(space.forward(model, ex), model.get_input_embeddings()).attribute(
        ex.x,
        baselines=ex.baseline,
        target=ex.explained,
        additional_forward_args=tuple(ex.extra.values()),
        n_steps=o.n_steps,
        internal_batch_size=o.internal_batch_size,
        return_convergence_delta=True,
    )
    return attr.sum(-1), float(d.abs().max())


def _gradient_x_input(space: TextSpace, model: Any, ex: Example) -> tuple[Any, float | None]:
    from captum.attr import LayerGradientXActivation

    attr = LayerGradientXActivation(space.forward(model, ex), model.get_input_embeddings()).attribute(
        ex.x, target=ex.explained, additional_forward_args=tuple(ex.extra.values())
    )
    return attr.sum(-1), None


def _feature_ablation(space: TextSpace, model: Any, ex: Example) -> tuple[Any, float | None]:
    from captum.attr import FeatureAblation

    return FeatureAblation(space.forward(model, ex)).attribute(
        ex.x,
        baselines=ex.baseline,
        target=ex.explained,
        additional_forward_args=tuple(ex.extra.values()),
        perturbations_per_eval=space.options.internal_batch_size or 1,
    ), None


def _occlusion(space: TextSpace, model: Any, ex: Example) -> tuple[Any, float | None]:
    from captum.attr import Occlusion

    w = space.options.occlusion_window or 3
    return Occlusion(space.forward(model, ex)).attribute(
        ex.x,
        sliding_window_shapes=(w,),
        strides=(1,),
        baselines=ex.baseline,
        target=ex.explained,
        additional_forward_args=tuple(ex.extra.values()),
        perturbations_per_eval=space.options.internal_batch_size or 1,
    ), None


TEXT_METHODS: dict[str, AttributionMethod] = {
    "integrated_gradients": AttributionMethod("LayerIntegratedGradients(embeddings)", _integrated_gradients),
    "gradient_x_input": AttributionMethod("LayerGradientXActivation(embeddings)", _gradient_x_input),
    "feature_ablation": AttributionMethod("FeatureAblation(token ids)", _feature_ablation),
    "occlusion": AttributionMethod("Occlusion(token ids)", _occlusion),
}


# ---------------------------------------------------------------------------------------------------
# Embedding-space twins (max-sensitivity): (space, forward on embeddings, embeddings (B, L, D), baseline
# embeddings (B, L, D), example) -> attributions (B, L, D)

Twin = Callable[["TextSpace", TextForward, Any, Any, Example], Any]


def _twin_integrated_gradients(space: TextSpace, fwd: TextForward, inputs: Any, base: Any, ex: Example) -> Any:
    from captum.attr import IntegratedGradients

    return IntegratedGradients(fwd).attribute(
        inputs,
        baselines=base,
        target=ex.explained,
        additional_forward_args=tuple(ex.extra.values()),
        n_steps=space.options.n_steps,
        internal_batch_size=space.options.internal_batch_size,
    )


def _twin_gradient_x_input(space: TextSpace, fwd: TextForward, inputs: Any, base: Any, ex: Example) -> Any:
    from captum.attr import InputXGradient

    return InputXGradient(fwd).attribute(inputs, target=ex.explained, additional_forward_args=tuple(ex.extra.values()))


def _twin_feature_ablation(space: TextSpace, fwd: TextForward, inputs: Any, base: Any, ex: Example) -> Any:
    import torch
    from captum.attr import FeatureAblation

    b, length, dim = inputs.shape
    mask = torch.arange(length, device=inputs.device).view(1, length, 1).expand(b, length, dim)  # one token each
    return FeatureAblation(fwd).attribute(
        inputs,
        baselines=base,
        target=ex.explained,
        feature_mask=mask,
        additional_forward_args=tuple(ex.extra.values()),
        perturbations_per_eval=space.options.internal_batch_size or 1,
    )


def _twin_occlusion(space: TextSpace, fwd: TextForward, inputs: Any, base: Any, ex: Example) -> Any:
    from captum.attr import Occlusion

    w, dim = space.options.occlusion_window or 3, inputs.shape[2]
    return Occlusion(fwd).attribute(
        inputs,
        sliding_window_shapes=(w, dim),
        strides=(1, dim),
        baselines=base,
        target=ex.explained,
        additional_forward_args=tuple(ex.extra.values()),
        perturbations_per_eval=space.options.internal_batch_size or 1,
    )


EMBEDDING_TWINS: dict[str, Twin] = {
    "integrated_gradients": _twin_integrated_gradients,
    "gradient_x_input": _twin_gradient_x_input,
    "feature_ablation": _twin_feature_ablation,
    "occlusion": _twin_occlusion,
}


# ---------------------------------------------------------------------------------------------------
# The space


class TextSpace(ClassifierSpace):
    """Token features of a text classifier's input (see the module docstring)."""

    model_task = TEXT_CLASSIFICATION
    data_field = "texts"
    methods = TEXT_METHODS
    defaults = ("integrated_gradients", "gradient_x_input", "feature_ablation")

    def __init__(self, target: Any, options: SpaceOptions, device: Any):
        super().__init__(target, options, device)
        self.tokens = TokenBaseline(target.tokenizer, options.text_baseline)

    def example(self, pos: int, ex_id: str, raw: str) -> Example:
        import torch

        batch = self.target.encode_texts([raw])
        ids = batch.pop("input_ids")
        special = torch.isin(ids, torch.tensor(self.tokens.special, device=ids.device))
        baseline = torch.where(special, ids, torch.full_like(ids, self.tokens.token_id))  # [CLS] pad ... pad [SEP]
        feat_pos = np.flatnonzero(~special[0].cpu().numpy())
        return Example(
            pos=pos, ex_id=ex_id, x=ids, baseline=baseline, n_features=len(feat_pos), extra=batch, feat_pos=feat_pos
        )

    def forward(self, model: Any, ex: Example, *, embeds: bool = False) -> TextForward:
        """The forward function Captum calls: token ids (or word embeddings) plus `ex.extra` -> logits."""
        return TextForward(self.target, model, list(ex.extra), embeds=embeds)

    def compose(self, ex: Example, keep: Any) -> torch.Tensor:
        return self.tokens.compose(ex, keep)

    def logits(self, model: Any, ex: Example, x: Any) -> torch.Tensor:
        return batched_forward(
            lambda b: self.forward(model, ex)(b, *ex.extra.values()), x, self.options.internal_batch_size or 64
        )

    def attribute(self, method: str, model: Any, ex: Example) -> Attribution:
        fn = self.method(method).attribute
        t0 = time.perf_counter()
        attr, delta = fn(self, model, ex)
        full = attr.detach()[0].double().cpu().numpy()
        return Attribution(method, full[ex.feat_pos], full, delta, time.perf_counter() - t0)

    def noise_input(self, method: str, model: Any, ex: Example, radius: float, seed: int) -> NoisyInput:
        """Word embeddings, noise relative to their RMS, explained by the method's embedding-space twin."""
        import torch

        twin = EMBEDDING_TWINS[method]
        emb = model.get_input_embeddings()
        with torch.no_grad():
            e, eb = emb(ex.x).detach(), emb(ex.baseline).detach()
        fwd = self.forward(model, ex, embeds=True)

        def explain(inputs: torch.Tensor) -> torch.Tensor:
            return twin(self, fwd, inputs, eb.expand(inputs.shape[0], -1, -1), ex).sum(-1)

        return NoisyInput(inputs=e, radius=radius * float(e.pow(2).mean().sqrt()), explain=explain, stream=1)

    def describe_baseline(self) -> dict[str, Any]:
        return self.tokens.describe()


def explain_texts(
    target: Any,
    texts: Sequence[str],
    *,
    method: str = "integrated_gradients",
    labels: Sequence[int] | None = None,
    n_steps: int = 50,
    internal_batch_size: int | None = None,
    baseline: TextBaseline = "pad",
) -> list[tuple[Example, Attribution]]:
    """Attribute each text's logit of `labels[i]` (default: the predicted class) to its tokens, with the
    same code the audit runs. Returns (example, attribution) pairs; `attribution.full` has one score per
    token position (special tokens included), `attribution.features` skips special tokens."""
    space = TextSpace(
        target,
        SpaceOptions(n_steps=n_steps, internal_batch_size=internal_batch_size, text_baseline=baseline),
        target.device,
    )
    out = []
    for i, text in enumerate(texts):
        ex = space.example(i, str(i), text)
        ex.explained = int(space.logits(target.model, ex, ex.x).argmax(-1)[0]) if labels is None else int(labels[i])
        out.append((ex, space.attribute(method, target.model, ex)))
    return out
