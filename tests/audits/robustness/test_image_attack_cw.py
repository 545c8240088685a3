"""Carlini-Wagner L2 (`fmaudit.robustness.cw`): the masked margin succeeds where torchattacks 3.3.0's CW loss
stalls (every other logit negative, upstream issue #184), finds the analytic minimum distance of a linear
model, builds its masks on the logits' device (torchattacks' `torch.eye(K)[labels]` does not), and runs
through the module on the digits CNN."""

from __future__ import annotations

import numpy as np
import pytest

from fmaudit.audits.robustness.image_attack import ImageAttackAudit
from fmaudit.testing import audit_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _negative_logit_model():
    """4 classes, linear in the 8x8 image; on the data z_0 = +2 and every other logit is about -4."""
    import torch

    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, generator=g)
    u /= u.norm()
    v = torch.randn(3, 64, generator=g)
    v /= v.norm(dim=1, keepdim=True)
    lin = torch.nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight[0] = 10 * u
        lin.weight[1:] = 2 * v
        lin.bias[0] = 2 - 10 * u.sum() * 0.5
        lin.bias[1:] = -4 - 2 * v.sum(1) * 0.5
    model = torch.nn.Sequential(torch.nn.Flatten(), lin).eval()
    r = torch.randn(8, 64, generator=g)
    r -= (r @ u)[:, None] * u[None]  # no component along u: z_0 = 2 exactly
    x = (0.5 + 0.05 * r).clamp(0.05, 0.95).reshape(8, 1, 8, 8)
    y = torch.zeros(8, dtype=torch.long)
    return model, x, y, lin


def test_masked_margin_succeeds_where_torchattacks_cw_stalls():
    import torch
    import torchattacks

    from fmaudit.robustness.cw import CarliniWagnerL2, margin

    model, x, y, lin = _negative_logit_model()
    with torch.no_grad():
        z = model(x)
    assert bool((z[:, 0] > 1).all()) and bool((z[:, 1:] < -2).all())  # every non-true logit is negative
    for c in (1.0, 100.0):
        adv = torchattacks.CW(model, c=c, kappa=0, steps=200, lr=0.01)(x, y)
        with torch.no_grad():
            assert bool((model(adv).argmax(1) == y).all()), c  # torchattacks' CW breaks nothing
    ours = CarliniWagnerL2(model, c=1e-2, steps=300, lr=0.01, binary_steps=9)
    adv = ours(x, y)
    with torch.no_grad():
        za = model(adv)
    assert bool((za.argmax(1) != y).all())  # every example broken
    assert bool((margin(za, y) < 0).all())
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    # the minimum L2 distance to a linear decision boundary is known: CW must reach it, and cannot beat it
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    flat = x.double().flatten(1)
    zz = flat @ w.T + b
    exact = torch.stack([(zz[:, 0] - zz[:, k]) / (w[0] - w[k]).norm() for k in (1, 2, 3)], 1).min(1).values
    dist = (adv.double() - x.double()).flatten(1).norm(dim=1)
    assert bool((dist >= exact * (1 - 1e-4)).all())
    assert bool((dist <= exact * 1.01).all()), dist / exact  # measured: within 0.3%
    assert ours.last_c is not None and bool((ours.last_c > 1e-2).all())  # the search raised c from its start


def test_masks_are_built_on_the_logits_device_not_the_default_device():
    """torchattacks' CW builds `torch.eye(K)[labels]` on the default device (the CPU), so GPU labels crash it.
    With the default device set to 'meta', anything built there cannot be copied back: torchattacks' loss
    fails, the masked margin (built with the logits' own device) gives the right numbers."""
    import torch
    import torchattacks

    from fmaudit.robustness.cw import margin

    logits = torch.tensor([[3.0, -1.0, -2.0], [-5.0, -4.0, -6.0], [0.5, 2.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    cw = torchattacks.CW(torch.nn.Linear(3, 3))
    with torch.device("meta"):
        with pytest.raises(NotImplementedError):
            cw.f(logits, labels)
        got = margin(logits, labels)
    assert got.device == logits.device
    assert got.tolist() == pytest.approx([4.0, 1.0, -1.0])  # the second row: -4 - (-5), with all logits negative
    # torchattacks' version on the same rows: max((1 - onehot) * z) is 0 when the others are all negative
    assert cw.f(logits, labels).tolist() == pytest.approx([3.0, 0.0, 0.0])


def test_cw_through_the_module_on_the_digits_cnn(tmp_path, digits, cnn):
    """Unbounded CW breaks every correctly classified digit (Carlini et al. 2019: unbounded attacks must reach
    100%), every example verified, never larger than torchattacks' CW on the examples both break."""
    import torch
    import torchattacks

    target = cnn
    data = digits.subset(np.arange(1000, 1024))
    ctx = audit_context(tmp_path, data=data, unit_id="0:robustness.image_attack@t")
    out = ImageAttackAudit(
        {
            "attacks": [{"name": "cw", "steps": 100, "lr": 0.05, "binary_steps": 6, "c": 0.1}],
            "l2_epsilons": [0.5, 1.0, 2.0],
            "num_images": 0,
            "large_budget": None,
        }
    ).run(target, ctx)
    row = out.tables["attacks"][0]
    assert row["success_rate_unbounded"] == 1.0
    assert row["settings"]["binary_steps"] == 6 and row["settings"]["implementation"] == "fmaudit.robustness.cw"
    assert out.metrics["num_invalid_adversarials"].value == 0
    accs = out.curves["robust_accuracy.cw"].y
    assert all(b <= a for a, b in zip(accs, accs[1:]))
    x, y = torch.as_tensor(data.images), torch.as_tensor(data.labels)
    model = target.model.eval()
    theirs = torchattacks.CW(model, c=1.0, steps=600, lr=0.05)(x, y)  # as many steps as ours in all
    with torch.no_grad():
        ok = (model(x).argmax(1) == y) & (model(theirs).argmax(1) != y)
    d_theirs = (theirs - x).flatten(1).norm(dim=1)[ok]
    assert out.metrics["median_l2_perturbation.cw"].value <= float(d_theirs.median()) * 1.05
