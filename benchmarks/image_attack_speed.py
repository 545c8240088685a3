"""Images/second of PGD-20, the reference AutoAttack and torchattacks' 10-iteration AutoAttack through
`robustness.image_attack` vs the libraries called directly, on the bundled digits CNN and ViT (fine-tuned
on bundled:digits, cached), same model, batch and seed; then the reference AutoAttack (fra31/auto-attack,
version 'standard': APGD-CE / APGD-T / FAB-T with 100 iterations, 9 target classes, Square with 5,000
queries) against torchattacks 3.3.0's AutoAttack(version='standard') (10 iterations): robust accuracy with
95% Clopper-Pearson intervals, and time.

The module's time is its whole `run()`: clean forward pass, input-gradient sanity check, the attack, and
the verification of every adversarial example (finite, in [0, 1], in the norm ball, re-predicted). The
direct time is the attack call plus the forward passes that give robust accuracy. Runs alternate (and
which side goes first alternates too); medians. The module's automatic large-budget check is off here
(it is one extra PGD-50 run, timed separately at the end).

Also prints robust accuracy of PGD-20 and both AutoAttacks over an epsilon grid from the module, and checks
that the reference AutoAttack is never above PGD, and that both paths give the same robust accuracy for the
same seed.

    .venv/bin/python benchmarks/image_attack_speed.py --models cnn      # the CNN only
    .venv/bin/python benchmarks/image_attack_speed.py --aa-n 16 --aa-repeats 2 --models vit
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {
    "cnn": ("bundled:digits-cnn", dict(epochs=10, batch_size=32, lr=3e-3)),
    "vit": ("bundled:digits-vit", dict(epochs=10, batch_size=32, lr=1e-3)),
}


def trained(key: str, data, seed: int):
    """The bundled model fine-tuned on half of bundled:digits (through fmaudit's cache, like a recipe)."""
    from fmaudit.data import member_split
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, default_cache_dir, finetune_cached

    model, cfg = MODELS[key]
    target = load_target(model=model, name=key, num_labels=10, seed=seed)
    split = member_split(data, member_fraction=0.5, seed=seed)
    stats, hit, _ = finetune_cached(target, split, TrainConfig(seed=seed, **cfg), cache_dir=default_cache_dir())
    target.split = split
    return target, split, hit, stats.duration_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="images per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--aa-n", type=int, default=32, help="images for AutoAttack (its 5000-query Square stage is slow)")
    ap.add_argument("--aa-repeats", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.1, help="Linf budget of the timed runs")
    ap.add_argument("--grid", type=float, nargs="+", default=[0.03, 0.1, 0.2], help="grid for AutoAttack <= PGD")
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=sorted(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import torchattacks

    from fmaudit.audits.base import AuditContext
    from fmaudit.audits.robustness.image_attack import ImageAttackAudit
    from fmaudit.data import load_digits
    from fmaudit.robustness.autoattack import _import_autoattack

    torch.set_num_threads(args.threads)
    data = load_digits()
    print(
        f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, {args.threads} thread(s), "
        f"Linf eps {args.eps:g}, PGD-20 on {args.n} images x {args.repeats} repeats, AutoAttacks on {args.aa_n} x "
        f"{args.aa_repeats} (medians)\n"
    )
    rows, ok = [], True
    tmp = Path(tempfile.mkdtemp(prefix="fmaudit-bench-"))
    for key in args.models:
        target, split, hit, train_s = trained(key, data, args.seed)
        evalset = split.nonmembers.subset(np.arange(max(args.n, args.aa_n)))
        x, y = torch.as_tensor(evalset.images), torch.as_tensor(evalset.labels)
        model = target.model
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean())
        print(
            f"{key}: {target.architecture}, {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"clean accuracy {clean:.3f} on {len(evalset)} held-out images "
            f"({'cached fine-tune' if hit else f'fine-tuned in {train_s:.1f} s'})"
        )

        def ctx(subset) -> AuditContext:
            return AuditContext(
                unit_id=f"0:robustness.image_attack@{key}",
                seed=args.seed,
                device="cpu",
                run_dir=tmp,
                cache_dir=tmp,
                store_examples=False,
                data=subset,
            )

        def reference_direct():
            aa = _import_autoattack().AutoAttack(
                model, norm="Linf", eps=args.eps, version="standard", seed=args.seed, verbose=False, device="cpu"
            )
            return lambda a, b: aa.run_standard_evaluation(a, b, bs=len(a))

        timed = {
            "PGD-20": (
                {"name": "pgd", "steps": 20},
                "pgd_linf",
                args.n,
                args.repeats,
                lambda: torchattacks.PGD(model, eps=args.eps, alpha=2.5 * args.eps / 20, steps=20),
            ),
            "AA-ref": ({"name": "autoattack"}, "autoattack_linf", args.aa_n, args.aa_repeats, reference_direct),
            "AA-fast": (
                {"name": "autoattack", "version": "fast"},
                "autoattack_fast_linf",
                args.aa_n,
                args.aa_repeats,
                lambda: torchattacks.AutoAttack(
                    model, norm="Linf", eps=args.eps, version="standard", n_classes=10, seed=args.seed
                ),
            ),
        }
        head: dict[str, dict[str, float]] = {}
        for title, (spec, label, n, repeats, make) in timed.items():
            module = ImageAttackAudit(
                {
                    "attacks": [spec],
                    "epsilons": [args.eps],
                    "num_examples": n,
                    "batch_size": n,
                    "num_images": 0,
                    "large_budget": None,
                }
            )
            sub = evalset.subset(np.arange(n))
            xs, ys = x[:n], y[:n]
            ours_t, direct_t, inside_t, ours_acc, direct_acc = [], [], [], None, None
            for rep in range(repeats):
                # Alternate which side goes first: the first of two back-to-back runs is measurably slower.
                for side in ("ours", "direct") if rep % 2 == 0 else ("direct", "ours"):
                    t0 = time.perf_counter()
                    if side == "ours":
                        out = module.run(target, ctx(sub))
                        ours_t.append(time.perf_counter() - t0)
                        inside_t.append(out.metrics[f"attack_seconds.{label}"].value)  # the torchattacks call
                        ours_acc = out.metrics[f"robust_accuracy.{label}@{args.eps:g}"].value
                    else:
                        torch.manual_seed(args.seed)
                        adv = make()(xs, ys)
                        with torch.no_grad():
                            direct_acc = float(
                                ((model(xs).argmax(1) == ys) & (model(adv).argmax(1) == ys)).double().mean()
                            )
                        direct_t.append(time.perf_counter() - t0)
            o, d = statistics.median(ours_t), statistics.median(direct_t)
            m = out.metrics[f"robust_accuracy.{label}@{args.eps:g}"]
            head[title] = {
                "acc": ours_acc,
                "lo": m.ci_low,
                "hi": m.ci_high,
                "attack_s": statistics.median(inside_t),
                "n": n,
            }
            # In-run overhead: the module's time outside the torchattacks call (clean pass, gradient check,
            # verification), over the call's own time, in the same run: immune to load drift between runs.
            inner = statistics.median([(t - a) / a for t, a in zip(ours_t, inside_t)])
            same = abs(ours_acc - direct_acc) < 1e-12
            ok &= same
            rows.append((key, title, n / o, n / d, o / d - 1, inner))
            print(
                f"  {title:<10} ({n} images) fmaudit {n / o:8.1f} img/s   direct {n / d:8.1f} img/s   "
                f"overhead {100 * (o / d - 1):+6.1f}% (in-run {100 * inner:+5.1f}%)   robust acc {ours_acc:.3f} vs "
                f"{direct_acc:.3f}{'' if same else '  MISMATCH'}"
            )

        ref, fast = head["AA-ref"], head["AA-fast"]
        print(
            f"  reference AutoAttack vs torchattacks' 'standard' at Linf {args.eps:g} on {ref['n']} images: robust "
            f"accuracy {ref['acc']:.3f} [{ref['lo']:.3f}, {ref['hi']:.3f}] in {ref['attack_s']:.1f} s vs "
            f"{fast['acc']:.3f} [{fast['lo']:.3f}, {fast['hi']:.3f}] in {fast['attack_s']:.1f} s (attack time, "
            f"medians; 95% Clopper-Pearson)"
        )
        grid = sorted(args.grid)
        sub = evalset.subset(np.arange(args.aa_n))
        t0 = time.perf_counter()
        out = ImageAttackAudit(
            {
                "attacks": [{"name": "pgd", "steps": 20}, "autoattack", "autoattack_fast"],
                "epsilons": grid,
                "num_examples": args.aa_n,
                "num_images": 0,
            }
        ).run(target, ctx(sub))
        total = time.perf_counter() - t0
        pgd = out.curves["robust_accuracy.pgd_linf"].y[1:]
        aa = out.curves["robust_accuracy.autoattack_linf"].y[1:]
        aaf = out.curves["robust_accuracy.autoattack_fast_linf"].y[1:]
        never_above = all(a <= p for a, p in zip(aa, pgd))
        ok &= never_above
        secs = {
            lab: out.metrics[f"attack_seconds.{lab}"].value
            for lab in ("pgd_linf", "autoattack_linf", "autoattack_fast_linf")
        }
        print(
            f"  robust accuracy on {args.aa_n} images over epsilon "
            + ", ".join(f"{e:g}" for e in grid)
            + " (attack seconds over the grid):"
        )
        print("    PGD-20          " + "  ".join(f"{v:.3f}" for v in pgd) + f"   ({secs['pgd_linf']:.1f} s)")
        print(
            "    AutoAttack ref  "
            + "  ".join(f"{v:.3f}" for v in aa)
            + f"   ({secs['autoattack_linf']:.1f} s)"
            + f"   -> <= PGD everywhere: {'yes' if never_above else 'NO'}"
        )
        print(
            "    AutoAttack fast " + "  ".join(f"{v:.3f}" for v in aaf) + f"   ({secs['autoattack_fast_linf']:.1f} s)"
        )
        large = out.tables["sanity"].get("large_budget")
        if large:
            print(
                f"    large-budget check: PGD-50 at Linf {large['epsilon']:g} leaves {large['robust_accuracy']:.3f} "
                f"(chance {large['chance']:.3f}) in {large['seconds']:.2f} s; whole run {total:.1f} s"
            )
        flags = [f.title for f in out.findings]
        print(f"    sanity findings: {flags or 'none'}\n")

    print(f"{'model':<5} {'attack':<11} {'fmaudit img/s':>14} {'direct img/s':>13} {'overhead':>9} {'in-run':>8}")
    for key, title, o, d, ov, inner in rows:
        print(f"{key:<5} {title:<11} {o:14.1f} {d:13.1f} {100 * ov:+8.1f}% {100 * inner:+7.1f}%")
    worst = max(r[4] for r in rows) if rows else 0.0
    worst_in = max(r[5] for r in rows) if rows else 0.0
    print(
        f"\nworst overhead {100 * worst:+.1f}% side by side, {100 * worst_in:+.1f}% in-run (goal < 10%); same robust "
        f"accuracy as direct calls and AutoAttack <= PGD: {'yes' if ok else 'NO'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
