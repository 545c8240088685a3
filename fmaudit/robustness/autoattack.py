"""AutoAttack (Croce & Hein, ICML 2020) at the reference settings, and torchattacks' cheaper variant.

`reference(...)` builds fra31/auto-attack's `AutoAttack(version='standard')` from the `autoattack` package
that the torchattacks 3.3.0 wheel installs (a 2020 snapshot of fra31/auto-attack whose 'standard'
settings are those of the paper and of today's upstream): APGD-CE (100 iterations, 1 restart), APGD-T (100
iterations, 9 target classes), FAB-T (100 iterations, 9 target classes), Square (5,000 queries, p_init
0.8), each run only on the points the previous ones did not break. The settings are read back from the
built object, not restated, so the report shows what actually ran.

Library traps handled here:
- `seed=None` makes the package seed every stage from `time.time()`: the run's seed is always passed.
- `device` defaults to 'cuda': the model's own device is passed (read from its parameters).
- The packaged `fab_pt.py` imports `torch.autograd.gradcheck.zero_gradients`, removed in torch 1.9+: it
  cannot even be imported under torch 2. `_import_autoattack()` puts back the same function upstream now
  ships in `autoattack/other_utils.py` (only where torch lacks it) before the import.
- APGD-T and FAB-T take the 2nd..(n_target_classes+1)-th most likely classes as targets; with K < 10
  classes the reference's 9 targets index past the logits, so K - 1 targets are used (recorded).
- APGD-T's targeted DLR loss divides by z_(1) - (z_(3) + z_(4)) / 2 and needs 4 classes; below 4 it is
  undefined (`MIN_CLASSES`): callers must refuse such targets (the module's check() does).

`fast(...)` is torchattacks' `AutoAttack(version='standard')`: the same four stages with 10 iterations for
APGD / APGD-T / FAB and 5,000 Square queries; cheaper and weaker, never to be called "standard".
"""

from __future__ import annotations

from typing import Any

from fmaudit.robustness.devices import model_device

MIN_CLASSES = 4  # targeted DLR (APGD-T) sorts 4 logits
REFERENCE = {
    "attacks_to_run": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "apgd_n_iter": 100,
    "apgd_n_restarts": 1,
    "apgd_rho": 0.75,
    "apgd_eot_iter": 1,
    "apgd_t_n_iter": 100,
    "apgd_t_n_target_classes": 9,
    "apgd_t_n_restarts": 1,
    "fab_n_iter": 100,
    "fab_n_target_classes": 9,
    "fab_n_restarts": 1,
    "square_n_queries": 5000,
    "square_p_init": 0.8,
    "square_n_restarts": 1,
}


def zero_gradients(x) -> None:
    """fra31/auto-attack's `other_utils.zero_gradients` (torch < 1.9's `gradcheck.zero_gradients`)."""
    import collections.abc

    import torch

    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, collections.abc.Iterable):
        for elem in x:
            zero_gradients(elem)


def _import_autoattack():
    import importlib

    # (`import torch.autograd.gradcheck as m` would give the function of that name, not the module)
    gradcheck = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck, "zero_gradients"):
        gradcheck.zero_gradients = zero_gradients
    import autoattack

    return autoattack


class _Reference:
    """Callable `adv = atk(images, labels)` around `autoattack.AutoAttack.run_standard_evaluation`."""

    def __init__(self, aa, batch_size: int):
        self.aa = aa
        self.batch_size = batch_size

    def __call__(self, images, labels):
        import warnings

        dev = self.aa.device
        with warnings.catch_warnings():
            # APGD builds nn.CrossEntropyLoss(reduce=False, reduction='none'): a deprecation notice per call.
            warnings.filterwarnings("ignore", message="size_average and reduce args will be deprecated")
            return self.aa.run_standard_evaluation(images.to(dev), labels.to(dev), bs=self.batch_size)


def reference(
    model, *, norm: str, eps: float, n_classes: int, seed: int, batch_size: int = 250, device: Any = None
) -> tuple[_Reference, dict[str, Any]]:
    """fra31's AutoAttack, version 'standard', built now (after the model is on its device)."""
    autoattack = _import_autoattack()
    if seed is None:
        raise ValueError("AutoAttack needs an explicit seed (seed=None seeds every stage from the clock)")
    if n_classes < MIN_CLASSES:
        raise ValueError(
            f"AutoAttack needs at least {MIN_CLASSES} classes (APGD-T's targeted DLR loss); got {n_classes}"
        )
    dev = model_device(model, "cpu") if device is None else device
    aa = autoattack.AutoAttack(
        model, norm=norm, eps=float(eps), seed=int(seed), version="standard", verbose=False, device=str(dev)
    )
    targets = min(9, n_classes - 1)
    aa.apgd_targeted.n_target_classes = targets
    aa.fab.n_target_classes = targets
    settings = reference_settings(aa)
    settings.update(
        {
            "implementation": "fra31/auto-attack (autoattack package installed by torchattacks 3.3.0)",
            "version": "standard",
            "norm": norm,
            "n_classes": n_classes,
            "device": str(dev),
            "target_classes_note": None
            if targets == 9
            else f"{n_classes} classes: {targets} target classes (the reference's 9 need >= 10 classes)",
        }
    )
    return _Reference(aa, batch_size), settings


def reference_settings(aa) -> dict[str, Any]:
    """Every setting of a built `autoattack.AutoAttack`, read from the object."""
    return {
        "attacks_to_run": list(aa.attacks_to_run),
        "seed": aa.seed,
        "apgd_n_iter": aa.apgd.n_iter,
        "apgd_n_restarts": aa.apgd.n_restarts,
        "apgd_rho": aa.apgd.thr_decr,
        "apgd_eot_iter": aa.apgd.eot_iter,
        "apgd_t_n_iter": aa.apgd_targeted.n_iter,
        "apgd_t_n_target_classes": aa.apgd_targeted.n_target_classes,
        "apgd_t_n_restarts": aa.apgd_targeted.n_restarts,
        "fab_n_iter": aa.fab.n_iter,
        "fab_n_target_classes": aa.fab.n_target_classes,
        "fab_n_restarts": aa.fab.n_restarts,
        "fab_alpha_max": aa.fab.alpha_max,
        "fab_eta": aa.fab.eta,
        "fab_beta": aa.fab.beta,
        "square_n_queries": aa.square.n_queries,
        "square_p_init": aa.square.p_init,
        "square_n_restarts": aa.square.n_restarts,
        "square_resc_schedule": aa.square.rescale_schedule,
        "restarts": 1,
    }


def fast(model, *, norm: str, eps: float, n_classes: int, seed: int):
    """torchattacks 3.3.0's AutoAttack(version='standard'): APGD / APGD-T / FAB with 10 iterations."""
    import torchattacks

    if seed is None:
        raise ValueError("AutoAttack needs an explicit seed (seed=None seeds every stage from the clock)")
    if n_classes < MIN_CLASSES:
        raise ValueError(
            f"AutoAttack needs at least {MIN_CLASSES} classes (APGD-T's targeted DLR loss); got {n_classes}"
        )
    atk = torchattacks.AutoAttack(model, norm=norm, eps=eps, version="standard", n_classes=n_classes, seed=int(seed))
    stages = atk._autoattack.attacks
    apgd, apgdt, fab, square = stages
    settings = {
        "implementation": "torchattacks 3.3.0 AutoAttack (NOT the reference: 10 iterations)",
        "version": "fast",
        "norm": norm,
        "n_classes": n_classes,
        "seed": int(seed),
        "device": str(atk.device),
        "attacks_to_run": ["apgd-ce", "apgd-t", "fab-t", "square"],
        "apgd_n_iter": apgd.steps,
        "apgd_n_restarts": apgd.n_restarts,
        "apgd_t_n_iter": apgdt.steps,
        "apgd_t_n_target_classes": apgdt.n_target_classes,
        "fab_n_iter": fab.steps,
        "fab_n_target_classes": fab.n_target_classes,
        "square_n_queries": square.n_queries,
        "square_p_init": square.p_init,
        "restarts": 1,
    }
    return atk, settings
