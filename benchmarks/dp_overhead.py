"""DP-SGD overhead on MiniLM: DP step time / non-DP step time and peak memory ratios, side by side.

Same model (bundled MiniLM, 22.7M parameters), same data (bundled tweets packed into 16 x 64-token
sequences), same optimizer (AdamW), for three trainable settings: full model, last 2 layers (+ pooler, head)
and LoRA (r=8 on query/value + head). DP steps are what `fmaudit.privacy.dp_finetune` runs (its clipping-mode
registry): ghost clipping (two backward passes), book-keeping clipping (one backward pass) and, with --hooks,
per-sample gradient hooks on the full model; per-example losses, noise.

Interleaved: each (setting, variant) lives in its own process (so its peak memory is its own), all variants of
a setting are started together, and the parent steps them in turn (plain, ghost, bookkeeping, plain, ...), so
a change in the machine's load hits every variant alike; times are medians. Peak memory: the process's peak
RSS (Linux VmHWM) and its growth from just before the first training step (VmHWM reset via clear_refs). The
machine's load average is printed beside the numbers. The last line gives the goal for book-keeping on the
full model (<= 1.5x non-DP step time, <= 1.2x peak memory) and whether it is met.

    .venv/bin/python benchmarks/dp_overhead.py            # 2 warm-up + 9 timed steps per variant
    .venv/bin/python benchmarks/dp_overhead.py --steps 15 --threads 2 --hooks --modes all
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
VARIANTS = ("plain", "ghost", "bookkeeping", "hooks")
GOAL_TIME, GOAL_MEMORY = 1.5, 1.2  # issue 15: book-keeping on the full model vs non-DP


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


def _setup(mode: str, variant: str, threads: int, batch: int, seq: int) -> tuple:
    """The model, a fixed packed batch and one training step for (mode, variant)."""
    import torch

    torch.set_num_threads(threads)
    from fmaudit.data import load_tweets
    from fmaudit.privacy.dp import apply_trainable
    from fmaudit.privacy.dp.clipping import CLIPPING_MODES
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

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            target.loss(model, fixed).backward()
            optimizer.step()
    else:
        from opacus import PrivacyEngine

        clipping = CLIPPING_MODES[variant]
        gsm, dp_opt, _dl = clipping.make_private(
            PrivacyEngine(accountant="rdp"),
            dict(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode=variant,
                loss_reduction="mean",
            ),
        )

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            clipping.loss(gsm, dp_opt, target.loss(gsm, fixed, reduction="none")).backward()
            dp_opt.step()

    return step, sum(p.numel() for p in params)


def child(mode: str, variant: str, warmup: int, threads: int, batch: int, seq: int) -> None:
    """Set up, warm up, then take one timed step per "step" line on stdin (printing its seconds); on "done",
    print the peak memory. Protocol lines on stdout start with "@@"."""
    step, trainable = _setup(mode, variant, threads, batch, seq)
    rss0 = _rss_kb("VmRSS")
    reset = _reset_peak()
    for _ in range(warmup):
        step()
    print("@@" + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t = time.perf_counter()
        step()
        print("@@" + json.dumps({"s": time.perf_counter() - t}), flush=True)
    peak = _rss_kb("VmHWM")
    print(
        "@@"
        + json.dumps(
            {
                "peak_growth_mib": (peak - rss0) / 1024 if reset else None,
                "peak_rss_mib": peak / 1024,
                "baseline_rss_mib": rss0 / 1024,
                "trainable": trainable,
            }
        ),
        flush=True,
    )


def _read(proc: subprocess.Popen) -> dict:
    """The child's next protocol line."""
    for line in proc.stdout:
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"child exited: {proc.stderr.read()[-2000:]}")


def run_interleaved(mode: str, variants: list[str], a: argparse.Namespace) -> dict[str, dict]:
    """All variants of one trainable setting at once, one process each, stepped in turn."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    procs = {
        v: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                v,
                "--warmup",
                str(a.warmup),
                "--threads",
                str(a.threads),
                "--batch",
                str(a.batch),
                "--seq",
                str(a.seq),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for v in variants
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for v in variants:  # set up and warmed up one after the other (each then waits for its steps)
            _read(procs[v])
        for _ in range(a.steps):
            for v in variants:
                procs[v].stdin.write("step\n")
                procs[v].stdin.flush()
                times[v].append(_read(procs[v])["s"])
        out = {}
        for v in variants:
            procs[v].stdin.write("done\n")
            procs[v].stdin.flush()
            out[v] = {**_read(procs[v]), "times": times[v], "median_s": statistics.median(times[v])}
        return out
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument(
        "--hooks",
        action="store_true",
        help="also time per-sample gradient hooks on the full model (slow, ~3x memory; reference)",
    )
    ap.add_argument("--child", nargs=2, metavar=("MODE", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.warmup, a.threads, a.batch, a.seq)
        return
    load0 = os.getloadavg()
    res: dict[tuple[str, str], dict] = {}
    for mode in a.modes.split(","):
        variants = [v for v in VARIANTS if v != "hooks" or (a.hooks and mode == "all")]
        for v, r in run_interleaved(mode, variants, a).items():
            res[(mode, v)] = r
            print(
                f"  {mode:14s} {v:11s} median step {r['median_s']:.3f} s  peak growth "
                f"{r['peak_growth_mib'] or float('nan'):7.1f} MiB  (peak RSS {r['peak_rss_mib']:.0f} MiB, "
                f"{r['trainable']:,} trainable)",
                flush=True,
            )
    load1 = os.getloadavg()
    print(
        f"\nMiniLM, batch {a.batch} x seq {a.seq}, {a.threads} threads, interleaved, median of {a.steps} steps "
        f"(after {a.warmup} warm-up); noise 1.0, C 1.0; {os.cpu_count()} CPUs, load average (1 min) "
        f"{load0[0]:.1f} at start, {load1[0]:.1f} at end"
    )
    print(
        f"{'trainable':14s} {'DP mode':11s} {'time DP/non-DP':>15s} {'peak-growth ratio':>18s} {'peak-RSS ratio':>15s}"
    )
    for (mode, v), d in res.items():
        if v == "plain" or (mode, "plain") not in res:
            continue
        p = res[(mode, "plain")]
        grow = (d["peak_growth_mib"] / p["peak_growth_mib"]) if d["peak_growth_mib"] and p["peak_growth_mib"] else None
        print(
            f"{mode:14s} {v:11s} {d['median_s'] / p['median_s']:14.2f}x "
            f"{(f'{grow:.2f}x' if grow else 'n/a'):>18s} {d['peak_rss_mib'] / p['peak_rss_mib']:14.2f}x"
        )
    print(_goal_line(res, load0, load1))


def _goal_line(res: dict[tuple[str, str], dict], load0: tuple, load1: tuple) -> str:
    """The last line: book-keeping on the full model against the goal, met or the honest miss."""
    if ("all", "bookkeeping") not in res or ("all", "plain") not in res:
        return "goal: not measured (needs --modes including all)"
    d, p = res[("all", "bookkeeping")], res[("all", "plain")]
    time_ratio = d["median_s"] / p["median_s"]
    rss_ratio = d["peak_rss_mib"] / p["peak_rss_mib"]
    grow = (d["peak_growth_mib"] / p["peak_growth_mib"]) if d["peak_growth_mib"] and p["peak_growth_mib"] else None
    met = time_ratio <= GOAL_TIME and rss_ratio <= GOAL_MEMORY
    misses = []
    if time_ratio > GOAL_TIME:
        misses.append(f"time {time_ratio:.2f}x > {GOAL_TIME}x")
    if rss_ratio > GOAL_MEMORY:
        misses.append(f"peak memory {rss_ratio:.2f}x > {GOAL_MEMORY}x")
    return (
        f"goal (full MiniLM, book-keeping vs non-DP: time <= {GOAL_TIME}x, peak memory <= {GOAL_MEMORY}x): "
        f"time {time_ratio:.2f}x, peak RSS {rss_ratio:.2f}x (growth from the first step "
        f"{f'{grow:.2f}x' if grow else 'n/a'}); load {load0[0]:.1f}->{load1[0]:.1f} on {os.cpu_count()} CPUs: "
        + ("MET" if met else "MISSED (" + ", ".join(misses) + ")")
    )


if __name__ == "__main__":
    main()
