"""One-run canary audits: insert m canaries into a training run (DP or not), each included with
probability 1/2, train once, score every canary, and turn the guesses into an epsilon lower bound
(fmaudit.privacy.audit_bound). For causal LMs, secret-sharer canaries also get the exposure metric of
Carlini et al. 2019.

    from fmaudit.privacy.canary import canary_audit, canary_findings
    res = canary_audit(base=base_target, members=train_data, train={"epochs": 2, "batch_size": 16, "lr": 5e-5},
                       num_canaries=200, seed=0)
    res.epsilon_lb, res.epsilon_lb_ceiling, res.accountant_epsilon
    canary_findings(res)    # the module's findings (critical when epsilon_lb > the epsilon it is compared with)

Every random choice draws from its own stream (fmaudit.seeds): which examples become canaries
(CANARY_MAKE), which canaries are included (CANARY_INCLUDE: independent of the choice), exposure candidates
(CANARY_EXPOSURE), the canary run's training seed (CANARY_TRAIN) and the canaries held out to choose the number
of guesses (CANARY_GUESS_SPLIT, guess_selection="holdout").

The bound: both the Steinke-Nasr-Jagielski and the f-DP (Mahloujifar-Melis-Chaudhuri, Gaussian family) analyses
of the same guesses (the assumption-free SNJ bound is the headline); `result.record` holds what recomputes both
(fmaudit.privacy.audit_bound.bounds).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np

from fmaudit.data import Dataset, Split
from fmaudit.seeds import Stream, derive, rng as stream_rng

CanaryKind = Literal["flipped_label", "random_tokens", "secret", "mislabel", "pattern"]
SECRET_PREFIX = "my secret code is"


@dataclass
class CanaryAuditResult:
    epsilon_lb: float                     # headline: epsilon_lb_sjn (valid for any DP mechanism)
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
    # The largest epsilon_lb this audit could report (a perfect attack: every included canary scored above
    # every excluded one), at the same m, inclusion draw, guess grid, delta and confidence.
    epsilon_lb_ceiling: float = float("nan")
    ceiling_guesses: int = 0              # r at which the perfect attack's bound peaks
    claimed_epsilon: float | None = None  # compared instead of the accountant's, when given
    rerun: dict[str, Any] = field(default_factory=dict)  # what was trained: procedure, settings, defaults used
    guess_grid: list[int] = field(default_factory=list)
    # Both analyses on the same guesses (fmaudit.privacy.audit_bound.bounds), and how r was chosen.
    epsilon_lb_sjn: float = float("nan")  # Steinke-Nasr-Jagielski: any (eps, delta)-DP mechanism
    epsilon_lb_fdp: float = float("nan")  # Mahloujifar-Melis-Chaudhuri f-DP, Gaussian family (see fdp_bound)
    mu_lb: float = float("nan")           # the GDP mu behind epsilon_lb_fdp
    bound: str = "sjn"                    # which analysis gave the headline
    guess_selection: str = "bonferroni"   # "holdout" or "bonferroni"
    # Everything needed to recompute both bounds: m, num_included, r, v, k_plus, k_minus, delta, confidence
    # (what the bound was computed at), guess_selection, guess_fraction, held_out_ids (canaries that only chose r).
    record: dict[str, Any] = field(default_factory=dict)
    ceiling_sjn: float = float("nan")     # each analysis's perfect-attack bound under the same procedure
    ceiling_fdp: float = float("nan")

    @property
    def reference_epsilon(self) -> float | None:
        """The epsilon the bound is checked against: the claimed one if given, else the run's accountant's."""
        return self.claimed_epsilon if self.claimed_epsilon is not None else self.accountant_epsilon


# ---------------------------------------------------------------------------------------------------
# Canaries


def default_kind(task: str) -> str:
    return {"text-classification": "flipped_label", "causal-lm": "secret", "image-classification": "mislabel"}[task]


def _flip(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return (labels + rng.integers(1, k, size=len(labels))) % k


MIN_RANDOM_TOKEN_WORDS = 100


def random_token_words(tokenizer: Any) -> list[str]:
    """Lowercase words (3+ letters) that are single tokens of a tokenizer's vocabulary, for random_tokens canaries.
    Byte-level BPE (GPT-2, RoBERTa: 'Ġword') and SentencePiece ('▁word') mark a word's start: there only marked
    tokens count (unmarked ones are word middles), the marker dropped. WordPiece words are unmarked."""
    marked, plain = set(), set()
    for w in tokenizer.get_vocab():
        hit = re.fullmatch(r"([\u0120\u2581]?)([a-z]{3,})", w)
        if hit:
            (marked if hit.group(1) else plain).add(hit.group(2))
    return sorted(marked if marked else plain)


def make_canaries(kind: str, *, m: int, seed: int, pool: Dataset | None, target: Any, num_labels: int | None,
                  secret_digits: int = 6) -> Dataset:
    """m canaries of `kind`, drawn from the CANARY_MAKE stream of `seed`. `pool` (examples the target never
    trained on) feeds the kinds built from real examples. Ids start with 'canary:'."""
    rng = stream_rng(seed, Stream.CANARY_MAKE)
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
        vocab = random_token_words(target.tokenizer)
        if len(vocab) < MIN_RANDOM_TOKEN_WORDS or not num_labels:
            raise ValueError("random_tokens canaries need a word-piece vocabulary and labels")
        words = np.asarray(vocab)  # once, not per canary (choice on a list converts it every call)
        texts = [" ".join(rng.choice(words, size=8)) for _ in range(m)]
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


def inclusion_vector(m: int, seed: int) -> np.ndarray:
    """Which of the m canaries are included in training: independent Bernoulli(1/2) draws from the
    CANARY_INCLUDE stream, so inclusion is independent of which examples became canaries."""
    return stream_rng(seed, Stream.CANARY_INCLUDE).random(int(m)) < 0.5


def holdout_split(m: int, seed: int, fraction: float) -> np.ndarray:
    """Which of the m canaries are held out to choose the number of guesses (True) rather than audited: a
    uniform sample of round(fraction m) of them (at least 1, at most m - 1), from the CANARY_GUESS_SPLIT stream
    (independent of the canary choice and of the inclusion draw)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    k = int(min(m - 1, max(1, round(fraction * m))))
    mask = np.zeros(int(m), dtype=bool)
    mask[stream_rng(seed, Stream.CANARY_GUESS_SPLIT).choice(int(m), size=k, replace=False)] = True
    return mask


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


def estimate_exposure(*, canary_losses: np.ndarray, candidate_losses: np.ndarray,
                      space_bits: float) -> tuple[np.ndarray, str]:
    """Exposure = log2 |R| - log2 rank (Carlini et al. 2019), and the estimator that produced it.

    "skewnorm": the rank fraction P(candidate loss <= canary loss) is extrapolated from a skew-normal fitted
    to random candidates' losses (their Section 4.3), so ranks beyond the sample are estimated; capped at
    log2 |R| (rank 1).
    "empirical_rank": when the fit fails (scipy's FitError, e.g. "Optimization converged to parameters that
    are outside the range allowed by the distribution" on tied losses) or gives non-finite values, the rank
    fraction is the candidates' own: (1 + #{candidate loss <= canary loss}) / (1 + n), i.e. the estimated
    rank is |R| times that. No extrapolation: exposure is at most log2(n + 1) bits with n candidates."""
    canary_losses = np.asarray(canary_losses, dtype=np.float64)
    candidate_losses = np.asarray(candidate_losses, dtype=np.float64)
    floor = 2.0 ** (-space_bits)
    try:
        import warnings

        from scipy.stats import skewnorm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow inside the optimizer on odd data
            params = skewnorm.fit(candidate_losses)
            frac = skewnorm.cdf(canary_losses, *params)
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(frac))):
            raise ValueError(f"skew-normal fit gave non-finite values (params {params})")
        estimator = "skewnorm"
    except Exception as exc:  # scipy.stats.FitError is a RuntimeError; non-finite data raises ValueError
        if not isinstance(exc, (RuntimeError, ValueError)):
            raise
        below = (candidate_losses[None, :] <= canary_losses[:, None]).sum(axis=1)
        frac = (1.0 + below) / (1.0 + len(candidate_losses))
        estimator = "empirical_rank"
    bits = -np.log2(np.clip(frac, floor, 1.0))
    return np.minimum(bits, space_bits), estimator


def exposure(*, canary_losses: np.ndarray, candidate_losses: np.ndarray, space_bits: float) -> np.ndarray:
    """Exposure per canary (see `estimate_exposure`, which also says which estimator was used)."""
    return estimate_exposure(canary_losses=canary_losses, candidate_losses=candidate_losses,
                             space_bits=space_bits)[0]


# ---------------------------------------------------------------------------------------------------
# What the canary run re-runs

# privacy.dp_finetune's defaults: used (and reported) only for keys an older report did not record.
DP_DEFAULTS: dict[str, Any] = {"lr": 5e-4, "weight_decay": 0.0, "n_layers": 2, "trainable": "all",
                               "accountant": "prv", "clipping": "auto", "max_grad_norm": 1.0,
                               "max_physical_batch_size": None}
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}
DP_REQUIRED = ("epochs", "batch_size", "noise_multiplier", "delta")
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 1, "batch_size": 16, "lr": 5e-5, "weight_decay": 0.0, "trainable": "all",
                                  "n_layers": 2}


def dp_rerun_settings(dp: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`dp_finetune` keyword arguments that re-run the DP procedure recorded in `dp` (a DP target's
    `provenance.dp`), and the keys it did not record (their privacy.dp_finetune defaults are used:
    then the canary run may not be the audited procedure, and the caller should say so)."""
    missing = [k for k in DP_REQUIRED if dp.get(k) is None]
    if missing:
        raise ValueError(f"the DP run's record lacks {', '.join(missing)}: cannot re-run it with canaries")
    kw: dict[str, Any] = {"epochs": int(dp["epochs"]), "batch_size": int(dp["batch_size"]),
                          "noise_multiplier": float(dp["noise_multiplier"]), "delta": float(dp["delta"])}
    defaulted: list[str] = []
    for key, default in DP_DEFAULTS.items():
        if key in dp and (dp[key] is not None or key == "max_physical_batch_size"):
            kw[key] = dp[key]
        else:
            kw[key] = default
            defaulted.append(key)
    kw["lr"], kw["weight_decay"] = float(kw["lr"]), float(kw["weight_decay"])
    kw["max_grad_norm"], kw["n_layers"] = float(kw["max_grad_norm"]), int(kw["n_layers"])
    if kw["max_physical_batch_size"] is not None:
        kw["max_physical_batch_size"] = int(kw["max_physical_batch_size"])
    if kw["trainable"] == "lora":
        lora = dp.get("lora")
        if not isinstance(lora, Mapping):
            lora = {}
            defaulted.append("lora")
        for key, default in LORA_DEFAULTS.items():
            val = lora.get(key, lora.get(f"lora_{key}", default))
            if key not in lora and f"lora_{key}" not in lora and "lora" not in defaulted:
                defaulted.append(f"lora.{key}")
            kw[f"lora_{key}"] = val
        kw["lora_r"], kw["lora_alpha"] = int(kw["lora_r"]), int(kw["lora_alpha"])
        kw["lora_dropout"] = float(kw["lora_dropout"])
        kw["lora_target_modules"] = list(kw["lora_target_modules"]) if kw["lora_target_modules"] else None
    return kw, defaulted


def check_delta(delta: float | None, dp: Mapping[str, Any] | None) -> str | None:
    """A problem message when `delta` is given for a DP run and differs from the run's own delta (the bound
    and the accountant's epsilon are then about different guarantees), else None."""
    if dp is None or delta is None or dp.get("delta") is None:
        return None
    run_delta = float(dp["delta"])
    if math.isclose(float(delta), run_delta, rel_tol=1e-9, abs_tol=0.0):
        return None
    side = "smaller than" if delta < run_delta else "larger than"
    return (f"delta={delta:g} is {side} the DP run's delta={run_delta:g}: the audit's lower bound and the "
            f"accountant's epsilon would then be about different (epsilon, delta) guarantees and cannot be "
            f"compared; use the DP run's delta (the default: leave delta unset)")


# ---------------------------------------------------------------------------------------------------
# The audit


def canary_audit(*, base: Any, members: Dataset, train: dict[str, Any], num_canaries: int = 200,
                 kind: str | None = None, pool: Dataset | None = None, dp: dict[str, Any] | None = None,
                 score: Literal["loss", "loss_delta"] = "loss_delta", delta: float | None = None,
                 confidence: float = 0.95, guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0),
                 guess_selection: Literal["holdout", "bonferroni"] = "holdout", holdout_fraction: float = 0.3,
                 secret_digits: int = 6, exposure_candidates: int = 300, seed: int = 0,
                 claimed_epsilon: float | None = None, cache_dir: str | Path | None = None,
                 progress: Callable[[str, int], Any] | None = None) -> CanaryAuditResult:
    """Train a copy of `base` on `members` plus the included canaries with the audited training procedure,
    and bound epsilon from the canaries' scores. `base` is never changed. The canary model is cached by hash
    (kind 'canary'), apart from every other cached model.

    Non-private runs re-run `train` (a fine-tune config: epochs, batch_size, lr, weight_decay, trainable,
    n_layers). DP runs re-run `dp` (a DP target's `provenance.dp`: epochs, batch_size, noise_multiplier,
    delta, max_grad_norm, accountant, lr, weight_decay, trainable, n_layers, lora, clipping,
    max_physical_batch_size) with the same noise multiplier on the canary run's data; `train` is not used
    then. Keys the record lacks fall back to the defaults and are listed in `result.rerun["defaulted"]`.

    delta: DP runs: must be the run's own delta (the default); anything else raises ValueError.
    claimed_epsilon: compare the bound with this epsilon instead of the canary run's accountant (a vendor's
        claim for this procedure, or a known-answer test that mis-states the accounting on purpose).
    guess_selection: "holdout" (default): round(holdout_fraction m) canaries, drawn from CANARY_GUESS_SPLIT,
        only choose the guess fraction; the bound uses the others with that single r, uncorrected.
        "bonferroni": every r of the grid on all canaries, Bonferroni-corrected (fmaudit.privacy.audit_bound.audit).
    """
    from fmaudit.privacy.audit_bound import audit, procedure_ceiling
    from fmaudit.training import TrainConfig, default_cache_dir, finetune_cached

    if num_canaries < 10:
        raise ValueError("use at least 10 canaries")
    if guess_selection not in ("holdout", "bonferroni"):
        raise ValueError(f"guess_selection must be 'holdout' or 'bonferroni', got {guess_selection!r}")
    held_out = holdout_split(num_canaries, seed, holdout_fraction) if guess_selection == "holdout" else None
    problem = check_delta(delta, dp)
    if problem:
        raise ValueError(problem)
    kind = kind or default_kind(base.task)
    canaries = make_canaries(kind, m=num_canaries, seed=seed, pool=pool, target=base,
                             num_labels=base.num_labels or members.num_labels, secret_digits=secret_digits)
    included = inclusion_vector(num_canaries, seed)
    train_set = concat(members, canaries.subset(np.flatnonzero(included)), name=f"{members.name}+canaries")
    split = Split(train_set, np.arange(len(train_set)), np.zeros(0, dtype=np.int64), seed, 1.0)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    train_seed = derive(seed, Stream.CANARY_TRAIN)
    model = base.copy(f"{base.name}+canaries")
    base_losses = base.per_example_loss(canaries) if score == "loss_delta" else None
    notes: list[str] = []
    accountant_eps, dp_params = None, None
    rerun: dict[str, Any] = {"train_seed": train_seed, "num_members": len(members),
                             "num_canaries_included": int(included.sum()), "num_train_examples": len(train_set)}
    if dp is None:
        defaulted = [k for k in TRAIN_DEFAULTS if train.get(k) is None]
        settings = {k: (train[k] if train.get(k) is not None else d) for k, d in TRAIN_DEFAULTS.items()}
        cfg = TrainConfig(epochs=int(settings["epochs"]), batch_size=int(settings["batch_size"]),
                          lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"]),
                          trainable=str(settings["trainable"]), n_layers=int(settings["n_layers"]), seed=train_seed)
        stats, hit, _ = finetune_cached(model, split, cfg, cache_dir=cache_dir, progress=progress,
                                        label="training with canaries", kind="canary")
        train_seconds = stats.duration_s
        delta = 1e-5 if delta is None else delta
        rerun.update(procedure="fine-tune (non-private)", settings={k: getattr(cfg, k) for k in TRAIN_DEFAULTS},
                     defaulted=defaulted)
    else:
        import warnings

        from fmaudit.privacy.dp import DPPrivacyWarning, dp_finetune

        kw, defaulted = dp_rerun_settings(dp)
        with warnings.catch_warnings():
            # delta >= 1/N is the audited run's own setting (its module reports it); the canary run repeats it.
            warnings.simplefilter("ignore", DPPrivacyWarning)
            res = dp_finetune(model=model, train_data=train_set, seed=train_seed, cache_dir=cache_dir, split=split,
                              progress=progress, **kw)
        model, hit, train_seconds = res.target, res.cache_hit, res.train_seconds
        accountant_eps = res.epsilon
        dp_params = res.params()
        delta = res.delta
        rerun.update(procedure="DP-SGD (privacy.dp_finetune)", settings=kw, defaulted=defaulted,
                     sample_rate=res.sample_rate, steps=res.steps, clipping_mode=res.clipping,
                     audited_epsilon=dp.get("epsilon"), audited_steps=dp.get("steps"),
                     audited_sample_rate=dp.get("sample_rate"))
        notes.append(f"the canary run used the audited run's noise multiplier {res.noise_multiplier:.4g} on "
                     f"{len(train_set)} examples; its own accountant epsilon is {res.epsilon:.4g}")
    if defaulted:
        notes.append(f"not recorded by the audited run, so the defaults were used: {', '.join(defaulted)}; if the "
                     "audited run set them differently, the canary run is not the audited procedure")
    trained_losses = model.per_example_loss(canaries)
    scores = (base_losses - trained_losses) if base_losses is not None else -trained_losses
    m = num_canaries
    head = audit(scores, included, delta=delta, confidence=confidence, guess_fractions=guess_fractions,
                 selection=guess_selection, holdout=held_out)
    top = procedure_ceiling(included, delta=delta, confidence=confidence, guess_fractions=guess_fractions,
                            selection=guess_selection, holdout=held_out)
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(included, scores)) if 0 < included.sum() < m else None
    ids = list(canaries.ids)
    record = {k: head[k] for k in ("m", "num_included", "r", "v", "k_plus", "k_minus", "delta")}
    record.update(confidence=head["test_confidence"], stated_confidence=confidence, guess_selection=guess_selection,
                  guess_fraction=head["fraction"], guess_fractions=sorted({float(f) for f in guess_fractions}),
                  holdout_fraction=holdout_fraction if held_out is not None else None,
                  held_out_ids=[ids[i] for i in head["held_out"]], num_canaries_total=m,
                  epsilon_lb_sjn=head["epsilon_lb_sjn"], epsilon_lb_fdp=head["epsilon_lb_fdp"], mu_lb=head["mu_lb"])
    result = CanaryAuditResult(
        epsilon_lb=head["epsilon_lb"], confidence=confidence, delta=delta, num_canaries=m,
        num_included=int(included.sum()), guesses=head["r"], correct=head["v"], rows=head["rows"], scores=scores,
        included=included, canary_ids=ids, kind=kind, score=score, accountant_epsilon=accountant_eps,
        dp=dp_params, train_seconds=train_seconds, cache_hit=hit, canary_auc=auc, notes=notes,
        epsilon_lb_ceiling=top["epsilon_lb"], ceiling_guesses=top["r"],
        claimed_epsilon=None if claimed_epsilon is None else float(claimed_epsilon), rerun=rerun,
        guess_grid=sorted({r["r"] for r in head["rows"]}), epsilon_lb_sjn=head["epsilon_lb_sjn"],
        epsilon_lb_fdp=head["epsilon_lb_fdp"], mu_lb=head["mu_lb"], bound=head["bound"],
        guess_selection=guess_selection, record=record, ceiling_sjn=top["epsilon_lb_sjn"],
        ceiling_fdp=top["epsilon_lb_fdp"])
    if kind == "secret":
        result.exposure = _secret_exposure(model, canaries, included, seed=seed, digits=secret_digits,
                                           n_candidates=exposure_candidates)
        if result.exposure["estimator"] != "skewnorm":
            notes.append("exposure: the skew-normal fit to the candidates' losses failed, so ranks are the empirical "
                         f"ranks among {exposure_candidates} candidates (at most "
                         f"{result.exposure['max_resolvable_bits']:.1f} bits can show)")
    return result


def _secret_exposure(model: Any, canaries: Dataset, included: np.ndarray, *, seed: int, digits: int,
                     n_candidates: int) -> dict[str, Any]:
    rng = stream_rng(seed, Stream.CANARY_EXPOSURE)
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
    exp, estimator = estimate_exposure(canary_losses=can_loss, candidate_losses=cand_loss, space_bits=bits)
    return {"space_bits": bits, "candidates": n_candidates, "estimator": estimator,
            "max_resolvable_bits": bits if estimator == "skewnorm" else min(bits, math.log2(n_candidates + 1)),
            "mean_included": float(exp[included].mean()) if included.any() else None,
            "mean_excluded": float(exp[~included].mean()) if (~included).any() else None,
            "max_included": float(exp[included].max()) if included.any() else None,
            "per_canary": exp.tolist()}


# ---------------------------------------------------------------------------------------------------
# Findings


def canary_findings(res: CanaryAuditResult) -> list[dict[str, str]]:
    """The findings for a canary audit result, as dicts with severity, title, detail and metric.

    - critical when epsilon_lb exceeds the epsilon it is compared with (the claimed one, else the canary
      run's accountant): the DP implementation or its accounting is broken; high instead when only the f-DP
      bound (Gaussian trade-off curve assumed) exceeds it and the assumption-free SNJ bound does not;
    - when that epsilon is above the audit's ceiling, the audit says it cannot confirm or refute it (not
      "consistent with the DP guarantee": no attack, however strong, could have contradicted it);
    - non-private runs: memorization when epsilon_lb > 0, else "nothing detected" (not a guarantee)."""
    conf = f"{res.confidence:.0%}"
    lb, top, m = res.epsilon_lb, res.epsilon_lb_ceiling, res.num_canaries
    rec = res.record or {}
    if rec.get("guess_selection") == "holdout":
        how = (f"{len(rec.get('held_out_ids', []))} held out to choose r, the bound on the other {rec.get('m')} "
               f"with r = {res.guesses}")
    else:
        how = f"r in {res.guess_grid or [res.guesses]}"
    where = f"m={m} canaries ({res.num_included} included), {how}, delta={res.delta:.3g}, {conf} confidence"
    by_fdp = ""
    if res.bound == "fdp" and math.isfinite(res.epsilon_lb_sjn):
        by_fdp = (f" (f-DP analysis, which assumes a Gaussian trade-off curve, as DP-SGD's approximately is; the "
                  f"assumption-free Steinke-Nasr-Jagielski bound on the same guesses is {res.epsilon_lb_sjn:.3f})")
    ref = res.reference_epsilon
    out: list[dict[str, str]] = []

    def add(severity: str, title: str, detail: str) -> None:
        out.append({"severity": severity, "title": title, "detail": detail, "metric": "epsilon_lb"})

    if ref is not None:
        who = "the claimed" if res.claimed_epsilon is not None else "the accountant's"
        also = ""
        if res.claimed_epsilon is not None and res.accountant_epsilon is not None:
            also = f" (the canary run's own accountant says epsilon <= {res.accountant_epsilon:.3f})"
        sjn = res.epsilon_lb_sjn if math.isfinite(res.epsilon_lb_sjn) else lb
        fdp = res.epsilon_lb_fdp if math.isfinite(res.epsilon_lb_fdp) else -math.inf
        if lb > ref + 1e-9 and (res.bound != "fdp" or sjn > ref + 1e-9):
            add("critical", f"Empirical epsilon exceeds {who} epsilon",
                f"The canary audit proves epsilon >= {lb:.3f} at {conf} confidence{by_fdp}, but {who} epsilon is "
                f"{ref:.3f}{also}. The DP implementation or its accounting is broken: do not rely on this "
                "model's privacy guarantee.")
        elif max(lb, fdp) > ref + 1e-9:  # only the f-DP bound (Gaussian trade-off curve assumed) exceeds it
            add("high", f"Empirical epsilon exceeds {who} epsilon if the trade-off curve is Gaussian",
                f"The f-DP analysis shows the training is not mu-GDP for mu <= {res.mu_lb:.3f}, i.e. epsilon >= "
                f"{max(lb, fdp):.3f} at delta={res.delta:.3g} ({conf} confidence) for a mechanism with a Gaussian trade-off "
                f"curve, above {who} epsilon {ref:.3f}{also}. The assumption-free Steinke-Nasr-Jagielski bound on "
                f"the same guesses is {sjn:.3f}, within the claim. DP-SGD's curve is close to Gaussian, so the "
                "guarantee is in doubt; a mechanism with another curve shape (randomized response, say) can be "
                "(epsilon, delta)-DP below the f-DP number. A larger audit would settle it.")
        elif not math.isfinite(top):  # a result built without a ceiling: say nothing about reach
            add("info", "Audit did not contradict the DP guarantee",
                f"{who[0].upper()}{who[1:]} epsilon is {ref:.3f}{also}; the audit shows epsilon >= {lb:.3f} "
                f"({conf} confidence, {m} canaries). Its ceiling is unknown, so whether it could have contradicted "
                "the claim is not known.")
        elif ref > top:
            add("low", f"Audit cannot test epsilon = {ref:.3g}: its ceiling is {top:.3f}",
                f"This audit can prove at most epsilon >= {top:.3f} (its ceiling at {where}: the bound a perfect "
                f"attack would reach), so it could only have detected a broken guarantee for an epsilon below "
                f"{top:.3f}; it cannot confirm or refute epsilon = {ref:.3f}. It shows "
                f"epsilon >= {lb:.3f}{also}. No attack could have contradicted {who} epsilon here, so this is not "
                "evidence that the guarantee holds. The ceiling grows only slowly with m (for a balanced draw at "
                "m = 1000, delta 1e-5: about 5.4 by Steinke-Nasr-Jagielski, 11.7 by the f-DP analysis, default "
                "holdout selection); testing a claim this large needs a much larger audit.")
        else:
            add("info", "Audit consistent with the DP guarantee",
                f"{who[0].upper()}{who[1:]} epsilon is {ref:.3f}{also}; the audit shows epsilon >= {lb:.3f} "
                f"({conf} confidence, {m} canaries). A perfect attack would have reached {top:.3f} >= {ref:.3f}, "
                "so the audit could have contradicted the claim; it did not (a weak membership score also gives a "
                "low bound, so this is evidence, not proof).")
    elif lb > 0:
        sat = (" The bound is at the audit's ceiling: the true epsilon may be much larger (more canaries "
               "would show more)." if lb >= top - 1e-9 else "")
        add("medium", "Training memorizes individual examples",
            f"Without DP, the canary audit proves epsilon >= {lb:.3f} ({conf} confidence; ceiling {top:.3f} at "
            f"{where}): single training examples measurably change the model. Consider DP fine-tuning.{sat}")
    else:
        add("info", "No privacy loss detected at this canary count",
            f"epsilon_lb = 0 with {m} canaries (ceiling {top:.3f} at {where}); this is NOT a privacy guarantee "
            "(more canaries or a stronger score may still find leakage).")
    return out
