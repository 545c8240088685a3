"""The noisy side of randomized smoothing (torch): class counts of a base classifier on Gaussian-noised
copies of an image (what CERTIFY and PREDICT in `fmaudit.robustness.smoothing` turn into bounds), and the
expectation-over-noise PGD-L2 on the soft smoothed classifier (Salman et al., NeurIPS 2019).

All noise is drawn on the CPU from generators the caller seeds, so the numbers do not depend on the device.
No torch import at module level.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def noisy_counts(
    model: Any, x1: Any, num: int, gen: Any, *, n_classes: int, sigma: float, batch_size: int, device: Any
) -> np.ndarray:
    """Class counts of `model` on `num` copies of one image `x1` plus N(0, sigma^2 I) noise from `gen`, in
    forward passes of at most `batch_size` copies."""
    import torch

    counts = np.zeros(n_classes, dtype=np.int64)
    left = int(num)
    with torch.no_grad():
        while left > 0:
            b = min(batch_size, left)
            noise = torch.randn((b, *x1.shape), generator=gen, dtype=torch.float32) * sigma
            pred = model((x1.unsqueeze(0) + noise).to(device)).argmax(1).cpu().numpy()
            counts += np.bincount(pred, minlength=n_classes)[:n_classes]
            left -= b
    return counts


def smoothed_pgd_l2(
    model: Any,
    xb: Any,
    yb: Any,
    radius: float,
    gens: list[Any],
    *,
    sigma: float,
    steps: int,
    noise_samples: int,
    step_size: float,
    random_start: bool,
    device: Any,
) -> Any:
    """PGD-L2 on the soft smoothed classifier: maximize -log(mean_k softmax(f(x' + noise_k))_y) over
    ||x' - x||_2 <= radius, x' in [0, 1]; normalized-gradient steps of `step_size` (absolute), k =
    `noise_samples` fresh noise draws per step, each example's from its own generator in `gens`. With
    `random_start`, from a random point of the ball (else from the clean image). Returns the points (CPU)."""
    import torch

    k = noise_samples
    b = len(xb)
    x0 = xb.clone()
    delta = torch.zeros_like(x0)
    if random_start:  # a random point of the ball (uniform direction, radius * U^(1/d)), kept in [0, 1]
        u = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens])
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x0.dim() - 1)))
        rad = torch.cat([torch.rand(1, generator=g) for g in gens]) ** (1.0 / u[0].numel()) * radius
        delta = (x0 + u * rad.view(-1, *([1] * (x0.dim() - 1)))).clamp(0, 1) - x0
    shape = (-1, *([1] * (x0.dim() - 1)))
    yb = yb.to(device)
    with torch.enable_grad():
        for _ in range(steps):
            noise = torch.cat([torch.randn((k, *x0.shape[1:]), generator=g) for g in gens]) * sigma
            adv = (x0 + delta).to(device).requires_grad_(True)
            logits = model(adv.repeat_interleave(k, dim=0) + noise.to(device))
            probs = torch.softmax(logits.float(), dim=1).view(b, k, -1).mean(1)
            loss = torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-20)), yb, reduction="sum")
            (g,) = torch.autograd.grad(loss, adv)
            g = g.detach().cpu().float()
            gn = g.flatten(1).norm(dim=1).view(shape)
            g = torch.where(gn > 0, g / gn.clamp_min(1e-20), torch.zeros_like(g))
            delta = delta + step_size * g
            norm = delta.flatten(1).norm(dim=1).view(shape)
            delta = delta * torch.clamp(radius / norm.clamp_min(1e-20), max=1.0)
            delta = (x0 + delta).clamp(0, 1) - x0  # clipping to the box only shortens delta
    return (x0 + delta).detach()
