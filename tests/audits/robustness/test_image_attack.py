"""robustness.image_attack: torchattacks through fmaudit, checked against invariants and against
torchattacks called directly, on the bundled digits CNN and the tiny ViT fixture."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest

from fmaudit.audits.base import AuditContext
from fmaudit.audits.robustness.image_attack import ImageAttackAudit
from fmaudit.data import Dataset
from fmaudit.testing import audit_context


def _ctx(tmp_path, data, *, store=True, seed=0) -> AuditContext:
    return audit_context(tmp_path, data=data, seed=seed, store_examples=store, unit_id="0:robustness.image_attack@t")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # AutoAttack: 10 s with one thread, 450 s with two under load


@pytest.fixture(scope="module")
def train_set(digits) -> Dataset:
    return digits.subset(np.arange(600))


@pytest.fixture(scope="module")
def eval_set(digits) -> Dataset:
    return digits.subset(np.arange(1000, 1048))


@pytest.fixture(scope="module")
def vit(tiny_vit_dir, train_set):
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    target = load_target(model=str(tiny_vit_dir), task="image-classification", name="vit")
    train(target, train_set, TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=0))
    return target


class _Spy:
    """Records every adversarial batch the module gets back from torchattacks."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ImageAttackAudit._attack_once

        def spy(module, spec, model, x, y, eps, n_classes, device, seed):
            adv, seconds, used = real(module, spec, model, x, y, eps, n_classes, device, seed)
            self.calls.append((spec.default_label, spec.norm_, eps, x.clone(), adv.clone()))
            return adv, seconds, used

        monkeypatch.setattr(ImageAttackAudit, "_attack_once", spy)


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        if tag == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return w, h, zlib.decompress(idat)


# ---------------------------------------------------------------------------------------------------
# Invariants on every example, curves, images


def test_every_adversarial_example_in_ball_and_box(cnn, eval_set, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    params = {
        "attacks": [
            "fgsm",
            {"name": "pgd", "steps": 10},
            {"name": "pgd", "norm": "L2", "steps": 10},
            {"name": "cw", "steps": 30, "c": 5, "lr": 0.05, "binary_steps": 3},
            {"name": "deepfool", "steps": 10},
            {"name": "square", "n_queries": 60},
        ],
        "epsilons": [0.05, 0.1, 0.2],
        "l2_epsilons": [0.5, 1.0, 2.0],
        "num_images": 2,
    }
    module = ImageAttackAudit(params)
    assert module.check(cnn, eval_set) == []
    out = module.run(cnn, _ctx(tmp_path, eval_set))

    # bounded attacks once per epsilon, minimum-norm attacks once, plus the automatic large-budget PGD
    assert len(spy.calls) == 3 + 3 + 3 + 1 + 1 + 3 + 1
    assert spy.calls[-1][:3] == ("large_budget_pgd_linf", "Linf", 0.5)
    for label, norm, eps, x, adv in spy.calls:
        assert adv.shape == x.shape and bool(np.isfinite(adv.numpy()).all()), label
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0, label
        if eps is None:
            continue
        delta = (adv.double() - x.double()).flatten(1)
        dist = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
        assert float(dist.max()) <= eps * (1 + 1e-5) + 1e-6 * math.sqrt(delta.shape[1]), (label, eps)

    clean = out.metrics["clean_accuracy"].value
    assert clean > 0.8  # the trained CNN: otherwise robustness numbers say nothing
    assert out.metrics["num_invalid_adversarials"].value == 0
    for name, curve in out.curves.items():
        assert curve.x[0] == 0.0 and curve.y[0] == pytest.approx(clean)
        assert all(v <= clean + 1e-12 for v in curve.y), name  # robust <= clean, always
    for name in (
        "robust_accuracy.pgd_linf",
        "robust_accuracy.pgd_l2",
        "robust_accuracy.cw",
        "robust_accuracy.deepfool",
    ):
        y = out.curves[name].y
        assert all(b <= a + 1e-12 for a, b in zip(y, y[1:])), (name, y)  # non-increasing in epsilon
    # PGD is at least as strong as FGSM on an undefended CNN, and actually breaks it at 0.2
    assert out.metrics["robust_accuracy.pgd_linf@0.2"].value <= out.metrics["robust_accuracy.fgsm@0.2"].value
    assert out.metrics["robust_accuracy.pgd_linf@0.2"].value < 0.5 * clean
    # the per-example worst case is below every single attack
    for eps in (0.05, 0.1, 0.2):
        worst = out.metrics[f"worst_robust_accuracy.linf@{eps:g}"].value
        assert worst <= min(
            out.metrics[f"robust_accuracy.{a}@{eps:g}"].value for a in ("fgsm", "pgd_linf", "square_linf")
        )
    table = {row["label"]: row for row in out.tables["attacks"]}
    assert table["pgd_linf"]["settings"]["steps"] == 10 and table["pgd_linf"]["settings"]["restarts"] == 1
    assert table["pgd_linf"]["settings"]["alpha"] == pytest.approx(0.25 * 0.2)  # 2.5 * eps / steps at the last eps
    assert table["square_linf"]["kind"] == "black-box" and table["cw"]["bounded"] is False
    assert out.metrics["attack_seconds.pgd_linf"].value > 0
    assert not [f for f in out.findings if "probabilit" in f.title]
    # an undefended CNN: the gradient attacks work, so none of the checklist flags fires
    assert not [f.title for f in out.findings if f.severity == "high"], [f.title for f in out.findings]
    assert (
        out.metrics["robust_accuracy.large_budget_pgd_linf@0.5"].value <= out.tables["sanity"]["large_budget"]["chance"]
    )
    # every accuracy carries its 95% Clopper-Pearson interval, which contains it
    for name, m in out.metrics.items():
        if "accuracy" in name:
            assert m.ci_level == 0.95 and m.ci_low <= m.value <= m.ci_high, name
            assert "Clopper-Pearson" in m.description and "n = 32 gives about +/-15 points" in m.description
    assert table_ci(out, "pgd_linf") == [
        [out.metrics[f"robust_accuracy.pgd_linf@{e:g}"].ci_low, out.metrics[f"robust_accuracy.pgd_linf@{e:g}"].ci_high]
        for e in (0.05, 0.1, 0.2)
    ]

    # example images: clean | adversarial | amplified perturbation, referenced from the result
    assert out.artifacts and all(a.endswith(".png") for a in out.artifacts)
    for ev in out.evidence:
        if "image" in ev:
            w, h, raw = _read_png(tmp_path / ev["image"])
            assert h == 8 * 8 and w == 3 * 64 + 2 * 16 and len(raw) == h * (1 + w)
            assert ev["adversarial_prediction"] != ev["true_label"] == ev["clean_prediction"]
            bound = ev["epsilon"] if ev["norm"] == "Linf" else None
            if bound is not None:
                assert ev["linf"] <= bound + 1e-6


def table_ci(out, label):
    return next(r for r in out.tables["attacks"] if r["label"] == label)["robust_accuracy_ci95"]


def test_no_raw_images_without_store_examples(cnn, eval_set, tmp_path):
    out = ImageAttackAudit({"attacks": ["fgsm"], "epsilons": [0.2], "num_images": 2}).run(
        cnn, _ctx(tmp_path, eval_set, store=False)
    )
    assert out.artifacts == [] and not list(tmp_path.rglob("*.png"))
    assert out.evidence and all("image" not in ev and ev["id"] in eval_set.ids for ev in out.evidence)


def test_adversarials_outside_the_threat_model_are_not_errors(cnn, eval_set, tmp_path, monkeypatch):
    """The module verifies each example itself: a broken attack cannot inflate the error rate."""
    import torch

    def broken(module, spec, model, x, y, eps, n_classes, device, seed):
        adv = x.clone()
        adv[0::3] = 1.0 - x[0::3]  # far outside the Linf ball
        adv[1::3] = x[1::3] + 2 * eps  # outside [0, 1] where x > 1 - 2 eps, and outside the ball
        adv[2::3] = float("nan")  # non-finite
        return adv, 0.01, {}

    monkeypatch.setattr(ImageAttackAudit, "_attack_once", broken)
    out = ImageAttackAudit({"attacks": ["fgsm"], "epsilons": [0.1], "num_images": 0}).run(cnn, _ctx(tmp_path, eval_set))
    clean = out.metrics["clean_accuracy"].value
    assert out.metrics["robust_accuracy.fgsm@0.1"].value == pytest.approx(clean)
    assert out.metrics["num_invalid_adversarials"].value > 0
    assert any(f.severity == "high" and "threat model" in f.title for f in out.findings)
    del torch


# ---------------------------------------------------------------------------------------------------
# Same numbers as torchattacks called directly


def _direct(model, attack, x, y):
    import torch

    adv = attack(x, y)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        adv_ok = model(adv).argmax(1) == y
    return float((clean_ok & adv_ok).double().mean())


@pytest.mark.parametrize("which", ["cnn", "vit"])
def test_robust_accuracy_equals_torchattacks_direct(which, request, eval_set, tmp_path):
    import torch
    import torchattacks

    target = request.getfixturevalue(which)
    seed = 1234
    params = {
        "attacks": [
            {"name": "pgd", "steps": 7},
            {"name": "pgd", "norm": "L2", "steps": 5},
            {"name": "square", "n_queries": 40},
            {"name": "cw", "steps": 3},
        ],
        "epsilons": [0.1],
        "l2_epsilons": [0.75],
        "num_images": 0,
        "check_gradients": False,
    }
    model = target.model
    for p in model.parameters():
        p.grad = None
    out = ImageAttackAudit(params).run(target, _ctx(tmp_path, eval_set, seed=seed))
    assert all(p.grad is None for p in model.parameters())  # the attacks left no gradients on the target
    assert all(p.requires_grad for p in model.parameters())
    x = torch.as_tensor(eval_set.images)
    y = torch.as_tensor(eval_set.labels)

    torch.manual_seed(seed)
    pgd = _direct(model, torchattacks.PGD(model, eps=0.1, alpha=2.5 * 0.1 / 7, steps=7, random_start=True), x, y)
    torch.manual_seed(seed)
    pgdl2 = _direct(model, torchattacks.PGDL2(model, eps=0.75, alpha=2.5 * 0.75 / 5, steps=5), x, y)
    torch.manual_seed(seed)
    square = _direct(model, torchattacks.Square(model, eps=0.1, n_queries=40, seed=seed), x, y)

    assert out.metrics["robust_accuracy.pgd_linf@0.1"].value == pytest.approx(pgd, abs=1e-12)
    assert out.metrics["robust_accuracy.pgd_l2@0.75"].value == pytest.approx(pgdl2, abs=1e-12)
    assert out.metrics["robust_accuracy.square_linf@0.1"].value == pytest.approx(square, abs=1e-12)


def test_autoattack_is_the_reference_and_equals_direct(cnn, eval_set, tmp_path, monkeypatch):
    """`autoattack` is fra31's AutoAttack(version='standard') with the reference settings (read back from the
    built object), seeded with the run's seed; `autoattack_fast` is torchattacks' 10-iteration version. Both
    give what calling the library directly gives. At a budget where APGD breaks nearly everything, so the
    5000-query Square stage stays cheap."""
    import torch
    import torchattacks

    from fmaudit.robustness.autoattack import REFERENCE, _import_autoattack

    data = eval_set.subset(np.arange(16))
    seed = 7
    spy = _Spy(monkeypatch)
    out = ImageAttackAudit(
        {
            "attacks": [{"name": "pgd", "steps": 5}, "autoattack", "autoattack_fast"],
            "epsilons": [0.25],
            "num_images": 0,
            "check_gradients": False,
            "large_budget": None,
        }
    ).run(cnn, _ctx(tmp_path, data, seed=seed))
    x, y = torch.as_tensor(data.images), torch.as_tensor(data.labels)
    table = {r["label"]: r for r in out.tables["attacks"]}
    ref = table["autoattack_linf"]["settings"]
    assert {k: ref[k] for k in REFERENCE} == REFERENCE  # 100 iterations, 9 targets, 5000 queries, p_init 0.8
    assert REFERENCE["apgd_n_iter"] == 100 and REFERENCE["apgd_t_n_target_classes"] == 9
    assert REFERENCE["square_n_queries"] == 5000
    assert ref["seed"] == seed and ref["device"] == "cpu" and ref["target_classes_note"] is None
    fast = table["autoattack_fast_linf"]["settings"]
    assert fast["apgd_n_iter"] == fast["apgd_t_n_iter"] == fast["fab_n_iter"] == 10 and fast["seed"] == seed
    assert "NOT the reference" in fast["implementation"]

    autoattack = _import_autoattack()
    torch.manual_seed(seed)
    aa = autoattack.AutoAttack(
        cnn.model, norm="Linf", eps=0.25, version="standard", seed=seed, verbose=False, device="cpu"
    )
    direct = _direct(cnn.model, lambda a, b: aa.run_standard_evaluation(a, b, bs=len(a)), x, y)
    torch.manual_seed(seed)
    direct_fast = _direct(
        cnn.model, torchattacks.AutoAttack(cnn.model, norm="Linf", eps=0.25, n_classes=10, seed=seed), x, y
    )
    got = out.metrics["robust_accuracy.autoattack_linf@0.25"].value
    assert got == pytest.approx(direct, abs=1e-12)
    assert out.metrics["robust_accuracy.autoattack_fast_linf@0.25"].value == pytest.approx(direct_fast, abs=1e-12)
    assert got <= out.metrics["robust_accuracy.pgd_linf@0.25"].value
    assert not [f for f in out.findings if "AutoAttack" in f.title]
    # every AutoAttack example inside [0, 1] and its ball, and the module counted none as invalid
    assert [c[0] for c in spy.calls] == ["pgd_linf", "autoattack_linf", "autoattack_fast_linf"]
    for label, _, eps, xs, adv in spy.calls:
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1, label
        assert float((adv.double() - xs.double()).abs().max()) <= eps * (1 + 1e-5) + 1e-6, label
    assert out.metrics["num_invalid_adversarials"].value == 0


# ---------------------------------------------------------------------------------------------------
# Sanity flags


def test_softmax_outputs_are_flagged(cnn, eval_set, tmp_path):
    import copy

    from torch import nn

    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    inner = nn.Sequential(copy.deepcopy(cnn.model.inner), nn.Softmax(dim=-1))
    soft = ImageClassifier(name="soft", model=PixelClassifier(inner), source="test", num_classes=10)
    out = ImageAttackAudit({"attacks": ["fgsm"], "epsilons": [0.1], "num_images": 0}).run(
        soft, _ctx(tmp_path, eval_set)
    )
    assert out.tables["sanity"]["outputs_look_like_probabilities"] is True
    assert any(f.severity == "high" and "probabilities" in f.title for f in out.findings)


def test_zero_gradients_and_black_box_win_are_flagged(cnn, eval_set, tmp_path):
    """A model that quantizes its input: zero gradients almost everywhere (gradient masking). White-box attacks
    stall, the black-box Square attack does not: both flags fire."""
    import copy

    import torch
    from torch import nn

    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    class Quantize(nn.Module):
        def forward(self, x):
            return torch.round(x * 4) / 4  # derivative 0 almost everywhere

    inner = nn.Sequential(Quantize(), copy.deepcopy(cnn.model.inner))
    masked = ImageClassifier(name="masked", model=PixelClassifier(inner), source="test", num_classes=10)
    out = ImageAttackAudit(
        {
            "attacks": [
                "fgsm",
                {"name": "pgd", "steps": 5, "random_start": False},
                {"name": "square", "n_queries": 200},
            ],
            "epsilons": [0.15, 0.3],
            "num_images": 0,
        }
    ).run(masked, _ctx(tmp_path, eval_set))
    assert out.metrics["zero_gradient_fraction"].value == 1.0
    titles = [f.title for f in out.findings]
    assert any("Zero input gradients" in t for t in titles)
    assert any("Black-box attack beats every white-box attack" in t for t in titles), titles
    assert any("does not fall" in t for t in titles if "pgd" in t), titles


def test_rising_curve_is_flagged():
    from fmaudit.audits.base import Outcome
    from fmaudit.audits.robustness.image_attack_sanity import sanity_attacks

    out = Outcome()
    runs = [{"name": "pgd", "label": "pgd_linf", "norm": "Linf", "epsilons": [0.1, 0.2], "acc": [0.2, 0.5]}]
    sanity_attacks(runs, 0.9, 100, out)
    assert [f.title for f in out.findings] == ["Robust accuracy under pgd_linf rises with epsilon (non-monotone)"]


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_params_errors():
    from pydantic import ValidationError

    P = ImageAttackAudit.Params
    with pytest.raises(ValidationError, match=r"did you mean 'pgd'"):
        P.model_validate({"attacks": ["pgdd"]})
    with pytest.raises(ValidationError, match=r"did you mean 'square'"):
        P.model_validate({"attacks": [{"name": "sqare"}]})
    with pytest.raises(ValidationError, match=r"must be in \(0, 1\].*8/255"):
        P.model_validate({"epsilons": [8]})
    with pytest.raises(ValidationError, match=r"> 0"):
        P.model_validate({"epsilons": [0.0]})
    with pytest.raises(ValidationError, match=r"must be in \(0, 1\]"):
        P.model_validate({"attacks": [{"name": "fgsm", "epsilons": [1.5]}]})
    with pytest.raises(ValidationError):
        P.model_validate({"attacks": [{"name": "pgd", "c": 1.0}]})  # CW's setting on PGD
    with pytest.raises(ValidationError, match="greater than or equal to 0.5"):
        P.model_validate({"large_budget": 0.3})  # below 0.5 the mid-gray image is out of reach: no chance bound
    assert P.model_validate({"large_budget": None}).large_budget is None
    fast = P.model_validate(
        {"attacks": ["autoattack_fast", "autoattack_fast_l2", {"name": "autoattack", "version": "fast", "label": "f"}]}
    )
    assert [(a.version, a.norm, a.default_label) for a in fast.attacks] == [
        ("fast", "Linf", "autoattack_fast_linf"),
        ("fast", "L2", "autoattack_fast_l2"),
        ("fast", "Linf", "f"),
    ]
    with pytest.raises(ValidationError, match="both labelled 'pgd_linf'"):
        P.model_validate({"attacks": ["pgd", {"name": "pgd", "steps": 5}]})
    p = P.model_validate({"epsilons": ["8/255", 0.1], "attacks": ["pgd_l2", "autoattack"]})
    assert p.epsilons == pytest.approx([8 / 255, 0.1])
    assert [a.default_label for a in p.attacks] == ["pgd_l2", "autoattack_linf"]
    assert P.model_validate({"attacks": [{"name": "pgd", "norm": "L2", "epsilons": [2.0]}]}).attacks[0].epsilons == [
        2.0
    ]


def test_check_rejects_non_image_target_and_unscaled_images(cnn, eval_set):
    module = ImageAttackAudit()

    class TextTarget:
        name, task, capabilities = "bert", "text-classification", frozenset({"text", "classifier", "logits"})

    assert "image classifiers" in module.check(TextTarget(), eval_set)[0]
    scaled = Dataset("raw", "test", "image", eval_set.ids, eval_set.labels, images=eval_set.images * 16.0)
    problems = module.check(cnn, scaled)
    assert len(problems) == 1 and "outside [0, 1]" in problems[0] and "declares no normalization" in problems[0]
    no_labels = Dataset("nl", "test", "image", eval_set.ids, None, images=eval_set.images)
    assert any("no labels" in p for p in module.check(cnn, no_labels))


def _recipe(tmp_path, **audit):
    return {
        "version": 1,
        "name": "img",
        "seed": 0,
        "output_dir": str(tmp_path / "reports"),
        "data": {"digits": {"source": "bundled:digits", "limit": 600}},
        "targets": {
            "cnn": {
                "model": "bundled:digits-cnn",
                "finetune": {"data": "digits", "epochs": 8, "batch_size": 32, "lr": 3.0e-3},
            }
        },
        "audits": [{"use": "robustness.image_attack", "target": "cnn", **audit}],
    }


def test_recipe_validation_errors(tmp_path, write_recipe):
    from typer.testing import CliRunner

    from fmaudit.cli import app
    from fmaudit.recipe import RecipeError, load_recipe

    def problems(recipe) -> str:
        with pytest.raises(RecipeError) as exc:
            load_recipe(recipe)
        return str(exc.value)

    msg = problems(_recipe(tmp_path, params={"attacks": ["fgsm", "autoatack"], "epsilons": [0.1, 4]}))
    assert "audits[0].params.attacks" in msg and "did you mean 'autoattack'" in msg
    assert "audits[0].params.epsilons" in msg and "(0, 1]" in msg
    text = _recipe(tmp_path)
    text["data"]["tweets"] = {"source": "bundled:tweets"}
    text["targets"]["bert"] = {"model": "bundled:minilm", "finetune": {"data": "tweets"}}
    text["audits"][0]["target"] = "bert"
    assert "needs image" in problems(text)
    nofinetune = _recipe(tmp_path)
    del nofinetune["targets"]["cnn"]["finetune"]
    nofinetune["audits"][0]["data"] = "digits"
    assert "add a `finetune:` entry" in problems(nofinetune)
    res = CliRunner().invoke(app, ["validate", str(write_recipe(_recipe(tmp_path, params={"attacks": ["pgdd"]})))])
    assert res.exit_code == 2 and "did you mean 'pgd'" in res.output


# ---------------------------------------------------------------------------------------------------
# End to end


def test_recipe_end_to_end(tmp_path):
    from fmaudit.report import load_report
    from fmaudit.runner import run_recipe

    recipe = _recipe(
        tmp_path,
        params={
            "attacks": ["fgsm", {"name": "pgd", "steps": 10}],
            "epsilons": [0.05, 0.15],
            "num_examples": 24,
            "num_images": 1,
        },
        fail_if={"robust_accuracy.pgd_linf@0.15": {"gt": 0.99}},
    )
    recipe["store_examples"] = True
    report = run_recipe(recipe)
    res = report.result("robustness.image_attack", "cnn")
    assert res.status == "ok", res.error
    assert report.exit_code == 0 and res.gates and res.gates[0].passed
    assert res.metrics["num_examples"].value == 24
    assert res.tables["evaluated_on"]["subset"] == "nonmembers"  # held-out examples of the fine-tuned target
    assert set(res.tables["evaluated_on"]["ids"]).isdisjoint(report.targets["cnn"].split.member_ids)
    assert res.metrics["clean_accuracy"].value >= 0.7
    for eps in ("0.05", "0.15"):
        assert res.metrics[f"robust_accuracy.pgd_linf@{eps}"].value <= res.metrics[f"robust_accuracy.fgsm@{eps}"].value
    run_dir = next((tmp_path / "reports").iterdir())
    assert res.artifacts and all((run_dir / a).is_file() for a in res.artifacts)
    again = load_report(run_dir)  # the written report validates against the schema
    assert again.result("robustness.image_attack").curves.keys() == res.curves.keys()
