"""fmaudit.explain: the quality metrics are written once over the feature-space interface, so a new space (here a
toy linear one, whose exact attributions are known) gets every metric without code of its own; and the three
built-in spaces keep the interface's contract (compose all-kept = the input, none kept = the baseline)."""

from __future__ import annotations

import copy
from typing import Any, get_args

import numpy as np
import pytest

from fmaudit.audits.explain.attribution import SPACES, AttributionAudit, Method
from fmaudit.explain.curves import removal_curves
from fmaudit.explain.faithfulness import completeness, infidelity, sensitivity
from fmaudit.explain.randomization import randomization_cascade
from fmaudit.explain.space import Attribution, AttributionMethod, Example, FeatureSpace, NoisyInput, SpaceOptions
from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION, TASKS, TEXT_CLASSIFICATION


def _exact(space: LinearSpace, model: Any, ex: Example) -> Attribution:
    """Gradient x input of a linear model: exactly each feature's contribution against a zero baseline."""
    w = model.weight.detach()[0].double()
    a = (w * ex.x[0].double()).numpy()
    return Attribution("exact", a, a[None], None)


class LinearSpace(FeatureSpace):
    """Coordinates of a vector as features; the output is a linear model's single logit."""

    model_task = "toy"
    data_field = "vectors"
    methods = {"exact": AttributionMethod("w * x", _exact)}
    defaults = ("exact",)

    def example(self, pos: int, ex_id: str, raw: Any) -> Example:
        import torch

        x = torch.as_tensor(np.asarray(raw, dtype=np.float32))[None]
        return Example(pos=pos, ex_id=ex_id, x=x, baseline=torch.zeros_like(x), n_features=x.shape[1])

    def prepare(self, model: Any, ex: Example, *, explain_true: bool) -> None:
        ex.meta["f_x"] = float(self.explained_output(model, ex, np.ones((1, ex.n_features), dtype=bool))[0])
        ex.meta["f_b"] = float(self.explained_output(model, ex, np.zeros((1, ex.n_features), dtype=bool))[0])

    def compose(self, ex: Example, keep: Any) -> Any:
        import torch

        m = torch.as_tensor(keep).to(ex.x.dtype)
        return ex.x * m + ex.baseline * (1 - m)

    def explained_output(self, model: Any, ex: Example, keep: Any) -> Any:
        import torch

        with torch.no_grad():
            return model(self.compose(ex, keep))[:, 0]

    def attribute(self, method: str, model: Any, ex: Example) -> Attribution:
        return self.method(method).attribute(self, model, ex)

    def noise_input(self, method: str, model: Any, ex: Example, radius: float, seed: int) -> NoisyInput:
        return NoisyInput(ex.x, radius, lambda inputs: model.weight.detach()[0] * inputs, stream=2)

    def describe_baseline(self) -> str:
        return "zeros"


class ToyTarget:
    """What the randomization check needs of a target: a model, a name, copies."""

    def __init__(self, model: Any, name: str = "toy"):
        self.model, self.name = model, name

    def copy(self, name: str) -> ToyTarget:
        return ToyTarget(copy.deepcopy(self.model), name)

    def weights_changed(self) -> None:
        pass


@pytest.fixture()
def toy():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(12, 1, bias=False).eval()
    space = LinearSpace(ToyTarget(model), SpaceOptions(), "cpu")
    rng = np.random.default_rng(0)
    examples = [space.example(i, f"v{i}", rng.normal(size=12)) for i in range(4)]
    for ex in examples:
        space.prepare(model, ex, explain_true=False)
    attrs = {"exact": [space.attribute("exact", model, ex) for ex in examples]}
    return space, model, examples, attrs


def test_metrics_over_a_new_space(toy):
    space, model, examples, attrs = toy
    # exact attributions of a linear model: complete, and infidelity (normalized) is zero
    c = completeness(examples, attrs["exact"], min_difference=0.01)
    assert max(c.gaps) < 1e-5 and c.gap_matches_delta is None and not c.has_delta
    for ex, a in zip(examples, attrs["exact"]):
        assert infidelity(space, model, ex, a, perturbations=8, drop=0.3, batch_size=4, seed=0) < 1e-8
        s = sensitivity(space, "exact", model, ex, samples=4, radius=0.01, seed=0)
        assert s == sensitivity(space, "exact", model, ex, samples=4, radius=0.01, seed=0) and 0 < s < 1
    # deletion / insertion: the curves run from F(x) to F(baseline) and back; the exact order beats random
    curves = removal_curves(
        space,
        model,
        examples,
        attrs,
        kinds=["deletion", "insertion"],
        steps=4,
        orderings=3,
        rng=np.random.default_rng(0),
    )
    d, i = curves["deletion"], curves["insertion"]
    fx, fb = np.mean([ex.meta["f_x"] for ex in examples]), np.mean([ex.meta["f_b"] for ex in examples])
    dc, ic = d.methods["exact"].curve, i.methods["exact"].curve
    assert dc[0] == pytest.approx(fx, abs=1e-5) and dc[-1] == pytest.approx(fb)
    assert ic[0] == pytest.approx(fb) and ic[-1] == pytest.approx(fx, abs=1e-5)
    assert np.mean(d.methods["exact"].scores) > np.mean(d.random.scores)
    assert np.mean(i.methods["exact"].scores) > np.mean(i.random.scores)
    assert list(d.fractions) == [0, 0.25, 0.5, 0.75, 1]


def test_randomization_over_a_new_space(toy):
    space, model, examples, attrs = toy
    res = randomization_cascade(space.target, space, examples, attrs, depth=None, seed=0)
    assert [g.name for g in res.steps] == ["(model)"] and res.complete and res.unused == []
    assert res.keys == ("spearman", "spearman_abs") and len(res.similarity["exact"]["spearman"][0]) == 4
    assert np.mean(res.similarity["exact"]["spearman"][-1]) < 0.9  # new weights, new attributions
    assert attrs["exact"][0].features == pytest.approx(space.attribute("exact", model, examples[0]).features)


def test_registries_cover_the_params():
    """Every method the params accept is some space's, and every model task has a space."""
    assert set(SPACES) == set(TASKS) == {TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, CAUSAL_LM}
    assert set(get_args(Method)) == {m for space in SPACES.values() for m in space.methods}
    for task, space in SPACES.items():
        assert space.model_task == task and set(space.defaults) <= set(space.methods)
        assert AttributionAudit().methods_for(task) == list(space.defaults)
    with pytest.raises(ValueError, match="not available for toy targets"):
        LinearSpace(None, SpaceOptions(), "cpu").method("saliency")


def test_spaces_compose_input_and_baseline(tiny_bert_dir, tiny_llama_dir, tiny_vit_dir):
    """All features kept is the input, none kept is the baseline, one row per keep mask."""
    from fmaudit.data import load_digits
    from fmaudit.targets import load_target

    text = load_target(model=str(tiny_bert_dir), task=TEXT_CLASSIFICATION, name="bert", max_length=32)
    lm = load_target(model=str(tiny_llama_dir), task=CAUSAL_LM, name="llama", max_length=32)
    vit = load_target(model=str(tiny_vit_dir), task=IMAGE_CLASSIFICATION, name="vit")
    image = load_digits().images[0]
    cases = [(text, "the movie was great today", 5), (lm, "the movie was great today", 2), (vit, image, 4)]
    for target, raw, n in cases:
        space = SPACES[target.task](target, SpaceOptions(continuation_tokens=3), "cpu")
        ex = space.example(0, "x", raw)
        assert ex.n_features == n
        both = space.compose(ex, np.stack([np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]))
        assert both.shape[0] == 2 and (both[0] == ex.x[0]).all() and (both[1] == ex.baseline[0]).all()
        space.prepare(target.model, ex, explain_true=False)
        out = space.explained_output(target.model, ex, np.ones((1, n), dtype=bool))
        assert float(out[0]) == pytest.approx(ex.meta["f_x"], abs=1e-5)
