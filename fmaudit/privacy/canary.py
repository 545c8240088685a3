"""One-run canary audits: insert m canaries into a training run (DP or not), each included with
probability 1/2, train once, score every canary, and turn the guesses into an epsilon lower bound
(fmaudit.privacy.audit_bound). For causal LMs, secret-sharer canaries also get the exposure metric of
Carlini et al. 2019.

    from fmaudit.privacy.canary import canary_audit
    res = canary_audit(base=base_target, members=train_data, train={"epochs": 2, "batch_size": 16, "lr": 5e-5},
                       num_canaries=200, seed=0)
    res.epsilon_lb, res.accountant_epsilon
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from fmaudit.data import Dataset, Split

CanaryKind = Literal["flipped_label", "random_tokens", "secret", "mislabel", "pattern"]
SECRET_PREFIX = "my secret code is"


@dataclass
class CanaryAuditResult:
    epsilon_lb: float                     # headline: valid over the whole guess grid (Bonferroni)
    confidence: float
    delta: float
    num_canaries: int
    num_included: int
    guesses: int                          # r at the headline
    correct: int                          # v at the headline
    rows: list[dict[str, Any]]            # per r: v, epsilon_lb, epsilon_lb_corrected
    scores: np.ndarray
    included: np.ndarray
    canary_ids: list[str]
    kind: str
    score: str
    accountant_epsilon: float | None = None   # DP runs: epsilon of THIS training run
    dp: dict[str, Any] | None = None
    exposure: dict[str, Any] | None = None
    train_seconds: float = 0.0
    cache_hit: bool = False
    canary_auc: float | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Canaries


def default_kind(task: str) -> str:
    return {"text-classification": "flipped_label", "causal-lm": "secret", "image-classification": "mislabel"}[task]


def _flip(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return (labels + rng.integers(1, k, size=len(labels))) % k


def make_canaries(kind: str, *, m: int, seed: int, pool: Dataset | None, target: Any, num_labels: int | None,
                  secret_digits: int = 6) -> Dataset:
    """m canaries of `kind`. `pool` (examples the target never trained on) feeds the kinds built from real
    examples. Ids start with 'canary:'."""
    rng = np.random.default_rng(seed)
    if kind in ("flipped_label", "mislabel", "pattern"):
        if pool is None or len(pool) < m:
            have = 0 if pool is None else len(pool)
            raise ValueError(f"{kind} canaries are built from held-out examples: need {m}, have {have}; "
                             "lower num_canaries or use more data")
        if pool.labels is None or not num_labels:
            raise ValueError(f"{kind} canaries need labelled data")
        chosen = pool.subset(np.sort(rng.choice(len(pool), size=m, replace=False)))
        labels = _flip(chosen.labels, num_labels, rng)
        images = chosen.images
        if kind == "pattern":
            images = images.copy()
            images[:, :, :2, :2] = 1.0  # a 2x2 white stamp in the top-left corner
        return Dataset("canaries", f"canary:{kind}", chosen.modality, [f"canary:{i}" for i in chosen.ids], labels,
                       texts=chosen.texts, images=images, label_names=chosen.label_names)
    if kind == "random_tokens":
        vocab = sorted(w for w in target.tokenizer.get_vocab() if re.fullmatch(r"[a-z]{3,}", w))
        if len(vocab) < 100 or not num_labels:
            raise ValueError("random_tokens canaries need a word-piece vocabulary and labels")
        texts = [" ".join(rng.choice(vocab, size=8)) for _ in range(m)]
        labels = rng.integers(0, num_labels, size=m)
        return Dataset("canaries", "canary:random_tokens", "text", [f"canary:rt{i}" for i in range(m)], labels,
                       texts=texts)
    if kind == "secret":
        if 10 ** secret_digits < 4 * m:
            raise ValueError(f"secret_digits={secret_digits} gives too few distinct secrets for {m} canaries")
        secrets: set[str] = set()
        while len(secrets) < m:
            secrets.add(" ".join(str(d) for d in rng.integers(0, 10, size=secret_digits)))
        texts = [f"{SECRET_PREFIX} {s}" for s in sorted(secrets)]
        order = rng.permutation(m)
        texts = [texts[i] for i in order]
        return Dataset("canaries", "canary:secret", "text", [f"canary:s{i}" for i in range(m)], None, texts=texts)
    raise ValueError(f"unknown canary kind {kind!r}")


def concat(a: Dataset, b: Dataset, name: str) -> Dataset:
    def cat(x, y):
        if x is None or y is None:
            return None
        return list(x) + list(y) if isinstance(x, list) else np.concatenate([x, y])

    labels = None if a.labels is None or b.labels is None else np.concatenate([a.labels, b.labels])
    return Dataset(name, f"{a.source}+{b.source}", a.modality, list(a.ids) + list(b.ids), labels,
                   texts=cat(a.texts, b.texts), images=cat(a.images, b.images), label_names=a.label_names)


# ---------------------------------------------------------------------------------------------------
# Exposure (secret sharer)


def exposure(*, canary_losses: np.ndarray, candidate_losses: np.ndarray, space_bits: float) -> np.ndarray:
    """Exposure = log2 |R| - log2 rank (Carlini et al. 2019). The rank fraction P(candidate loss <= canary
    loss) is extrapolated from a skew-normal fitted to random candidates' losses (their Section 4.3),
    so ranks beyond the sample are estimated; capped at log2 |R| (rank 1)."""
    from scipy.stats import skewnorm

    params = skewnorm.fit(candidate_losses)
    frac = skewnorm.cdf(canary_losses, *params)
    bits = -np.log2(np.clip(frac, 2.0 ** (-space_bits), 1.0))
    return np.minimum(bits, space_bits)


# ---------------------------------------------------------------------------------------------------
# The audit


def canary_audit(*, base: Any, members: Dataset, train: dict[str, Any], num_canaries: int = 200,
                 kind: str | None = None, pool: Dataset | None = None, dp: dict[str, Any] | None = None,
                 score: Literal["loss", "loss_delta"] = "loss_delta", delta: float | None = None,
                 confidence: float = 0.95, guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0),
                 secret_digits: int = 6, exposure_candidates: int = 300, seed: int = 0,
                 cache_dir: str | Path | None = None, progress: Callable[[str, int], Any] | None = None
                 ) -> CanaryAuditResult:
    """Train a copy of `base` on `members` plus the included canaries, with the same settings as the
    audited training (`train`: epochs, batch_size, lr, weight_decay, trainable, n_layers; plus `dp`: the
    DP-SGD settings of a private run), and bound epsilon from the canaries' scores. `base` is never
    changed. The canary model is cached by hash (kind 'canary'), apart from every other cached model."""
    from fmaudit.privacy.audit_bound import audit_curve
    from fmaudit.training import TrainConfig, default_cache_dir, finetune_cached

    if num_canaries < 10:
        raise ValueError("use at least 10 canaries")
    kind = kind or default_kind(base.task)
    rng = np.random.default_rng(seed)
    canaries = make_canaries(kind, m=num_canaries, seed=seed, pool=pool, target=base,
                             num_labels=base.num_labels or members.num_labels, secret_digits=secret_digits)
    included = rng.random(num_canaries) < 0.5
    train_set = concat(members, canaries.subset(np.flatnonzero(included)), name=f"{members.name}+canaries")
    split = Split(train_set, np.arange(len(train_set)), np.zeros(0, dtype=np.int64), seed, 1.0)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model = base.copy(f"{base.name}+canaries")
    base_losses = base.per_example_loss(canaries) if score == "loss_delta" else None
    notes: list[str] = []
    accountant_eps, dp_params = None, None
    if dp is None:
        cfg = TrainConfig(epochs=int(train.get("epochs", 1)), batch_size=int(train.get("batch_size", 16)),
                          lr=float(train.get("lr", 5e-5)), weight_decay=float(train.get("weight_decay", 0.0)),
                          trainable=str(train.get("trainable", "all")), n_layers=int(train.get("n_layers", 2)),
                          seed=seed)
        stats, hit, _ = finetune_cached(model, split, cfg, cache_dir=cache_dir, progress=progress,
                                        label="training with canaries", kind="canary")
        train_seconds = stats.duration_s
        delta = 1e-5 if delta is None else delta
    else:
        import warnings

        from fmaudit.privacy.dp import DPPrivacyWarning, dp_finetune

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DPPrivacyWarning)
            res = dp_finetune(model=model, train_data=train_set, epochs=int(dp["epochs"]),
                              batch_size=int(dp["batch_size"]), lr=float(train.get("lr", 5e-4)),
                              noise_multiplier=float(dp["noise_multiplier"]), delta=float(dp["delta"]),
                              max_grad_norm=float(dp["max_grad_norm"]), accountant=dp.get("accountant", "prv"),
                              trainable=dp.get("trainable", "all"), n_layers=int(train.get("n_layers", 2)),
                              clipping=dp.get("clipping", "auto"), seed=seed, cache_dir=cache_dir, split=split,
                              progress=progress)
        model, hit, train_seconds = res.target, res.cache_hit, res.train_seconds
        accountant_eps = res.epsilon
        dp_params = res.params()
        delta = res.delta if delta is None else delta
        notes.append(f"the canary run used the audited run's noise multiplier {res.noise_multiplier:.4g} on "
                     f"{len(train_set)} examples; its own accountant epsilon is {res.epsilon:.4g}")
    trained_losses = model.per_example_loss(canaries)
    scores = (base_losses - trained_losses) if base_losses is not None else -trained_losses
    m = num_canaries
    grid = [max(1, int(round(f * m))) for f in guess_fractions]
    curve = audit_curve(scores, included, delta=delta, confidence=confidence, guess_counts=grid)
    best = curve["best"]
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(included, scores)) if 0 < included.sum() < m else None
    result = CanaryAuditResult(
        epsilon_lb=best["epsilon_lb_corrected"], confidence=confidence, delta=delta, num_canaries=m,
        num_included=int(included.sum()), guesses=best["r"], correct=best["v"], rows=curve["rows"], scores=scores,
        included=included, canary_ids=list(canaries.ids), kind=kind, score=score, accountant_epsilon=accountant_eps,
        dp=dp_params, train_seconds=train_seconds, cache_hit=hit, canary_auc=auc, notes=notes)
    if kind == "secret":
        result.exposure = _secret_exposure(model, canaries, included, seed=seed, digits=secret_digits,
                                           n_candidates=exposure_candidates)
    return result


def _secret_exposure(model: Any, canaries: Dataset, included: np.ndarray, *, seed: int, digits: int,
                     n_candidates: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed + 1)
    taken = set(canaries.texts)
    cands: list[str] = []
    while len(cands) < n_candidates:
        t = f"{SECRET_PREFIX} " + " ".join(str(d) for d in rng.integers(0, 10, size=digits))
        if t not in taken:
            taken.add(t)
            cands.append(t)
    cand_data = Dataset("candidates", "candidates", "text", [f"cand:{i}" for i in range(len(cands))], texts=cands)
    cand_loss = model.per_example_loss(cand_data)
    can_loss = model.per_example_loss(canaries)
    bits = digits * math.log2(10)
    exp = exposure(canary_losses=can_loss, candidate_losses=cand_loss, space_bits=bits)
    return {"space_bits": bits, "candidates": n_candidates,
            "mean_included": float(exp[included].mean()) if included.any() else None,
            "mean_excluded": float(exp[~included].mean()) if (~included).any() else None,
            "max_included": float(exp[included].max()) if included.any() else None,
            "per_canary": exp.tolist()}

