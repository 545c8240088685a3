"""`privacy.canary_audit`: an empirical lower bound on epsilon from one training run with canaries,
next to the accountant's epsilon for DP targets (Steinke, Nasr & Jagielski 2023; and the f-DP analysis of
Mahloujifar, Melis & Chaudhuri 2025 on the same guesses)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import Field

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, base_target

DEFAULT_CANARIES = 1000  # enough for a bound that can say something (ceiling about 5 at delta 1e-5)


def default_canaries(num_members: int, num_nonmembers: int) -> int:
    """The default m: DEFAULT_CANARIES, at most the members of the canary run (about m / 2 canaries join them,
    so canaries stay at most a third of its training set) and the non-members canaries may be drawn from;
    never below the 10 the params allow."""
    return max(10, min(DEFAULT_CANARIES, num_members, num_nonmembers))


class CanaryAudit(AuditModule):
    name = "privacy.canary_audit"
    category = "privacy"
    description = (
        "One-run privacy audit: insert canaries (each with probability 1/2) into the target's training "
        "procedure, train once, and prove a lower bound on epsilon from how well the canaries' scores "
        "reveal inclusion; compares it with the accountant's epsilon on DP targets. Secret-sharer "
        "exposure for causal LMs."
    )
    requires = frozenset({"per_example_loss", "trainable"})
    metric_names = (
        "epsilon_lb",
        "epsilon_lb_sjn",
        "epsilon_lb_fdp",
        "epsilon_lb_ceiling",
        "accountant_epsilon",
        "canary_auc",
        "guesses",
        "correct_guesses",
        "num_canaries",
        "exposure_mean_included",
        "exposure_max_included",
        "exposure_mean_excluded",
        "exposure_auc",
        "exposure_p_value",
    )

    class Params(AuditParams):
        num_canaries: int | None = Field(
            default=None,
            ge=10,
            le=100_000,
            description="m: canaries, each included in training with probability 1/2. Default: 1,000, capped at "
            "the members of the canary run (and the non-members flipped-label / mislabel canaries are drawn "
            "from), so the canaries stay a minority of what it trains on.",
        )
        kind: Literal["auto", "flipped_label", "random_tokens", "secret", "mislabel", "pattern"] = Field(
            default="auto",
            description="auto: flipped_label (text classifiers), secret (causal LMs), mislabel (images).",
        )
        score: Literal["loss", "loss_delta"] = Field(
            default="loss_delta",
            description="Membership signal: the trained model's loss, or its drop from the base model's loss.",
        )
        confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
        delta: float | None = Field(
            default=None,
            gt=0,
            lt=1,
            description="Default: the DP run's delta, else 1e-5. "
            "DP targets: must be the DP run's delta (anything else is refused).",
        )
        guess_fractions: list[float] = Field(
            default=[0.05, 0.1, 0.2, 0.5, 1.0],
            min_length=1,
            description="Numbers of guesses r as fractions of the audited canaries.",
        )
        guess_selection: Literal["holdout", "bonferroni"] = Field(
            default="holdout",
            description="holdout: a seeded share of the canaries (holdout_fraction) chooses the "
            "guess fraction, the bound uses the others with that single r, uncorrected; bonferroni: every r on all "
            "canaries, corrected over the grid.",
        )
        holdout_fraction: float = Field(
            default=0.3,
            gt=0.0,
            lt=1.0,
            description="Share of the canaries held out to choose r (guess_selection: holdout).",
        )
        max_members: int | None = Field(
            default=None,
            gt=0,
            description="Train the canary run on a seeded sample of at most this many members (cheaper).",
        )
        secret_digits: int = Field(default=6, ge=3, le=12, description="Causal LMs: digits per secret.")
        exposure_candidates: int = Field(default=300, ge=50, description="Random secrets for exposure ranks.")

    params: Params

    def check(self, target, data) -> list[str]:
        problems = []
        if target.split is None:
            problems.append(
                "the canary audit re-runs the target's training: the target must be fine-tuned by the "
                "recipe (or produced from one that is)"
            )
        if any(not 0 < f <= 1 for f in self.params.guess_fractions):
            problems.append("guess_fractions must lie in (0, 1]")
        kind = self.params.kind
        from fmaudit.privacy.canary import kinds_for

        ok = {"auto"} | kinds_for(target.task)
        if kind not in ok:
            problems.append(f"canary kind {kind!r} does not fit a {target.task} target (use {', '.join(sorted(ok))})")
        elif kind == "random_tokens":  # refused here, not after the target's fine-tuning
            from fmaudit.privacy.canary import MIN_RANDOM_TOKEN_WORDS, random_token_words

            have = len(random_token_words(target.tokenizer))
            if have < MIN_RANDOM_TOKEN_WORDS:
                problems.append(
                    f"random_tokens canaries draw whole words from the tokenizer's vocabulary: it has "
                    f"{have}, fewer than {MIN_RANDOM_TOKEN_WORDS}; use kind: flipped_label"
                )
        from fmaudit.privacy.canary import check_delta

        prov = target.provenance
        delta_problem = check_delta(self.params.delta, prov.dp.as_dict() if prov is not None and prov.dp else None)
        if delta_problem:
            problems.append(delta_problem)
        return problems

    def run(self, target, ctx: AuditContext) -> Outcome:
        from fmaudit.privacy.canary import canary_audit, canary_findings
        from fmaudit.seeds import Stream

        p = self.params
        prov = target.provenance
        dp = prov.dp.as_dict() if prov is not None and prov.dp is not None else None
        train = (
            {k: v for k, v in asdict(prov.train).items() if k != "seed"} if dp is None and prov and prov.train else {}
        )
        split = target.split
        members = split.members
        members = members.sample(p.max_members, ctx.seed, Stream.CANARY_MEMBERS)
        m = p.num_canaries if p.num_canaries is not None else default_canaries(len(members), len(split.nonmembers))
        base = base_target(target, ctx)
        res = canary_audit(
            base=base,
            members=members,
            train=train,
            num_canaries=m,
            kind=None if p.kind == "auto" else p.kind,
            pool=split.nonmembers,
            dp=dp,
            score=p.score,
            delta=p.delta,
            confidence=p.confidence,
            guess_fractions=tuple(p.guess_fractions),
            guess_selection=p.guess_selection,
            holdout_fraction=p.holdout_fraction,
            secret_digits=p.secret_digits,
            exposure_candidates=p.exposure_candidates,
            seed=ctx.seed,
            cache_dir=ctx.cache_dir,
            progress=ctx.progress,
        )
        out = Outcome()
        conf = f"{p.confidence:.0%}"
        how = (
            "r chosen on held-out canaries"
            if res.guess_selection == "holdout"
            else "Bonferroni-corrected over the guess grid"
        )
        out.metric(
            "epsilon_lb",
            res.epsilon_lb,
            higher_is_better=False,
            unit="epsilon",
            description=f"Lower bound on epsilon at {conf} confidence ({how}): the Steinke-Nasr-Jagielski "
            "bound, which holds for any (eps, delta)-DP mechanism. The training procedure is NOT "
            "(eps, delta)-DP for any smaller eps. epsilon_lb_fdp, often larger, holds only for "
            "mechanisms with a Gaussian trade-off curve, so it is not the headline.",
        )
        out.metric(
            "epsilon_lb_sjn",
            res.epsilon_lb_sjn,
            higher_is_better=False,
            unit="epsilon",
            description="Steinke-Nasr-Jagielski bound on the same guesses: holds for any (eps, delta)-DP mechanism.",
        )
        out.metric(
            "epsilon_lb_fdp",
            res.epsilon_lb_fdp,
            higher_is_better=False,
            unit="epsilon",
            description=f"f-DP one-run bound (Mahloujifar, Melis, Chaudhuri 2025) on the same guesses: the "
            f"mechanism is not mu-GDP for mu <= {res.mu_lb:.3f}, shown as that mu's epsilon at "
            "delta (a bound on epsilon for mechanisms with a Gaussian trade-off curve).",
        )
        out.metric(
            "epsilon_lb_ceiling",
            res.epsilon_lb_ceiling,
            higher_is_better=True,
            unit="epsilon",
            description=f"The largest epsilon_lb this audit could report (a perfect attack, same m, inclusion "
            f"draw, guess selection, delta and confidence; r = {res.ceiling_guesses}; "
            f"Steinke-Nasr-Jagielski alone {res.ceiling_sjn:.3f}, f-DP {res.ceiling_fdp:.3f}). An "
            "epsilon above it can be neither confirmed nor refuted by this audit.",
        )
        if res.accountant_epsilon is not None:
            out.metric(
                "accountant_epsilon",
                res.accountant_epsilon,
                higher_is_better=False,
                unit="epsilon",
                description="Upper bound from the accountant for the canary training run itself.",
            )
        how_m = (
            ""
            if p.num_canaries is not None
            else f" (the default: {DEFAULT_CANARIES:,}, capped at the canary run's {len(members)} members and the "
            f"{len(split.nonmembers)} non-members)"
        )
        out.metric(
            "num_canaries", res.num_canaries, unit="canaries", description=f"m canaries{how_m}; each included w.p. 1/2."
        )
        out.metric("guesses", res.guesses, unit="guesses", description="r: guesses behind the headline bound.")
        out.metric("correct_guesses", res.correct, unit="guesses", description="v: correct guesses among r.")
        if res.canary_auc is not None:
            out.metric(
                "canary_auc",
                res.canary_auc,
                higher_is_better=False,
                unit="AUC",
                description="ROC AUC of the canary scores for included vs excluded (0.5 = no signal).",
            )
        rows = res.rows
        rec = res.record
        if res.guess_selection == "holdout":
            about = (
                f"on the {len(rec['held_out_ids'])} held-out canaries only, at {conf} each: they chose r; the "
                f"headline is computed once on the other {rec['m']}"
            )
        else:
            about = f"on all canaries, each at {rec['confidence']:.4g} confidence, so the maximum holds at {conf}"
        out.curve(
            "epsilon_lb_vs_guesses",
            [r["r"] for r in rows],
            [r["epsilon_lb"] for r in rows],
            x_label="number of guesses r",
            y_label="epsilon lower bound",
            description=f"epsilon_lb (Steinke-Nasr-Jagielski) per number of guesses, {about}",
        )
        out.tables["guesses"] = rows
        out.tables["bound"] = rec
        out.tables["audit"] = {
            "kind": res.kind,
            "score": res.score,
            "delta": res.delta,
            "confidence": res.confidence,
            "num_included": res.num_included,
            "members_in_canary_run": len(members),
            "canary_run_cache_hit": res.cache_hit,
            "canary_run_seconds": round(res.train_seconds, 2),
            "dp": res.dp,
            "epsilon_lb_ceiling": res.epsilon_lb_ceiling,
            "ceiling_sjn": res.ceiling_sjn,
            "ceiling_fdp": res.ceiling_fdp,
            "guess_selection": res.guess_selection,
            "bound": res.bound,
            "mu_lb": res.mu_lb,
            "ceiling_guesses": res.ceiling_guesses,
            "notes": res.notes,
        }
        out.tables["rerun"] = res.rerun
        if res.exposure is not None:
            ex = res.exposure
            out.metric(
                "exposure_mean_included",
                ex["mean_included"],
                higher_is_better=False,
                unit="bits",
                description=f"Mean exposure of inserted secrets (max {ex['space_bits']:.1f} bits = ranked first; "
                + (
                    "skew-normal extrapolation of the rank)"
                    if ex["estimator"] == "skewnorm"
                    else f"empirical rank among {ex['candidates']} candidates, as the skew-normal fit "
                    f"failed: at most {ex['max_resolvable_bits']:.1f} bits can show)"
                ),
            )
            out.metric(
                "exposure_max_included",
                ex["max_included"],
                higher_is_better=False,
                unit="bits",
                description="Largest exposure among inserted secrets.",
            )
            out.metric(
                "exposure_mean_excluded",
                ex["mean_excluded"],
                higher_is_better=False,
                unit="bits",
                description="Mean exposure of the secrets left out of training: the chance level to compare with.",
            )
            out.metric(
                "exposure_auc",
                ex["auc_included_vs_excluded"],
                higher_is_better=False,
                unit="AUC",
                description="AUC of exposure, included vs excluded secrets (0.5 = the model does not rank the "
                "secrets it saw higher).",
            )
            out.metric(
                "exposure_p_value",
                ex["p_value_included_vs_excluded"],
                higher_is_better=True,
                unit="probability",
                description="One-sided Mann-Whitney p-value for 'included secrets have higher exposure'.",
            )
            out.tables["exposure"] = {k: v for k, v in ex.items() if k != "per_canary"}
            _exposure_finding(out, ex, level=p.confidence)
        held = set(res.record.get("held_out_ids", []))
        for i, cid in enumerate(res.canary_ids):
            ev = {"id": cid, "included": bool(res.included[i]), "score": float(res.scores[i]), "held_out": cid in held}
            if res.exposure is not None:
                ev["exposure_bits"] = res.exposure["per_canary"][i]
            out.evidence.append(ev)
        out.findings_from(canary_findings(res))
        return out


def _exposure_finding(out: Outcome, ex: dict[str, Any], *, level: float) -> None:
    """Medium when the inserted secrets rank significantly higher than the excluded ones (one-sided test at
    1 - `level`): the model gives up secrets it saw, whatever the epsilon bound says at this canary count."""
    pv, auc = ex["p_value_included_vs_excluded"], ex["auc_included_vs_excluded"]
    if pv is None or pv >= 1 - level:
        return
    out.finding(
        "medium",
        "Planted secrets are exposed",
        f"The secrets trained on rank higher among random secrets of the same form than the ones left out: mean "
        f"exposure {ex['mean_included']:.2f} bits vs {ex['mean_excluded']:.2f} (max {ex['max_included']:.2f} of "
        f"{ex['space_bits']:.1f}); exposure AUC {auc:.3f}, one-sided Mann-Whitney p = {pv:.3g}. A secret in the "
        "training data is easier to extract from this model than one that was not",
        metric="exposure_p_value",
    )
