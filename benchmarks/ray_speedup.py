"""Speed-up of reference-model training on Ray: 1 worker of 1 CPU vs 2 workers of 1 CPU each.

    .venv/bin/python benchmarks/ray_speedup.py [--models 8] [--epochs 3] [--repeats 3]

Trains N reference models the way privacy.membership does (a copy of the base weights, a random half of
the population, `finetune_cached` into an empty cache, so nothing is a cache hit), through the
RayExecutor. One local Ray instance with 2 CPUs serves both settings, so they are measured side by side,
interleaved, in one run: every task holds 1 CPU (torch uses one thread), and in the 1-worker setting each
task also holds a custom resource of which there is only one unit, so one task runs at a time. Workers
are warmed up (imports done) before timing. Also timed: the same trainings in this process with one torch
thread (the local executor), which shows Ray's per-task overhead. Prints medians and the speed-up
(goal: >= 1.7x on a 2-core machine), and per measurement how many workers ran, how many tasks overlapped
and how many cores the tasks kept busy (CPU seconds / wall seconds), which tells whether other load on
the machine, rather than scheduling, limited the speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class TrainReference:
    """One reference model: the unit of work that membership inference maps over."""

    def __init__(self, base, population, masks, seeds, config, cache_dir: str):
        self.base, self.population, self.masks, self.seeds = base, population, masks, seeds
        self.config, self.cache_dir = config, cache_dir

    def __call__(self, r: int) -> tuple[float, float, float, int]:
        """(start, end) wall clock, CPU seconds used, worker pid."""
        import dataclasses

        from fmaudit.data import Split
        from fmaudit.training import finetune_cached

        start, cpu = time.time(), time.process_time()
        ref = self.base.copy(name=f"ref{r}")
        split = Split(self.population, np.nonzero(self.masks[r])[0], np.nonzero(~self.masks[r])[0], self.seeds[r], 0.5)
        cfg = dataclasses.replace(self.config, seed=self.seeds[r])
        _, hit, _ = finetune_cached(ref, split, cfg, cache_dir=Path(self.cache_dir), kind="reference")
        assert not hit
        return start, time.time(), time.process_time() - cpu, os.getpid()


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """Most tasks running at the same moment."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def warm(_: int) -> int:
    import torch  # noqa: F401

    import fmaudit.targets.vision  # noqa: F401
    import fmaudit.training  # noqa: F401

    time.sleep(1.0)  # hold the CPU so the two warm-up tasks land on two workers
    return os.getpid()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=8, help="reference models per measurement (N)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per reference model")
    ap.add_argument("--examples", type=int, default=1200, help="population size (digits images)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per setting (medians are reported)")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process baseline")
    args = ap.parse_args()

    try:
        import ray
    except ImportError:
        sys.exit("this benchmark needs Ray: pip install 'fmaudit[ray]'")
    import torch

    from fmaudit.data import load_digits
    from fmaudit.executor import LocalExecutor
    from fmaudit.privacy.membership.reference_models import paired_halves
    from fmaudit.ray_executor import RayExecutor
    from fmaudit.targets.vision import ImageClassifier, PixelClassifier, digits_cnn
    from fmaudit.training import TrainConfig

    torch.manual_seed(0)
    population = load_digits()
    population = population.subset(np.arange(min(args.examples, len(population))))
    base = ImageClassifier(
        name="cnn", model=PixelClassifier(digits_cnn(10)), source="benchmark", kind="torch-module", num_classes=10
    )
    masks = paired_halves(len(population), args.models, 0)
    seeds = [int(np.random.SeedSequence([0, r]).generate_state(1)[0]) for r in range(args.models)]
    config = TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3, trainable="all", seed=0)

    t = time.perf_counter()
    ray.init(num_cpus=2, resources={"serial_slot": 1}, include_dashboard=False, logging_level="WARNING")
    print(f"ray.init: {time.perf_counter() - t:.1f} s", flush=True)
    settings = {
        "ray, 1 worker x 1 CPU": RayExecutor(
            num_cpus_per_task=1, max_retries=0, task_options={"resources": {"serial_slot": 1}}
        ),
        "ray, 2 workers x 1 CPU": RayExecutor(num_cpus_per_task=1, max_retries=0),
    }
    t = time.perf_counter()
    pids = settings["ray, 2 workers x 1 CPU"].map(warm, [0, 1])
    print(f"warm-up of {len(set(pids))} worker(s): {time.perf_counter() - t:.1f} s", flush=True)
    if not args.no_local:
        settings["local, 1 thread"] = LocalExecutor()

    times: dict[str, list[float]] = {k: [] for k in settings}
    cores: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, ex in settings.items():
                job = TrainReference(base, population, masks, seeds, config, f"{tmp}/{rep}-{len(times[name])}-{name}")
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    t = time.perf_counter()
                    per_model = ex.map(job, list(range(args.models)))
                    dt = time.perf_counter() - t
                finally:
                    torch.set_num_threads(threads)
                times[name].append(dt)
                cpu = sum(m[2] for m in per_model)
                cores[name].append(cpu / dt)
                print(
                    f"  repeat {rep + 1}: {name:24s} {dt:7.2f} s wall; {len({m[3] for m in per_model})} worker(s), "
                    f"at most {max_overlap([(m[0], m[1]) for m in per_model])} at once; {cpu:6.2f} CPU-s "
                    f"= {cpu / dt:.2f} cores busy",
                    flush=True,
                )
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n{args.models} reference models (digits CNN, {len(population)} examples, {args.epochs} epoch(s) each), "
        f"median of {args.repeats}:"
    )
    for k in settings:
        print(
            f"  {k:24s} {med[k]:7.2f} s   ({med[k] / args.models:.2f} s per model; "
            f"{statistics.median(cores[k]):.2f} cores busy)"
        )
    one, two = med["ray, 1 worker x 1 CPU"], med["ray, 2 workers x 1 CPU"]
    speedup = one / two
    print(f"speed-up, 2 workers vs 1: {speedup:.2f}x (goal >= 1.7x){'' if speedup >= 1.7 else '  -- below goal'}")
    if "local, 1 thread" in med:
        print(f"Ray 1 worker / local in-process: {one / med['local, 1 thread']:.2f}x (scheduling + transfer overhead)")
    print(
        f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. Other processes on the "
        "machine distort these timings: 2 workers can only go ~2x faster when they get ~2 cores busy."
    )


if __name__ == "__main__":
    main()
