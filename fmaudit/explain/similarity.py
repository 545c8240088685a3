"""How similar two attributions of one input are: Spearman rank correlation of the feature scores, and for images
SSIM of the absolute maps (each scaled to [0, 1] by its own maximum), implemented here in numpy with
scikit-image's defaults (7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariances)."""

from __future__ import annotations

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; identical vectors (constant ones included) correlate 1, a constant vs a
    varying vector 0."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 2:
        return float("nan")
    if np.allclose(a, b, rtol=1e-6, atol=1e-12):
        return 1.0
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0, win_size: int = 7) -> float:
    """Mean structural similarity of two 2-D maps (Wang et al. 2004), scikit-image's default variant: uniform
    `win_size` window (shrunk to the largest odd size that fits), K1 = 0.01, K2 = 0.03, sample covariances,
    mean over the windows that lie fully inside the image."""
    from scipy.ndimage import uniform_filter

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim needs two 2-D maps of one shape, got {a.shape} and {b.shape}")
    w = min(win_size, *a.shape)
    w -= 1 - w % 2  # odd
    if w < 3:
        raise ValueError(f"maps of shape {a.shape} are too small for SSIM")
    n = w * w
    cov = n / (n - 1)
    ux, uy = uniform_filter(a, w), uniform_filter(b, w)
    vx = cov * (uniform_filter(a * a, w) - ux * ux)
    vy = cov * (uniform_filter(b * b, w) - uy * uy)
    vxy = cov * (uniform_filter(a * b, w) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (w - 1) // 2
    return float(s[pad : s.shape[0] - pad, pad : s.shape[1] - pad].mean())


def map_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two attribution maps as Adebayo et al. compare them: absolute values, each scaled to [0, 1]
    by its own maximum (an all-zero map stays zero)."""
    a, b = np.abs(np.asarray(a, dtype=np.float64)), np.abs(np.asarray(b, dtype=np.float64))
    a = a / a.max() if a.max() > 0 else a
    b = b / b.max() if b.max() > 0 else b
    return ssim(a, b, data_range=1.0)
