"""The canary audit itself: choose and include canaries, train once with the audited procedure, score every
canary and bound epsilon from the guesses (fmaudit.privacy.audit_bound), next to the audit's ceiling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fmaudit.data import Dataset, Split
from fmaudit.privacy.canary.exposure import secret_exposure
from fmaudit.privacy.canary.kinds import default_kind, make_canaries
from fmaudit.privacy.canary.rerun import check_delta, train_canary_run
from fmaudit.seeds import Stream, derive
from fmaudit.seeds import rng as stream_rng


@dataclass
class CanaryAuditResult:
    epsilon_lb: float  # headline: epsilon_lb_sjn (valid for any DP mechanism)
    confidence: float
    delta: float
    num_canaries: int
    num_included: int
    guesses: int  # r at the headline
    correct: int  # v at the headline
    rows: list[dict[str, Any]]  # per r: v, epsilon_lb, epsilon_lb_corrected
    scores: np.ndarray
    included: np.ndarray
    canary_ids: list[str]
    kind: str
    score: str
    accountant_epsilon: float | None = None  # DP runs: epsilon of THIS training run
    dp: dict[str, Any] | None = None
    exposure: dict[str, Any] | None = None
    train_seconds: float = 0.0
    cache_hit: bool = False
    canary_auc: float | None = None
    notes: list[str] = field(default_factory=list)
    # The largest epsilon_lb this audit could report (a perfect attack: every included canary scored above
    # every excluded one), at the same m, inclusion draw, guess grid, delta and confidence.
    epsilon_lb_ceiling: float = float("nan")
    ceiling_guesses: int = 0  # r at which the perfect attack's bound peaks
    claimed_epsilon: float | None = None  # compared instead of the accountant's, when given
    rerun: dict[str, Any] = field(default_factory=dict)  # what was trained: procedure, settings, defaults used
    guess_grid: list[int] = field(default_factory=list)
    # Both analyses on the same guesses (fmaudit.privacy.audit_bound.bounds), and how r was chosen.
    epsilon_lb_sjn: float = float("nan")  # Steinke-Nasr-Jagielski: any (eps, delta)-DP mechanism
    epsilon_lb_fdp: float = float("nan")  # Mahloujifar-Melis-Chaudhuri f-DP, Gaussian family (see fdp_bound)
    mu_lb: float = float("nan")  # the GDP mu behind epsilon_lb_fdp
    bound: str = "sjn"  # which analysis gave the headline
    guess_selection: str = "bonferroni"  # "holdout" or "bonferroni"
    # Everything needed to recompute both bounds: m, num_included, r, v, k_plus, k_minus, delta, confidence
    # (what the bound was computed at), guess_selection, guess_fraction, held_out_ids (canaries that only chose r).
    record: dict[str, Any] = field(default_factory=dict)
    ceiling_sjn: float = float("nan")  # each analysis's perfect-attack bound under the same procedure
    ceiling_fdp: float = float("nan")

    @property
    def reference_epsilon(self) -> float | None:
        """The epsilon the bound is checked against: the claimed one if given, else the run's accountant's."""
        return self.claimed_epsilon if self.claimed_epsilon is not None else self.accountant_epsilon


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
    return Dataset(
        name,
        f"{a.source}+{b.source}",
        a.modality,
        list(a.ids) + list(b.ids),
        labels,
        texts=cat(a.texts, b.texts),
        images=cat(a.images, b.images),
        label_names=a.label_names,
    )


def canary_audit(
    *,
    base: Any,
    members: Dataset,
    train: dict[str, Any],
    num_canaries: int = 200,
    kind: str | None = None,
    pool: Dataset | None = None,
    dp: dict[str, Any] | None = None,
    score: Literal["loss", "loss_delta"] = "loss_delta",
    delta: float | None = None,
    confidence: float = 0.95,
    guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0),
    guess_selection: Literal["holdout", "bonferroni"] = "holdout",
    holdout_fraction: float = 0.3,
    secret_digits: int = 6,
    exposure_candidates: int = 300,
    seed: int = 0,
    claimed_epsilon: float | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str, int], Any] | None = None,
) -> CanaryAuditResult:
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
    from sklearn.metrics import roc_auc_score

    from fmaudit.privacy.audit_bound import audit, procedure_ceiling
    from fmaudit.training import default_cache_dir

    if num_canaries < 10:
        raise ValueError("use at least 10 canaries")
    if guess_selection not in ("holdout", "bonferroni"):
        raise ValueError(f"guess_selection must be 'holdout' or 'bonferroni', got {guess_selection!r}")
    held_out = holdout_split(num_canaries, seed, holdout_fraction) if guess_selection == "holdout" else None
    problem = check_delta(delta, dp)
    if problem:
        raise ValueError(problem)
    kind = kind or default_kind(base.task)
    canaries = make_canaries(
        kind,
        m=num_canaries,
        seed=seed,
        pool=pool,
        target=base,
        num_labels=base.num_labels or members.num_labels,
        secret_digits=secret_digits,
    )
    included = inclusion_vector(num_canaries, seed)
    train_set = concat(members, canaries.subset(np.flatnonzero(included)), name=f"{members.name}+canaries")
    split = Split(train_set, np.arange(len(train_set)), np.zeros(0, dtype=np.int64), seed, 1.0)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    train_seed = derive(seed, Stream.CANARY_TRAIN)
    model = base.copy(f"{base.name}+canaries")
    base_losses = base.per_example_loss(canaries) if score == "loss_delta" else None
    run = train_canary_run(
        model=model,
        train_set=train_set,
        split=split,
        train=train,
        dp=dp,
        delta=delta,
        train_seed=train_seed,
        cache_dir=cache_dir,
        progress=progress,
    )
    model, delta, notes = run.model, run.delta, run.notes
    rerun: dict[str, Any] = {
        "train_seed": train_seed,
        "num_members": len(members),
        "num_canaries_included": int(included.sum()),
        "num_train_examples": len(train_set),
        **run.rerun,
    }
    trained_losses = model.per_example_loss(canaries)
    scores = (base_losses - trained_losses) if base_losses is not None else -trained_losses
    m = num_canaries
    head = audit(
        scores,
        included,
        delta=delta,
        confidence=confidence,
        guess_fractions=guess_fractions,
        selection=guess_selection,
        holdout=held_out,
    )
    top = procedure_ceiling(
        included,
        delta=delta,
        confidence=confidence,
        guess_fractions=guess_fractions,
        selection=guess_selection,
        holdout=held_out,
    )
    auc = float(roc_auc_score(included, scores)) if 0 < included.sum() < m else None
    ids = list(canaries.ids)
    record = {k: head[k] for k in ("m", "num_included", "r", "v", "k_plus", "k_minus", "delta")}
    record.update(
        confidence=head["test_confidence"],
        stated_confidence=confidence,
        guess_selection=guess_selection,
        guess_fraction=head["fraction"],
        guess_fractions=sorted({float(f) for f in guess_fractions}),
        holdout_fraction=holdout_fraction if held_out is not None else None,
        held_out_ids=[ids[i] for i in head["held_out"]],
        num_canaries_total=m,
        epsilon_lb_sjn=head["epsilon_lb_sjn"],
        epsilon_lb_fdp=head["epsilon_lb_fdp"],
        mu_lb=head["mu_lb"],
    )
    result = CanaryAuditResult(
        epsilon_lb=head["epsilon_lb"],
        confidence=confidence,
        delta=delta,
        num_canaries=m,
        num_included=int(included.sum()),
        guesses=head["r"],
        correct=head["v"],
        rows=head["rows"],
        scores=scores,
        included=included,
        canary_ids=ids,
        kind=kind,
        score=score,
        accountant_epsilon=run.accountant_epsilon,
        dp=run.dp_params,
        train_seconds=run.train_seconds,
        cache_hit=run.cache_hit,
        canary_auc=auc,
        notes=notes,
        epsilon_lb_ceiling=top["epsilon_lb"],
        ceiling_guesses=top["r"],
        claimed_epsilon=None if claimed_epsilon is None else float(claimed_epsilon),
        rerun=rerun,
        guess_grid=sorted({r["r"] for r in head["rows"]}),
        epsilon_lb_sjn=head["epsilon_lb_sjn"],
        epsilon_lb_fdp=head["epsilon_lb_fdp"],
        mu_lb=head["mu_lb"],
        bound=head["bound"],
        guess_selection=guess_selection,
        record=record,
        ceiling_sjn=top["epsilon_lb_sjn"],
        ceiling_fdp=top["epsilon_lb_fdp"],
    )
    if kind == "secret":
        result.exposure = secret_exposure(
            model, canaries, included, seed=seed, digits=secret_digits, n_candidates=exposure_candidates
        )
        if result.exposure["estimator"] != "skewnorm":
            notes.append(
                "exposure: the skew-normal fit to the candidates' losses failed, so ranks are the empirical "
                f"ranks among {exposure_candidates} candidates (at most "
                f"{result.exposure['max_resolvable_bits']:.1f} bits can show)"
            )
    return result
