"""Time the quickstart cold (empty fine-tune cache) and warm (cached), as a user runs it.

    .venv/bin/python benchmarks/quickstart_time.py [--recipe recipes/quickstart.yaml] [--warm-runs 2]

Each run is a fresh `fmaudit run` process, so imports and model loading are included. Prints both
times, the warm median and the cold / warm ratio, against the goals (cold <= 300 s, warm <= 90 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(recipe: Path, cache: Path, out: Path) -> tuple[float, int]:
    env = dict(os.environ, FMAUDIT_CACHE_DIR=str(cache))
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "fmaudit.cli", "run", str(recipe), "-q", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t
    if res.returncode not in (0, 1):
        print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
    return dt, res.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    ap.add_argument("--warm-runs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "reports"
        cold, rc = run_once(args.recipe, cache, out)
        print(f"cold run: {cold:7.1f} s (exit {rc})", flush=True)
        warm = []
        for i in range(args.warm_runs):
            dt, rc = run_once(args.recipe, cache, out)
            warm.append(dt)
            print(f"warm run {i + 1}: {dt:6.1f} s (exit {rc})", flush=True)
    med = statistics.median(warm)
    print(
        f"\nquickstart cold {cold:.1f} s (goal <= 300 s) | warm median {med:.1f} s (goal <= 90 s) | "
        f"cold/warm {cold / med:.1f}x | cpus {os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
