"""Membership-inference power per CPU-second: every attack x reference-model budget on one fine-tuned MiniLM
and on its DP twin, with AUC, TPR at 1% and 0.1% FPR (intervals) and what each attack cost.

    .venv/bin/python benchmarks/membership_power.py                      # the quickstart's MiniLM, 1,050 non-members
    .venv/bin/python benchmarks/membership_power.py --limit 2000 --budgets 1,2,4,8
    .venv/bin/python benchmarks/membership_power.py --step-ratio-only    # interleaved per-step cost only

The target is the quickstart's: bundled MiniLM fine-tuned (all layers, 3 epochs) on a quarter of a balanced
sample of tweets, so most of the sample is non-members (the default 1,400 tweets give 350 members and 1,050
non-members: TPR at 0.1% FPR is measured, not extrapolated). Its DP twin is the quickstart's too (epsilon 8).
Everything runs in one recipe, side by side: the budgets share reference models (the 2-model run uses the
first pair of the 4), which are trained once and cached. Cost per attack = scoring the target plus what the
attack needs (reference models' recorded training and scoring time, or the quantile attack's base features
and regressions), in CPU-seconds of this run and in fine-tunes of the target (the module's own `attacks`
table). Intervals are simultaneous over each audit's attacks.

Goal (issue 14): the best attack costing at most one target fine-tune reaches >= 3x the loss attack's TPR at
1% FPR, and >= 5% absolute, on the non-private MiniLM; on the DP twin every attack's TPR@1%FPR interval
covers 1%. The last line says whether both hold, or by how much they miss.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


def step_cost_ratio(
    *,
    max_length: int,
    trainable: str,
    n_layers: int,
    rounds: int = 7,
    steps: int = 3,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Per-step training time of a reference model (cheap trainable setting) and of a full fine-tune,
    measured interleaved on the same batches so machine load hits both alike. Returns (ratio of medians,
    median reference step s, median full step s)."""
    import statistics
    import time as _t

    import torch

    from fmaudit.data import load_tweets
    from fmaudit.targets import load_target

    data = load_tweets()
    from fmaudit.seeds import Stream, rng

    idx = rng(seed, Stream.EXAMPLE_SAMPLE).choice(len(data), batch_size * steps, replace=False)
    data = data.subset(np.sort(idx))
    models = {}
    for mode in ("all", trainable):
        t = load_target(model="bundled:minilm", max_length=max_length, seed=seed)
        t.set_trainable(mode, n_layers)
        opt = torch.optim.AdamW([q for q in t.model.parameters() if q.requires_grad], lr=1e-5)
        ds = t.torch_dataset(data)
        batches = [t.collate([ds[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(steps)]
        models[mode] = (t, opt, batches)
    times: dict[str, list[float]] = {"all": [], trainable: []}
    for r in range(rounds + 1):
        for mode in ("all", trainable) if r % 2 else (trainable, "all"):
            t, opt, batches = models[mode]
            t.model.train()
            start = _t.perf_counter()
            for b in batches:
                opt.zero_grad(set_to_none=True)
                t.loss(t.model, b).backward()
                opt.step()
            if r:  # round 0 warms up
                times[mode].append((_t.perf_counter() - start) / steps)
    ref, full = statistics.median(times[trainable]), statistics.median(times["all"])
    return ref / full, ref, full


ROOT = Path(__file__).resolve().parent.parent
ATTACKS_BY_BUDGET = ("rmia", "rmia_offline", "lira_offline")
GOAL_RATIO, GOAL_ABS, NOMINAL_FPR = 3.0, 0.05, 0.01


def _recipe(args, cache: str, out_dir: str) -> dict:
    budgets = sorted({int(b) for b in args.budgets.split(",")}, reverse=True)
    ref = {"reference_trainable": args.reference_trainable, "reference_n_layers": args.reference_n_layers}
    audits = []
    for r in budgets:  # largest first: it trains every model, the smaller budgets reuse the cache
        attacks = list(ATTACKS_BY_BUDGET) + (["lira_online"] if r >= 2 else [])
        if r == budgets[0]:
            attacks = ["loss", "quantile"] + attacks
        audits.append(
            {
                "use": "privacy.membership",
                "target": "minilm",
                "params": {"attacks": attacks, "reference_models": r, "bootstrap": args.bootstrap, **ref},
            }
        )
    audits.append(
        {"use": "privacy.dp_finetune", "target": "minilm", "produces": "minilm-dp", "params": _quickstart_dp_params()}
    )
    audits.append(
        {
            "use": "privacy.membership",
            "target": "minilm-dp",
            "params": {
                "attacks": ["loss", "quantile", *ATTACKS_BY_BUDGET, "lira_online"],
                "reference_models": args.dp_budget,
                "bootstrap": args.bootstrap,
                **ref,
            },
        }
    )
    return {
        "version": 1,
        "name": "membership-power",
        "seed": args.seed,
        "cache_dir": cache,
        "output_dir": out_dir,
        "data": {"tweets": {"source": "bundled:tweets", "limit": args.limit, "balance": True}},
        "targets": {
            "minilm": {
                "model": "bundled:minilm",
                "max_length": args.max_length,
                "finetune": {
                    "data": "tweets",
                    "member_fraction": args.member_fraction,
                    "epochs": args.epochs,
                    "batch_size": 16,
                    "lr": args.lr,
                },
            }
        },
        "audits": audits,
    }


def _quickstart_dp_params() -> dict:
    """The DP twin's settings, read from recipes/quickstart.yaml (so the benchmark's twin is the quickstart's)."""
    from fmaudit.recipe import load_recipe

    raw = load_recipe(ROOT / "recipes" / "quickstart.yaml").raw
    (dp,) = [a for a in raw["audits"] if a["use"] == "privacy.dp_finetune"]
    return dict(dp["params"])


class Row(NamedTuple):
    attack: str
    refs: int
    auc: Any
    tpr_1: Any  # metrics: value, ci_low, ci_high
    tpr_01: Any
    cost_s: float | None
    cost_finetunes: float | None


def _fmt(m) -> str:
    lo = "-" if m.ci_low is None else f"{m.ci_low:.3f}"
    hi = "-" if m.ci_high is None else f"{m.ci_high:.3f}"
    return f"{m.value:.3f} [{lo}, {hi}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=1400, help="balanced tweets (member_fraction of them members)")
    ap.add_argument("--member-fraction", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=3, help="target fine-tune epochs (reference models: the same)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--reference-trainable", default="last_n_layers", choices=["head", "last_n_layers", "all"])
    ap.add_argument("--reference-n-layers", type=int, default=1)
    ap.add_argument("--budgets", default="1,2,4", help="reference-model budgets for the non-private target")
    ap.add_argument("--dp-budget", type=int, default=2, help="reference models for the DP twin's attacks")
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh folder (so costs are measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-ratio-only", action="store_true", help="only the interleaved per-step cost comparison")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_ratio_only:
        ratio, ref_s, full_s = step_cost_ratio(
            max_length=args.max_length, trainable=args.reference_trainable, n_layers=args.reference_n_layers
        )
        print(
            f"interleaved per-step cost (MiniLM, batch 16, {args.reference_trainable} n_layers="
            f"{args.reference_n_layers} vs all layers; median of 7 rounds): reference {ref_s:.3f} s, full "
            f"{full_s:.3f} s, ratio {ratio:.3f}"
        )
        return 0
    from fmaudit.runner import run_recipe

    cache = args.cache_dir or tempfile.mkdtemp(prefix="fmaudit-mia-bench-")
    out_dir = tempfile.mkdtemp(prefix="fmaudit-mia-bench-runs-")
    t0 = time.perf_counter()
    report = run_recipe(_recipe(args, cache, out_dir))
    wall = time.perf_counter() - t0
    tgt = report.targets["minilm"]
    print(
        f"target: bundled MiniLM fine-tuned on {tgt.split.num_members} balanced tweets ({args.epochs} epochs, lr "
        f"{args.lr}, all layers), {tgt.split.num_nonmembers} non-members; fine-tune "
        f"{tgt.finetune['train_seconds']:.1f} s{' (from the cache)' if tgt.cache_hit else ''}; "
        f"host cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}"
    )
    rows: dict[str, list[Row]] = {"minilm": [], "minilm-dp": []}
    n_non = 0
    for res in report.audits:
        if res.status != "ok":
            print(f"audit {res.unit_id} failed: {res.error.message if res.error else '?'}", file=sys.stderr)
            return 3
        if res.module != "privacy.membership":
            if res.module == "privacy.dp_finetune":
                acc = res.metrics["accuracy"].value
                eps = res.metrics["epsilon"].value
                print(f"DP twin: epsilon {eps:.2f}, held-out accuracy {acc:.3f}")
            continue
        r = res.params["reference_models"]
        table = res.tables["attacks"]
        for name in res.params["attacks"]:
            budget = r if "reference_models" in _needs(name) else 0
            rows[res.target].append(
                Row(
                    name,
                    budget,
                    res.metrics[f"{name}.auc"],
                    res.metrics[f"{name}.tpr_at_1pct_fpr"],
                    res.metrics[f"{name}.tpr_at_0.1pct_fpr"],
                    table[name].get("cost_seconds"),
                    table[name].get("cost_target_finetunes"),
                )
            )
        if res.target == "minilm":
            n_non = int(res.metrics["num_nonmembers"].value)
    print(f"non-members scored: {n_non} (lowest resolvable FPR {1 / n_non:.4f})")
    for name in rows:
        print()
        print(f"{name}:")
        print(
            f"{'attack':14s} {'refs':>4s}  {'AUC':>22s}  {'TPR@1%FPR':>22s}  {'TPR@0.1%FPR':>22s}  "
            f"{'cost s':>8s}  {'x fine-tune':>11s}"
        )
        for row in rows[name]:
            cfs = "-" if row.cost_finetunes is None else f"{row.cost_finetunes:.3f}"
            css = "-" if row.cost_s is None else f"{row.cost_s:.1f}"
            print(
                f"{row.attack:14s} {row.refs:4d}  {_fmt(row.auc):>22s}  {_fmt(row.tpr_1):>22s}  "
                f"{_fmt(row.tpr_01):>22s}  {css:>8s}  {cfs:>11s}"
            )
    print()
    print(f"wall time {wall:.0f} s (fine-tunes, reference models, DP twin, scoring, bootstrap)")

    loss = next(row.tpr_1.value for row in rows["minilm"] if row.attack == "loss")
    cheap = [
        row
        for row in rows["minilm"]
        if row.attack != "loss" and row.cost_finetunes is not None and row.cost_finetunes <= 1.0
    ]
    uncovered = [
        f"{row.attack}-{row.refs} [{row.tpr_1.ci_low:.3f}, {row.tpr_1.ci_high:.3f}]"
        for row in rows["minilm-dp"]
        if row.tpr_1.ci_low is not None and not (row.tpr_1.ci_low <= NOMINAL_FPR <= row.tpr_1.ci_high)
    ]
    if cheap:
        top = max(cheap, key=lambda row: row.tpr_1.value)
        best, a, r, cf = top.tpr_1.value, top.attack, top.refs, top.cost_finetunes
        ratio = best / loss if loss > 0 else float("inf")
        met = ratio >= GOAL_RATIO and best >= GOAL_ABS
        power = (
            f"best attack at <= 1 fine-tune: {a} ({r} refs, {cf:.2f} fine-tunes) TPR@1%FPR {best:.3f} = "
            f"{ratio:.2f}x loss's {loss:.3f} (goal >= {GOAL_RATIO:.0f}x and >= {GOAL_ABS:.2f}): "
            + ("MET" if met else f"MISSED by {max(GOAL_RATIO - ratio, 0):.2f}x / {max(GOAL_ABS - best, 0):.3f}")
        )
    else:
        met = False
        power = "no attack cost <= 1 fine-tune here: power goal NOT MET"
    dp_line = (
        "DP twin: every attack's TPR@1%FPR interval covers 1%: MET"
        if not uncovered
        else f"DP twin: interval misses 1% for {', '.join(uncovered)}: NOT MET"
    )
    print(f"goal: {power}; {dp_line}")
    return 0 if met and not uncovered else 1


def _needs(attack: str) -> frozenset:
    from fmaudit.privacy.membership.attacks import ATTACKS

    return ATTACKS[attack].needs


if __name__ == "__main__":
    sys.exit(main())
