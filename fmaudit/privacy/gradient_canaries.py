"""White-box Dirac gradient canaries for DP-SGD: an epsilon lower bound from the DP run itself, no extra training.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023), section 7 (white-box
auditing with Dirac canaries, after Nasr et al. 2023); Andrew et al., "One-shot Empirical Privacy Estimation for
Federated Learning" (ICLR 2024) for canaries as extra gradient directions inserted into the noisy sum.

The game (m canaries, each included independently with probability 1/2):

- canary c is a gradient of norm exactly C = max_grad_norm on ONE parameter coordinate (a Dirac gradient): C times
  the unit vector of that coordinate; the m coordinates are distinct (`choose_coordinates`);
- at every DP-SGD step each included canary is Poisson-sampled like an example (probability q, the run's sample
  rate) and, when sampled, C is added to its coordinate of the clipped summed gradient BEFORE the Gaussian noise
  (Opacus' `add_noise`), so a canary is treated exactly as one more example whose clipped gradient is C e_c;
- the white-box observation of canary c is the noisy summed gradient's coordinate c, read right after the noise,
  summed over the steps. The auditor knows the rest of the data (the DP adversary may), so it removes the part of
  that sum that the real examples' clipped gradients put there: score_c = sum_t (noisy_t[c] - data_t[c]) =
  C K_c + N(0, T sigma^2 C^2) with K_c ~ Bin(T, q) for an included canary and 0 otherwise (`score="residual"`,
  the headline; "noisy", the raw sum, and "llr", the per-step likelihood ratio, are reported beside it: `scores`);
- the guesses and both bounds are those of the canary audit (`fmaudit.privacy.audit_bound.audit`, holdout
  selection: 30% of the canaries, from their own stream, only choose the number of guesses), at the run's delta,
  with the ceiling a perfect attack could reach for the same procedure (`audit_bound.procedure_ceiling`);
- the excluded canaries' residuals are pure noise: their spread is the noise multiplier the run really applied
  (`noise_check`), which catches missing noise even where the ceiling is below the accountant's epsilon.

The model is not hurt: every canary coordinate is put back to its value before training after every optimizer
step (`Inserter.restore`). Those m coordinates therefore never train, and nothing else depends on the canaries:
the per-coordinate optimizer (AdamW) never mixes coordinates, the noise draws are the same, so the trained model is
bit for bit the model a run without canaries but with the same m coordinates frozen gives (whatever the inclusion
draw). At most half of any tensor is frozen, so every trainable tensor still moves.

How coordinates are chosen: among the trainable tensors with two or more dimensions (weight matrices, embeddings;
biases and norms get the largest data gradients, and are used only if there is no such tensor), the number of
canaries per tensor is a multivariate hypergeometric draw over pools of floor(numel / 2) coordinates per tensor
(so each tensor gets about its share, never more than half of it), then distinct coordinates uniformly within each
tensor; all from the GRADIENT_CANARY_COORDS stream, independent of the inclusion (GRADIENT_CANARY_INCLUDE) and of
the per-step sampling (GRADIENT_CANARY_SAMPLE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fmaudit.privacy import audit_bound
from fmaudit.seeds import Stream, rng

GUESS_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)  # as the canary audit
HOLDOUT_FRACTION = 0.3
MIN_CANARIES = 10
NOISE_ALPHA = 1e-6  # the noise check flags a run only when this little noise has this chance under the claimed sigma
Score = Literal["residual", "noisy", "llr"]
SCORES: tuple[Score, ...] = ("residual", "noisy", "llr")

__all__ = [
    "GUESS_FRACTIONS",
    "HOLDOUT_FRACTION",
    "MIN_CANARIES",
    "NOISE_ALPHA",
    "SCORES",
    "Inserter",
    "audit",
    "choose_coordinates",
    "findings",
    "holdout_mask",
    "inclusion",
    "noise_check",
    "scores",
]


def choose_coordinates(sizes: Sequence[tuple[str, int, int]], m: int, seed: int) -> list[tuple[str, int]]:
    """m distinct (tensor name, flat index) coordinates among trainable tensors given as (name, numel, ndim):
    tensors with ndim >= 2 when there are any, at most numel // 2 canaries per tensor (hypergeometric counts over
    those pools), uniform within a tensor. Raises ValueError when the pools hold fewer than m coordinates."""
    pool = [(n, k) for n, k, d in sizes if d >= 2 and k >= 2] or [(n, k) for n, k, _ in sizes if k >= 2]
    caps = np.array([k // 2 for _, k in pool], dtype=np.int64)
    if m > int(caps.sum()):
        raise ValueError(
            f"{m} gradient canaries need {m} distinct coordinates, at most half of each trainable "
            f"tensor: only {int(caps.sum())} available"
        )
    g = rng(seed, Stream.GRADIENT_CANARY_COORDS)
    counts = g.multivariate_hypergeometric(caps, m) if m else np.zeros(len(pool), dtype=np.int64)
    out = []
    for (name, numel), c in zip(pool, counts):
        out += [(name, int(i)) for i in np.sort(g.choice(numel, size=int(c), replace=False))]
    return out


def inclusion(m: int, seed: int) -> np.ndarray:
    """Which canaries are included: independent Bernoulli(1/2), GRADIENT_CANARY_INCLUDE stream."""
    return rng(seed, Stream.GRADIENT_CANARY_INCLUDE).random(int(m)) < 0.5


def holdout_mask(m: int, seed: int, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """The canaries held out to choose the number of guesses: round(fraction m) of them (at least 1, at most
    m - 1), GRADIENT_CANARY_GUESS_SPLIT stream (independent of the coordinates and of the inclusion)."""
    k = int(min(m - 1, max(1, round(fraction * m))))
    mask = np.zeros(int(m), dtype=bool)
    mask[rng(seed, Stream.GRADIENT_CANARY_GUESS_SPLIT).choice(int(m), size=k, replace=False)] = True
    return mask


@dataclass
class _Group:
    """The canaries that sit on one parameter tensor."""

    param: Any  # the nn.Parameter the optimizer updates
    index: Any  # LongTensor of flat indices, on the parameter's device
    ids: np.ndarray  # canary numbers, aligned with `index`
    initial: Any  # the coordinates' values before training


class Inserter:
    """Live canaries during one DP-SGD run: `attach(optimizer)` after Opacus' make_private, `detach()` after
    training, `record()` for the cache. Per step (one logical batch, empty ones included): Poisson-sample the
    included canaries, add C to their coordinates of the clipped summed gradient, let Opacus add the noise, read
    the noisy coordinates; after the optimizer's step, put the canary coordinates back."""

    def __init__(
        self, named_params: Sequence[tuple[str, Any]], m: int, *, seed: int, sample_rate: float, max_grad_norm: float
    ):
        import torch

        trainable = [(n, p) for n, p in named_params if p.requires_grad]
        coords = choose_coordinates([(n, p.numel(), p.dim()) for n, p in trainable], m, seed)
        by_name = dict(trainable)
        self.m, self.seed, self.q, self.c = int(m), int(seed), float(sample_rate), float(max_grad_norm)
        self.coordinates = coords
        self.included = inclusion(m, seed)
        self._sampler = rng(seed, Stream.GRADIENT_CANARY_SAMPLE)
        self.noisy = np.zeros(m)  # sum over steps of the noisy summed gradient's coordinate
        self.data = np.zeros(m)  # sum over steps of the real examples' clipped gradients there (no canary)
        self.llr = np.zeros(m)  # sum over steps of the per-step log-likelihood ratio (see `scores`)
        self._step_data = np.zeros(m)
        self.sigma = 0.0
        self.sampled = np.zeros(m, dtype=np.int64)
        self.steps = 0
        self.groups: list[_Group] = []
        names = [n for n, _ in coords]
        for name in dict.fromkeys(names):
            ids = np.array([i for i, n in enumerate(names) if n == name], dtype=np.int64)
            p = by_name[name]
            index = torch.tensor([coords[i][1] for i in ids], dtype=torch.long, device=p.device)
            self.groups.append(_Group(p, index, ids, p.detach().reshape(-1)[index].clone()))
        self._handles: list[Any] = []
        self._optimizer: Any = None

    def attach(self, optimizer: Any) -> None:
        """Wrap the DP optimizer's `add_noise` (insert and observe) and hook its inner optimizer's step (restore)."""
        original = optimizer.add_noise

        def add_noise() -> None:
            self._insert()
            original()
            self._observe()

        optimizer.add_noise = add_noise
        self._optimizer = optimizer
        self.sigma = float(optimizer.noise_multiplier)
        self._handles.append(optimizer.original_optimizer.register_step_post_hook(lambda *_: self.restore()))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._optimizer is not None and "add_noise" in self._optimizer.__dict__:
            del self._optimizer.__dict__["add_noise"]
        self.restore()

    def _insert(self) -> None:
        import torch

        hits = (self._sampler.random(self.m) < self.q) & self.included
        self.sampled += hits
        self.steps += 1
        with torch.no_grad():
            for g in self.groups:
                summed = g.param.summed_grad
                if not summed.is_contiguous():
                    summed = g.param.summed_grad = summed.contiguous()
                flat = summed.view(-1)
                self._step_data[g.ids] = flat[g.index].double().cpu().numpy()
                h = torch.as_tensor(hits[g.ids], device=flat.device)
                if bool(h.any()):
                    flat.index_add_(
                        0, g.index[h], torch.full((int(h.sum()),), self.c, dtype=flat.dtype, device=flat.device)
                    )

    def _observe(self) -> None:
        import torch

        noisy = np.zeros(self.m)
        with torch.no_grad():
            for g in self.groups:
                noisy[g.ids] = g.param.grad.reshape(-1)[g.index].double().cpu().numpy()
        self.noisy += noisy
        self.data += self._step_data
        # log [(1 - q) N(x; 0, s^2) + q N(x; C, s^2)] / N(x; 0, s^2), x the step's residual, s = sigma C
        z = ((noisy - self._step_data) * self.c - self.c**2 / 2) / max(self.sigma * self.c, 1e-12) ** 2
        self.llr += np.logaddexp(math.log1p(-self.q), math.log(self.q) + z)

    def restore(self) -> None:
        """Put every canary coordinate back to its value before training."""
        import torch

        with torch.no_grad():
            for g in self.groups:
                g.param.data.view(-1).index_copy_(0, g.index, g.initial)

    def record(self) -> dict[str, Any]:
        """What the run keeps (JSON-ready, cached with the weights): enough to recompute every score and bound."""
        return {
            "m": self.m,
            "seed": self.seed,
            "sample_rate": self.q,
            "max_grad_norm": self.c,
            "steps": self.steps,
            "coordinates": [[n, i] for n, i in self.coordinates],
            "included": self.included.tolist(),
            "noise_multiplier": self.sigma,
            "noisy_sum": self.noisy.tolist(),
            "data_sum": self.data.tolist(),
            "llr": self.llr.tolist(),
            "sampled": self.sampled.tolist(),
        }


def scores(record: dict[str, Any], score: Score = "residual") -> np.ndarray:
    """Per-canary scores from a run's record.

    residual (the headline): sum over steps of the noisy coordinate minus the real examples' clipped gradients
        there, C K + N(0, T sigma^2 C^2) for an included canary sampled K times, N(0, T sigma^2 C^2) otherwise;
    noisy: the raw sum of the noisy coordinate (the data part only adds spread);
    llr: sum over steps of log[(1 - q) + q exp((x C - C^2 / 2) / (sigma C)^2)], x the step's residual: the
        Neyman-Pearson statistic of one canary under the claimed (q, sigma), stronger than the sum when sigma < 1.
    Any score gives a valid bound; the headline is fixed in advance, the others are reported beside it."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "llr":
        return np.asarray(record["llr"], dtype=np.float64)
    noisy = np.asarray(record["noisy_sum"], dtype=np.float64)
    return noisy - np.asarray(record["data_sum"], dtype=np.float64) if score == "residual" else noisy


def noise_check(record: dict[str, Any]) -> dict[str, float]:
    """The noise the excluded canaries saw: their residual is the sum of T noise draws on their coordinate, so
    sum(residual^2) / (T sigma^2 C^2) is chi-square with one degree of freedom per excluded canary when the noise is
    what the accountant assumes. Returns the measured noise multiplier and the lower-tail p-value (small: less
    noise than claimed)."""
    from scipy.stats import chi2

    out = ~np.asarray(record["included"], dtype=bool)
    residual = scores(record, "residual")[out]
    t, c, sigma = int(record["steps"]), float(record["max_grad_norm"]), float(record["noise_multiplier"])
    if not len(residual) or t == 0 or sigma <= 0:
        return {"measured_noise_multiplier": math.nan, "noise_p_value": 1.0, "excluded": int(len(residual))}
    stat = float(np.sum(residual**2)) / (t * (sigma * c) ** 2)
    return {
        "measured_noise_multiplier": math.sqrt(float(np.mean(residual**2)) / t) / c,
        "noise_p_value": float(chi2.cdf(stat, len(residual))),
        "excluded": int(len(residual)),
    }


def audit(
    record: dict[str, Any],
    *,
    delta: float,
    epsilon: float,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] = GUESS_FRACTIONS,
    holdout_fraction: float = HOLDOUT_FRACTION,
    score: Score = "residual",
) -> dict[str, Any]:
    """Both one-run bounds (headline: Steinke-Nasr-Jagielski) on the canaries' `score`, with the holdout choice of
    the number of guesses, the ceiling of the same procedure, epsilon_lb / epsilon for the run's `epsilon`, the
    headline bound of every other score beside it (`epsilon_lb_by_score`) and the noise check."""
    included = np.asarray(record["included"], dtype=bool)
    held = holdout_mask(len(included), int(record["seed"]), holdout_fraction)
    fractions = list(guess_fractions)
    by = {
        name: audit_bound.audit(
            scores(record, name),
            included,
            delta=delta,
            confidence=confidence,
            guess_fractions=fractions,
            selection="holdout",
            holdout=held,
        )
        for name in SCORES
    }
    head = by[score]
    top = audit_bound.procedure_ceiling(
        included, delta=delta, confidence=confidence, guess_fractions=fractions, selection="holdout", holdout=held
    )
    sampled = np.asarray(record["sampled"])
    return {
        "m": int(record["m"]),
        "audited": int(head["m"]),
        "held_out": int(held.sum()),
        "r": head["r"],
        "v": head["v"],
        "k_plus": head["k_plus"],
        "k_minus": head["k_minus"],
        "guess_fraction": head["fraction"],
        "num_included": int(head["num_included"]),
        "delta": delta,
        "confidence": confidence,
        "score": score,
        "epsilon": epsilon,
        "epsilon_lb": head["epsilon_lb"],
        "epsilon_lb_fdp": head["epsilon_lb_fdp"],
        "mu_lb": head["mu_lb"],
        "epsilon_lb_ceiling": top["epsilon_lb_sjn"],
        "ceiling_fdp": top["epsilon_lb_fdp"],
        "epsilon_lb_ratio": head["epsilon_lb"] / epsilon if epsilon > 0 else math.inf,
        "epsilon_lb_by_score": {name: b["epsilon_lb"] for name, b in by.items()},
        "steps": int(record["steps"]),
        "sample_rate": float(record["sample_rate"]),
        "max_grad_norm": float(record["max_grad_norm"]),
        "noise_multiplier": float(record["noise_multiplier"]),
        "mean_times_sampled": float(sampled[included].mean()) if included.any() else 0.0,
        **noise_check(record),
    }


def findings(result: dict[str, Any]) -> list[dict[str, str]]:
    """critical when the assumption-free bound exceeds the accountant's epsilon, or when the excluded canaries saw
    significantly less noise than the accountant assumes (p < NOISE_ALPHA): the DP step is broken (noise, clipping
    or sampling is not what the accountant assumed); high when only the f-DP (Gaussian) number exceeds epsilon;
    info otherwise."""
    eps, lb, fdp, top = result["epsilon"], result["epsilon_lb"], result["epsilon_lb_fdp"], result["epsilon_lb_ceiling"]
    what = (
        f"{result['m']} Dirac gradient canaries ({result['audited']} audited, {result['r']} guesses, "
        f"{result['v']} right, {result['score']} score) prove epsilon >= {lb:.3f} at delta {result['delta']:.2g} "
        f"with {result['confidence']:.0%} confidence (f-DP analysis: {fdp:.3f}); a perfect attack could prove at "
        f"most {top:.3f} here; the accountant claims {eps:.3f}"
    )
    out = []
    if lb > eps + 1e-9:
        out.append(
            {
                "severity": "critical",
                "title": "Gradient canaries prove more leakage than the accountant's epsilon",
                "detail": what + ". The DP-SGD step does not do what the accountant assumes (noise, clipping or "
                "sampling is broken): do not trust this epsilon.",
            }
        )
    if result["noise_p_value"] < NOISE_ALPHA:
        out.append(
            {
                "severity": "critical",
                "title": "DP-SGD adds less noise than the accountant assumes",
                "detail": f"the {result['excluded']} excluded gradient canaries saw noise multiplier "
                f"{result['measured_noise_multiplier']:.4g} (sum over {result['steps']} steps), the "
                f"accountant assumes {result['noise_multiplier']:.4g} (chi-square p = "
                f"{result['noise_p_value']:.2g}): epsilon {eps:.3f} does not hold.",
            }
        )
    if out:
        return out
    if fdp > eps + 1e-9:
        return [
            {
                "severity": "high",
                "title": "The f-DP analysis of the gradient canaries exceeds the accountant's epsilon",
                "detail": what + ". Only the Gaussian-family analysis exceeds it; DP-SGD is close to Gaussian, so the "
                "guarantee is in doubt.",
            }
        ]
    ratio = f"epsilon_lb / epsilon = {lb / eps:.2f}" if eps > 0 else "epsilon 0"
    return [
        {
            "severity": "info",
            "title": f"Gradient canaries: epsilon >= {lb:.2f} proven ({ratio})",
            "detail": what + f"; noise multiplier seen {result['measured_noise_multiplier']:.3f} (claimed "
            f"{result['noise_multiplier']:.3f}): consistent with the accountant.",
        }
    ]
