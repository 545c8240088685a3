"""Carlini-Wagner L2 (Carlini & Wagner, S&P 2017), untargeted, as in the authors' `l2_attack.py`.

    minimize  ||x' - x||_2^2 + c * max(Z(x')_y - max_{i != y} Z(x')_i, -kappa),   x' = (tanh(w) + 1) / 2

with Adam on w, abort-early when the loss stops falling, and a per-example binary search over c
(`binary_steps` rounds: c grows tenfold until an attack succeeds, then bisects between the largest failing
and the smallest succeeding c). The smallest successful perturbation over all rounds is returned; an
example never broken is returned unchanged.

The margin masks the true class to -inf before the max over the other logits. torchattacks 3.3.0's CW takes
`max((1 - onehot) * Z)`, which is 0 (not the largest other logit) when every other logit is negative: its
loss then stops pushing once Z_y reaches 0, with the true class still on top (upstream issue #184). It also
builds its one-hot with `torch.eye(K)[labels]` on the default device, which crashes for GPU labels; here
every mask is built on the logits' device.
"""

from __future__ import annotations

from typing import Any

from fmaudit.robustness.devices import model_device


def margin(logits, labels):
    """Z_y - max_{i != y} Z_i per row: > 0 while the true class wins. Built on the logits' device."""
    import torch

    labels = labels.to(logits.device).long()
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    other = logits.masked_fill(mask, float("-inf")).max(dim=1).values
    return logits.gather(1, labels[:, None]).squeeze(1) - other


class CarliniWagnerL2:
    """Callable like a torchattacks attack: `adv = CarliniWagnerL2(model, ...)(images, labels)`.

    Images in [0, 1]; the model returns logits. Gradients are taken with `torch.autograd.grad` with respect
    to w only, so the model's parameters' `.grad` is never touched."""

    def __init__(
        self,
        model,
        *,
        c: float = 1e-3,
        kappa: float = 0.0,
        steps: int = 1000,
        lr: float = 0.01,
        binary_steps: int = 9,
        abort_early: bool = True,
    ):
        if c <= 0 or kappa < 0 or steps < 1 or lr <= 0 or binary_steps < 1:
            raise ValueError("need c > 0, kappa >= 0, steps >= 1, lr > 0, binary_steps >= 1")
        self.model = model
        self.c, self.kappa, self.steps, self.lr = float(c), float(kappa), int(steps), float(lr)
        self.binary_steps, self.abort_early = int(binary_steps), bool(abort_early)
        self.last_c: Any = None  # per-example c after the search (for inspection)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "c_initial": self.c,
            "kappa": self.kappa,
            "steps": self.steps,
            "lr": self.lr,
            "binary_steps": self.binary_steps,
            "abort_early": self.abort_early,
            "loss": "margin, true class masked to -inf",
            "box": "tanh change of variables",
            "restarts": 1,
        }

    def __call__(self, images, labels):
        import torch

        device = model_device(self.model, images.device)
        x = images.detach().to(device).float()
        y = labels.detach().to(device).long()
        n = len(x)
        kappa = self.kappa
        lo = torch.zeros(n, device=device)
        hi = torch.full((n,), float("inf"), device=device)
        c = torch.full((n,), self.c, device=device)
        best_l2 = torch.full((n,), float("inf"), device=device)
        best_adv = x.clone()
        # (1 - 1e-6) keeps atanh finite at pixels of exactly 0 or 1.
        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        check_every = max(1, self.steps // 10)
        for _ in range(self.binary_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=device)
            prev = float("inf")
            for it in range(self.steps):
                with torch.enable_grad():
                    adv = (torch.tanh(w) + 1) / 2
                    l2sq = (adv - x).pow(2).flatten(1).sum(1)
                    logits = self.model(adv)
                    m = margin(logits, y)
                    loss = (l2sq + c * m.clamp(min=-kappa)).sum()
                    (g,) = torch.autograd.grad(loss, [w])
                with torch.no_grad():
                    success = (logits.argmax(1) != y) & (m <= -kappa)
                    better = success & (l2sq < best_l2)
                    best_l2 = torch.where(better, l2sq, best_l2)
                    best_adv[better] = adv[better].detach()
                    succeeded |= success
                w.grad = g
                opt.step()
                if self.abort_early and it % check_every == 0:
                    value = float(loss.detach())
                    if value > prev * 0.9999:
                        break
                    prev = value
            with torch.no_grad():
                hi = torch.where(succeeded, torch.minimum(hi, c), hi)
                lo = torch.where(succeeded, lo, torch.maximum(lo, c))
                c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
        self.last_c = c.detach().cpu()
        return best_adv.detach()
