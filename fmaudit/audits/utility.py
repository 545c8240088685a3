"""`utility`: the model's clean performance, so every report states what is being protected."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome, select_examples


class UtilityAudit(AuditModule):
    name = "utility"
    category = "utility"
    description = (
        "Clean performance: accuracy, macro-F1, expected calibration error and confusion matrix for "
        "classifiers; perplexity for causal LMs."
    )
    requires = frozenset({"per_example_loss"})
    metric_names = ("accuracy", "macro_f1", "ece", "nll", "perplexity", "num_examples")

    class Params(AuditParams):
        split: Literal["auto", "nonmembers", "members", "all"] = Field(
            default="auto",
            description="Which examples: auto = held-out non-members when the target was "
            "fine-tuned on this data, else all of it.",
        )
        max_examples: int | None = Field(
            default=None, gt=0, description="Evaluate a seeded sample of at most this many."
        )
        batch_size: int = Field(default=32, gt=0)
        ece_bins: int = Field(default=15, ge=2, le=100)
        bootstrap: int = Field(default=1000, ge=0, le=100_000, description="Bootstrap rounds for intervals (0: none).")
        confidence: float = Field(default=0.95, gt=0.5, lt=1.0)

    params: Params

    def check(self, target, data) -> list[str]:
        problems = []
        if data is None or len(data) == 0:
            problems.append("no examples to evaluate on")
        elif "classifier" in target.capabilities:
            if data.labels is None:
                problems.append(f"dataset {data.name!r} has no labels; a classifier's utility needs them")
            elif target.num_labels is not None and data.num_labels is not None and data.num_labels > target.num_labels:
                problems.append(
                    f"dataset {data.name!r} has {data.num_labels} labels but the model has "
                    f"{target.num_labels} outputs; set num_labels on the target"
                )
        return problems

    def run(self, target, ctx: AuditContext) -> Outcome:
        data, choice = select_examples(ctx, self.params.split, self.params.max_examples)
        out = Outcome()
        out.tables["evaluated_on"] = {"dataset": ctx.require_data().name, "subset": choice, "num_examples": len(data)}
        p = self.params
        level = p.confidence
        if "classifier" in target.capabilities:
            self._classifier(target, data, ctx, out, level)
        else:
            self._lm(target, data, ctx, out, level)
        return out

    def _classifier(self, target, data, ctx, out: Outcome, level: float) -> None:
        from sklearn.metrics import confusion_matrix

        from fmaudit.stats import bootstrap_ci, expected_calibration_error, softmax, wilson_interval

        p = self.params
        logits = target.logits(data, batch_size=p.batch_size)
        probs = softmax(logits)
        y = data.labels
        pred = probs.argmax(axis=1)
        n = len(y)
        correct = int((pred == y).sum())
        labels = list(range(logits.shape[1]))
        out.metric(
            "accuracy",
            correct / n,
            higher_is_better=True,
            ci=wilson_interval(correct, n, level),
            ci_level=level,
            unit="fraction",
            description="Fraction of examples classified correctly (Wilson interval).",
        )

        k = len(labels)

        def f1(idx: np.ndarray) -> float:
            # Macro-F1 from a confusion matrix (same definition as sklearn's f1_score(average="macro",
            # zero_division=0); checked against it in the tests). Fast enough to bootstrap.
            cm = np.bincount(y[idx] * k + pred[idx], minlength=k * k).reshape(k, k)
            tp = np.diag(cm).astype(np.float64)
            denom = cm.sum(0) + cm.sum(1)
            per_class = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
            return float(per_class.mean())

        out.metric(
            "macro_f1",
            f1(np.arange(n)),
            higher_is_better=True,
            ci=bootstrap_ci(f1, n, rounds=p.bootstrap, level=level, seed=ctx.seed) if p.bootstrap else None,
            ci_level=level,
            unit="fraction",
            description="Unweighted mean of per-class F1 (bootstrap interval).",
        )
        ece, confs, accs, counts = expected_calibration_error(probs, y, bins=p.ece_bins)
        out.metric(
            "ece",
            ece,
            higher_is_better=False,
            unit="fraction",
            description=f"Expected calibration error over {p.ece_bins} equal-width confidence bins.",
        )
        nll = -np.log(np.clip(probs[np.arange(n), y], 1e-12, 1.0))
        out.metric(
            "nll",
            float(nll.mean()),
            higher_is_better=False,
            unit="nats",
            description="Mean negative log-likelihood of the true label.",
        )
        out.metric("num_examples", n, unit="examples", description="Examples evaluated.")
        keep = [i for i, c in enumerate(counts) if c > 0]
        out.curve(
            "reliability",
            [confs[i] for i in keep],
            [accs[i] for i in keep],
            x_label="confidence",
            y_label="accuracy",
            description="Reliability diagram: accuracy per confidence bin (diagonal = calibrated).",
        )
        names = target.label_names or data.label_names or [str(i) for i in labels]
        out.tables["confusion_matrix"] = {
            "labels": list(names)[: len(labels)],
            "matrix": confusion_matrix(y, pred, labels=labels).tolist(),
            "rows": "true label",
            "columns": "predicted label",
        }
        majority = float(np.bincount(y, minlength=len(labels)).max() / n)
        out.tables["majority_class_accuracy"] = majority
        if correct / n <= majority + 1e-9:
            out.finding(
                "medium",
                "Accuracy is no better than always predicting the majority class",
                f"accuracy {correct / n:.3f} vs majority-class rate {majority:.3f}: audit numbers on this "
                "model say little about a useful model; fine-tune it first",
                metric="accuracy",
            )

    def _lm(self, target, data, ctx, out: Outcome, level: float) -> None:
        from fmaudit.stats import bootstrap_ci

        p = self.params
        lps = target.token_logprobs(data, batch_size=max(1, p.batch_size // 4))
        tok_nll = np.array([-lp.sum() for lp in lps])
        counts = np.array([len(lp) for lp in lps], dtype=np.float64)
        keep = counts > 0
        tok_nll, counts = tok_nll[keep], counts[keep]
        n = len(counts)
        if n == 0:
            raise ValueError("every text is shorter than 2 tokens; nothing to score")

        def ppl(idx: np.ndarray) -> float:
            return float(np.exp(tok_nll[idx].sum() / counts[idx].sum()))

        mean_nll = float(tok_nll.sum() / counts.sum())
        out.metric(
            "perplexity",
            float(np.exp(mean_nll)),
            higher_is_better=False,
            ci=bootstrap_ci(ppl, n, rounds=p.bootstrap, level=level, seed=ctx.seed) if p.bootstrap else None,
            ci_level=level,
            unit="perplexity",
            description="exp(token-weighted mean negative log-likelihood); bootstrap over sequences.",
        )
        out.metric(
            "nll",
            mean_nll,
            higher_is_better=False,
            unit="nats/token",
            description="Token-weighted mean negative log-likelihood.",
        )
        out.metric("num_examples", n, unit="examples", description="Sequences scored.")
        out.tables["tokens_scored"] = int(counts.sum())
