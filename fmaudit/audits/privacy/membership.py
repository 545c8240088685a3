"""`privacy.membership`: membership-inference attacks on classifiers and causal LMs.

Given a target and known members (trained on) and non-members (never seen), measures how well attacks
tell them apart: loss / confidence / entropy baselines, LiRA (online, offline; fixed or per-example
variance) and RMIA with reference models fine-tuned by the same loop as the target, and the causal-LM
scores (zlib ratio, Min-K% Prob, Min-K%++). Positive class = member, always.

Reference models start from the target's base (pre-fine-tune) weights and each trains on a random half of
the population (the target's whole fine-tune dataset), in complementary pairs, with recorded seeds, and
are cached by hash. They are cheap by default: only the last block(s) and the head train.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, base_target

AttackName = Literal["loss", "confidence", "entropy", "zlib", "min_k", "min_k_pp", "calibrated_loss",
                     "lira_online", "lira_offline", "rmia", "rmia_offline", "quantile"]

CLASSIFIER_ONLY = {"confidence", "entropy"}
LM_ONLY = {"zlib", "min_k", "min_k_pp"}
REFERENCE_ATTACKS = {"lira_online", "lira_offline", "rmia", "rmia_offline"}

ATTACK_DESCRIPTIONS = {
    "loss": "loss threshold (Yeom et al. 2018): lower loss = member",
    "confidence": "highest softmax probability (label-free)",
    "entropy": "prediction entropy (label-free): lower = member",
    "zlib": "sequence loss divided by zlib-compressed length (Carlini et al. 2021)",
    "min_k": "mean of the lowest k% token log-probs (Min-K% Prob, Shi et al. 2023)",
    "min_k_pp": "Min-K%++ (Zhang et al. 2024): lowest k% of token log-probs standardized by the "
                "model's own next-token distribution",
    "calibrated_loss": "target loss minus a calibration model's loss (the base weights by default; "
                       "difficulty calibration / reference-model attack)",
    "lira_online": "LiRA online (Carlini et al. 2022): Gaussian likelihood ratio, IN vs OUT reference models",
    "lira_offline": "LiRA offline: one-sided test against OUT reference models only",
    "rmia": "RMIA (Zarifzadeh et al. 2024), Pr(x) from all reference models",
    "rmia_offline": "RMIA offline: Pr(x) from OUT reference models with the linear approximation a",
    "quantile": "quantile regression (Bertran et al. 2023, Gaussian form): the target's logit-scaled confidence, "
                "standardized by the non-member mean and spread predicted from the base model's features "
                "(one regression instead of reference models)",
}

_PER_ATTACK = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "tpr_at_0pct_fpr", "balanced_accuracy", "advantage",
               "ppv_at_1pct_fpr")


class MembershipAudit(AuditModule):
    name = "privacy.membership"
    category = "privacy"
    description = ("Membership inference: loss / confidence / entropy baselines, LiRA and RMIA with cheap reference "
                   "models fine-tuned by the same loop, zlib / Min-K% / Min-K%++ for causal LMs; AUC with a "
                   "bootstrap interval, TPR at 1%, 0.1% and 0% FPR, ROC curves, and a blind-baseline shift check.")
    requires = frozenset({"per_example_loss"})
    metric_names = _PER_ATTACK + tuple(f"*.{m}" for m in _PER_ATTACK) + (
        "blind_baseline_auc", "num_members", "num_nonmembers", "reference_cost_ratio", "auc_null", "advantage_null",
        "tpr_at_1pct_fpr_null", "auc_p_value", "fpr_resolution", "reference_overlap_max_deviation")

    class Params(AuditParams):
        attacks: list[AttackName] = Field(
            default_factory=lambda: ["loss", "rmia"], min_length=1,
            description="Attacks to run. Classifiers: loss, confidence, entropy; causal LMs: loss, zlib, min_k, "
                        "min_k_pp; both: calibrated_loss, quantile, lira_online, lira_offline, rmia, rmia_offline.")
        reference_models: int = Field(default=2, ge=1, le=256,
                                      description="Reference models for LiRA / RMIA (trained in complementary pairs).")
        reference_trainable: Literal["head", "last_n_layers", "all"] = Field(
            default="last_n_layers", description="What trains in a reference model (cheap by default).")
        reference_n_layers: int = Field(default=1, ge=1, description="With last_n_layers: how many final blocks train.")
        reference_epochs: int | None = Field(default=None, ge=1, description="Default: the target's fine-tune epochs.")
        reference_lr: float | None = Field(default=None, gt=0, description="Default: the target's fine-tune lr.")
        reference_batch_size: int | None = Field(default=None, ge=1, description="Default: the target's batch size.")
        reference_seed: int = Field(default=0, ge=0, description="Seed of the reference models' halves and training "
                                                                 "(recorded; the same seed reuses cached models).")
        fixed_variance: bool | None = Field(default=None, description="LiRA with one global variance; default: "
                                                                      "when fewer than 64 reference models.")
        rmia_gamma: float = Field(default=1.0, gt=0, description="RMIA's likelihood-ratio threshold gamma.")
        rmia_offline_a: float = Field(default=0.3, ge=0, le=1, description="RMIA offline approximation parameter a.")
        lira_shrinkage: bool = Field(default=True, description="LiRA: shrink each example's IN - OUT gap toward the "
                                                                "global gap, never below 0 (stable with few models).")
        quantile_folds: int = Field(default=5, ge=2, le=20, description="quantile: cross-fitting folds over the "
                                    "known non-members (each scored by a regression that never saw it).")
        null_permutations: int = Field(default=200, ge=0, le=10_000, description="Label permutations for the "
                                       "headline's null reference (0: none).")
        min_k: float = Field(default=0.2, gt=0, le=1, description="Fraction of lowest-probability tokens for Min-K%.")
        calibration_model: str = Field(default="base", description="calibrated_loss: 'base' (the target's "
                                                                   "pre-fine-tune weights) or another target's name.")
        members: list[str] | None = Field(default=None, description="Member example ids (default: the target's "
                                                                    "fine-tune split).")
        nonmembers: list[str] | None = Field(default=None, description="Non-member ids (default with members: every "
                                                                       "other example of the data).")
        max_examples: int | None = Field(default=None, ge=2, description="Score a seeded sample of at most this many "
                                                                         "members and as many non-members.")
        batch_size: int = Field(default=32, ge=1)
        bootstrap: int = Field(default=1000, ge=0, le=100_000, description="Bootstrap rounds (0: no intervals).")
        confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
        per_example_scores: bool = Field(default=True, description="Scores by example id in the report's tables.")
        evidence: int = Field(default=10, ge=0, description="Most exposed members listed as evidence (ids; text "
                                                            "only when the recipe sets store_examples).")

    # -- pre-flight ----------------------------------------------------------------------------------
    def check(self, target, data) -> list[str]:
        p = self.params
        caps = target.capabilities
        problems = []
        is_clf = "classifier" in caps
        wrong = sorted(set(p.attacks) & (LM_ONLY if is_clf else CLASSIFIER_ONLY))
        if wrong:
            problems.append(f"attack(s) {', '.join(wrong)} do not apply to a {target.task} target")
        if "causal_lm" not in caps and not is_clf:
            problems.append(f"privacy.membership supports classifiers and causal LMs, not {target.task}")
        if set(p.attacks) & REFERENCE_ATTACKS and "trainable" not in caps:
            problems.append(f"reference-model attacks ({', '.join(sorted(set(p.attacks) & REFERENCE_ATTACKS))}) "
                            f"fine-tune reference models, but target {target.name!r} cannot be fine-tuned; use "
                            "loss / confidence / entropy / zlib / min_k instead")
        if p.members is None and p.nonmembers is not None:
            problems.append("nonmembers given without members; give members too (or neither, to use the split)")
        if p.members is None and getattr(target, "split", None) is None:
            problems.append(f"target {target.name!r} has no member / non-member split: fine-tune it in the recipe "
                            "(targets.<name>.finetune) or give params members / nonmembers (example ids)")
        if data is None or len(data) == 0:
            problems.append("no data to attack")
        elif is_clf and data.labels is None:
            problems.append(f"dataset {data.name!r} has no labels; classifier attacks need them")
        return problems

    # -- run -----------------------------------------------------------------------------------------
    def run(self, target, ctx: AuditContext) -> Outcome:
        p = self.params
        out = Outcome()
        t0 = time.perf_counter()
        population, audit_idx, is_member, source = self._sets(target, ctx, out)
        audit = population.subset(audit_idx, name=f"{population.name}[audit]")
        is_clf = "classifier" in target.capabilities
        attacks = list(dict.fromkeys(p.attacks))
        with ctx.task("membership: scoring the target", 1) as bar:
            sig = self._signals(target, audit, is_clf, need_dist="min_k_pp" in attacks)
            bar.advance()
        scores: dict[str, np.ndarray] = {}
        for a in attacks:
            if a == "loss":
                scores[a] = -sig["loss"]
            elif a == "confidence":
                scores[a] = sig["confidence"]
            elif a == "entropy":
                scores[a] = -sig["entropy"]
            elif a in ("zlib", "min_k_pp"):
                scores[a] = -sig[a] if a == "zlib" else sig[a]
            elif a == "min_k":
                scores[a] = sig["min_k"]
        timings = {"score_target_s": time.perf_counter() - t0}

        if "quantile" in attacks:
            t = time.perf_counter()
            scores["quantile"], qinfo = self._quantile(target, ctx, audit, sig, is_member, is_clf)
            timings["quantile_s"] = time.perf_counter() - t
            out.tables["quantile_regression"] = qinfo | {"seconds": round(timings["quantile_s"], 3)}

        if "calibrated_loss" in attacks:
            t = time.perf_counter()
            cal, cal_name = self._calibration_target(target, ctx)
            cal_sig = self._signals(cal, audit, is_clf, need_dist=False)
            scores["calibrated_loss"] = cal_sig["loss"] - sig["loss"]
            out.tables["calibration_model"] = {"name": cal_name, "weights_sha256": cal.weights_sha256()}
            timings["calibration_s"] = time.perf_counter() - t

        if set(attacks) & REFERENCE_ATTACKS:
            t = time.perf_counter()
            ref_phi, ref_logp, in_mask, ref_info = self._reference_signals(target, ctx, population, audit_idx, is_clf,
                                                                           out, is_member)
            timings["reference_models_s"] = time.perf_counter() - t
            self._reference_scores(attacks, sig, ref_phi, ref_logp, in_mask, scores, out)

        self._report(out, ctx, attacks, scores, is_member, audit, is_clf, sig)
        out.tables["sets"] = {**source, "num_members": int(is_member.sum()), "num_nonmembers": int((~is_member).sum()),
                              "population": len(population), "population_dataset": population.name}
        out.tables["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        self._costs(out, target, attacks, timings)
        return out

    @staticmethod
    def _costs(out: Outcome, target, attacks, timings: dict[str, float]) -> None:
        """What each attack cost the auditor, in CPU-seconds of this run and in fine-tunes of the target:
        scoring the target, plus what the attack adds (reference models: their recorded training time, also
        when they came from the cache; quantile: base features and regressions; calibration: base scoring)."""
        refs = out.tables.get("reference_models", {}).get("models", [])
        ref_train = float(sum(r.get("train_seconds") or 0.0 for r in refs))
        ref_score = float(sum(r.get("score_seconds") or 0.0 for r in refs))
        extra = {"calibrated_loss": timings.get("calibration_s", 0.0), "quantile": timings.get("quantile_s", 0.0)}
        target_train = target.provenance.train_seconds if target.provenance is not None else None
        for a in attacks:
            cost = timings.get("score_target_s", 0.0) + (ref_train + ref_score if a in REFERENCE_ATTACKS
                                                         else extra.get(a, 0.0))
            row = out.tables["attacks"][a]
            row["cost_seconds"] = round(cost, 3)
            row["cost_target_finetunes"] = round(cost / target_train, 4) if target_train else None

    # -- members / non-members -----------------------------------------------------------------------
    def _sets(self, target, ctx: AuditContext, out: Outcome):
        """(population dataset, audit indices into it, is_member per audit index, provenance)."""
        p = self.params
        if p.members is not None:
            data = ctx.data
            if data is None:
                raise ValueError("members were given but the audit has no data to find them in")
            mem_ids = list(p.members)
            non_ids = list(p.nonmembers) if p.nonmembers is not None else None
            _validate_ids(mem_ids, non_ids, data.ids)
            pos = {x: i for i, x in enumerate(data.ids)}
            mem = np.array([pos[x] for x in mem_ids], dtype=np.int64)
            if non_ids is None:
                mask = np.ones(len(data), bool)
                mask[mem] = False
                non = np.nonzero(mask)[0]
            else:
                non = np.array([pos[x] for x in non_ids], dtype=np.int64)
            population, source = data, {"source": "params"}
        else:
            split = ctx.split if ctx.split is not None else getattr(target, "split", None)
            if split is None:
                raise ValueError(f"target {target.name!r} has no member / non-member split; fine-tune it in the recipe "
                                 "or give params members / nonmembers")
            if ctx.data is not None and ctx.data.fingerprint != split.dataset.fingerprint:
                raise ValueError(f"the audit's data {ctx.data.name!r} is not the data target {target.name!r} was "
                                 f"fine-tuned on ({split.dataset.name!r}), so membership is unknown; drop `data:` "
                                 "or give params members / nonmembers")
            population = split.dataset
            mem, non = np.asarray(split.member_idx), np.asarray(split.nonmember_idx)
            _validate_ids([population.ids[i] for i in mem], [population.ids[i] for i in non], population.ids)
            source = {"source": "split", "split_seed": split.seed, "member_fraction": split.member_fraction}
        if len(mem) == 0 or len(non) == 0:
            raise ValueError(f"membership inference needs members and non-members; got {len(mem)} member(s) and "
                             f"{len(non)} non-member(s)")
        if p.max_examples is not None:
            from fmaudit.seeds import Stream
            from fmaudit.seeds import rng as stream_rng

            rng = stream_rng(ctx.seed, Stream.MEMBERSHIP_SAMPLE)
            if len(mem) > p.max_examples:
                mem = np.sort(rng.choice(mem, p.max_examples, replace=False))
            if len(non) > p.max_examples:
                non = np.sort(rng.choice(non, p.max_examples, replace=False))
        audit_idx = np.r_[mem, non].astype(np.int64)
        is_member = np.r_[np.ones(len(mem), bool), np.zeros(len(non), bool)]
        if population.texts is not None:
            dup = set(population.texts[i] for i in mem) & set(population.texts[i] for i in non)
            if dup:
                out.finding("low", f"{len(dup)} text(s) appear among both members and non-members",
                            "identical texts under different ids: such a 'non-member' was in effect trained on, "
                            "which lowers the measured leakage")
        return population, audit_idx, is_member, source

    # -- model outputs -------------------------------------------------------------------------------
    def _signals(self, target, data, is_clf: bool, need_dist: bool) -> dict[str, np.ndarray]:
        return _signals(target, data, is_clf, need_dist, batch_size=self.params.batch_size, min_k=self.params.min_k)

    def _calibration_target(self, target, ctx: AuditContext):
        name = self.params.calibration_model
        if name == "base":
            return base_target(target, ctx), "base"
        try:
            if ctx.services is None:
                raise KeyError(name)
            cal = ctx.services.target(name)
        except KeyError:
            raise ValueError(f"calibration_model {name!r} is not a target of this run") from None
        if cal.task != target.task:
            raise ValueError(f"calibration_model {name!r} is a {cal.task} model; the target is {target.task}")
        return cal, name

    def _quantile(self, target, ctx: AuditContext, audit, sig, is_member: np.ndarray, is_clf: bool):
        """Quantile-regression attack: base-model features of every audit example, a regression fitted on
        a share of the known non-members (the attacker's public data), scored out of fold."""
        from fmaudit.audits.privacy.membership_attacks import classifier_signals, quantile_regression_scores

        p = self.params
        base = base_target(target, ctx)
        feats = penultimate_features(base, audit, batch_size=p.batch_size if is_clf else max(1, p.batch_size // 4))
        if is_clf:
            k = int(max(audit.labels.max() + 1, target.num_labels or 0))
            # the label matters (per-class difficulty): the base model's logits and its log-probability of the
            # true label next to the representation
            base_logits = base.logits(audit, batch_size=p.batch_size)
            base_sig = classifier_signals(base_logits, audit.labels)
            feats = np.concatenate([feats, np.eye(k)[audit.labels], base_logits,
                                    base_sig["phi"][:, None]], axis=1)
        score, info = quantile_regression_scores(sig["phi"], feats, ~is_member, folds=p.quantile_folds,
                                                 seed=ctx.seed)
        return score, info | {"feature_source": "the base model's representation (text: last hidden layer, mean "
                                                "over tokens; else the input of its last linear layer)"
                                                + (", the label, the base model's logits and logit-scaled "
                                                   "confidence" if is_clf else "")}

    # -- reference models ----------------------------------------------------------------------------
    def _train_config(self, target, seed: int, out: Outcome, ctx: AuditContext):
        from fmaudit.training import TrainConfig

        p = self.params
        cfg = target.provenance.train if target.provenance is not None else None
        source = ctx.services.source_of(target) if ctx.services is not None else None
        if cfg is None and source is not None and source != target.name:
            # a produced target (e.g. DP fine-tuned): mimic its source's recipe fine-tune, so both targets
            # share the same (cached) reference models
            src = ctx.services.target(source)
            cfg = src.provenance.train if src.provenance is not None else None
        if cfg is None:
            out.finding("low", "Reference models use default training settings",
                        f"target {target.name!r} records no fine-tune settings; reference models train with "
                        "epochs / lr / batch size from params or the defaults (1 epoch, lr 5e-5, batch 16)")
        cfg = cfg or TrainConfig()
        return TrainConfig(epochs=p.reference_epochs or cfg.epochs, batch_size=p.reference_batch_size or cfg.batch_size,
                           lr=p.reference_lr or cfg.lr, weight_decay=cfg.weight_decay, trainable=p.reference_trainable,
                           n_layers=p.reference_n_layers, seed=seed)

    def _reference_signals(self, target, ctx: AuditContext, population, audit_idx: np.ndarray, is_clf: bool,
                           out: Outcome, is_member: np.ndarray):
        from fmaudit.audits.privacy.membership_attacks import paired_halves
        from fmaudit.executor import LocalExecutor
        from fmaudit.seeds import Stream, derive

        p = self.params
        base = base_target(target, ctx)
        R = p.reference_models
        masks = paired_halves(len(population), R, p.reference_seed)
        seeds = [derive(p.reference_seed, Stream.REFERENCE_TRAIN, r) % (2**32) for r in range(R)]
        configs = [self._train_config(target, seeds[r], out, ctx) for r in range(R)]
        out.findings = _dedupe_findings(out.findings)
        audit = population.subset(audit_idx, name=f"{population.name}[audit]")
        executor = ctx.executor or LocalExecutor()
        progress = ctx.progress
        try:  # a remote executor pickles what the function captures: progress bars stay in this process
            from fmaudit.executor import local_only  # type: ignore[attr-defined]

            progress = local_only(progress)
        except ImportError:
            pass
        train_one = _TrainReference(base=base, population=population, audit=audit, masks=masks, seeds=seeds,
                                    configs=configs, is_clf=is_clf, cache_dir=ctx.cache_dir, progress=progress,
                                    batch_size=p.batch_size, min_k=p.min_k, label=target.name)
        results = executor.map(train_one, list(range(R)))
        errors = [r for r in results if "error" in r]
        if errors:
            raise RuntimeError("reference model training failed: " + "; ".join(f"#{e['index']}: {e['error']}"
                                                                              for e in errors))
        results.sort(key=lambda r: r["index"])
        ref_phi = np.stack([r["phi"] for r in results])
        ref_logp = np.stack([r["logp"] for r in results])
        in_mask = masks[:, audit_idx]
        target_train = target.provenance.train_seconds if target.provenance is not None else None
        rows = []
        overlap = reference_overlap(in_mask, is_member)
        for r in results:
            ratio = r["train_seconds"] / target_train if target_train else None
            rows.append({k: v for k, v in r.items() if k not in ("phi", "logp")} | {"cost_ratio": ratio}
                        | overlap["models"][r["index"]])
        out.metric("reference_overlap_max_deviation", overlap["max_deviation"], higher_is_better=False,
                   unit="fraction", description="Largest |overlap - 0.5| over reference models, where overlap is the "
                                                "fraction of the target's members (or non-members) in a reference "
                                                "model's training half; near 0 = references independent of the "
                                                f"answer (chance level here about {overlap['chance_deviation']:.3f}).")
        if overlap["correlated"]:
            out.finding("high", "Reference models are correlated with the target's membership",
                        f"reference model(s) {overlap['correlated']} trained on a half whose overlap with the target's "
                        "members differs from 0.5 far beyond chance (|z| > 4.5): such references know the answer and "
                        "LiRA / RMIA numbers are not valid; use another reference_seed", metric="reference_overlap_max_deviation")
        out.tables["reference_models"] = {
            "count": R, "base_weights_sha256": base.weights_sha256(),
            "config": {k: getattr(configs[0], k) for k in ("epochs", "batch_size", "lr", "weight_decay", "trainable",
                                                           "n_layers")},
            "halves": "complementary pairs of random halves of the population", "reference_seed": p.reference_seed,
            "halves_stream": "fmaudit.seeds Stream.REFERENCE_HALVES, key = pair index",
            # which examples each reference model trained on: model 2j on these ids, model 2j+1 on the rest
            "pairs": [{"models": [2 * j, 2 * j + 1] if 2 * j + 1 < R else [2 * j],
                       "in_ids_of_first": [population.ids[i] for i in np.nonzero(masks[2 * j])[0]]}
                      for j in range((R + 1) // 2)],
            "target_train_seconds": target_train, "models": rows}
        ratios = [r["cost_ratio"] for r in rows if r["cost_ratio"] is not None]
        if ratios:
            out.metric("reference_cost_ratio", float(np.median(ratios)), higher_is_better=False, unit="ratio",
                       description="Median training time of one reference model / the target's fine-tune time "
                                   "(as recorded when each was trained).")
        return ref_phi, ref_logp, in_mask, rows

    def _reference_scores(self, attacks, sig, ref_phi, ref_logp, in_mask, scores, out: Outcome) -> None:
        from fmaudit.audits.privacy.membership_attacks import lira_scores, rmia_scores

        p = self.params
        R = ref_phi.shape[0]
        fixed = p.fixed_variance if p.fixed_variance is not None else R < 64
        info: dict[str, Any] = {"fixed_variance": fixed}
        if "lira_online" in attacks or "lira_offline" in attacks:
            online, offline, linfo = lira_scores(sig["phi"], ref_phi, in_mask, fixed_variance=fixed,
                                                 shrink=p.lira_shrinkage)
            info["lira"] = linfo
            if "lira_online" in attacks:
                scores["lira_online"] = online
            if "lira_offline" in attacks:
                scores["lira_offline"] = offline
        if "rmia" in attacks:
            scores["rmia"] = rmia_scores(sig["logp_true"], ref_logp, in_mask, gamma=p.rmia_gamma)
        if "rmia_offline" in attacks:
            scores["rmia_offline"] = rmia_scores(sig["logp_true"], ref_logp, in_mask, offline=True, a=p.rmia_offline_a,
                                                 gamma=p.rmia_gamma)
        n_imp = int((in_mask.sum(0) == 0).sum() + (in_mask.sum(0) == R).sum())
        if n_imp:
            out.finding("info", f"{n_imp} example(s) lack an IN or an OUT reference model",
                        "with a single reference model each example is only IN or only OUT; the missing mean is "
                        "the other one shifted by the global IN - OUT gap. Use an even reference_models >= 2.")
        out.tables["reference_attack_settings"] = info | {"rmia_gamma": p.rmia_gamma, "rmia_offline_a": p.rmia_offline_a}

    # -- statistics and report -----------------------------------------------------------------------
    def _report(self, out: Outcome, ctx: AuditContext, attacks, scores, is_member, audit, is_clf, sig) -> None:
        from fmaudit.audits.privacy.membership_stats import (FPR_LEVELS, attack_metrics, blind_baseline,
                                                             calibrated_headlines, curve_points, summarize_levels)

        p = self.params
        level = p.confidence
        n_mem, n_non = int(is_member.sum()), int((~is_member).sum())
        results = {}
        scores_used: dict[str, np.ndarray] = {}
        per_level = 1.0 - (1.0 - level) / max(1, len(attacks))
        for a in attacks:
            s = np.nan_to_num(np.asarray(scores[a], dtype=np.float64), nan=-np.inf)
            finite = np.isfinite(s)
            if not finite.all():  # +-inf from saturated outputs: keep their order, make them finite
                lo, hi = (s[finite].min(), s[finite].max()) if finite.any() else (0.0, 0.0)
                s = np.where(s == np.inf, hi + 1.0, np.where(s == -np.inf, lo - 1.0, s))
                scores[a] = s
            scores_used[a] = s
            results[a] = attack_metrics(s, is_member, bootstrap=p.bootstrap, level=per_level, seed=ctx.seed)
        simult = (f" Intervals are simultaneous over the {len(attacks)} attacks (Bonferroni: each at "
                  f"{per_level:.2%})." if len(attacks) > 1 else "")
        for a, m in results.items():
            desc = ATTACK_DESCRIPTIONS[a]
            out.metric(f"{a}.auc", m.auc, higher_is_better=False, ci=m.ci.get("auc"), ci_level=per_level,
                       unit="fraction", description=f"ROC AUC, members positive; {desc}.{simult}")
            for suffix, lvl in FPR_LEVELS:
                out.metric(f"{a}.tpr_at_{suffix}_fpr", m.tpr[suffix], higher_is_better=False,
                           ci=m.ci.get(f"tpr_at_{suffix}_fpr"), ci_level=per_level, unit="fraction",
                           description=f"Members found at {lvl:.1%} false-positive rate; {a}")
            out.metric(f"{a}.balanced_accuracy", m.balanced_accuracy, higher_is_better=False, unit="fraction",
                       description=f"Best balanced accuracy over thresholds (in-sample, biased upward); {a}")
            out.metric(f"{a}.advantage", m.advantage, higher_is_better=False, ci=m.ci.get("advantage"),
                       ci_level=per_level, unit="fraction",
                       description=f"Attacker advantage max(TPR - FPR) over thresholds (in-sample: above 0 even "
                                   f"on pure noise; compare with advantage_null); {a}")
            out.metric(f"{a}.ppv_at_1pct_fpr", m.ppv_at_1pct_fpr, higher_is_better=False, unit="fraction",
                       description=f"Precision of member guesses at 1% FPR with this audit set's member share "
                                   f"({n_mem}/{n_mem + n_non}); {a}")
            fx, fy = curve_points(m.fpr, m.tpr_curve)
            out.curve(f"roc.{a}", fx, fy, x_label="false positive rate", y_label="true positive rate", log_x=True,
                      log_y=True, description=f"ROC of {a} (members positive); plot log-log for the low-FPR regime")
        # headline: the strongest attack, chosen on one half and measured on the other, with a null
        heads, sel = calibrated_headlines(scores_used, is_member, bootstrap=p.bootstrap, level=level,
                                          null_rounds=p.null_permutations, seed=ctx.seed)
        best_by = {name: h.attack for name, h in heads.items()}
        for name, h in heads.items():
            src = out.metrics[f"{h.attack}.{name}"]
            where = {"selection half": f"chosen as the strongest of {len(attacks)} attacks on a random half of the "
                                       f"audit set, measured on the other half ({h.num_members} members, "
                                       f"{h.num_nonmembers} non-members)",
                     "same examples": f"the strongest of {len(attacks)} attacks on the same examples it is measured "
                                      "on (too few examples to split them): optimistic",
                     "only attack": "the only attack, measured on the whole audit set"}[h.selected_on]
            out.metric(name, h.value, higher_is_better=False, ci=h.ci, ci_level=level if h.ci else None,
                       unit=src.unit, description=f"Headline: {h.attack} ({where}). {src.description}")
        for name in ("auc", "advantage", "tpr_at_1pct_fpr"):
            h = heads[name]
            if h.null_quantile is not None:
                out.metric(f"{name}_null", h.null_quantile, higher_is_better=False, unit="fraction",
                           description=f"Null reference for the headline {name}: its {level:.0%} quantile over "
                                       f"{p.null_permutations} random permutations of the member labels (same "
                                       "scores, same examples). A headline at or below it is indistinguishable "
                                       "from chance.")
        if heads["auc"].p_value is not None:
            out.metric("auc_p_value", heads["auc"].p_value, higher_is_better=True, unit="probability",
                       description="Permutation p-value of the headline AUC (one-sided): the chance of an AUC at "
                                   "least this high if membership carried no signal.")
        out.metric("fpr_resolution", 1.0 / heads["auc"].num_nonmembers, higher_is_better=False, unit="fraction",
                   description="Smallest non-zero false-positive rate the headline can resolve (1 / non-members it "
                               "is measured on): TPR at any lower FPR is the TPR at 0% FPR.")
        out.tables["headline"] = {
            "method": {"selection half": "attack chosen on a stratified random half of the audit set, metrics "
                                        "measured on the other half",
                       "same examples": "attack chosen and measured on the same examples (too few to split): "
                                        "optimistic",
                       "only attack": "single attack on the whole audit set"}[heads["auc"].selected_on],
            "selection_ids": [audit.ids[i] for i in np.nonzero(sel)[0]] if sel is not None else None,
            "null_permutations": p.null_permutations,
            "metrics": {name: {"attack": h.attack, "value": h.value, "ci": list(h.ci) if h.ci else None,
                               "null_quantile": h.null_quantile, "p_value": h.p_value,
                               "num_members": h.num_members, "num_nonmembers": h.num_nonmembers}
                        for name, h in heads.items()}}
        out.metric("num_members", n_mem, unit="examples", description="Members attacked.")
        out.metric("num_nonmembers", n_non, unit="examples", description="Non-members attacked.")
        out.tables["attacks"] = {a: {"auc": m.auc, "auc_ci": m.ci.get("auc"), "tpr": m.tpr,
                                     "advantage": m.advantage, "balanced_accuracy": m.balanced_accuracy,
                                     "ppv_at_1pct_fpr": m.ppv_at_1pct_fpr, "best_threshold": m.best_threshold,
                                     "description": ATTACK_DESCRIPTIONS[a]} for a, m in results.items()}
        out.tables["strongest_attack"] = best_by

        n_head = heads["auc"].num_nonmembers
        for suffix, lvl, needed in summarize_levels(FPR_LEVELS, n_head):
            where = (f"the headline is measured on {n_head} of the {n_non} non-members (the other half chose the "
                     "attack)" if n_head < n_non else f"{n_non} non-members")
            out.finding("low", f"Too few non-members to measure TPR at {lvl:.1%} FPR",
                        f"{where}: the lowest non-zero FPR is {1 / n_head:.2%}, so tpr_at_{suffix}_fpr "
                        f"equals the TPR at 0% FPR; at least {needed} non-members are needed "
                        f"({2 * needed} with several attacks, since half of them choose the attack)",
                        metric=f"tpr_at_{suffix}_fpr")

        # blind baseline: is there a shift a model-free attacker could exploit?
        if audit.texts is not None:
            lengths = np.array([len(t) for t in audit.texts], dtype=np.float64)
        else:
            lengths = None
        checks = blind_baseline(is_member, lengths=lengths, labels=audit.labels, bootstrap=min(p.bootstrap, 500),
                                level=level, seed=ctx.seed)
        if checks:
            blind = max(max(c.auc, 1 - c.auc) for c in checks)
            out.metric("blind_baseline_auc", blind, higher_is_better=False, unit="fraction",
                       description="Best model-free attack (length or label alone), oriented so 0.5 = no shift.")
            out.tables["blind_baseline"] = [{"feature": c.feature, "auc": c.auc, "ci": list(c.ci), "detail": c.detail,
                                             "flagged": c.flagged} for c in checks]
            for c in checks:
                if c.flagged:
                    out.finding("medium", f"Members and non-members differ in {c.feature}",
                                f"{c.detail}; {c.feature} alone separates them with AUC {c.auc:.3f} "
                                f"[{c.ci[0]:.3f}, {c.ci[1]:.3f}]. A distribution shift inflates every attack's AUC "
                                "without any leak: compare against blind_baseline_auc", metric="blind_baseline_auc")

        head = out.metrics["auc"]
        h = heads["auc"]
        ci_txt = f" [{head.ci_low:.3f}, {head.ci_high:.3f}]" if head.ci_low is not None else ""
        detail = (f"TPR at 1% FPR {out.metrics['tpr_at_1pct_fpr'].value:.3f}, at 0.1% FPR "
                  f"{out.metrics['tpr_at_0.1pct_fpr'].value:.3f}; measured on {h.num_members} members vs "
                  f"{h.num_nonmembers} non-members")
        chance = h.null_quantile is not None and (h.value <= h.null_quantile or (h.p_value or 0) > 1 - level)
        if chance:
            out.finding("info", f"Indistinguishable from chance: strongest attack {h.attack} AUC {head.value:.3f}"
                                f"{ci_txt}",
                        f"{detail}. The headline does not exceed its null reference (AUC {h.null_quantile:.3f} is "
                        f"the {level:.0%} quantile of label-permuted AUCs; p = {h.p_value:.3f}). This is not proof of "
                        f"safety: a stronger attack or more examples may still find a leak.", metric="auc")
        else:
            ptxt = f"; above its null reference {h.null_quantile:.3f} (p = {h.p_value:.3g})" \
                if h.null_quantile is not None else ""
            out.finding("info", f"Strongest attack: {h.attack} with AUC {head.value:.3f}{ci_txt}", detail + ptxt,
                        metric="auc")

        ids = list(audit.ids)
        if p.per_example_scores:
            table: dict[str, Any] = {"ids": ids, "is_member": [bool(x) for x in is_member],
                                     "scores": {a: [float(v) for v in scores[a]] for a in attacks}}
            if ctx.store_examples and audit.texts is not None:
                table["texts"] = list(audit.texts)
            out.tables["per_example"] = table
        if p.evidence:
            a = best_by.get("tpr_at_1pct_fpr") or attacks[0]
            s = np.asarray(scores[a])
            order = [i for i in np.argsort(-s, kind="stable") if is_member[i]][: p.evidence]
            nonmember_top = float(np.max(s[~is_member]))
            for rank, i in enumerate(order, 1):
                ev: dict[str, Any] = {"id": ids[i], "attack": a, "score": float(s[i]), "rank": rank,
                                      "above_every_nonmember": bool(s[i] > nonmember_top)}
                if ctx.store_examples and audit.texts is not None:
                    ev["text"] = audit.texts[i]
                out.evidence.append(ev)


# ---------------------------------------------------------------------------------------------------
# helpers


def _signals(target, data, is_clf: bool, need_dist: bool, *, batch_size: int, min_k: float) -> dict[str, np.ndarray]:
    from fmaudit.audits.privacy.membership_attacks import classifier_signals, sequence_signals

    if is_clf:
        return classifier_signals(target.logits(data, batch_size=batch_size), data.labels)
    lp, mu, sd = _lm_token_stats(target, data, batch_size=max(1, batch_size // 4), need_dist=need_dist)
    return sequence_signals(lp, data.texts, k=min_k, token_mu=mu, token_sigma=sd)


class _TrainReference:
    """One reference model: fine-tune a copy of the base on its half (or load it from the cache), then score
    the audit examples. A plain picklable callable, so a remote executor can run it on another machine
    that shares the cache folder. Returns an error value instead of raising (the caller reports them all)."""

    def __init__(self, *, base, population, audit, masks, seeds, configs, is_clf, cache_dir, progress, batch_size,
                 min_k, label):
        self.base, self.population, self.audit = base, population, audit
        self.masks, self.seeds, self.configs = masks, seeds, configs
        self.is_clf, self.cache_dir, self.progress = is_clf, cache_dir, progress
        self.batch_size, self.min_k, self.label = batch_size, min_k, label

    def __call__(self, r: int) -> dict[str, Any]:
        from fmaudit.data import Split
        from fmaudit.training import finetune_cached

        try:
            ref = self.base.copy(name=f"{self.label}-ref{r}")
            mask = self.masks[r]
            member_idx = np.nonzero(mask)[0]
            split = Split(self.population, member_idx, np.nonzero(~mask)[0], self.seeds[r], 0.5)
            t = time.perf_counter()
            stats, hit, key = finetune_cached(ref, split, self.configs[r], cache_dir=self.cache_dir,
                                              progress=self.progress, label=f"reference model {r + 1}/{len(self.masks)}",
                                              kind="reference")
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            s = _signals(ref, self.audit, self.is_clf, False, batch_size=self.batch_size, min_k=self.min_k)
            infer_s = time.perf_counter() - t
            del ref
            return {"index": r, "phi": s["phi"], "logp": s["logp_true"], "seed": self.seeds[r], "cache_key": key,
                    "cache_hit": hit, "train_seconds": stats.duration_s, "steps": stats.steps,
                    "members": int(len(member_idx)), "wall_seconds": load_s, "score_seconds": infer_s}
        except Exception as exc:  # isolated per the executor contract; raised by the caller with context
            return {"index": r, "error": f"{type(exc).__name__}: {exc}"}


def penultimate_features(target, data, *, batch_size: int) -> np.ndarray:
    """A representation of every example by `target`'s model, shape (n, d), float64: for Hugging Face text
    models the last hidden layer averaged over non-padding tokens (what sentence encoders such as MiniLM
    are trained to produce; a BERT pooler may be untrained); otherwise the input of the model's last linear
    layer in module order (the classification head), averaged over positions for sequences."""
    import torch

    model = target.model
    if getattr(target, "tokenizer", None) is not None and hasattr(model, "config"):
        rows = []
        model.eval()
        with torch.no_grad():
            for _idx, batch in target.batches(data, batch_size):
                out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
                h = out.hidden_states[-1].float()
                w = batch.get("attention_mask", torch.ones(h.shape[:2], device=h.device)).to(h.dtype)
                rows.append(((h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)).double().cpu()
                            .numpy())
        return np.concatenate(rows)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"target {target.name!r} has no linear layer to read features from")
    captured: dict[str, Any] = {}
    hook = linears[-1].register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach()))
    out = np.zeros((len(data), 0))
    rows: list[np.ndarray] = []
    is_lm = "causal_lm" in target.capabilities
    try:
        model.eval()
        with torch.no_grad():
            for _idx, batch in target.batches(data, batch_size):
                if is_lm:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                else:
                    target.forward_logits(model, batch)
                x = captured.pop("x").float()
                if x.dim() == 3:
                    mask = batch.get("attention_mask")
                    w = (mask if mask is not None else torch.ones(x.shape[:2], device=x.device)).to(x.dtype)
                    x = (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
                rows.append(x.reshape(len(x), -1).double().cpu().numpy())
    finally:
        hook.remove()
    out = np.concatenate(rows) if rows else out
    return out


def reference_overlap(in_mask: np.ndarray, is_member: np.ndarray, z_limit: float = 4.5) -> dict[str, Any]:
    """For every reference model, the fraction of the target's members and of its non-members that are in
    that model's training half (about 0.5 each when the halves are independent of the target's split),
    and which models deviate beyond chance (|z| > z_limit under a fair coin per example)."""
    in_mask = np.asarray(in_mask, dtype=bool)
    y = np.asarray(is_member).astype(bool)
    models, bad, worst = [], [], 0.0
    for r in range(in_mask.shape[0]):
        mo, no = float(in_mask[r, y].mean()), float(in_mask[r, ~y].mean())
        z = max(abs(mo - 0.5) / np.sqrt(0.25 / y.sum()), abs(no - 0.5) / np.sqrt(0.25 / (~y).sum()))
        worst = max(worst, abs(mo - 0.5), abs(no - 0.5))
        if z > z_limit:
            bad.append(r)
        models.append({"member_overlap": round(mo, 4), "nonmember_overlap": round(no, 4)})
    chance = float(np.sqrt(0.25 / min(y.sum(), (~y).sum())))
    return {"models": models, "max_deviation": worst, "correlated": bad, "chance_deviation": chance}


def _validate_ids(members: list[str], nonmembers: list[str] | None, known: list[str]) -> None:
    if not members:
        raise ValueError("the member set is empty; membership inference needs at least one member")
    if nonmembers is not None and not nonmembers:
        raise ValueError("the non-member set is empty; membership inference needs at least one non-member")
    known_set = set(known)
    for label, ids in (("members", members), ("nonmembers", nonmembers or [])):
        missing = [x for x in ids if x not in known_set]
        if missing:
            raise ValueError(f"{label}: {len(missing)} id(s) not in the data, e.g. {missing[:3]}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{label}: duplicate ids")
    if nonmembers is not None:
        both = sorted(set(members) & set(nonmembers))
        if both:
            raise ValueError(f"members and non-members overlap in {len(both)} example(s), e.g. {both[:3]}; "
                             "an example cannot be both")


def _dedupe_findings(findings):
    seen, out = set(), []
    for f in findings:
        if (f.severity, f.title) not in seen:
            seen.add((f.severity, f.title))
            out.append(f)
    return out


def _lm_token_stats(target, data, *, batch_size: int, need_dist: bool):
    """Next-token log-probs per sequence and, for Min-K%++, the mean and standard deviation of log p
    under the model's own next-token distribution at each position."""
    import torch

    if not need_dist:
        return target.token_logprobs(data, batch_size=batch_size), None, None
    n = len(data)
    lps: list[Any] = [None] * n
    mus: list[Any] = [None] * n
    sds: list[Any] = [None] * n
    model = target.model
    model.eval()
    with torch.no_grad():
        for idx, batch in target.batches(data, batch_size):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logp = torch.log_softmax(model(**inputs).logits[:, :-1, :].float(), dim=-1)
            tgt = batch["labels"][:, 1:]
            mask = tgt != -100
            lp = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            prob = logp.exp()
            mu = (prob * logp).sum(-1)
            sd = ((prob * logp * logp).sum(-1) - mu * mu).clamp_min(0).sqrt()
            for row, i in enumerate(idx):
                m = mask[row]
                lps[int(i)] = lp[row][m].double().cpu().numpy()
                mus[int(i)] = mu[row][m].double().cpu().numpy()
                sds[int(i)] = sd[row][m].double().cpu().numpy()
    return lps, mus, sds
