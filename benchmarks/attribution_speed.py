"""Attributions per second: LayerIntegratedGradients (n_steps 50) on the bundled MiniLM, through
fmaudit's explain.attribution code path vs Captum called directly on the same inputs.

Both sides explain the same tweets, towards the same (predicted) class, with the same baselines
([CLS] pad ... pad [SEP]) and the same internal batch size. Rounds alternate between the two sides and
the medians are compared, so load from other processes hits both alike.

    .venv/bin/python benchmarks/attribution_speed.py            # 4 tweets x 3 rounds, 1 thread
    .venv/bin/python benchmarks/attribution_speed.py --n 12 --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="tweets explained per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-steps", type=int, default=50)
    ap.add_argument("--internal-batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared box)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import numpy as np
    import torch
    from captum.attr import LayerIntegratedGradients

    from fmaudit.data import load_tweets
    from fmaudit.explain.text import explain_texts
    from fmaudit.targets import load_target

    torch.set_num_threads(args.threads)
    target = load_target(model="bundled:minilm", name="minilm", device=args.device, max_length=64)
    tweets = load_tweets()
    rng = np.random.default_rng(0)
    texts = [tweets.texts[int(i)] for i in rng.choice(len(tweets), args.n, replace=False)]
    model = target.model
    labels = [int(x) for x in target.logits_texts(texts).argmax(1)]

    # Captum directly: the same inputs, prepared outside the timed region.
    pad = target.tokenizer.pad_token_id
    specials = torch.tensor(sorted(target.tokenizer.all_special_ids), device=target.device)
    prepared = []
    for text in texts:
        batch = target.encode_texts([text])
        ids = batch.pop("input_ids")
        base = torch.where(torch.isin(ids, specials), ids, torch.full_like(ids, pad))
        prepared.append((ids, base, batch))

    def direct() -> list:
        out = []
        for (ids, base, extra), y in zip(prepared, labels):
            keys = list(extra)

            def fwd(input_ids, *rest):
                return model(input_ids=input_ids, **dict(zip(keys, rest))).logits

            lig = LayerIntegratedGradients(fwd, model.get_input_embeddings())
            a, d = lig.attribute(
                ids,
                baselines=base,
                target=y,
                additional_forward_args=tuple(extra.values()),
                n_steps=args.n_steps,
                internal_batch_size=args.internal_batch_size,
                return_convergence_delta=True,
            )
            out.append(a.sum(-1).detach())
        return out

    def ours() -> list:
        return explain_texts(
            target, texts, labels=labels, n_steps=args.n_steps, internal_batch_size=args.internal_batch_size
        )

    # warm-up and a same-numbers check
    d0, o0 = direct(), ours()
    max_diff = max(float((a[0] - torch.as_tensor(b.full, dtype=a.dtype)).abs().max()) for a, (_, b) in zip(d0, o0))
    tokens = [int(p[0].shape[1]) for p in prepared]

    t_direct, t_ours = [], []
    for r in range(args.rounds):
        for _name, fn, bucket in (("direct", direct, t_direct), ("ours", ours, t_ours))[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t)
    md, mo = statistics.median(t_direct), statistics.median(t_ours)
    print(
        f"MiniLM LayerIntegratedGradients, n_steps={args.n_steps}, internal_batch_size={args.internal_batch_size}, "
        f"{args.n} tweets ({min(tokens)}-{max(tokens)} tokens, mean {np.mean(tokens):.1f}), {args.rounds} rounds, "
        f"threads={args.threads}, device={args.device}"
    )
    print(f"  captum direct : {args.n / md:7.2f} attributions/s  (median {md / args.n * 1000:.0f} ms each)")
    print(f"  fmaudit module: {args.n / mo:7.2f} attributions/s  (median {mo / args.n * 1000:.0f} ms each)")
    print(f"  overhead      : {(mo / md - 1) * 100:+.1f}%   (goal: under +10%)")
    print(f"  max |attribution difference|: {max_diff:.2e}")


if __name__ == "__main__":
    main()
