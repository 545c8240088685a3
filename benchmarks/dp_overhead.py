"""DP-SGD overhead on MiniLM: DP step time / non-DP step time and peak memory ratios, side by side.

Same model (bundled MiniLM, 22.7M parameters), same data (bundled tweets packed into 16 x 64-token
sequences), same optimizer (AdamW), for three trainable settings: full model, last 2 layers (+ pooler, head)
and LoRA (r=8 on query/value + head). DP steps are what `fmaudit.privacy.dp_finetune` runs: Opacus
make_private with ghost clipping (with --hooks, also per-sample gradient hooks on the full model),
per-example losses, noise. Each (setting, variant) runs in its own process so its peak memory is its own;
peak memory = peak RSS growth from just before the first training step (Linux VmHWM, reset via clear_refs).

    .venv/bin/python benchmarks/dp_overhead.py            # ~3 warm-up + 5 timed steps per variant
    .venv/bin/python benchmarks/dp_overhead.py --steps 10 --threads 2 --hooks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("all", "last_n_layers", "lora")
VARIANTS = ("plain", "ghost", "hooks")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(mode: str, variant: str, steps: int, warmup: int, threads: int, batch: int, seq: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from fmaudit.data import load_tweets
    from fmaudit.privacy.dp import apply_trainable
    from fmaudit.targets import load_target

    target = load_target(model="bundled:minilm", num_labels=2, max_length=seq, seed=0)
    data = load_tweets(labels=("negative", "positive"), name="tweets")
    tok = target.tokenizer
    # Pack tweets into full-length sequences: every step sees exactly batch x seq tokens.
    ids, labels, buf, k = [], [], [], 0
    while len(ids) < batch:
        buf += tok(data.texts[k], add_special_tokens=False)["input_ids"]
        if len(buf) >= seq - 2:
            ids.append([tok.cls_token_id] + buf[: seq - 2] + [tok.sep_token_id])
            labels.append(int(data.labels[k]))
            buf = []
        k += 1
    fixed = target.collate([{"input_ids": x, "label": y} for x, y in zip(ids, labels)])
    assert tuple(fixed["input_ids"].shape) == (batch, seq)

    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]} if mode == "lora" else None
    apply_trainable(target, mode, 2, lora)
    model = target.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loader = torch.utils.data.DataLoader([0] * batch, batch_size=batch)  # only its length matters to Opacus
    torch.manual_seed(0)

    if variant == "plain":
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = target.loss(model, fixed)
            loss.backward()
            optimizer.step()
    else:
        from opacus import PrivacyEngine
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        engine = PrivacyEngine(accountant="rdp")
        kw = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                  poisson_sampling=False, grad_sample_mode=variant)
        if variant == "ghost":
            gsm, dp_opt, _crit, _dl = engine.make_private(criterion=torch.nn.CrossEntropyLoss(), **kw)
        else:
            gsm, dp_opt, _dl = engine.make_private(**kw)

        def step():
            dp_opt.zero_grad(set_to_none=True)
            per_example = target.loss(gsm, fixed, reduction="none")
            loss = (DPTensorFastGradientClipping(gsm, dp_opt, per_example, "mean") if variant == "ghost"
                    else per_example.mean())
            loss.backward()
            dp_opt.step()

    rss0 = _rss_kb("VmRSS")
    reset = _reset_peak()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = _rss_kb("VmHWM")
    trainable = sum(p.numel() for p in params)
    return {"mode": mode, "variant": variant, "median_s": statistics.median(times), "times": times,
            "peak_growth_mib": (peak - rss0) / 1024 if reset else None, "peak_rss_mib": peak / 1024,
            "baseline_rss_mib": rss0 / 1024, "trainable": trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--hooks", action="store_true", help="also time per-sample gradient hooks on the full model "
                                                          "(slow; reference for ghost clipping)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps, a.warmup, a.threads, a.batch, a.seq)))
        return
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    plan = [(m, v) for m in a.modes.split(",") for v in VARIANTS if v != "hooks" or (a.hooks and m == "all")]
    res: dict[tuple[str, str], dict] = {}
    for mode, variant in plan:
        out = subprocess.run([sys.executable, __file__, "--child", mode, variant, "--steps", str(a.steps), "--warmup",
                              str(a.warmup), "--threads", str(a.threads), "--batch", str(a.batch), "--seq",
                              str(a.seq)], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{mode}/{variant} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res[(mode, variant)] = r
        print(f"  {mode:14s} {variant:6s} median step {r['median_s']:.3f} s  peak growth "
              f"{r['peak_growth_mib'] or float('nan'):7.1f} MiB  (peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"{r['trainable']:,} trainable)", flush=True)
    print(f"\nMiniLM, batch {a.batch} x seq {a.seq}, {a.threads} threads, median of {a.steps} steps "
          f"(after {a.warmup} warm-up); noise 1.0, C 1.0")
    print(f"{'trainable':14s} {'DP mode':7s} {'time DP/non-DP':>15s} {'peak-growth ratio':>18s} {'peak-RSS ratio':>15s}")
    for mode, variant in plan:
        if variant == "plain" or (mode, variant) not in res or (mode, "plain") not in res:
            continue
        d, p = res[(mode, variant)], res[(mode, "plain")]
        grow = (d["peak_growth_mib"] / p["peak_growth_mib"]) if d["peak_growth_mib"] and p["peak_growth_mib"] else None
        print(f"{mode:14s} {variant:7s} {d['median_s'] / p['median_s']:14.2f}x "
              f"{(f'{grow:.2f}x' if grow else 'n/a'):>18s} {d['peak_rss_mib'] / p['peak_rss_mib']:14.2f}x")


if __name__ == "__main__":
    main()
