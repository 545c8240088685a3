"""The known-answer suite, printed: planted scenarios whose right answer is known, one line each with the
measured numbers, then a summary line.

    .venv/bin/python benchmarks/known_answers.py                # every scenario, seed 0
    .venv/bin/python benchmarks/known_answers.py --seeds 5      # the seeded scenarios over seeds 0..4
    .venv/bin/python benchmarks/known_answers.py --only membership_null

Scenarios (fmaudit/known_answers.py):
- membership: null            a target scored on two sets it never saw: every AUC interval covers 0.5,
                              the calibrated headline stays at or below its permutation null
- membership: planted leak    a memorising MLP: strongest attack AUC >= 0.8, TPR@1%FPR >= 5%;
                              its DP twin at epsilon 1 within its null
- dp: canary consistency      canary epsilon_lb <= accountant epsilon on an honest DP run; a
                              mis-accounted run (noise off, epsilon claimed) raises the critical finding
- seeds: split vs references  reference halves independent of the member split, for every seed
- seeds: same seed twice      identical metrics
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import warnings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1, help="run seeded scenarios for seeds 0..N-1")
    ap.add_argument("--only", nargs="*", help="scenario names (default: all)")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)  # the scenarios' numbers are the output here
    from fmaudit.known_answers import SCENARIOS

    names = args.only or list(SCENARIOS)
    results = []
    for name in names:
        fn = SCENARIOS[name]
        seeded = "seed" in inspect.signature(fn).parameters
        for seed in range(args.seeds if seeded else 1):
            r = fn(seed=seed) if seeded else fn()
            r.name = f"{r.name} (seed {seed})" if seeded and args.seeds > 1 else r.name
            results.append(r)
            print(r.line(), flush=True)
    bad = [r.name for r in results if not r.passed]
    print(
        f"known answers: {len(results) - len(bad)}/{len(results)} scenarios right"
        + (f"; wrong: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
