"""DP utility on MiniLM: how much accuracy differential privacy costs, side by side with the non-private model.

Bundled MiniLM (22.7M parameters) + a classification head, fine-tuned on balanced bundled tweets (negative vs
positive; the majority baseline is 50%). Members: a seeded balanced sample; evaluation: a disjoint balanced
sample of never-seen tweets. Rows: the non-private fine-tune (all weights, AdamW), then
`fmaudit.privacy.dp_finetune` at each epsilon for each trainable scope (full model, last layers, LoRA), with
the DP training defaults it picks when none are given (Li et al., ICLR 2022: large logical batches, higher
learning rates, few epochs; the defaults it took are printed). Accuracy with a 95% Wilson interval on the
evaluation set, and training time. The last line: the gap between the non-private accuracy and the best DP
variant at the largest epsilon, against the goal (within 5 points; Li et al. report about 2 for RoBERTa on
SST-2, with far more data and compute).

    .venv/bin/python benchmarks/dp_utility.py                      # 4000 members, eps 1 3 8, three scopes
    .venv/bin/python benchmarks/dp_utility.py --members 800 --eval 1000 --epsilons 8 --scopes last_n_layers lora

The full run trains ten MiniLM models: hours on a 2-core CPU, minutes on a GPU (`--device cuda`).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

SCOPES = ("all", "last_n_layers", "lora")
GOAL_POINTS = 5.0


def _accuracy(target, data) -> tuple[float, float, float]:
    from fmaudit.stats import wilson_interval

    pred = target.logits(data, batch_size=64).argmax(1)
    hits = int((pred == data.labels).sum())
    low, high = wilson_interval(hits, len(data))
    return hits / len(data), low, high


def _row(name: str, eps: str, acc: tuple[float, float, float], seconds: float, note: str = "") -> None:
    print(f"{name:<16} {eps:>7}  {acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]  {seconds:8.1f} s  {note}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=4000, help="balanced training examples (members)")
    ap.add_argument("--eval", type=int, default=2000, help="balanced held-out examples for accuracy")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    ap.add_argument("--epochs", type=int, default=2, help="non-private fine-tune epochs")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=1, help="DP last_n_layers: how many blocks train")
    ap.add_argument("--dp-epochs", type=int, default=None, help="DP epochs (default: dp_finetune's DP defaults)")
    ap.add_argument("--dp-batch-size", type=int, default=None, help="DP logical batch (default: DP defaults)")
    ap.add_argument("--dp-lr", type=float, default=None, help="DP learning rate (default: DP defaults)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from fmaudit.data import balanced_sample, load_tweets
    from fmaudit.privacy.dp import DPPrivacyWarning, dp_finetune
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pool = balanced_sample(load_tweets(), args.members + args.eval, args.seed)
    rng = np.random.default_rng([args.seed, 1])  # which balanced examples are members: its own stream
    order = rng.permutation(len(pool))
    labels = pool.labels[order]
    members_idx = np.concatenate([order[labels == c][: args.members // 2] for c in (0, 1)])
    members = pool.subset(np.sort(members_idx), name="tweets[members]")
    held_out = pool.subset(np.setdiff1d(np.arange(len(pool)), members_idx), name="tweets[eval]")
    print(
        f"MiniLM on balanced tweets: {len(members)} members, {len(held_out)} held-out examples "
        f"(majority baseline 0.500), device {args.device}"
    )
    print(f"{'variant':<16} {'epsilon':>7}  accuracy [95% CI]         train")

    base = load_target(
        model="bundled:minilm", num_labels=2, max_length=args.max_length, device=args.device, seed=args.seed
    )
    plain = base.copy("non-private")
    t = time.perf_counter()
    train(plain, members, TrainConfig(epochs=args.epochs, batch_size=16, lr=5e-5, trainable="all", seed=args.seed))
    non_private = _accuracy(plain, held_out)
    _row("non-private", "inf", non_private, time.perf_counter() - t, f"all weights, {args.epochs} epochs, lr 5e-5")

    best: dict[float, tuple[float, str]] = {}
    for eps in args.epsilons:
        for scope in args.scopes:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DPPrivacyWarning)  # the seed statement: a benchmark, not a release
                res = dp_finetune(
                    model=base,
                    train_data=members,
                    target_epsilon=eps,
                    trainable=scope,
                    n_layers=args.n_layers,
                    epochs=args.dp_epochs,
                    batch_size=args.dp_batch_size,
                    lr=args.dp_lr,
                    seed=args.seed,
                )
            acc = _accuracy(res.target, held_out)
            picked = ", ".join(f"{k} {v}" for k, v in res.picked_defaults.items()) or "none"
            _row(
                f"DP {scope}",
                f"{eps:g}",
                acc,
                time.perf_counter() - t,
                f"epsilon {res.epsilon:.2f}, noise {res.noise_multiplier:.2f}, {res.steps} steps; defaults: {picked}",
            )
            if eps not in best or acc[0] > best[eps][0]:
                best[eps] = (acc[0], scope)

    top = max(best)
    gap = 100 * (non_private[0] - best[top][0])
    verdict = "goal met" if gap <= GOAL_POINTS else f"goal missed by {gap - GOAL_POINTS:.1f} points"
    print(
        f"GAP at epsilon {top:g}: non-private {non_private[0]:.3f} vs best DP ({best[top][1]}) {best[top][0]:.3f}: "
        f"{gap:.1f} points (goal <= {GOAL_POINTS:g}): {verdict}"
    )


if __name__ == "__main__":
    main()
