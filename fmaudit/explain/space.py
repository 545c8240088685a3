"""The feature-space interface: what every attribution method and quality metric sees of an input.

Like Captum's `InterpretableInput`, a feature space says three things about an input and nothing else:

- how many interpretable features it has (`example()` builds an `Example` with `n_features`): tokens without
  special tokens, pixels or ViT patches, prompt tokens;
- how to compose an input from it with some features kept and the others set to the baseline (`compose`,
  one boolean row per composed input);
- which output the attributions explain (`explained_output`: the explained class's logit, or a causal LM's
  continuation log-prob) and what the deletion / insertion curves read (`curve_output`).

Attribution methods are per-space dict registries (name -> `AttributionMethod`), so the quality metrics in
`curves.py`, `faithfulness.py`, `road.py` and `randomization.py` are written once, over this interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch


TextBaseline = Literal["pad", "unk", "mask"]  # the token that replaces removed tokens
ImageBaseline = Literal["black", "blur"]
ImageFeatures = Literal["auto", "pixels", "patches"]  # auto: ViT patches when the model has them, else pixels
Continuation = Literal["text", "generate"]  # causal LMs: the text's own last tokens, or the greedy continuation


@dataclass(frozen=True)
class SpaceOptions:
    """How inputs are explained: the settings feature spaces and their methods read. The audit's params have
    the same names and take their defaults from here."""

    n_steps: int = 50  # integrated gradients: Riemann steps
    internal_batch_size: int | None = 32  # largest forward batch inside a Captum call or a metric
    text_baseline: TextBaseline = "pad"  # pad | unk | mask: the token that replaces removed tokens
    image_baseline: ImageBaseline = "black"  # black | blur
    image_features: ImageFeatures = "auto"  # auto (ViT patches when the model has them) | pixels | patches
    blur_sigma: float = 2.0
    occlusion_window: int | None = None  # tokens (default 3) or pixels (default side / 4)
    gradient_shap_samples: int = 10
    gradient_shap_stdevs: float = 0.1
    continuation: Continuation = "text"  # causal LMs: text | generate
    continuation_tokens: int = 3
    max_prompt_tokens: int = 32

    @classmethod
    def from_params(cls, params: Any) -> SpaceOptions:
        """The options read off any object with the same attribute names (the audit's params)."""
        return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Example:
    """One explained input and its per-example state."""

    pos: int  # index into the explained subset
    ex_id: str
    x: Any  # model input (1, ...): token ids or pixels
    baseline: Any  # same shape as x
    n_features: int
    explained: int | None = None  # class index explained (classifiers)
    true_label: int | None = None
    predicted: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # text: attention mask etc.; LM: prompt input, continuation
    feat_pos: np.ndarray | None = None  # tokens: positions of the features (special tokens excluded)
    meta: dict[str, Any] = field(default_factory=dict)  # data index, F(x), F(baseline), probability


@dataclass
class Attribution:
    """One method's explanation of one example: `features` is one score per interpretable feature (tokens
    without special tokens; pixels or patches summed over channels); `full` keeps the method's own shape."""

    method: str
    features: np.ndarray
    full: np.ndarray
    delta: float | None = None  # integrated gradients' convergence delta
    seconds: float = 0.0


class AttributionMethod(NamedTuple):
    """A registry entry: the Captum class behind a method (as reports name it) and the function that calls it.
    The function's signature is the space's own (see each space's registry)."""

    captum: str
    attribute: Callable[..., Any]


@dataclass(frozen=True)
class NoisyInput:
    """What max-sensitivity perturbs: `inputs` get uniform noise of `radius`, `explain` maps perturbed inputs to
    attributions (one score per input position), `stream` tells the noise streams of spaces apart."""

    inputs: Any
    radius: float
    explain: Callable[[Any], Any]
    stream: int


class FeatureSpace:
    """Base of the text, image and causal-LM feature spaces (see the module docstring)."""

    model_task: ClassVar[str]  # the fmaudit.tasks constant of the targets it explains
    data_field: ClassVar[str]  # the Dataset attribute holding raw inputs: "texts" | "images"
    curve_unit: ClassVar[str] = "probability"  # unit of curve_output
    output_unit: ClassVar[str] = "logit"  # unit of explained_output
    methods: ClassVar[dict[str, AttributionMethod]]  # name -> method, in the order reports list them
    defaults: ClassVar[tuple[str, ...]]  # methods used when none are named (first = the primary one)
    has_noise: ClassVar[bool] = True  # inputs admit small perturbations (max-sensitivity)

    def __init__(self, target: Any, options: SpaceOptions, device: Any):
        self.target = target
        self.options = options
        self.device = device

    def method(self, name: str) -> AttributionMethod:
        try:
            return self.methods[name]
        except KeyError:
            raise ValueError(
                f"method {name!r} is not available for {self.model_task} targets (available: {list(self.methods)})"
            ) from None

    def captum_name(self, method: str, ex: Example) -> str:
        """The Captum class behind `method` on inputs like `ex` (tables.methods)."""
        return self.method(method).captum

    def example(self, pos: int, ex_id: str, raw: Any) -> Example | None:
        """The example for one raw input (a text or an image), or None when it has nothing to explain."""
        raise NotImplementedError

    def prepare(self, model: Any, ex: Example, *, explain_true: bool) -> None:
        """Fill in what is explained (class or continuation) and F(x), F(baseline) in `ex.meta`."""
        raise NotImplementedError

    def compose(self, ex: Example, keep: Any) -> torch.Tensor:
        """Inputs with the features where `keep` (K, n_features) is False set to the baseline: (K, ...)."""
        raise NotImplementedError

    def explained_output(self, model: Any, ex: Example, keep: Any) -> torch.Tensor:
        """The output the attributions explain, for each composed input: (K,)."""
        raise NotImplementedError

    def curve_output(self, model: Any, ex: Example, keep: Any) -> torch.Tensor:
        """The output deletion / insertion curves read (classifiers: probability of the explained class)."""
        return self.explained_output(model, ex, keep)

    def attribute(self, method: str, model: Any, ex: Example) -> Attribution:
        raise NotImplementedError

    def noise_input(self, method: str, model: Any, ex: Example, radius: float, seed: int) -> NoisyInput:
        """What max-sensitivity perturbs (spaces with `has_noise`)."""
        raise NotImplementedError(f"{self.model_task} inputs have no small perturbation")

    def describe_baseline(self) -> Any:
        """The baseline as the report records it."""
        raise NotImplementedError

    def describe_features(self, ex: Example) -> dict[str, Any] | None:
        """What a feature is, when the report records it (images: pixels or patches)."""
        return None


class ClassifierSpace(FeatureSpace):
    """Classifiers: the explained output is the logit of the explained class; curves read its probability."""

    def logits(self, model: Any, ex: Example, x: Any) -> torch.Tensor:
        """Logits of a batch of inputs shaped like `ex.x`, without gradients."""
        raise NotImplementedError

    def prepare(self, model: Any, ex: Example, *, explain_true: bool) -> None:
        import torch

        with torch.no_grad():
            lg = self.logits(model, ex, torch.cat([ex.x, ex.baseline]))
        ex.predicted = int(lg[0].argmax())
        ex.explained = ex.true_label if explain_true and ex.true_label is not None else ex.predicted
        ex.meta["f_x"], ex.meta["f_b"] = float(lg[0, ex.explained]), float(lg[1, ex.explained])
        ex.meta["prob"] = float(lg[0].softmax(-1)[ex.explained])

    def explained_output(self, model: Any, ex: Example, keep: Any) -> torch.Tensor:
        return self.logits(model, ex, self.compose(ex, keep))[:, ex.explained]

    def curve_output(self, model: Any, ex: Example, keep: Any) -> torch.Tensor:
        return self.logits(model, ex, self.compose(ex, keep)).softmax(-1)[:, ex.explained]
