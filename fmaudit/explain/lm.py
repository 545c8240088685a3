"""Causal LMs: features are the prompt's tokens (special tokens excluded), the explained output is the
log-probability of a target continuation (the text's own next tokens, or the model's greedy ones), teacher-forced.

Methods (Captum): `LLMAttribution(FeatureAblation)` and `LLMGradientAttribution(LayerIntegratedGradients)` on the
input embeddings. No max-sensitivity: token inputs have no small perturbation.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fmaudit.batching import batched_forward
from fmaudit.explain.space import Attribution, AttributionMethod, Example, FeatureSpace, SpaceOptions
from fmaudit.explain.tokens import TokenBaseline
from fmaudit.tasks import CAUSAL_LM

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------------------------------------------
# Methods: (space, model, example) -> Captum's LLMAttributionResult


def _feature_ablation(space: LMSpace, model: Any, ex: Example) -> Any:
    from captum.attr import FeatureAblation, LLMAttribution

    return LLMAttribution(FeatureAblation(model), space.target.tokenizer).attribute(
        ex.extra["input"], target=ex.extra["continuation"], forward_in_tokens=False, perturbations_per_eval=1
    )  # LLMAttribution's forward takes one perturbation at a time


def _integrated_gradients(space: LMSpace, model: Any, ex: Example) -> Any:
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution

    lig = LayerIntegratedGradients(model, model.get_input_embeddings())
    return LLMGradientAttribution(lig, space.target.tokenizer).attribute(
        ex.extra["input"],
        target=ex.extra["continuation"],
        n_steps=space.options.n_steps,
        internal_batch_size=space.options.internal_batch_size,
    )


LM_METHODS: dict[str, AttributionMethod] = {
    "feature_ablation": AttributionMethod("LLMAttribution(FeatureAblation)", _feature_ablation),
    "integrated_gradients": AttributionMethod(
        "LLMGradientAttribution(LayerIntegratedGradients(embeddings))", _integrated_gradients
    ),
}


class LMSpace(FeatureSpace):
    """Prompt-token features of a causal LM, explaining a continuation's log-prob (see the module docstring)."""

    model_task = CAUSAL_LM
    data_field = "texts"
    curve_unit = "nats"
    output_unit = "nats"
    methods = LM_METHODS
    defaults = ("feature_ablation", "integrated_gradients")
    has_noise = False

    def __init__(self, target: Any, options: SpaceOptions, device: Any):
        super().__init__(target, options, device)
        self.tokens = TokenBaseline(target.tokenizer, options.text_baseline)

    def example(self, pos: int, ex_id: str, raw: str) -> Example | None:
        """The text split into a prompt and its continuation (`continuation: text`), or the prompt and the
        model's greedy continuation (`generate`); None when the text is too short for either."""
        import torch
        from captum.attr import TextTokenInput

        tok, o = self.target.tokenizer, self.options
        ids = tok(raw, add_special_tokens=False)["input_ids"]
        c = o.continuation_tokens
        if o.continuation == "text":
            ids = ids[: o.max_prompt_tokens + c]
            if len(ids) < c + 1:
                return None
            prompt, cont = tok.decode(ids[:-c]), torch.tensor(ids[-c:], dtype=torch.long)
        else:
            if not ids:
                return None
            prompt, cont = tok.decode(ids[: o.max_prompt_tokens]), None
        inp = TextTokenInput(prompt, tok, baselines=self.tokens.token_id, skip_tokens=list(self.tokens.special) or None)
        if inp.n_itp_features == 0:
            return None
        x = inp.inp_tensor.to(self.device)
        if cont is None:
            with torch.no_grad():
                out = self.target.model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=c,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            cont = out[0, x.shape[1] :].cpu()
            if len(cont) == 0:
                return None
        mask = inp.itp_mask[0].numpy() if inp.itp_mask is not None else np.ones(x.shape[1], dtype=bool)
        feat_pos = np.flatnonzero(mask)
        baseline = x.clone()
        baseline[0, torch.as_tensor(feat_pos, device=x.device)] = self.tokens.token_id
        return Example(
            pos=pos,
            ex_id=ex_id,
            x=x,
            baseline=baseline,
            n_features=len(feat_pos),
            feat_pos=feat_pos,
            extra={"input": inp, "continuation": cont.to(self.device)},
        )

    def prepare(self, model: Any, ex: Example, *, explain_true: bool) -> None:
        full = np.ones((1, ex.n_features), dtype=bool)
        ex.meta["f_x"] = float(self.explained_output(model, ex, full)[0])
        ex.meta["f_b"] = float(self.explained_output(model, ex, ~full)[0])

    def compose(self, ex: Example, keep: Any) -> torch.Tensor:
        return self.tokens.compose(ex, keep)

    def continuation_logprob(self, model: Any, ex: Example, prompts: Any) -> torch.Tensor:
        """Sum over the continuation of log p(token | prompt, earlier continuation): the quantity both
        Captum LLM wrappers attribute (teacher-forced, one forward per prompt)."""
        import torch

        cont = ex.extra["continuation"]

        def one(b: torch.Tensor) -> torch.Tensor:
            ids = torch.cat([b, cont.view(1, -1).expand(b.shape[0], -1)], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            p_len = b.shape[1]
            lp = logits[:, p_len - 1 : p_len - 1 + len(cont)].log_softmax(-1)
            return lp.gather(-1, cont.view(1, -1, 1).expand(b.shape[0], -1, 1)).squeeze(-1).sum(-1)

        return batched_forward(one, prompts, self.options.internal_batch_size or 16)

    def explained_output(self, model: Any, ex: Example, keep: Any) -> torch.Tensor:
        return self.continuation_logprob(model, ex, self.compose(ex, keep))

    def attribute(self, method: str, model: Any, ex: Example) -> Attribution:
        fn = self.method(method).attribute
        t0 = time.perf_counter()
        res = fn(self, model, ex)
        seq = res.seq_attr.detach().double().cpu().numpy()
        full = res.token_attr.detach().double().cpu().numpy() if res.token_attr is not None else seq[None]
        return Attribution(method, seq, full, None, time.perf_counter() - t0)

    def describe_baseline(self) -> dict[str, Any]:
        return self.tokens.describe()
