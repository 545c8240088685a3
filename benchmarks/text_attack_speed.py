"""TextAttack speed: the same attack on the same examples through TextAttack's stock
`HuggingFaceModelWrapper` (pads every input to the tokenizer's max length) and through fmaudit's
`TargetModelWrapper` (target tokenization, length-sorted sub-batches, dynamic padding).

Target: the bundled MiniLM fine-tuned on 300 bundled tweets for one epoch (cached by fmaudit, so a second
run starts quickly). Examples: a seeded sample of the held-out tweets. The two attacks run
interleaved, example by example, with the same seed before each, so load on a shared machine hits both alike.

    .venv/bin/python benchmarks/text_attack_speed.py --attack deepwordbug --n 12
    .venv/bin/python benchmarks/text_attack_speed.py --attack embedding-swap --n 12

Prints per-wrapper median and total seconds per example, the time ratio, both success rates and how many
examples ended identically (same result type and same adversarial text).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", default="deepwordbug", help="deepwordbug | pruthi | input-reduction | embedding-swap")
    ap.add_argument("--n", type=int, default=12, help="examples to attack (default 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both (1: no thread thrashing on a busy shared machine)",
    )
    ap.add_argument("--pool", type=int, default=600, help="tweets to draw (half fine-tune MiniLM, half held out)")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from fmaudit.audits.robustness.text_attack import TextAttackAudit
    from fmaudit.audits.robustness.textattack_env import import_textattack
    from fmaudit.data import load_tweets, member_split
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, default_cache_dir, finetune_cached

    t0 = time.perf_counter()
    tweets = load_tweets()
    rng = np.random.default_rng(args.seed)
    tweets = tweets.subset(np.sort(rng.choice(len(tweets), args.pool, replace=False)), name="tweets")
    target = load_target(
        model="bundled:minilm",
        num_labels=2,
        label_names=tweets.label_names,
        max_length=64,
        name="minilm",
        seed=args.seed,
    )
    split = member_split(tweets, member_fraction=0.5, seed=args.seed)
    config = TrainConfig(epochs=args.epochs, batch_size=16, lr=5e-5, seed=args.seed)
    _, hit, _ = finetune_cached(target, split, config, cache_dir=default_cache_dir())
    held_out = split.nonmembers
    acc = float((target.predict(held_out) == held_out.labels).mean())
    data = held_out.subset(np.sort(rng.choice(len(held_out), min(args.n + 1, len(held_out)), replace=False)))
    print(
        f"target: MiniLM fine-tuned on {len(split.member_idx)} tweets ({args.epochs} epoch(s), cache "
        f"{'hit' if hit else 'miss'}), held-out accuracy {acc:.3f}, max_length {target.max_length}; prepared in "
        f"{time.perf_counter() - t0:.1f}s; {len(data) - 1} examples (+1 warm-up), attack {args.attack}",
        flush=True,
    )

    import_textattack()
    from textattack.attack_results import SkippedAttackResult, SuccessfulAttackResult
    from textattack.models.wrappers import HuggingFaceModelWrapper

    from fmaudit.audits.robustness import text_attack_engine as engine

    params = TextAttackAudit.Params(attack=args.attack, query_budget=None)
    stock_wrapper = HuggingFaceModelWrapper(target.model, target.tokenizer)
    ours_wrapper = engine.TargetModelWrapper(target, batch_size=params.batch_size)
    stock_attack, _ = engine.build_attack(
        params.attack, stock_wrapper, params=params, target=target, cache_dir=default_cache_dir()
    )
    stock_attack.goal_function.batch_size = 32  # TextAttack's default
    ours_attack, _ = engine.build_attack(
        params.attack, ours_wrapper, params=params, target=target, cache_dir=default_cache_dir()
    )
    print(
        f"stock: HuggingFaceModelWrapper, pads to {target.tokenizer.model_max_length}, batch 32; "
        f"ours: TargetModelWrapper, dynamic padding, batch {params.batch_size}",
        flush=True,
    )

    times = {"stock": [], "ours": []}
    res = {"stock": [], "ours": []}
    texts, labels = list(data.texts), [int(y) for y in data.labels]
    for i, (text, y) in enumerate(zip(texts, labels)):
        for name, attack in (("stock", stock_attack), ("ours", ours_attack)):
            engine.seed_all(args.seed + i)
            t = time.perf_counter()
            r = attack.attack(text, y)
            dt = time.perf_counter() - t
            if i > 0:  # example 0 warms both paths up
                times[name].append(dt)
                res[name].append(r)
        if i > 0:
            print(
                f"  example {i:2d}: stock {times['stock'][-1]:6.2f}s  ours {times['ours'][-1]:6.2f}s  "
                f"{type(res['stock'][-1]).__name__[:-12]:>10} / {type(res['ours'][-1]).__name__[:-12]}",
                flush=True,
            )

    def rate(rs):
        attacked = [r for r in rs if not isinstance(r, SkippedAttackResult)]
        ok = [r for r in attacked if isinstance(r, SuccessfulAttackResult)]
        return len(ok), len(attacked)

    same = sum(
        type(a) is type(b) and a.perturbed_result.attacked_text.text == b.perturbed_result.attacked_text.text
        for a, b in zip(res["stock"], res["ours"])
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    tot = {k: sum(v) / len(v) for k, v in times.items()}
    (s_ok, s_n), (o_ok, o_n) = rate(res["stock"]), rate(res["ours"])
    print()
    print(f"{'wrapper':<8} {'median s/ex':>12} {'mean s/ex':>10} {'success rate':>14}")
    print(f"{'stock':<8} {med['stock']:>12.3f} {tot['stock']:>10.3f} {s_ok:>7}/{s_n:<3} {s_ok / max(s_n, 1):>5.2f}")
    print(f"{'ours':<8} {med['ours']:>12.3f} {tot['ours']:>10.3f} {o_ok:>7}/{o_n:<3} {o_ok / max(o_n, 1):>5.2f}")
    print(
        f"speed-up (stock / ours): median {med['stock'] / med['ours']:.1f}x, mean {tot['stock'] / tot['ours']:.1f}x; "
        f"identical outcomes on {same}/{len(res['ours'])} examples"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
