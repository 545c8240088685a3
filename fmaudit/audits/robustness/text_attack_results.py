"""What robustness.text_attack makes of TextAttack's results: the re-verified summary, the degenerate-target
check (a model that predicts one class cannot be flipped, which says nothing about robustness) and the
evidence rows (raw text only when the recipe stores examples)."""

from __future__ import annotations

from typing import Any

import numpy as np

DEGENERATE_TOP_SHARE = 0.9  # one class takes at least this share of the predictions
DEGENERATE_ACC_MARGIN = 0.05  # clean accuracy at most this far above the majority baseline


def degeneracy(
    rows: list[dict[str, Any]], labels: list[int], num_labels: int | None, label_names: list[str] | None
) -> dict[str, Any]:
    """Predicted-class distribution of the sample, the majority baseline of its true labels, and why (if at all)
    the target looks degenerate: clean accuracy within `DEGENERATE_ACC_MARGIN` of the majority baseline, or one
    class taking >= `DEGENERATE_TOP_SHARE` of the predictions. Needs at least 2 classes among the true labels
    for the accuracy test (a single-class sample has majority baseline 1 and is reported as such)."""
    n = len(rows)
    k = max([num_labels or 0] + [r["orig_pred"] + 1 for r in rows] + [y + 1 for y in labels])
    pred = np.bincount([r["orig_pred"] for r in rows], minlength=k) if n else np.zeros(k, dtype=int)
    true = np.bincount(labels, minlength=k) if n else np.zeros(k, dtype=int)
    names = [label_names[i] if label_names and i < len(label_names) else str(i) for i in range(k)]
    acc = float(np.mean([r["orig_pred"] == y for r, y in zip(rows, labels)])) if n else 0.0
    majority = float(true.max() / n) if n else 0.0
    top = float(pred.max() / n) if n else 0.0
    reasons = []
    if n:
        if top >= DEGENERATE_TOP_SHARE:
            reasons.append(
                f"the target predicts {names[int(pred.argmax())]!r} for {top:.0%} of the {n} sampled examples"
            )
        if acc <= majority + DEGENERATE_ACC_MARGIN:
            reasons.append(
                f"clean accuracy {acc:.3f} is within {DEGENERATE_ACC_MARGIN:.2f} of the majority "
                f"baseline {majority:.3f} (always predicting {names[int(true.argmax())]!r})"
            )
    table = {
        "predicted_class_counts": {names[i]: int(pred[i]) for i in range(k)},
        "true_class_counts": {names[i]: int(true[i]) for i in range(k)},
        "clean_accuracy": acc,
        "majority_baseline": majority,
        "top_predicted_class_share": top,
        "degenerate": bool(reasons),
        "rule": (
            f"degenerate when one class takes >= {DEGENERATE_TOP_SHARE:.0%} of the predictions or clean "
            f"accuracy <= majority baseline + {DEGENERATE_ACC_MARGIN:.2f}"
        ),
    }
    return {"majority_baseline": majority, "top_predicted_class_share": top, "reasons": reasons, "table": table}


def summarize(
    results: list[Any], labels: list[int], target: Any, attack_name: str, query_budget: int | None, softmax: Any
) -> dict[str, Any]:
    """Classify TextAttack results, re-verify every success with the target, and aggregate."""
    from textattack.attack_results import (
        FailedAttackResult,
        MaximizedAttackResult,
        SkippedAttackResult,
        SuccessfulAttackResult,
    )

    reduction = attack_name == "input-reduction"
    rows: list[dict[str, Any]] = []
    claimed: list[int] = []
    for i, r in enumerate(results):
        orig = r.original_result
        probs = np.asarray(
            orig.raw_output.detach().cpu() if hasattr(orig.raw_output, "detach") else orig.raw_output, dtype=np.float64
        )
        row: dict[str, Any] = {
            "label": labels[i],
            "orig_pred": int(np.argmax(probs)),
            "orig_conf": float(np.max(probs)),
            "verified": None,
            "queries": int(r.perturbed_result.num_queries),
            "changed_words": 0,
            "num_words": int(orig.attacked_text.num_words),
        }
        if isinstance(r, SkippedAttackResult):
            row["status"] = "skipped"
        elif isinstance(r, SuccessfulAttackResult):
            row["status"] = "success"
            claimed.append(i)
        elif isinstance(r, MaximizedAttackResult):
            row["status"] = "maximized"
            words_removed = orig.attacked_text.num_words - r.perturbed_result.attacked_text.num_words
            if words_removed > 0:
                claimed.append(i)
        elif isinstance(r, FailedAttackResult):
            row["status"] = "failed"
        else:  # pragma: no cover
            row["status"] = type(r).__name__
        if row["status"] != "skipped":
            row["changed_words"] = (
                orig.attacked_text.num_words - r.perturbed_result.attacked_text.num_words
                if reduction
                else len(orig.attacked_text.all_words_diff(r.perturbed_result.attacked_text))
            )
        rows.append(row)

    if claimed:
        adv_texts = [results[i].perturbed_result.attacked_text.text for i in claimed]
        probs = softmax(target.logits_texts(adv_texts))
        for j, i in enumerate(claimed):
            pred = int(probs[j].argmax())
            ok = (pred == labels[i]) if reduction else (pred != labels[i])
            rows[i].update(verified=bool(ok), adv_pred=pred, adv_conf=float(probs[j].max()))
    attacked = [r for r in rows if r["status"] != "skipped"]
    verified = [r for r in rows if r["verified"]]
    pct = [100.0 * r["changed_words"] / r["num_words"] for r in verified if r["num_words"] > 0]
    budget_hit = 0
    if query_budget is not None:
        budget_hit = sum(1 for r in attacked if r["queries"] >= query_budget and not r["verified"])
    return {
        "rows": rows,
        "clean_correct": len(attacked),
        "num_attacked": len(attacked),
        "num_skipped": len(rows) - len(attacked),
        "num_claimed": len(claimed),
        "num_successes": len(verified),
        "num_verified": len(verified),
        "num_unverified": len(claimed) - len(verified),
        "num_failed": len(attacked) - len(verified),
        "num_budget_exhausted": budget_hit,
        "avg_perturbed_word_pct": float(np.mean(pct)) if pct else None,
        "avg_queries": float(np.mean([r["queries"] for r in attacked])) if attacked else None,
    }


def evidence(
    rows: list[dict[str, Any]], results: list[Any], ids: list[str], store_examples: bool, limit: int, engine: Any
) -> list[dict[str, Any]]:
    """Verified successes first, then unverified claims and failures; raw text only when allowed."""
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            0
            if rows[i]["verified"]
            else 1
            if rows[i]["verified"] is False
            else 2
            if rows[i]["status"] == "failed"
            else 3,
            i,
        ),
    )
    out = []
    for i in order[:limit]:
        r = rows[i]
        if r["status"] == "skipped":
            continue
        item: dict[str, Any] = {
            "id": ids[i],
            "status": r["status"],
            "verified": r["verified"],
            "label": r["label"],
            "original_prediction": r["orig_pred"],
            "original_confidence": round(r["orig_conf"], 6),
            "queries": r["queries"],
            "words_changed": r["changed_words"],
            "num_words": r["num_words"],
        }
        if "adv_pred" in r:
            item["adversarial_prediction"] = r["adv_pred"]
            item["adversarial_confidence"] = round(r["adv_conf"], 6)
        if store_examples:
            a, b = engine.marked_diff(results[i])
            item["original_text"] = a
            item["adversarial_text"] = b
        out.append(item)
    return out
