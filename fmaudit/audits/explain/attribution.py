"""`explain.attribution`: why the model decides, and whether that explanation can be trusted.

Attributions come from Captum (its methods are called, never re-implemented), through one feature-space
interface per model task (`fmaudit/explain/`: `text.py`, `image.py`, `lm.py`):

- text classifiers: LayerIntegratedGradients on the input embedding layer (with convergence delta),
  LayerGradientXActivation on it (gradient x input), FeatureAblation and Occlusion over token ids;
- image classifiers (pixels in [0, 1]): IntegratedGradients, Saliency, GradientShap, Occlusion, InputXGradient;
  features are pixels, or the model's patches for ViT-style models (the config's patch_size);
- causal LMs: `LLMAttribution(FeatureAblation)` and `LLMGradientAttribution(LayerIntegratedGradients)` over
  the prompt tokens, for a target continuation (the text's own next tokens, or the model's greedy one).

Quality of each explanation, cheap by default, written once over that interface (`fmaudit/explain/`):

- deletion / insertion curves (AOPC) against a random ordering of the same features (`curves.py`);
- Captum's `infidelity` (in the features' presence space: random subsets dropped to the baseline) and
  `sensitivity_max` (uniform input noise; in word-embedding space for text) (`faithfulness.py`);
- the cascading model-parameter randomization sanity check (Adebayo et al. 2018): the layer groups of a COPY
  of the model are re-initialized from the top down, one at a time and cumulatively (`cascade.py`,
  `randomization.py`), and the similarity curve (Spearman signed / absolute, SSIM for images) with the trained
  model's attributions is reported; a method whose attributions barely change after the deepest step is flagged;
- integrated-gradients completeness: sum of attributions vs F(x) - F(baseline), within the convergence delta
  (absolute and relative gaps; the relative one is undefined where F(x) ~ F(baseline)) (`faithfulness.py`);
- images, opt-in: ROAD (Rong et al. 2022), removal with noisy linear imputation instead of the baseline (`road.py`).

This module orchestrates; `quality.py`, `method_metrics.py` and `evidence.py` next to it write the report.
Heavy imports (torch, captum, matplotlib) happen inside functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, select_examples
from fmaudit.audits.explain.evidence import evidence, heatmaps, top_tokens
from fmaudit.audits.explain.method_metrics import report_methods
from fmaudit.audits.explain.quality import QualityRun, run_quality
from fmaudit.explain.image import ImageSpace, patch_grid
from fmaudit.explain.lm import LMSpace
from fmaudit.explain.space import (
    Attribution,
    Continuation,
    Example,
    FeatureSpace,
    ImageBaseline,
    ImageFeatures,
    SpaceOptions,
    TextBaseline,
)
from fmaudit.explain.text import TextSpace
from fmaudit.explain.tokens import baseline_token_id
from fmaudit.seeds import Stream
from fmaudit.seeds import rng as stream_rng
from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION

if TYPE_CHECKING:
    from fmaudit.data import Dataset

__all__ = ["AttributionAudit", "SPACES"]

Method = Literal[
    "integrated_gradients", "gradient_x_input", "feature_ablation", "occlusion", "saliency", "gradient_shap"
]
MetricName = Literal["deletion", "insertion", "infidelity", "sensitivity", "randomization", "completeness", "road"]

# Model task -> its feature space (its methods, in the order reports list them, and its default methods).
SPACES: dict[str, type[FeatureSpace]] = {
    TEXT_CLASSIFICATION: TextSpace,
    IMAGE_CLASSIFICATION: ImageSpace,
    CAUSAL_LM: LMSpace,
}
_OPTIONS = SpaceOptions()  # the defaults of the options the params share with the feature spaces


class AttributionAudit(AuditModule):
    name = "explain.attribution"
    category = "explain"
    description = (
        "Feature attributions via Captum (integrated gradients, gradient x input, ablation, occlusion, "
        "saliency, GradientShap; LLM attribution for causal LMs) with explanation-quality metrics: "
        "deletion / insertion AOPC vs random, infidelity, max-sensitivity, the model-parameter "
        "randomization sanity check and integrated-gradients completeness."
    )
    requires = frozenset()
    tasks = tuple(SPACES)
    metric_names = (
        "*.deletion_aopc",
        "*.insertion_auc",
        "*.infidelity",
        "*.sensitivity_max",
        "*.randomization_spearman",
        "*.randomization_spearman_abs",
        "*.randomization_ssim",
        "*.seconds_per_example",
        "integrated_gradients.convergence_delta",
        "integrated_gradients.completeness_gap",
        "integrated_gradients.completeness_abs_gap",
        "integrated_gradients.completeness_relative_error",
        "random.deletion_aopc",
        "*.road_morf",
        "*.road_lerf",
        "random.road",
        "random.insertion_auc",
        "methods_failing_randomization",
        "num_examples",
    )

    class Params(AuditParams):
        methods: list[Method] | None = Field(
            default=None,
            description="Attribution methods; default per task: text ig, gradient_x_input, "
            "feature_ablation; images ig, saliency, gradient_shap, occlusion; causal LMs "
            "feature_ablation, integrated_gradients. The first one drives the aggregates.",
        )
        num_examples: int = Field(default=8, gt=0, le=10_000, description="Examples explained (seeded sample).")
        split: Literal["auto", "nonmembers", "members", "all"] = Field(
            default="auto", description="auto = held-out non-members when the target was fine-tuned on this data."
        )
        explain_label: Literal["predicted", "true"] = Field(
            default="predicted", description="Classifiers: explain the predicted class or the true label."
        )
        n_steps: int = Field(
            default=_OPTIONS.n_steps, gt=1, le=5000, description="Integrated gradients: Riemann steps."
        )
        internal_batch_size: int | None = Field(
            default=_OPTIONS.internal_batch_size,
            gt=0,
            description="Upper bound on the forward batch inside a Captum call (memory).",
        )
        text_baseline: TextBaseline = Field(
            default=_OPTIONS.text_baseline, description="Token that replaces removed tokens (special tokens are kept)."
        )
        image_baseline: ImageBaseline = Field(default=_OPTIONS.image_baseline, description="Image baseline.")
        image_features: ImageFeatures = Field(
            default=_OPTIONS.image_features,
            description="Features of images for occlusion / deletion / insertion / infidelity / rank correlations: "
            "auto = ViT patches (the config's patch_size) when the model has them, else pixels.",
        )
        blur_sigma: float = Field(
            default=_OPTIONS.blur_sigma, gt=0, description="Gaussian blur sigma (pixels) of the blur baseline."
        )
        occlusion_window: int | None = Field(
            default=_OPTIONS.occlusion_window,
            gt=0,
            description="Occlusion window: tokens (default 3) or pixels (default side / 4).",
        )
        gradient_shap_samples: int = Field(default=_OPTIONS.gradient_shap_samples, gt=0, le=1000)
        gradient_shap_stdevs: float = Field(default=_OPTIONS.gradient_shap_stdevs, ge=0)
        continuation: Continuation = Field(
            default=_OPTIONS.continuation,
            description="Causal LMs: attribute the text's own last tokens, or the greedy continuation.",
        )
        continuation_tokens: int = Field(default=_OPTIONS.continuation_tokens, gt=0, le=64)
        max_prompt_tokens: int = Field(default=_OPTIONS.max_prompt_tokens, gt=0, le=4096)
        quality: list[MetricName] = Field(
            default=["deletion", "insertion", "infidelity", "sensitivity", "randomization", "completeness"],
            description="Explanation-quality metrics to compute.",
        )
        curve_steps: int = Field(default=10, ge=2, le=200, description="Points of the deletion / insertion curves - 1.")
        random_orderings: int = Field(default=3, ge=1, le=100, description="Random orderings averaged per example.")
        perturbations: int = Field(default=10, gt=0, le=1000, description="Infidelity / sensitivity perturbations.")
        infidelity_drop: float = Field(
            default=0.25, gt=0, lt=1, description="Probability that a feature is dropped in an infidelity perturbation."
        )
        sensitivity_radius: float = Field(
            default=0.02, gt=0, description="Uniform noise radius: pixels, or times the RMS of the word embeddings."
        )
        sensitivity_examples: int = Field(default=4, ge=0, description="Examples with max-sensitivity (costly).")
        randomization_examples: int | None = Field(
            default=None, gt=0, description="Examples for the randomization check (default: all)."
        )
        randomization_depth: int | None = Field(
            default=None,
            gt=0,
            description="Cascade steps (layer groups re-initialized from the top, cumulatively); "
            "default: all of them, down to the embeddings / first layer.",
        )
        randomization_threshold: float = Field(
            default=0.5,
            gt=-1,
            lt=1,
            description="A method fails when its mean rank correlation with the randomized "
            "model's attributions is above this.",
        )
        completeness_tolerance: float = Field(
            default=0.05, gt=0, description="Largest |sum(attr) - (F(x) - F(b))| / |F(x) - F(b)| accepted."
        )
        road_noise: float = Field(
            default=0.01,
            ge=0,
            description="ROAD (images): std of the Gaussian noise added to imputed pixels (Rong et al. 2022).",
        )
        completeness_min_difference: float = Field(
            default=0.01,
            ge=0,
            description="|F(x) - F(baseline)| below this (logits / nats) counts as F(x) = "
            "F(baseline): the relative error is undefined there.",
        )
        top_tokens: int = Field(default=15, ge=0, le=1000, description="Most influential tokens listed.")
        heatmaps: bool = Field(default=True, description="Images: write heatmap PNGs to the run's artifacts.")
        bootstrap: int = Field(default=1000, ge=0, le=100_000)
        confidence: float = Field(default=0.95, gt=0.5, lt=1.0)

        @model_validator(mode="after")
        def _unique(self) -> AttributionAudit.Params:
            if self.methods is not None:
                if not self.methods:
                    raise ValueError("methods: give at least one method, or leave it out for the defaults")
                if len(set(self.methods)) != len(self.methods):
                    raise ValueError("methods: each method at most once")
            return self

    params: Params

    # -- pre-flight ----------------------------------------------------------------------------------
    def methods_for(self, task: str) -> list[str]:
        if self.params.methods is not None:
            return list(self.params.methods)
        return list(SPACES[task].defaults) if task in SPACES else []

    def check(self, target: Any, data: Dataset | None) -> list[str]:
        p = self.params
        task = getattr(target, "task", None)
        if task not in SPACES:
            return [f"explain.attribution supports {', '.join(SPACES)} targets, not {task!r}"]
        space = SPACES[task]
        problems: list[str] = []
        bad = [m for m in self.methods_for(task) if m not in space.methods]
        if bad:
            problems.append(f"methods {bad} are not available for {task} targets (available: {list(space.methods)})")
        if data is None or len(data) == 0:
            problems.append("no examples to explain")
        elif getattr(data, space.data_field) is None:
            problems.append(f"dataset {data.name!r} has no {space.data_field}")
        elif (
            space is ImageSpace
            and p.image_features == "patches"
            and patch_grid(target, *np.asarray(getattr(data, space.data_field)[0]).shape[-2:]) is None
        ):
            problems.append(
                "image_features: patches needs a model whose config has a patch_size (ViT); "
                f"{getattr(target, 'architecture', '?')} has none (use auto or pixels)"
            )
        elif task != CAUSAL_LM and p.explain_label == "true" and data.labels is None:
            problems.append(f"explain_label: true needs labels, and dataset {data.name!r} has none")
        if "road" in p.quality and space is not ImageSpace:
            problems.append("quality: road (imputation of removed pixels) is for image classifiers only")
        if space is not ImageSpace:
            try:
                baseline_token_id(target.tokenizer, p.text_baseline)
            except ValueError as exc:
                problems.append(str(exc))
            if not hasattr(target.model, "get_input_embeddings"):
                problems.append("the model has no get_input_embeddings(); layer attributions need it")
        return problems

    # -- run -----------------------------------------------------------------------------------------
    def run(self, target: Any, ctx: AuditContext) -> Outcome:
        from fmaudit.targets.base import hook_count

        p = self.params
        space = SPACES[target.task](target, SpaceOptions.from_params(p), target.device)
        methods = self.methods_for(target.task)
        data, choice = select_examples(ctx, p.split)
        model = target.model
        model.eval()
        hooks_before, sha_before = hook_count(model), target.weights_sha256()

        examples = self._examples(space, model, data, stream_rng(ctx.seed, Stream.ATTRIBUTION_ORDER))
        attrs: dict[str, list[Attribution]] = {m: [] for m in methods}
        with ctx.progress_bar("attributing", len(methods) * len(examples)) as bar:
            for m in methods:
                for ex in examples:
                    attrs[m].append(space.attribute(m, model, ex))
                    bar.advance()

        out = Outcome()
        quality = QualityRun(p, target, space, model, examples, attrs, ctx.seed, out)
        run_quality(quality)
        report_methods(quality)

        assert ctx.data is not None  # select_examples refuses a context without data
        out.tables["explained_on"] = {
            "dataset": ctx.data.name,
            "subset": choice,
            "num_examples": len(examples),
            "task": target.task,
            "explain_label": p.explain_label,
        }
        out.tables["methods"] = {m: space.captum_name(m, examples[0]) for m in methods}
        features = space.describe_features(examples[0])
        if features is not None:
            out.tables["features"] = features
        out.tables["baseline"] = space.describe_baseline()
        paths = heatmaps(examples, attrs, ctx) if isinstance(space, ImageSpace) and p.heatmaps else []
        out.artifacts.extend(paths)
        out.evidence = [
            evidence(
                space,
                ex,
                attrs,
                names=target.label_names or data.label_names,
                store=ctx.store_examples,
                data=data,
                heatmap=paths[i] if paths else None,
            )
            for i, ex in enumerate(examples)
        ]
        if isinstance(space, (TextSpace, LMSpace)) and p.top_tokens:
            out.tables["top_tokens"] = top_tokens(
                space, examples, attrs[methods[0]], count=p.top_tokens, store=ctx.store_examples
            )
            out.tables["top_tokens"]["method"] = methods[0]

        # Invariants: no hook left behind, target weights untouched.
        if hook_count(model) != hooks_before:
            raise RuntimeError("a Captum hook was left on the target model")
        target.weights_changed()
        if target.weights_sha256() != sha_before:
            raise RuntimeError("the target's weights changed while explaining it")
        return out

    def _examples(
        self, space: FeatureSpace, model: Any, data: Dataset, order_rng: np.random.Generator
    ) -> list[Example]:
        """Up to num_examples explainable examples, in a seeded order, with what each explains and F(x), F(b)."""
        examples: list[Example] = []
        raw = getattr(data, space.data_field)
        for i in order_rng.permutation(len(data)):
            if len(examples) >= self.params.num_examples:
                break
            ex = space.example(len(examples), data.ids[int(i)], raw[int(i)])
            if ex is None or ex.n_features == 0:
                continue
            ex.meta["data_index"] = int(i)
            if data.labels is not None:
                ex.true_label = int(data.labels[int(i)])
            examples.append(ex)
        if not examples:
            raise ValueError("no example could be explained (texts too short for a prompt and continuation?)")
        for ex in examples:
            space.prepare(model, ex, explain_true=self.params.explain_label == "true")
        return examples
