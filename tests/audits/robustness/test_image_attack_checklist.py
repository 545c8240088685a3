"""robustness.image_attack: Carlini et al. 2019 checklist flags, each fired by a constructed model; the
reference AutoAttack's library traps; Clopper-Pearson intervals."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fmaudit.audits.base import AuditContext
from fmaudit.audits.robustness.image_attack import ImageAttackAudit
from fmaudit.audits.robustness.image_attack_specs import ATTACKS
from fmaudit.data import Dataset
from fmaudit.testing import audit_context


def _ctx(tmp_path, data, *, seed=0) -> AuditContext:
    return audit_context(tmp_path, data=data, seed=seed, unit_id="0:robustness.image_attack@t")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # AutoAttack: 10 s with one thread, 450 s with two under load


@pytest.fixture(scope="module")
def eval_set(digits) -> Dataset:
    return digits.subset(np.arange(1000, 1032))


def _wrap(inner, name="m", num_classes=10):
    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    return ImageClassifier(name=name, model=PixelClassifier(inner), source="test", num_classes=num_classes)


# ---------------------------------------------------------------------------------------------------
# Constructed models with masked or misleading gradients (forward passes are the trained CNN's)


def _radius_gate():
    import torch

    class RadiusGate(torch.autograd.Function):
        """Identity; the input gradient survives only within Linf radius r of a stored (clean) image, as with a
        defense whose gradients are informative on the data and masked off it."""

        @staticmethod
        def forward(ctx, x, bank, r):
            d = (x.detach().flatten(1)[:, None, :] - bank.flatten(1)[None]).abs().amax(2).min(1).values
            ctx.save_for_backward((d <= r).to(x.dtype))
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            (keep,) = ctx.saved_tensors
            return g * keep.view(-1, *([1] * (g.dim() - 1))), None, None

    class Gate(torch.nn.Module):
        def __init__(self, bank, r):
            super().__init__()
            self.register_buffer("bank", torch.as_tensor(bank).float())
            self.r = r

        def forward(self, x):
            return RadiusGate.apply(x, self.bank, self.r)

    return Gate


def _against_autoattack():
    """Two more layers on the logits: gradients pass only for losses that touch every logit (cross-entropy,
    not AutoAttack's DLR or FAB's logit differences), and the forward returns 10 * one-hot of the argmax with
    a straight-through backward (scores carry no margin, so the score-based Square search is blind)."""
    import torch

    class LossGate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z.view_as(z)

        @staticmethod
        def backward(ctx, g):
            return g * (g != 0).all(1, keepdim=True).to(g.dtype)

    class Gate(torch.nn.Module):
        def forward(self, z):
            return LossGate.apply(z)

    class HardLabel(torch.nn.Module):
        def forward(self, z):
            hard = 10 * torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).to(z.dtype)
            return z + (hard - z).detach()

    return Gate, HardLabel


def test_masked_gradients_off_the_data_fire_three_flags(cnn, eval_set, tmp_path):
    """Gradients only within Linf 0.1 of the clean images: FGSM (one step from the clean image) works at every
    budget, PGD's random start leaves the radius above 0.1 and stalls. Robust accuracy under PGD rises with
    epsilon, FGSM beats PGD, and the automatic large budget does not reach chance."""
    from torch import nn

    Gate = _radius_gate()
    target = _wrap(nn.Sequential(Gate(eval_set.images, 0.1), copy.deepcopy(cnn.model.inner)))
    out = ImageAttackAudit(
        {"attacks": ["fgsm", {"name": "pgd", "steps": 10}], "epsilons": [0.05, 0.1, 0.2], "num_images": 0}
    ).run(target, _ctx(tmp_path, eval_set))
    m = {k: v.value for k, v in out.metrics.items()}
    titles = [f.title for f in out.findings if f.severity == "high"]
    assert m["zero_gradient_fraction"] == 0.0  # the clean-point check cannot see this masking
    assert m["robust_accuracy.pgd_linf@0.2"] > m["robust_accuracy.pgd_linf@0.05"] + 0.05
    assert "Robust accuracy under pgd_linf rises with epsilon (non-monotone)" in titles
    assert m["robust_accuracy.fgsm@0.2"] < m["robust_accuracy.pgd_linf@0.2"] - 0.3
    assert "Single-step fgsm beats iterative pgd_linf (Linf, epsilon 0.2)" in titles
    assert "Accuracy does not reach chance at Linf epsilon 0.5" in titles
    assert out.tables["sanity"]["single_step_beats_iterative"][-1] == {
        "norm": "Linf",
        "epsilon": 0.2,
        "single_step": "fgsm",
        "iterative": "pgd_linf",
    }


def test_same_flags_stay_quiet_on_the_plain_cnn(cnn, eval_set, tmp_path):
    out = ImageAttackAudit(
        {
            "attacks": [
                "fgsm",
                {"name": "pgd", "steps": 10},
                {"name": "cw", "steps": 100, "lr": 0.05, "binary_steps": 4, "c": 0.1},
            ],
            "epsilons": [0.05, 0.1, 0.2],
            "num_images": 0,
        }
    ).run(cnn, _ctx(tmp_path, eval_set))
    assert next(r for r in out.tables["attacks"] if r["label"] == "cw")["success_rate_unbounded"] == 1.0
    assert not [f.title for f in out.findings if f.severity in ("high", "medium")]
    large = out.tables["sanity"]["large_budget"]
    assert large["robust_accuracy"] <= large["chance"] and large["chance"] == pytest.approx(
        np.bincount(eval_set.labels).max() / len(eval_set)
    )


def test_quantized_input_does_not_reach_chance(cnn, eval_set, tmp_path):
    """Input quantization: zero gradients everywhere, PGD cannot move even at epsilon 0.5."""
    import torch
    from torch import nn

    class Quantize(nn.Module):
        def forward(self, x):
            return torch.round(x * 4) / 4

    target = _wrap(nn.Sequential(Quantize(), copy.deepcopy(cnn.model.inner)))
    out = ImageAttackAudit(
        {
            "attacks": ["fgsm", {"name": "cw", "steps": 50, "binary_steps": 2, "c": 1.0}],
            "epsilons": [0.1],
            "num_images": 0,
        }
    ).run(target, _ctx(tmp_path, eval_set))
    large = out.tables["sanity"]["large_budget"]
    assert large["robust_accuracy"] == pytest.approx(out.metrics["clean_accuracy"].value)
    assert large["ci95"][0] > large["chance"]
    titles = [f.title for f in out.findings]
    assert "Accuracy does not reach chance at Linf epsilon 0.5" in titles
    # ... and the unbounded attack (CW, zero gradients) breaks nothing: it must reach 100% (Carlini et al. 2019)
    assert next(r for r in out.tables["attacks"] if r["label"] == "cw")["success_rate_unbounded"] < 0.5
    assert "Unbounded cw does not break every example" in titles
    quiet = ImageAttackAudit({"attacks": ["fgsm"], "epsilons": [0.1], "num_images": 0, "large_budget": None}).run(
        target, _ctx(tmp_path, eval_set)
    )
    assert "large_budget" not in quiet.tables["sanity"] and not any("chance" in f.title for f in quiet.findings)


def test_autoattack_weaker_than_fgsm_is_flagged(cnn, eval_set, tmp_path):
    """A model tuned against AutoAttack: gradients only near the data (APGD's random start leaves them), only for
    cross-entropy (FAB-T and APGD-T's DLR get none), no score margin (Square searches blind). One FGSM step
    from the clean image still works, so the reference AutoAttack ends up weaker than FGSM."""
    from torch import nn

    Gate = _radius_gate()
    LossGate, HardLabel = _against_autoattack()
    data = eval_set.subset(np.arange(16))
    target = _wrap(nn.Sequential(Gate(data.images, 0.05), copy.deepcopy(cnn.model.inner), LossGate(), HardLabel()))
    out = ImageAttackAudit(
        {
            "attacks": ["fgsm", "autoattack"],
            "epsilons": [0.2],
            "num_images": 0,
            "large_budget": None,
            "check_gradients": False,
        }
    ).run(target, _ctx(tmp_path, data))
    fgsm = out.metrics["robust_accuracy.fgsm@0.2"].value
    aa = out.metrics["robust_accuracy.autoattack_linf@0.2"].value
    assert aa > fgsm + 0.1, (aa, fgsm)
    assert "AutoAttack (autoattack_linf) is weaker than fgsm (Linf, epsilon 0.2)" in [f.title for f in out.findings]
    assert out.metrics["num_invalid_adversarials"].value == 0


# ---------------------------------------------------------------------------------------------------
# Library traps


def test_attacks_are_built_on_the_models_device_not_a_stale_target_device(cnn, eval_set, tmp_path, monkeypatch):
    """torchattacks fixes an attack's device when it is built; fra31's AutoAttack takes a device (default
    'cuda'). The module reads the device from the model's parameters and builds every attack after that: a
    target whose `device` string is stale (the model was moved afterwards) still runs where the model is."""
    import torch
    import torchattacks

    small = torch.nn.Linear(2, 3)
    atk = torchattacks.PGD(small)
    assert atk.device == torch.device("cpu")
    small.to("meta")  # the model moves; the attack does not follow (the trap)
    assert atk.device == torch.device("cpu") and next(small.parameters()).device.type == "meta"

    built = []

    def spy(real):
        def build(spec, model, *, eps, n_classes, seed, device, batch_size):
            atk, used = real(spec, model, eps=eps, n_classes=n_classes, seed=seed, device=device, batch_size=batch_size)
            built.append(
                (spec.name, device, getattr(atk, "device", None), getattr(getattr(atk, "aa", None), "device", None))
            )
            return atk, used

        return build

    for cls in ATTACKS.values():  # each spec builds its own attack
        monkeypatch.setattr(cls, "build", spy(cls.build))
    stale = copy.copy(cnn)
    stale.device = "cuda:0"  # a CPU-only torch cannot even create a tensor there
    data = eval_set.subset(np.arange(8))
    out = ImageAttackAudit(
        {"attacks": ["fgsm", "autoattack"], "epsilons": [0.3], "num_images": 0, "large_budget": None}
    ).run(stale, _ctx(tmp_path, data))
    assert out.tables["evaluated_on"]["device"] == "cpu"
    assert [b[0] for b in built] == ["fgsm", "autoattack"]
    assert all(b[1] == torch.device("cpu") for b in built)
    assert built[0][2] == torch.device("cpu") and built[1][3] == "cpu"


def test_autoattack_always_gets_the_runs_seed(cnn, eval_set, tmp_path):
    """fra31's AutoAttack (and torchattacks') seed every stage from time.time() when seed is None."""
    import torch

    from fmaudit.robustness import autoattack as ra

    lib = ra._import_autoattack().AutoAttack(cnn.model, eps=0.1, seed=None, verbose=False, device="cpu")
    assert isinstance(lib.get_seed(), float)  # the trap: a clock seed, different every run
    with pytest.raises(ValueError, match="explicit seed"):
        ra.reference(cnn.model, norm="Linf", eps=0.1, n_classes=10, seed=None)
    with pytest.raises(ValueError, match="explicit seed"):
        ra.fast(cnn.model, norm="Linf", eps=0.1, n_classes=10, seed=None)
    atk, settings = ra.reference(cnn.model, norm="Linf", eps=0.3, n_classes=10, seed=11, batch_size=8)
    assert atk.aa.seed == 11 and atk.aa.get_seed() == 11 and settings["seed"] == 11
    data = eval_set.subset(np.arange(8))
    x, y = torch.as_tensor(data.images), torch.as_tensor(data.labels)
    first = atk(x, y)
    assert atk.aa.apgd.seed == atk.aa.apgd_targeted.seed == atk.aa.fab.seed == atk.aa.square.seed == 11
    assert torch.equal(first, ra.reference(cnn.model, norm="Linf", eps=0.3, n_classes=10, seed=11)[0](x, y))
    out = ImageAttackAudit(
        {"attacks": ["autoattack_fast"], "epsilons": [0.3], "num_images": 0, "large_budget": None}
    ).run(cnn, _ctx(tmp_path, data, seed=5))
    assert out.tables["attacks"][0]["settings"]["seed"] == 5


def test_autoattack_needs_four_classes(cnn, eval_set):
    """APGD-T's targeted DLR loss sorts 4 logits: below 4 classes the library indexes past them. check()
    says so instead of crashing; other attacks are fine with 3 classes."""
    import importlib

    import torch
    from torch import nn

    from fmaudit.robustness import autoattack as ra

    ra._import_autoattack()
    apgdt = importlib.import_module("autoattack.autopgd_pt").APGDAttack_targeted(nn.Linear(2, 3), device="cpu")
    with pytest.raises(IndexError):  # the trap, in the library itself
        apgdt.dlr_loss_targeted(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 2]))
    three = Dataset("d3", "test", "image", eval_set.ids, eval_set.labels % 3, images=eval_set.images)
    target = _wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), num_classes=3)
    problems = ImageAttackAudit({"attacks": ["pgd", "autoattack_fast", "autoattack_l2"]}).check(target, three)
    assert len(problems) == 2 and all("at least 4 classes" in p and "DLR" in p for p in problems)
    assert "'autoattack_fast_linf'" in problems[0] and "'autoattack_l2'" in problems[1]
    assert ImageAttackAudit({"attacks": ["pgd", "square", "cw"]}).check(target, three) == []
    with pytest.raises(ValueError, match="at least 4 classes"):
        ra.reference(target.model, norm="Linf", eps=0.1, n_classes=3, seed=0)
    # 5 classes: the reference's 9 targets would index past the logits; 4 are used, and the report says so
    _, settings = ra.reference(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), norm="Linf", eps=0.1, n_classes=5, seed=0)
    assert settings["apgd_t_n_target_classes"] == settings["fab_n_target_classes"] == 4
    assert "5 classes" in settings["target_classes_note"]
    del cnn


# ---------------------------------------------------------------------------------------------------
# Intervals


def test_clopper_pearson_matches_beta_quantiles_and_n32_is_about_15_points():
    from scipy.stats import beta, binomtest

    from fmaudit.robustness.intervals import clopper_pearson, half_width

    for k, n in [(0, 32), (1, 32), (5, 32), (16, 32), (31, 32), (32, 32), (37, 100), (3, 7)]:
        lo, hi = clopper_pearson(k, n)
        want_lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
        want_hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
        assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)
    assert clopper_pearson(16, 32, level=0.5)[1] - clopper_pearson(16, 32, level=0.5)[0] < 0.15
    assert 0.13 <= half_width(32, 0.25) <= 0.17 and 0.15 <= half_width(32, 0.5) <= 0.19
    assert 0.08 <= half_width(100, 0.5) <= 0.11
    assert clopper_pearson(0, 0) is None
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)
