"""`robustness.text_attack`: how often small, meaning-preserving edits flip a text classifier, at what query
cost, and which examples break, using TextAttack's attacks (its search methods and constraints, unchanged).

Runs offline: DeepWordBug, Pruthi and input reduction need no download, and `embedding-swap` (TextFooler in
spirit) takes its synonyms from the target's own input embeddings. Other TextAttack recipes can be named;
when one needs a resource that is not on this machine, `check()` says which and how to provide it.
Every success TextAttack reports is re-run through the target (an independent forward pass) and counts
only if the target's prediction really changed.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, select_examples
from fmaudit.audits.robustness.text_attack_recipes import (
    ALL_ATTACKS,
    EMBEDDING_SWAP,
    MASKED_LM_DEFAULTS,
    NATIVE_ATTACKS,
    canonical,
)
from fmaudit.audits.robustness.text_attack_results import DEGENERATE_TOP_SHARE, degeneracy, evidence, summarize
from fmaudit.hints import did_you_mean
from fmaudit.report import Severity


class TextAttackAudit(AuditModule):
    name = "robustness.text_attack"
    category = "robustness"
    description = (
        "Adversarial text attacks through TextAttack (offline: deepwordbug, pruthi, input-reduction, "
        "embedding-swap; other TextAttack recipes when their resources are local): clean accuracy, "
        "accuracy under attack, success rate, perturbed words, queries; every success re-verified."
    )
    requires = frozenset({"text", "classifier", "logits"})
    metric_names = (
        "clean_accuracy",
        "accuracy_under_attack",
        "attack_success_rate",
        "avg_perturbed_word_pct",
        "avg_queries",
        "wall_time_per_example_s",
        "num_examples",
        "num_attacked",
        "num_skipped",
        "num_successes",
        "num_failed",
        "num_verified",
        "num_unverified",
        "num_budget_exhausted",
        "majority_baseline",
        "top_predicted_class_share",
    )

    class Params(AuditParams):
        attack: str = Field(
            default="deepwordbug",
            description=(
                "deepwordbug | pruthi | input-reduction | embedding-swap (no downloads), or any other TextAttack "
                "recipe name (textfooler, pwws, bae, bert-attack, ...) whose resources are available locally."
            ),
        )
        num_examples: int = Field(
            default=20, gt=0, le=100_000, description="Attack a seeded sample of at most this many examples."
        )
        split: Literal["auto", "nonmembers", "members", "all"] = Field(
            default="auto", description="auto = held-out non-members when the target was fine-tuned on this data."
        )
        query_budget: int | None = Field(
            default=2000,
            gt=0,
            description=("Model queries allowed per example (TextAttack's goal-function budget); null = unlimited."),
        )
        batch_size: int = Field(default=64, gt=0, le=4096, description="Texts per forward pass.")
        max_candidates: int = Field(
            default=30, gt=0, le=200, description="embedding-swap: nearest-neighbour candidates per word."
        )
        min_cos_sim: float = Field(
            default=0.5,
            gt=0.0,
            lt=1.0,
            description=(
                "embedding-swap: minimum cosine similarity between a word and its replacement in the target's "
                "input-embedding space."
            ),
        )
        max_modification_rate: float = Field(
            default=0.3,
            gt=0.0,
            le=1.0,
            description=("embedding-swap: at most this fraction of the words may be replaced (at least one)."),
        )
        polarity_filter: bool = Field(
            default=True,
            description=(
                "embedding-swap: refuse swaps between antonyms, words of opposite sentiment polarity, or that add or "
                "remove a negation (raw embeddings put good next to bad)."
            ),
        )
        min_sentence_sim: float | None = Field(
            default=0.8,
            gt=0.0,
            le=1.0,
            description=(
                "embedding-swap: minimum cosine similarity between the original and the perturbed text under the "
                "bundled MiniLM sentence encoder (offline stand-in for TextFooler's USE); null = no such constraint."
            ),
        )
        search: Literal["delete", "unk", "gradient", "weighted-saliency", "greedy", "beam"] = Field(
            default="delete",
            description=(
                "embedding-swap search: delete / unk / gradient / weighted-saliency = TextAttack's GreedyWordSwapWIR "
                "with that word-importance ranking (gradient: one backward pass per example through the target's "
                "input embeddings); greedy = GreedySearch (every position and candidate at each step, best kept; "
                "many more queries); beam = BeamSearch, width 4."
            ),
        )
        max_word_swaps: int = Field(default=1, gt=0, le=100, description="pruthi: words that may be edited.")
        masked_lm: str | None = Field(
            default=None,
            description=(
                "bae / bert-attack / clare: a local folder with a Hugging Face masked LM to use instead of the hub "
                "model the recipe names."
            ),
        )
        max_evidence: int = Field(default=10, ge=0, le=1000, description="Examples kept as evidence.")

        @field_validator("attack")
        @classmethod
        def _known_attack(cls, v: str) -> str:
            name = canonical(v)
            if name not in ALL_ATTACKS:
                raise ValueError(
                    f"unknown attack {v!r}"
                    + did_you_mean(name, ALL_ATTACKS, n=3)
                    + f" (offline: {', '.join(sorted(NATIVE_ATTACKS))}; TextAttack recipes: "
                    + ", ".join(a for a in ALL_ATTACKS if a not in NATIVE_ATTACKS)
                    + ")"
                )
            return name

        @model_validator(mode="after")
        def _masked_lm_only_where_used(self) -> TextAttackAudit.Params:
            if self.masked_lm is not None and self.attack not in MASKED_LM_DEFAULTS:
                raise ValueError(
                    f"masked_lm is used only by {', '.join(sorted(MASKED_LM_DEFAULTS))}, not by {self.attack!r}"
                )
            return self

    params: Params

    # ----------------------------------------------------------------------------------------------
    def check(self, target, data) -> list[str]:
        problems: list[str] = []
        caps: frozenset[str] = getattr(target, "capabilities", frozenset())
        if not {"text", "classifier"} <= set(caps) or not hasattr(target, "tokenize"):
            kind = getattr(target, "kind", type(target).__name__)
            problems.append(
                f"robustness.text_attack attacks text classifiers; target "
                f"{getattr(target, 'name', '?')!r} is a {kind} target"
            )
            return problems
        if data is None or len(data) == 0:
            problems.append("no examples to attack: the dataset is empty (give the audit a `data:` with examples)")
        elif data.texts is None:
            problems.append(f"dataset {data.name!r} has no texts; text attacks need text data")
        elif data.labels is None:
            problems.append(f"dataset {data.name!r} has no labels; an attack needs the true label of each example")
        elif target.num_labels is not None and data.num_labels is not None and data.num_labels > target.num_labels:
            problems.append(
                f"dataset {data.name!r} has {data.num_labels} labels but the model has {target.num_labels} outputs"
            )
        if self.params.attack not in NATIVE_ATTACKS:
            problems += _missing(self.params, None)
        return problems

    # ----------------------------------------------------------------------------------------------

    def run(self, target, ctx: AuditContext) -> Outcome:
        from fmaudit.audits.robustness.textattack_env import import_textattack

        if _needs_resources(self.params.attack):
            problems = _missing(self.params, ctx.cache_dir)
            if problems:
                raise ValueError("; ".join(problems))
        import_textattack(ctx.cache_dir)
        from fmaudit.audits.robustness import text_attack_engine as engine
        from fmaudit.stats import softmax

        p = self.params
        data, choice = select_examples(ctx, self.params.split, self.params.num_examples)
        out = Outcome()
        wrapper = engine.TargetModelWrapper(target, batch_size=p.batch_size)
        t_build = time.perf_counter()
        attack, info = engine.build_attack(p.attack, wrapper, params=p, target=target, cache_dir=ctx.cache_dir)
        build_s = time.perf_counter() - t_build

        texts, labels = list(data.texts), [int(y) for y in data.labels]
        results, seconds = [], []
        with ctx.progress_bar(f"{p.attack} on {target.name}", len(texts)) as bar:
            for i, (text, y) in enumerate(zip(texts, labels)):
                engine.seed_all((ctx.seed + i) % (2**32))
                t0 = time.perf_counter()
                results.append(attack.attack(text, y))
                seconds.append(time.perf_counter() - t0)
                bar.advance()
        summary = summarize(results, labels, target, p.attack, p.query_budget, softmax)
        n = len(results)
        total_s = float(np.sum(seconds))
        reduction = p.attack == "input-reduction"

        out.metric(
            "clean_accuracy",
            summary["clean_correct"] / n,
            higher_is_better=True,
            unit="fraction",
            description="Fraction of the attacked sample the target classifies correctly before any edit.",
        )
        if not reduction:
            out.metric(
                "accuracy_under_attack",
                (summary["num_attacked"] - summary["num_successes"]) / n,
                higher_is_better=True,
                unit="fraction",
                description="Fraction still classified correctly after the attack (verified successes only).",
            )
        rate = summary["num_successes"] / summary["num_attacked"] if summary["num_attacked"] else None
        out.metric(
            "attack_success_rate",
            rate,
            higher_is_better=False,
            unit="fraction",
            description=(
                "Verified successes / attacked examples (correctly classified ones)."
                if not reduction
                else "Examples reduced by at least one word with the prediction unchanged (verified) "
                "/ attacked examples."
            ),
        )
        out.metric(
            "avg_perturbed_word_pct",
            summary["avg_perturbed_word_pct"],
            higher_is_better=None,
            unit="percent",
            description=(
                "Mean percentage of words changed in verified successes."
                if not reduction
                else "Mean percentage of words removed in verified reductions."
            ),
        )
        out.metric(
            "avg_queries",
            summary["avg_queries"],
            higher_is_better=None,
            unit="queries",
            description="Mean model queries per attacked example (TextAttack's count).",
        )
        out.metric(
            "wall_time_per_example_s",
            total_s / n,
            higher_is_better=False,
            unit="seconds",
            description="Attack wall time per example in the sample (skipped ones included).",
        )
        deg = degeneracy(
            summary["rows"],
            labels,
            getattr(target, "num_labels", None),
            getattr(data, "label_names", None) or getattr(target, "label_names", None),
        )
        out.metric(
            "majority_baseline",
            deg["majority_baseline"],
            higher_is_better=None,
            unit="fraction",
            description="Accuracy of always predicting the most frequent true label of the sample.",
        )
        out.metric(
            "top_predicted_class_share",
            deg["top_predicted_class_share"],
            higher_is_better=None,
            unit="fraction",
            description="Share of the sample the target assigns to its most predicted class (before any edit).",
        )
        for key in (
            "num_attacked",
            "num_skipped",
            "num_successes",
            "num_failed",
            "num_verified",
            "num_unverified",
            "num_budget_exhausted",
        ):
            out.metric(key, summary[key], unit="examples")
        out.metric("num_examples", n, unit="examples", description="Examples in the attacked sample.")

        out.tables["attack"] = {
            "name": p.attack,
            "textattack_version": _version("textattack"),
            "description": NATIVE_ATTACKS.get(p.attack, f"TextAttack recipe {p.attack}"),
            "query_budget": p.query_budget,
            "batch_size": p.batch_size,
            "seed": ctx.seed,
            "goal_function": type(attack.goal_function).__name__,
            "search_method": type(attack.search_method).__name__,
            "transformation": type(attack.transformation).__name__,
            "build_seconds": round(build_s, 3),
            "attack_seconds": round(total_s, 3),
            "model_forward_inputs": wrapper.num_inputs,
            "model_gradients": wrapper.num_gradients,
            **info,
        }
        refused = {k: v for c in attack.constraints for k, v in getattr(c, "refused", {}).items()}
        if p.attack == EMBEDDING_SWAP:
            out.tables["attack"]["search_wir_method"] = p.search
            out.tables["attack"]["swaps_refused_by_polarity_filter"] = refused if p.polarity_filter else None
        out.tables["constraints"] = engine.constraint_table(attack)
        out.tables["predictions"] = deg["table"]
        out.tables["evaluated_on"] = {"dataset": ctx.require_data().name, "subset": choice, "num_examples": n}
        out.tables["verification"] = {
            "claimed_successes": summary["num_claimed"],
            "verified": summary["num_verified"],
            "unverified": summary["num_unverified"],
            "method": (
                "each adversarial text re-run through the target (target.logits_texts, an independent "
                "forward pass); a flip counts only if the prediction differs from the true label"
                if not reduction
                else "each reduced text re-run through the target; it counts only if "
                "the prediction still equals the true label"
            ),
        }
        out.tables["per_example"] = [
            {
                "id": data.ids[i],
                "status": r["status"],
                "queries": r["queries"],
                "seconds": round(seconds[i], 4),
                "verified": r["verified"],
            }
            for i, r in enumerate(summary["rows"])
        ]
        out.evidence = evidence(summary["rows"], results, data.ids, ctx.store_examples, p.max_evidence, engine)

        if summary["num_unverified"]:
            out.finding(
                "high",
                f"{summary['num_unverified']} reported successes did not hold when re-run",
                "TextAttack reported them as successful but the target's own forward pass disagrees; they "
                "are counted as failures",
                metric="num_unverified",
            )
        if rate is not None and not reduction:
            sev: Severity = "high" if rate >= 0.5 else "medium" if rate >= 0.2 else "low" if rate > 0 else "info"
            out.finding(
                sev,
                f"{p.attack} flips {rate:.0%} of correctly classified examples"
                + (" (degenerate target: not evidence of robustness)" if deg["reasons"] else ""),
                f"{summary['num_successes']} of {summary['num_attacked']} attacked examples (budget "
                f"{p.query_budget} queries, {summary['avg_queries'] or 0:.0f} used on average); accuracy "
                f"{summary['clean_correct'] / n:.3f} -> {(summary['num_attacked'] - summary['num_successes']) / n:.3f}",
                metric="attack_success_rate",
            )
        if deg["reasons"]:
            # A (near-)constant classifier cannot be flipped on most examples: a low success rate is no evidence
            # of robustness.
            near_constant = deg["top_predicted_class_share"] >= DEGENERATE_TOP_SHARE
            out.finding(
                "high" if near_constant else "medium",
                "Degenerate target: this attack result says nothing about robustness",
                "; ".join(deg["reasons"]) + ". A target that (nearly) always predicts one class, or is no more "
                "accurate than doing so, is attacked only where its constant guess happens to be right, so "
                "its success rate reflects the class balance of the sample, not robustness. Fix or retrain the target (or "
                "attack a sample it classifies well) before reading the attack numbers",
                metric="top_predicted_class_share" if near_constant else "clean_accuracy",
            )
        if summary["num_budget_exhausted"]:
            out.finding(
                "info",
                f"query budget exhausted on {summary['num_budget_exhausted']} examples",
                "those attacks stopped early; a larger query_budget may find more successes",
                metric="num_budget_exhausted",
            )
        if summary["num_attacked"] == 0:
            out.finding(
                "medium", "Nothing to attack: the target misclassifies every sampled example", metric="num_attacked"
            )
        return out


def _needs_resources(attack: str) -> bool:
    return attack not in NATIVE_ATTACKS


def _missing(params: Any, cache_dir: Any) -> list[str]:
    """Resources a TextAttack recipe needs that are not available (cache_dir None: fmaudit's default)."""
    from fmaudit.audits.robustness.text_attack_recipes import ResourceContext, missing_resources
    from fmaudit.audits.robustness.textattack_env import nltk_data_dir, textattack_cache_dir

    rc = ResourceContext(
        ta_cache=textattack_cache_dir(cache_dir), nltk_dir=nltk_data_dir(cache_dir), masked_lm=params.masked_lm
    )
    return missing_resources(params.attack, rc)


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:  # pragma: no cover
        return None
