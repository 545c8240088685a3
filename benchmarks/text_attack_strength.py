"""Text attack strength: the best offline word-level attack against the quickstart's MiniLM target.

Target: `recipes/quickstart.yaml`'s `minilm` (bundled MiniLM + classification head fine-tuned on 300 bundled
tweets, negative vs positive; loaded through the runner's session, so its fine-tune cache is shared with the
quickstart). Examples: a seeded sample of the held-out tweets (non-members) that the target classifies
correctly. Attack: `robustness.text_attack`'s `embedding-swap` (TextFooler's search and constraints with
offline stand-ins: synonyms from the target's own input embeddings, the antonym / sentiment-polarity filter,
the bundled MiniLM sentence encoder for sentence similarity), run through the audit module itself, so every
success is re-verified by an independent forward pass.

A success counts toward the goal only if (1) the module verified the flip, (2) the sentence similarity of the
adversarial text to the original, recomputed here with the MiniLM sentence encoder, is >= 0.8, and (3) at most
20% of the words changed (recomputed from TextAttack's word diff). Goal (issue 16, item 9): >= 60% of
correctly classified tweets (TextFooler reports > 80% on BERT with 50 counter-fitted synonyms and USE).

    .venv/bin/python benchmarks/text_attack_strength.py              # 40 examples, < 10 min on 2 cores
    .venv/bin/python benchmarks/text_attack_strength.py --n 100 --search gradient

The last line is the success rate with its Clopper-Pearson and Wilson 95% intervals against the 60% goal.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.60


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="correctly classified held-out tweets to attack (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no thrashing on a shared machine)")
    ap.add_argument(
        "--search", default="greedy", choices=["delete", "unk", "gradient", "weighted-saliency", "greedy", "beam"]
    )
    ap.add_argument("--max-candidates", type=int, default=80, help="embedding neighbours tried per word")
    ap.add_argument("--min-cos-sim", type=float, default=0.3, help="word-embedding cosine of a swap")
    ap.add_argument("--min-sentence-sim", type=float, default=0.8)
    ap.add_argument("--max-modification-rate", type=float, default=0.2)
    ap.add_argument("--query-budget", type=int, default=3000)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from fmaudit.audits.base import AuditContext
    from fmaudit.audits.robustness.text_attack import TextAttackAudit
    from fmaudit.recipe import load_recipe
    from fmaudit.robustness.intervals import clopper_pearson
    from fmaudit.robustness.text_similarity import MiniLMSentenceEncoder
    from fmaudit.session import Session
    from fmaudit.training import default_cache_dir

    t0 = time.perf_counter()
    session = Session(load_recipe(args.recipe), "cpu", default_cache_dir(), None)
    target = session.target("minilm")
    held_out = target.split.nonmembers
    pred = target.predict(held_out)
    correct = np.flatnonzero(pred == held_out.labels)
    acc = len(correct) / len(held_out)
    majority = np.bincount(held_out.labels).max() / len(held_out)
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(correct, size=min(args.n, len(correct)), replace=False))
    data = held_out.subset(pick, name="tweets-heldout-correct")
    print(
        f"target: quickstart minilm (fine-tune cache {'hit' if target.cache_hit else 'miss'}), held-out accuracy "
        f"{acc:.3f} on {len(held_out)} (majority baseline {majority:.3f}, predicted positive "
        f"{np.mean(pred == 1):.2f}); {len(data)} correctly classified held-out tweets attacked "
        f"(labels: {np.bincount(data.labels, minlength=2).tolist()}); prepared in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    params = {
        "attack": "embedding-swap",
        "num_examples": len(data),
        "split": "all",
        "search": args.search,
        "max_candidates": args.max_candidates,
        "min_cos_sim": args.min_cos_sim,
        "min_sentence_sim": args.min_sentence_sim,
        "max_modification_rate": args.max_modification_rate,
        "polarity_filter": True,
        "query_budget": args.query_budget,
        "max_evidence": len(data),
    }
    print(
        "attack: " + ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("num_examples", "max_evidence")),
        flush=True,
    )
    run_dir = default_cache_dir() / "benchmarks" / "text_attack_strength"
    ctx = AuditContext(
        unit_id="bench:robustness.text_attack@minilm",
        seed=args.seed,
        device="cpu",
        run_dir=run_dir,
        cache_dir=default_cache_dir(),
        store_examples=True,
        data=data,
    )
    t1 = time.perf_counter()
    out = TextAttackAudit(params).run(target, ctx)
    attack_s = time.perf_counter() - t1
    m = {k: v.value for k, v in out.metrics.items()}

    verified = [e for e in out.evidence if e["verified"]]
    unmark = lambda s: re.sub(r"\[\[(.*?)\]\]", r"\1", s)  # noqa: E731
    sims = (
        MiniLMSentenceEncoder().similarity(
            [unmark(e["original_text"]) for e in verified], [unmark(e["adversarial_text"]) for e in verified]
        )
        if verified
        else []
    )
    ok = 0
    for e, s in zip(verified, sims):
        frac = e["words_changed"] / max(e["num_words"], 1)
        good = s >= args.min_sentence_sim - 1e-6 and frac <= 0.2 + 1e-9
        ok += bool(good)
        print(
            f"  {'ok ' if good else 'OUT'} sim {s:.3f} words {e['words_changed']}/{e['num_words']}  "
            f"{e['adversarial_text'][:150]}"
        )
    n = m["num_attacked"]
    print(
        f"verified flips {m['num_successes']}/{n} (unverified claims {m['num_unverified']}); within similarity "
        f">= {args.min_sentence_sim} and <= 20% words: {ok}/{n}; avg queries {m['avg_queries']:.0f}; "
        f"refused by the polarity filter: {out.tables['attack'].get('swaps_refused_by_polarity_filter')}; "
        f"attack time {attack_s:.0f}s ({attack_s / max(len(data), 1):.1f}s/example)",
        flush=True,
    )
    rate = ok / n if n else 0.0
    cp = clopper_pearson(ok, n) or (0.0, 1.0)
    wl = wilson(ok, n)
    verdict = (
        "MET"
        if cp[0] >= GOAL
        else "MISSED"
        if cp[1] < GOAL
        else (
            "met by the point estimate, not yet by the interval"
            if rate >= GOAL
            else "not met by the point estimate; interval includes it"
        )
    )
    print(
        f"success rate {rate:.3f} ({ok}/{n}) 95% Clopper-Pearson [{cp[0]:.3f}, {cp[1]:.3f}], Wilson "
        f"[{wl[0]:.3f}, {wl[1]:.3f}] vs goal {GOAL:.2f}: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
