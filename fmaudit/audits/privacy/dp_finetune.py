"""`privacy.dp_finetune`: fine-tune a target with DP-SGD (Opacus) and produce the private model as a new
target, with its epsilon ledger and its utility beside the non-private baseline."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, base_target
from fmaudit.privacy.gradient_canaries import MIN_CANARIES


class DPFinetuneAudit(AuditModule):
    name = "privacy.dp_finetune"
    category = "privacy"
    description = (
        "Fine-tune the target with differential privacy (DP-SGD via Opacus: Poisson sampling, ghost "
        "clipping, PRV/RDP accounting) from its pre-trained weights on the same members, and produce the "
        "private model as a new target. Reports the epsilon ledger, every DP parameter, and utility "
        "beside the non-private model."
    )
    requires = frozenset({"trainable", "per_example_loss"})
    produces_target = True
    metric_names = (
        "epsilon",
        "epsilon_gdp",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "accuracy",
        "baseline_accuracy",
        "accuracy_drop",
        "perplexity",
        "baseline_perplexity",
        "perplexity_ratio",
        "loss",
        "baseline_loss",
        "train_seconds",
        "num_trainable_parameters",
        "gradient_canary_epsilon_lb",
        "gradient_canary_epsilon_lb_fdp",
        "gradient_canary_epsilon_lb_ceiling",
        "gradient_canary_epsilon_lb_ratio",
        "gradient_canary_noise_multiplier",
    )

    class Params(AuditParams):
        target_epsilon: float | None = Field(
            default=8.0,
            gt=0,
            description="Privacy budget; the accountant picks the noise. null: give noise_multiplier.",
        )
        noise_multiplier: float | None = Field(
            default=None, gt=0, description="Fixed noise (then set target_epsilon: null)."
        )
        delta: float | None = Field(
            default=None, gt=0, lt=1, description="Default min(1e-5, 1/(10 N)); values >= 1/N warn."
        )
        max_grad_norm: float = Field(default=1.0, gt=0, description="Per-example clipping bound.")
        epochs: int | None = Field(default=None, ge=1, description="Default: the target's fine-tune epochs (else 1).")
        batch_size: int | None = Field(
            default=None,
            ge=2,
            description="Expected logical batch (Poisson sampling). Default: the target's fine-tune batch size.",
        )
        max_physical_batch_size: int | None = Field(
            default=None, ge=1, description="BatchMemoryManager limit per forward/backward."
        )
        lr: float = Field(
            default=5e-4,
            gt=0,
            description="AdamW learning rate (DP usually wants a larger one than non-private fine-tuning).",
        )
        weight_decay: float = Field(default=0.0, ge=0)
        accountant: Literal["prv", "rdp", "gdp"] = "prv"
        trainable: Literal["all", "last_n_layers", "head", "lora"] = "all"
        n_layers: int = Field(default=2, ge=1, description="trainable: last_n_layers: how many blocks.")
        lora_r: int = Field(default=8, ge=1)
        lora_alpha: int = Field(default=16, ge=1)
        lora_target_modules: list[str] | None = None
        clipping: Literal["auto", "ghost", "bookkeeping", "hooks"] = Field(
            default="auto",
            description="auto (bookkeeping when it covers every trainable layer, else ghost), ghost (two "
            "backward passes), bookkeeping (one backward pass; Linear / Embedding / LayerNorm / Conv2d, else hooks) "
            "or hooks.",
        )
        member_fraction: float = Field(
            default=0.5,
            gt=0,
            lt=1,
            description="Only for targets that were not fine-tuned in the recipe: split the audit's data.",
        )
        epsilon_budget: float | None = Field(
            default=None, gt=0, description="Finding (high) when the spent epsilon exceeds it."
        )
        min_accuracy: float | None = Field(
            default=None, ge=0, le=1, description="Finding when the DP model's held-out accuracy is below it."
        )
        max_accuracy_drop: float = Field(
            default=0.10, ge=0, le=1, description="Finding when DP accuracy is more than this below the baseline."
        )
        max_perplexity_ratio: float = Field(
            default=1.5, gt=1, description="Causal LMs: finding when DP perplexity / baseline exceeds it."
        )
        eval_examples: int = Field(default=1000, gt=0, description="Held-out examples for utility (seeded sample).")
        gradient_canaries: int = Field(
            default=0,
            ge=0,
            description="White-box Dirac gradient canaries inserted "
            "into the DP-SGD steps themselves (0: off; else at least 10): epsilon_lb of "
            "this run, its ceiling, epsilon_lb / epsilon; critical finding when the DP "
            "step is broken. The canary coordinates keep their pre-trained values.",
        )

        @model_validator(mode="after")
        def _one_noise_source(self):
            if (self.target_epsilon is None) == (self.noise_multiplier is None):
                raise ValueError("give exactly one of target_epsilon and noise_multiplier (set the other to null)")
            return self

    params: Params

    # -- helpers ---------------------------------------------------------------------------------------
    def _settings(self, target) -> dict[str, Any]:
        p = self.params
        ft = target.provenance.train if target.provenance is not None else None
        return dict(
            epochs=p.epochs or (ft.epochs if ft is not None else 1),
            batch_size=p.batch_size or (ft.batch_size if ft is not None else 16),
        )

    def _train_data(self, target, data):
        split = target.split
        if split is not None:
            return split.members, split
        return (data, None) if data is not None else (None, None)

    def check(self, target, data) -> list[str]:
        from fmaudit.privacy.dp import preflight, validate_settings

        p = self.params
        s = self._settings(target)
        members, _ = self._train_data(target, data)
        n = None
        if members is not None:
            n = len(members) if target.split is not None else int(round(len(members) * p.member_fraction))
        problems = validate_settings(
            n=n,
            target_epsilon=p.target_epsilon,
            noise_multiplier=p.noise_multiplier,
            delta=p.delta,
            max_grad_norm=p.max_grad_norm,
            lr=p.lr,
            accountant=p.accountant,
            trainable=p.trainable,
            clipping=p.clipping,
            max_physical_batch_size=p.max_physical_batch_size,
            n_layers=p.n_layers,
            **s,
        )
        if 0 < p.gradient_canaries < MIN_CANARIES:
            problems.append(f"gradient_canaries must be 0 (off) or at least {MIN_CANARIES}, got {p.gradient_canaries}")
        if members is None:
            problems.append(
                "no training data: fine-tune the target in the recipe (its members are reused) or "
                "name a dataset with `data:`"
            )
        more, _notes, _mode = preflight(
            target, trainable=p.trainable, n_layers=p.n_layers, lora=self._lora(), clipping=p.clipping
        )
        return problems + more

    def _lora(self) -> dict[str, Any] | None:
        p = self.params
        if p.trainable != "lora":
            return None
        return {"r": p.lora_r, "alpha": p.lora_alpha, "dropout": 0.0, "target_modules": p.lora_target_modules}

    def _base(self, target, ctx: AuditContext):
        """The target's weights BEFORE its non-private fine-tune (DP must start from them: weights that
        already saw the members void the guarantee), reloaded and checked by hash through `base_target`."""
        if target.provenance is None:
            return target.copy(), "the target as given (it was not fine-tuned in this recipe)"
        base = base_target(target, ctx)
        return base, "the pre-trained weights of the non-private target (same members, verified by sha256)"

    # -- run -------------------------------------------------------------------------------------------
    def run(self, target, ctx: AuditContext) -> Outcome:
        import warnings

        from fmaudit.data import member_split
        from fmaudit.privacy.dp import SEED_STATEMENT, DPPrivacyWarning, dp_finetune, utility_summary
        from fmaudit.provenance import DPRecord, Provenance

        p = self.params
        s = self._settings(target)
        split = target.split
        if split is None:
            seed = ctx.run_seed if ctx.run_seed is not None else ctx.seed
            split = member_split(ctx.require_data(), member_fraction=p.member_fraction, seed=seed)
        base, start = self._base(target, ctx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DPPrivacyWarning)  # reported as a finding below
            res = dp_finetune(
                model=base,
                train_data=split.members,
                target_epsilon=p.target_epsilon,
                noise_multiplier=p.noise_multiplier,
                delta=p.delta,
                max_grad_norm=p.max_grad_norm,
                lr=p.lr,
                weight_decay=p.weight_decay,
                accountant=p.accountant,
                trainable=p.trainable,
                n_layers=p.n_layers,
                lora_r=p.lora_r,
                lora_alpha=p.lora_alpha,
                lora_target_modules=p.lora_target_modules,
                clipping=p.clipping,
                max_physical_batch_size=p.max_physical_batch_size,
                seed=ctx.seed,
                cache_dir=ctx.cache_dir,
                split=split,
                progress=ctx.progress,
                gradient_canaries=p.gradient_canaries,
                **s,
            )
        out = Outcome()
        produced = res.target
        produced.split = split
        produced.cache_hit = res.cache_hit
        produced.source = f"{target.source} (DP fine-tuned by {ctx.unit_id})"
        produced.provenance = Provenance(
            data=split.dataset.name,
            dp=DPRecord.from_params(res.params()),
            base_weights_sha256=base.weights_sha256(),
            cache_key=res.cache_key,
            seed=ctx.seed,
            steps=res.steps,
            epoch_losses=tuple(res.epoch_losses),
            train_seconds=round(res.train_seconds, 3),
            start=start,
        )
        out.produced = produced

        # Privacy ledger -------------------------------------------------------------------------------
        used = res.epsilon_accountant or res.accountant
        how = (
            f"{res.accountant} accountant"
            if used == res.accountant
            else f"{res.accountant} accountant asked, {used}'s epsilon claimed"
        )
        out.metric(
            "epsilon",
            res.epsilon,
            higher_is_better=False,
            unit="epsilon",
            description=f"Privacy loss spent over {res.steps} steps ({how}"
            f"{'; the larger of GDP and PRV' if res.accountant == 'gdp' else ''}, "
            f"delta={res.delta:.3g}).",
        )
        if res.epsilon_gdp is not None:
            out.metric(
                "epsilon_gdp",
                res.epsilon_gdp,
                higher_is_better=False,
                unit="epsilon",
                description="GDP's epsilon (a central-limit approximation that can understate epsilon; "
                "shown for comparison, never claimed when it is below PRV's).",
            )
        out.metric("delta", res.delta, higher_is_better=False, description="Failure probability of the guarantee.")
        out.metric("noise_multiplier", res.noise_multiplier, description="Gaussian noise std / clipping bound.")
        out.metric("sample_rate", res.sample_rate, unit="fraction", description="Poisson sampling rate per step.")
        out.metric("steps", res.steps, unit="steps", description="Noisy optimizer steps (logical batches).")
        out.metric("num_trainable_parameters", res.num_trainable_parameters, unit="parameters")
        out.metric(
            "train_seconds", res.train_seconds, unit="seconds", description="DP training time (0-ish on a cache hit)."
        )
        out.curve(
            "epsilon_ledger",
            res.ledger_steps,
            res.ledger_epsilon,
            x_label="step",
            y_label="epsilon",
            description=f"Epsilon spent after each step ({how}, delta={res.delta:.3g}).",
        )
        out.tables["dp_parameters"] = {
            **res.params(),
            "start": start,
            "run_seed": ctx.seed,
            "noise_seed": "not stored: derived from run_seed (Stream.DP_NOISE)",
            "guarantee_requires_secret_seed": SEED_STATEMENT,
            "poisson_sampling": True,
            "cache_hit": res.cache_hit,
            "privacy_unit": "one training example" if "classifier" in target.capabilities else "one training sequence",
        }
        out.tables["epsilon_per_epoch"] = res.epsilon_per_epoch
        out.tables["notes"] = res.notes

        # Utility beside the baseline -------------------------------------------------------------------
        held_out = split.nonmembers
        dp_u = utility_summary(produced, held_out, max_examples=p.eval_examples, seed=ctx.seed)
        base_u = utility_summary(target, held_out, max_examples=p.eval_examples, seed=ctx.seed)
        out.tables["utility"] = {
            "evaluated_on": f"{held_out.name} (non-members, up to {p.eval_examples})",
            "dp": dp_u,
            "non_private": base_u,
            "non_private_target": target.name,
            "dp_train": res.train_utility,
        }
        if "accuracy" in dp_u:
            out.metric(
                "accuracy",
                dp_u["accuracy"],
                higher_is_better=True,
                unit="fraction",
                description="DP model, held-out accuracy.",
            )
            out.metric(
                "baseline_accuracy",
                base_u.get("accuracy"),
                higher_is_better=True,
                unit="fraction",
                description="Non-private model, same held-out examples.",
            )
            drop = base_u.get("accuracy", dp_u["accuracy"]) - dp_u["accuracy"]
            out.metric(
                "accuracy_drop",
                drop,
                higher_is_better=False,
                unit="fraction",
                description="Baseline accuracy minus DP accuracy.",
            )
            if p.min_accuracy is not None and dp_u["accuracy"] < p.min_accuracy:
                out.finding(
                    "medium",
                    "DP model accuracy is below the threshold",
                    f"accuracy {dp_u['accuracy']:.3f} < min_accuracy {p.min_accuracy:.3f} at epsilon "
                    f"{res.epsilon:.2f}: raise epsilon, train longer, or fine-tune fewer parameters",
                    metric="accuracy",
                )
            if drop > p.max_accuracy_drop:
                out.finding(
                    "medium",
                    "DP costs more accuracy than allowed",
                    f"accuracy {dp_u['accuracy']:.3f} vs {base_u.get('accuracy', float('nan')):.3f} "
                    f"non-private (drop {drop:.3f} > {p.max_accuracy_drop:.3f})",
                    metric="accuracy_drop",
                )
        if "perplexity" in dp_u:
            out.metric(
                "perplexity",
                dp_u["perplexity"],
                higher_is_better=False,
                unit="perplexity",
                description="DP model, held-out perplexity.",
            )
            out.metric("baseline_perplexity", base_u.get("perplexity"), higher_is_better=False, unit="perplexity")
            ratio = dp_u["perplexity"] / max(base_u.get("perplexity", dp_u["perplexity"]), 1e-12)
            out.metric("perplexity_ratio", ratio, higher_is_better=False, description="DP / non-private perplexity.")
            if ratio > p.max_perplexity_ratio:
                out.finding(
                    "medium",
                    "DP model perplexity is much worse than the non-private model",
                    f"ratio {ratio:.2f} > {p.max_perplexity_ratio:.2f}",
                    metric="perplexity_ratio",
                )
        if "loss" in dp_u:
            out.metric("loss", dp_u["loss"], higher_is_better=False, unit="nats")
            out.metric("baseline_loss", base_u.get("loss"), higher_is_better=False, unit="nats")

        # Budget and delta -----------------------------------------------------------------------------
        budget = p.epsilon_budget
        if budget is not None and res.epsilon > budget:
            out.finding(
                "high",
                "Epsilon exceeds the recipe's privacy budget",
                f"spent epsilon {res.epsilon:.3f} > budget {budget:g} (noise multiplier "
                f"{res.noise_multiplier:.3f}, {res.steps} steps)",
                metric="epsilon",
            )
        n = len(split.members)
        if res.delta >= 1.0 / n:
            out.finding(
                "high",
                "delta is not below 1/N",
                f"delta {res.delta:g} >= 1/{n}: the guarantee allows publishing a training example outright; "
                "use the default delta",
                metric="delta",
            )
        # accounting notes (GDP pairing, accountant fallbacks, loose RDP) and the seed
        out.findings_from(res.findings, metric="epsilon")
        if res.gradient_canaries is not None:
            _report_canaries(out, res.gradient_canaries)
        out.finding(
            "info",
            f"DP fine-tuned: epsilon {res.epsilon:.2f} at delta {res.delta:.2g}",
            f"{how}, noise {res.noise_multiplier:.3f}, C={res.max_grad_norm:g}, "
            f"sample rate {res.sample_rate:.4f}, {res.steps} steps, clipping {res.clipping}, trainable "
            f"{res.trainable} ({res.num_trainable_parameters:,} parameters); started from {start}",
            metric="epsilon",
        )
        return out


def _report_canaries(out: Outcome, g: dict[str, Any]) -> None:
    """The gradient-canary audit of the DP run (fmaudit.privacy.gradient_canaries): metrics, table, findings."""
    how = (
        f"{g['m']} Dirac gradient canaries in the DP-SGD steps ({g['audited']} audited, holdout choice of the "
        f"guesses, {g['score']} score), delta={g['delta']:.3g}, {g['confidence']:.0%} confidence"
    )
    out.metric(
        "gradient_canary_epsilon_lb",
        g["epsilon_lb"],
        higher_is_better=False,
        unit="epsilon",
        description=f"Proven lower bound on epsilon (Steinke-Nasr-Jagielski) from {how}.",
    )
    out.metric(
        "gradient_canary_epsilon_lb_fdp",
        g["epsilon_lb_fdp"],
        higher_is_better=False,
        unit="epsilon",
        description="The same guesses under the f-DP analysis (Gaussian family; not the headline).",
    )
    out.metric(
        "gradient_canary_epsilon_lb_ceiling",
        g["epsilon_lb_ceiling"],
        unit="epsilon",
        description="The most this audit could prove: a perfect attack, same canaries and guess procedure.",
    )
    out.metric(
        "gradient_canary_epsilon_lb_ratio",
        g["epsilon_lb_ratio"],
        unit="fraction",
        description="Gradient-canary epsilon_lb / the accountant's epsilon (above 1: the DP step is broken).",
    )
    out.metric(
        "gradient_canary_noise_multiplier",
        g["measured_noise_multiplier"],
        description=f"Noise multiplier the excluded canaries saw (claimed {g['noise_multiplier']:.4g}).",
    )
    out.tables["gradient_canaries"] = {k: v for k, v in g.items() if k not in ("record", "findings")}
    for f in g["findings"]:
        out.finding(f["severity"], f["title"], f["detail"], metric="gradient_canary_epsilon_lb")
