"""Choosing the executor without starting Ray: the recipe block, the --executor flag, and the message
(exit 2, naming the `fmaudit[ray]` extra) when Ray is not installed. Runs with or without Ray."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from fmaudit.cli import app
from fmaudit.executor import ExecutorUnavailable, LocalExecutor, LocalOnly, TaskFailed, map_sharded
from fmaudit.executor_factory import make_executor, ray_available
from fmaudit.recipe import RecipeError, load_recipe
from fmaudit.testing import tiny_text_recipe


@pytest.fixture()
def no_ray(monkeypatch):
    """Ray made unimportable, as on an install without the extra."""
    monkeypatch.setitem(sys.modules, "ray", None)
    assert not ray_available()


@pytest.fixture()
def tiny_bert_dir(tmp_path):
    """A folder that passes validation; nothing here loads a model (the executor is chosen first)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # a valid, empty header
    (d / "vocab.txt").write_text("[PAD]\n")  # a tokenizer file (validation refuses checkpoints without one)
    return d


def _recipe(tmp_path, tiny_bert_dir, sentiment_csv, **kw):
    return tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, **kw)


def test_missing_extra_message_from_recipe_and_flag(no_ray, write_recipe, tmp_path, tiny_bert_dir, sentiment_csv):
    runner = CliRunner()
    ray_recipe = write_recipe(_recipe(tmp_path, tiny_bert_dir, sentiment_csv, executor={"kind": "ray"}))
    res = runner.invoke(app, ["run", str(ray_recipe), "-q"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "fmaudit[ray]" in out and "--executor local" in out
    assert not (tmp_path / "reports").exists()  # nothing ran, nothing written

    local_recipe = write_recipe(_recipe(tmp_path, tiny_bert_dir, sentiment_csv), name="local.yaml")
    res = runner.invoke(app, ["run", str(local_recipe), "-q", "--executor", "ray"])
    assert res.exit_code == 2 and "fmaudit[ray]" in " ".join(res.output.split())
    res = runner.invoke(app, ["run", str(local_recipe), "-q", "--executor", "dask"])
    assert res.exit_code == 2 and "local, ray" in res.output
    # validating needs no Ray: where a recipe runs is checked when it runs
    assert runner.invoke(app, ["validate", str(ray_recipe)]).exit_code == 0
    with pytest.raises(ExecutorUnavailable, match=r"fmaudit\[ray\]"):
        make_executor("ray")


def test_executor_block_is_validated(tmp_path, tiny_bert_dir, sentiment_csv):
    ok = load_recipe(
        _recipe(
            tmp_path,
            tiny_bert_dir,
            sentiment_csv,
            executor={
                "kind": "ray",
                "address": "ray://head:10001",
                "num_gpus_per_task": 0.5,
                "num_cpus_per_task": 2,
                "max_retries": 0,
            },
        )
    ).recipe
    assert ok.executor.kind == "ray" and ok.executor.num_gpus_per_task == 0.5
    plain = load_recipe(_recipe(tmp_path, tiny_bert_dir, sentiment_csv)).recipe
    assert ok.sha256 == plain.sha256  # where it runs is not part of what it computes
    for bad, path in [
        ({"kind": "spark"}, "executor.kind"),
        ({"kind": "ray", "max_retries": -1}, "executor.max_retries"),
        ({"kind": "ray", "num_cpus_per_task": 0}, "executor.num_cpus_per_task"),
        ({"kind": "local", "address": "auto"}, "executor"),
        ({"kind": "ray", "adress": "auto"}, "executor.adress"),
    ]:
        with pytest.raises(RecipeError) as info:
            load_recipe(_recipe(tmp_path, tiny_bert_dir, sentiment_csv, executor=bad))
        assert [p.path for p in info.value.problems] == [path], bad
    with pytest.raises(RecipeError, match="did you mean 'address'"):
        load_recipe(_recipe(tmp_path, tiny_bert_dir, sentiment_csv, executor={"kind": "ray", "adress": "auto"}))


def test_local_executor_contract():
    ex = LocalExecutor()
    assert ex.map(lambda x: x + 1, [1, 2]) == [2, 3]
    with pytest.raises(ZeroDivisionError):  # without on_error a failure propagates
        ex.map(lambda x: 1 // x, [1, 0])
    out = ex.map(lambda x: 1 // x, [1, 0, 2], on_error=lambda item, exc: (item, exc))
    assert out[0] == 1 and out[2] == 0
    item, exc = out[1]
    assert item == 0 and isinstance(exc, TaskFailed) and exc.error_type == "ZeroDivisionError" and not exc.crashed
    assert map_sharded(ex, lambda chunk: [c * 2 for c in chunk], list(range(5)), shard_size=2) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="returned 1"):
        map_sharded(ex, lambda chunk: chunk[:1], [1, 2], shard_size=2)


def test_local_only_helpers_pickle_as_none():
    import pickle
    import threading

    lock = threading.Lock()
    wrapped = LocalOnly(lambda *a: lock)
    assert wrapped() is lock
    assert pickle.loads(pickle.dumps({"progress": wrapped}))["progress"] is None
