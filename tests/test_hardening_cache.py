"""The shared fine-tune cache: an inter-process lock per entry (two runs at once never interleave
check / train / write), atomic publishing, and a damaged entry that is rebuilt instead of loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fmaudit.cache_lock import CacheLockTimeout, entry_lock, publish_dir

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fmaudit.cache_lock import entry_lock

    root, use_lock = Path(sys.argv[1]), sys.argv[2] == "1"
    counter = root / "counter.txt"
    (root / f"ready-{sys.argv[3]}").touch()
    while len(list(root.glob("ready-*"))) < 2:  # start the read-modify-write together
        time.sleep(0.01)

    def bump():
        n = int(counter.read_text()) if counter.exists() else 0
        time.sleep(0.4)  # "training"
        counter.write_text(str(n + 1))

    if use_lock:
        with entry_lock(root, "entry"):
            bump()
    else:
        bump()
""")


def _race(tmp_path: Path, use_lock: bool) -> int:
    root = tmp_path / ("locked" if use_lock else "unlocked")
    root.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), "1" if use_lock else "0", str(i)]) for i in range(2)
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    return int((root / "counter.txt").read_text())


def test_two_processes_serialize_on_the_entry_lock(tmp_path):
    assert _race(tmp_path, use_lock=False) == 1  # the race the lock exists for: one update is lost
    assert _race(tmp_path, use_lock=True) == 2


def test_lock_timeout_and_release(tmp_path):
    with entry_lock(tmp_path, "k"):
        code = (
            "import sys\nfrom fmaudit.cache_lock import entry_lock, CacheLockTimeout\n"
            "try:\n    with entry_lock(sys.argv[1], 'k', timeout=0.3): pass\n"
            "except CacheLockTimeout as e:\n    print('timeout', e); sys.exit(7)\n"
        )
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 7 and "locked by another process" in res.stdout
    # Released on exit: the next holder gets it at once.
    with entry_lock(tmp_path, "k", timeout=1.0):
        pass
    assert time.perf_counter() - t0 < 30
    with pytest.raises(CacheLockTimeout):
        with entry_lock(tmp_path, "k2"):
            # flock locks are per open file description: a second open in this process also waits.
            with entry_lock(tmp_path, "k2", timeout=0.2):
                pass


def test_publish_dir_replaces_an_entry_whole(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "weights").write_text("old")
    tmp = tmp_path / ".tmp"
    tmp.mkdir()
    (tmp / "weights").write_text("new")
    publish_dir(tmp, final)
    assert (final / "weights").read_text() == "new" and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_truncated_cache_entry_is_rebuilt_not_loaded(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.runner import run_recipe
    from fmaudit.testing import tiny_text_recipe

    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, cache_dir=str(tmp_path / "cache"))
    first = run_recipe(recipe)
    (weights,) = (tmp_path / "cache").rglob("weights.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    second = run_recipe(recipe)
    assert second.targets["bert"].cache_hit is False  # detected, retrained
    assert second.targets["bert"].weights_sha256 == first.targets["bert"].weights_sha256
    assert weights.stat().st_size == len(data)  # and the entry is whole again
    assert run_recipe(recipe).targets["bert"].cache_hit is True


def test_two_concurrent_runs_share_one_fine_tune_and_keep_separate_run_folders(tmp_path):
    """Two `fmaudit run` processes on one recipe and cache, started together: one trains, the other waits on
    the entry lock and loads the result (without the lock both train); both reports are complete and in
    their own folders, even when started in the same second."""
    import json
    import os

    import yaml

    recipe = {
        "version": 1,
        "name": "conc",
        "output_dir": str(tmp_path / "reports"),
        "cache_dir": str(tmp_path / "cache"),
        "data": {"digits": {"source": "bundled:digits", "limit": 600}},
        "targets": {
            "cnn": {
                "model": "bundled:digits-cnn",
                "finetune": {"data": "digits", "epochs": 60, "batch_size": 32, "lr": 3.0e-3},
            }
        },
        "audits": [{"use": "utility", "target": "cnn"}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fmaudit.cli", "run", str(path), "-q"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted((tmp_path / "reports").iterdir())
    assert len(folders) == 2
    reports = [json.loads((d / "report.json").read_text()) for d in folders]
    hits = sorted(r["targets"]["cnn"]["cache_hit"] for r in reports)
    assert hits == [False, True]
    assert len({r["targets"]["cnn"]["weights_sha256"] for r in reports}) == 1
    assert len(list((tmp_path / "cache").rglob("weights.safetensors"))) == 1


def test_finetune_cached_serializes_builders_of_one_entry_and_publishes_atomically(tmp_path):
    """Every fine-tune that goes through the cache (recipe targets, reference models, DP and canary runs)
    holds the entry's lock while it checks, trains and writes: a second builder waits, then loads."""
    import threading

    import numpy as np

    from fmaudit.data import Dataset, Split
    from fmaudit.training import TrainConfig, TrainStats, finetune_cached

    class Tiny:
        """The smallest target finetune_cached can work with."""

        task = "text-classification"
        device = "cpu"

        def __init__(self):
            import torch

            torch.manual_seed(0)
            self.model = torch.nn.Linear(2, 2)

        def weights_sha256(self):
            import hashlib

            return hashlib.sha256(
                b"".join(v.detach().numpy().tobytes() for v in self.model.state_dict().values())
            ).hexdigest()

        def weights_changed(self):
            pass

    ds = Dataset("d", "d", "text", ["a", "b", "c", "d"], np.array([0, 1, 0, 1]), texts=["a", "b", "c", "d"])
    split = Split(ds, np.array([0, 1]), np.array([2, 3]), 0, 0.5)
    calls, inside, overlap = [], [0], []
    lock = threading.Lock()

    def train_fn(target, data, config, progress=None, label=""):
        import time

        import torch

        with lock:
            inside[0] += 1
            overlap.append(inside[0])
        calls.append(1)
        time.sleep(0.3)
        with torch.no_grad():
            target.model.weight.add_(1.0)
        with lock:
            inside[0] -= 1
        return TrainStats(steps=1, examples_seen=2, duration_s=0.3)

    results = []
    targets = [Tiny() for _ in range(3)]  # built here: torch's global seed is not thread-safe

    def build(target):
        results.append(finetune_cached(target, split, TrainConfig(seed=0), cache_dir=tmp_path, train_fn=train_fn))

    threads = [threading.Thread(target=build, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and max(overlap) == 1  # trained once; nobody trained alongside
    assert sorted(hit for _s, hit, _k in results) == [False, True, True]
    assert not [p for p in (tmp_path / "finetune").iterdir() if p.name.startswith(".") and p.is_dir()]
