"""Small statistics helpers shared by modules (scipy / numpy only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good at small n and near 0 / 1)."""
    from scipy.stats import norm

    if n == 0:
        return (0.0, 1.0)
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(
    stat: Callable[[np.ndarray], float], n: int, *, rounds: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap over example indices: `stat(indices) -> value`."""
    if n == 0 or rounds <= 0:
        return (float("nan"), float("nan"))
    from fmaudit.seeds import Stream
    from fmaudit.seeds import rng as stream_rng

    rng = stream_rng(seed, Stream.BOOTSTRAP)
    vals = np.array([stat(rng.integers(0, n, size=n)) for _ in range(rounds)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    return (float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha)))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = 15
) -> tuple[float, list[float], list[float], list[int]]:
    """ECE with equal-width confidence bins (Guo et al. 2017). Returns (ece, bin confidence,
    bin accuracy, bin counts) for a reliability diagram."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, confs, accs, counts = 0.0, [], [], []
    n = len(labels)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        k = int(in_bin.sum())
        counts.append(k)
        if k == 0:
            confs.append(float((lo + hi) / 2))
            accs.append(float("nan"))
            continue
        c, a = float(conf[in_bin].mean()), float(correct[in_bin].mean())
        confs.append(c)
        accs.append(a)
        ece += (k / n) * abs(a - c)
    return float(ece), confs, accs, counts
