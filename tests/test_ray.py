"""The Ray executor on a local Ray instance (`ray.init(num_cpus=2)`, shared by this module): a recipe
with reference models reports the same numbers and writes the same cache on Ray as locally; units of a
wave run as tasks and their products come back; a killed task is retried; a task that keeps dying is
reported as that unit's error while the others complete. Skipped when Ray is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fmaudit[ray]')")

import ray_helpers  # noqa: E402

from fmaudit.executor import NotSendable, TaskFailed, map_sharded  # noqa: E402
from fmaudit.ray_executor import RayExecutor  # noqa: E402
from fmaudit.testing import tiny_text_recipe  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module. Workers find tests/ and the test plugin on PYTHONPATH (as
    plugins are installed on every node of a real cluster) and start importing torch / transformers at
    once, while the driver does its local reference run."""
    if ray.is_initialized():
        ray.shutdown()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(HERE / "plugin_pkg"), old) if p)
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    warm = ray.remote(ray_helpers.warm_up)
    warming = [warm.options(num_cpus=1).remote(i) for i in range(2)]
    yield warming
    ray.shutdown()


@pytest.fixture()
def one_thread():
    """Local runs with one torch thread, as in a 1-CPU Ray task: same float reduction order."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _values(result) -> dict[str, float | None]:
    return {k: m.value for k, m in result.metrics.items()}


def _cache_entries(cache: Path, kind: str) -> dict[str, Path]:
    return {p.name: p for p in (cache / kind).iterdir()} if (cache / kind).exists() else {}


# -- a recipe with reference models: same report and cache on Ray as locally ------------------------------


def test_reference_models_on_ray_match_local(ray_cluster, tiny_bert_dir, sentiment_csv, tmp_path, one_thread):
    from safetensors.torch import load_file

    from fmaudit.recipe import load_recipe
    from fmaudit.runner import run_recipe

    audit = {
        "use": "privacy.membership",
        "target": "bert",
        "params": {"attacks": ["loss", "rmia", "lira_offline"], "reference_models": 2, "bootstrap": 50},
    }
    local = run_recipe(
        tiny_text_recipe(
            tiny_bert_dir, sentiment_csv, tmp_path / "local", audits=[audit], cache_dir=str(tmp_path / "cache-local")
        )
    )
    ray.get(ray_cluster)  # workers ready (imports done while the local run trained)
    recipe = tiny_text_recipe(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path / "ray",
        audits=[audit],
        cache_dir=str(tmp_path / "cache-ray"),
        executor={"kind": "ray", "max_retries": 1},
    )
    on_ray = run_recipe(recipe)

    (lr,), (rr,) = local.audits, on_ray.audits
    assert lr.status == rr.status == "ok", (lr.error, rr.error)
    # where it ran is not part of what it computes: the recipe hash ignores the executor
    assert on_ray.recipe_sha256 == load_recipe({k: v for k, v in recipe.items() if k != "executor"}).recipe.sha256
    lv, rv = _values(lr), _values(rr)
    assert set(lv) == set(rv) and {"rmia.auc", "lira_offline.auc", "loss.auc"} <= set(lv)
    for k in lv:
        if k == "reference_cost_ratio":  # a timing
            continue
        assert (rv[k] is None and lv[k] is None) or rv[k] == pytest.approx(lv[k], rel=1e-6, abs=1e-9), k
    for name in lr.curves:
        assert np.allclose(rr.curves[name].y, lr.curves[name].y, atol=1e-9), name
    lref, rref = lr.tables["reference_models"], rr.tables["reference_models"]
    assert [m["cache_key"] for m in rref["models"]] == [m["cache_key"] for m in lref["models"]]
    assert not any(m["cache_hit"] for m in rref["models"])
    assert rref["base_weights_sha256"] == lref["base_weights_sha256"]
    # the reference models really trained in Ray workers, and wrote the same cache entries there
    lc, rc = _cache_entries(tmp_path / "cache-local", "reference"), _cache_entries(tmp_path / "cache-ray", "reference")
    assert len(lc) == 2 and set(lc) == set(rc)
    for key in lc:
        a, b = load_file(lc[key] / "weights.safetensors"), load_file(rc[key] / "weights.safetensors")
        assert set(a) == set(b) and all(np.allclose(a[n].numpy(), b[n].numpy(), atol=1e-6) for n in a)
    assert on_ray.targets["bert"].weights_sha256 == local.targets["bert"].weights_sha256

    # a second run on Ray reuses the cache its workers wrote
    again = run_recipe(recipe)
    assert all(m["cache_hit"] for m in again.audits[0].tables["reference_models"]["models"])
    assert again.audits[0].metrics["rmia.auc"].value == pytest.approx(lv["rmia.auc"])


# -- audits of one wave as tasks: products come back, a dying unit is only its own error --------------------


@pytest.fixture()
def crash_module(test_modules):
    from fmaudit.registry import registry

    registry.register(ray_helpers.CrashWorker)
    yield ray_helpers.CrashWorker
    registry.unregister(ray_helpers.CrashWorker.name)


def _digits_recipe(tmp_path: Path, **kw) -> dict:
    return {
        "version": 1,
        "name": "wave",
        "seed": 0,
        "output_dir": str(tmp_path / "reports"),
        "cache_dir": str(tmp_path / "cache"),
        "data": {"digits": {"source": "bundled:digits", "limit": 200}},
        "targets": {
            "cnn": {
                "model": "bundled:digits-cnn",
                "finetune": {"data": "digits", "epochs": 1, "batch_size": 32, "lr": 1e-3},
            }
        },
        **kw,
    }


def test_cli_executor_flag_runs_on_ray(ray_cluster, write_recipe, tmp_path):
    from typer.testing import CliRunner

    from fmaudit.cli import app

    path = write_recipe(
        _digits_recipe(tmp_path, audits=[{"use": "utility", "target": "cnn"}, {"use": "utility", "target": "cnn"}])
    )
    res = CliRunner().invoke(app, ["run", str(path), "-q", "--executor", "ray"])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "reports").iterdir()
    first = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])
    assert first["executor"] == "ray"


def test_wave_units_run_as_tasks_and_a_dying_unit_is_its_own_error(ray_cluster, crash_module, tmp_path, one_thread):
    from fmaudit.run_report import EXIT_MODULE_ERROR
    from fmaudit.runner import run_recipe

    audits = [
        {"use": "test.produce_copy", "target": "cnn", "produces": "cnn2"},
        {"use": "utility", "target": "cnn"},
        {"use": "test.crash_worker", "target": "cnn"},
        {"use": "utility", "target": "cnn2"},
    ]  # next wave: needs the product of a remote unit
    local = run_recipe(_digits_recipe(tmp_path / "local", audits=[a for a in audits if "crash" not in a["use"]]))
    report = run_recipe(_digits_recipe(tmp_path / "ray", audits=audits, executor={"kind": "ray", "max_retries": 1}))

    by = {(r.module, r.target): r for r in report.audits}
    crashed = by[("test.crash_worker", "cnn")]
    assert crashed.status == "error" and crashed.error.type == "WorkerCrashed"
    assert "2 attempt" in crashed.error.message and crashed.error.hint
    for key in (("test.produce_copy", "cnn"), ("utility", "cnn"), ("utility", "cnn2")):
        assert by[key].status == "ok", by[key].error
    assert report.exit_code == EXIT_MODULE_ERROR
    lby = {(r.module, r.target): r for r in local.audits}
    for key in (("utility", "cnn"), ("utility", "cnn2")):
        assert _values(by[key]) == pytest.approx(_values(lby[key]))
    # the produced target came back from its worker, with its provenance
    assert report.targets["cnn2"].produced_by == "0:test.produce_copy@cnn"
    assert report.targets["cnn2"].weights_sha256 == report.targets["cnn"].weights_sha256
    (run_dir,) = (tmp_path / "ray" / "reports").iterdir()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["entry_type"] for e in events]
    assert kinds.count("audit_started") == kinds.count("audit_result") == 4
    assert events[0]["executor"] == "ray"


def test_a_wave_that_cannot_travel_runs_in_the_driver(ray_cluster, tmp_path):
    from fmaudit.runner import run_recipe

    recipe = _digits_recipe(
        tmp_path,
        audits=[{"use": "utility", "target": "cnn"}, {"use": "utility", "target": "cnn"}],
        executor={"kind": "ray"},
    )
    recipe["targets"]["cnn"].update(model="python:ray_helpers:locked_cnn", task="image-classification")
    report = run_recipe(recipe)
    assert [r.status for r in report.audits] == ["ok", "ok"], [r.error for r in report.audits]
    assert _values(report.audits[0]) == _values(report.audits[1])


# -- the executor itself ---------------------------------------------------------------------------------


def test_nested_maps_and_shards(ray_cluster):
    ex = RayExecutor(max_retries=0)
    assert ex.map(ray_helpers.Nested(ex), [2, 3]) == [[0, 1], [0, 1, 4]]
    assert map_sharded(ex, lambda chunk: [x * 2 for x in chunk], list(range(7)), shard_size=3) == [
        x * 2 for x in range(7)
    ]
    assert ex.map(ray_helpers.square, []) == []


def test_arrays_arrive_writable_as_in_a_local_run(ray_cluster):
    out = RayExecutor().map(ray_helpers.WriteInPlace(np.zeros(100_000)), [1, 2])
    assert [float(a[0]) for a in out] == [1.0, 2.0] and all(a.flags.writeable for a in out)


def test_unpicklable_work_is_a_clear_error(ray_cluster):
    import threading

    lock = threading.Lock()
    with pytest.raises(NotSendable, match="LocalOnly"):
        RayExecutor().map(lambda x: (lock, x), [1])


def test_a_killed_task_is_retried_and_succeeds(ray_cluster, tmp_path):
    out = RayExecutor(max_retries=2).map(ray_helpers.CrashOnce(str(tmp_path)), [1, 2])
    assert out == [10, 20]
    for x in (1, 2):
        pids = (tmp_path / f"attempts-{x}").read_text().split()
        assert len(pids) == 2 and pids[0] != pids[1]  # the first worker died; a new one finished it


def test_a_task_that_keeps_dying_is_that_items_error(ray_cluster, tmp_path):
    ex = RayExecutor(max_retries=1)
    failed = []
    out = ex.map(
        ray_helpers.CrashOn(str(tmp_path), bad=2),
        [1, 2, 3],
        on_error=lambda item, exc: failed.append((item, exc)) or -1,
    )
    assert out == [2, -1, 4]
    ((item, exc),) = failed
    assert item == 2 and isinstance(exc, TaskFailed) and exc.crashed and exc.attempts == 2
    assert exc.error_type == "WorkerCrashed"
    assert len((tmp_path / "attempts-2").read_text().split()) == 2  # tried, retried once, given up
    # without on_error: the failure is raised, after the other items ran
    (tmp_path / "again").mkdir()
    with pytest.raises(TaskFailed, match="bad item 0") as info:
        ex.map(ray_helpers.RaiseOn(str(tmp_path / "again"), bad=0), [0, 1, 2])
    assert info.value.index == 0 and isinstance(info.value.cause, ValueError)
    assert (tmp_path / "again" / "attempts-1").exists() and (tmp_path / "again" / "attempts-2").exists()


def test_an_exception_is_reported_not_retried(ray_cluster, tmp_path):
    out = RayExecutor(max_retries=3).map(
        ray_helpers.RaiseOn(str(tmp_path), bad=1), [0, 1], on_error=lambda item, exc: exc
    )
    assert out[0] == 0
    exc = out[1]
    assert isinstance(exc, TaskFailed) and isinstance(exc.cause, ValueError) and not exc.crashed
    assert exc.error_type == "ValueError" and "bad item 1" in str(exc)
    assert len((tmp_path / "attempts-1").read_text().split()) == 1
