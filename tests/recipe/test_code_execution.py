"""Issue 19 item 7: `python:` targets run code named in the recipe. `validate` and the report say so; the
code may come only from the recipe's folder, installed packages, or a folder given with --allow-code-from."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fmaudit.cli import app
from fmaudit.report import load_report

cli = CliRunner()

MODULE = """
from pathlib import Path

import torch
from torch import nn

Path(__file__).with_name(__name__ + ".IMPORTED").write_text("imported")  # proof that the module ran


def make(num_labels=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_labels))
"""


def _recipe(folder: Path, model: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "version": 1,
        "name": "code",
        "output_dir": str(folder / "reports"),
        "data": {"digits": {"source": "bundled:digits", "limit": 60}},
        "targets": {"net": {"model": model, "task": "image-classification"}},
        "audits": [{"use": "utility", "target": "net", "data": "digits"}],
    }
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _module(folder: Path, name: str, monkeypatch) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(MODULE)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return path


def test_code_under_the_recipe_folder_runs_and_is_recorded(tmp_path, monkeypatch):
    name = "fm_code_here"
    mod = _module(tmp_path / "recipe", name, monkeypatch)  # next to the recipe, not on sys.path
    path = _recipe(tmp_path / "recipe", f"python:{name}:make")
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "this recipe runs code" in res.output and f"python:{name}:make" in res.output
    assert str(mod.resolve()) in "".join(res.output.split())
    assert not (mod.parent / f"{name}.IMPORTED").exists()  # validate imports nothing
    res = cli.invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert (mod.parent / f"{name}.IMPORTED").exists()
    (run_dir,) = (tmp_path / "recipe" / "reports").iterdir()
    code = load_report(run_dir).targets["net"].code
    assert code is not None and code.ref == f"python:{name}:make" and code.factory == "make"
    assert code.file == str(mod.resolve())
    assert code.sha256 == hashlib.sha256(mod.read_bytes()).hexdigest()
    assert code.allowed_by.startswith("recipe folder")
    assert str(tmp_path / "recipe") not in sys.path  # the folder was on the path only for the import


def test_code_from_elsewhere_is_refused_before_anything_runs(tmp_path, monkeypatch):
    name = "fm_code_elsewhere"
    mod = _module(tmp_path / "elsewhere", name, monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))  # e.g. PYTHONPATH=/tmp/...
    path = _recipe(tmp_path / "recipe", f"python:{name}:make")
    for cmd in (["validate", str(path)], ["run", str(path), "-q"]):
        res = cli.invoke(app, cmd)
        assert res.exit_code == 2, (cmd, res.output, res.exception)
        flat = "".join(res.output.split())  # rich wraps long paths anywhere
        assert "--allow-code-from" in flat and str(mod.resolve()) in flat and "outsidetherecipe'sfolder" in flat
        assert "Traceback" not in res.output
    assert not (mod.parent / f"{name}.IMPORTED").exists()  # nothing ran
    assert not (tmp_path / "recipe" / "reports").exists()  # no run folder


def test_allow_code_from_flag_allows_it(tmp_path, monkeypatch):
    name = "fm_code_flagged"
    mod = _module(tmp_path / "elsewhere", name, monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    path = _recipe(tmp_path / "recipe", f"python:{name}:make")
    flag = ["--allow-code-from", str(tmp_path / "elsewhere")]
    res = cli.invoke(app, ["validate", str(path), *flag])
    assert res.exit_code == 0, res.output
    assert "this recipe runs code" in res.output and "--allow-code-from" in res.output
    res = cli.invoke(app, ["run", str(path), "-q", *flag])
    assert res.exit_code == 0, (res.output, res.exception)
    (run_dir,) = (tmp_path / "recipe" / "reports").iterdir()
    code = load_report(run_dir).targets["net"].code
    assert (
        code.file == str(mod.resolve()) and code.allowed_by == f"--allow-code-from {(tmp_path / 'elsewhere').resolve()}"
    )
    assert code.sha256 == hashlib.sha256(mod.read_bytes()).hexdigest()


def test_installed_package_is_allowed(tmp_path):
    path = _recipe(tmp_path / "recipe", "python:fmaudit.targets.vision:digits_cnn")
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "installed package" in res.output and "fmaudit/targets/vision.py" in "".join(res.output.split())


def test_load_target_refuses_too(tmp_path, monkeypatch):
    """Defence in depth: the loader checks again, whoever calls it (an API user, a Ray worker)."""
    from fmaudit.targets import TargetError, load_target

    name = "fm_code_api"
    mod = _module(tmp_path / "elsewhere", name, monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    (tmp_path / "recipe").mkdir()
    with pytest.raises(TargetError, match="--allow-code-from"):
        load_target(model=f"python:{name}:make", task="image-classification", base_dir=tmp_path / "recipe")
    assert not (mod.parent / f"{name}.IMPORTED").exists()
    t = load_target(
        model=f"python:{name}:make",
        task="image-classification",
        base_dir=tmp_path / "recipe",
        allow_code_from=[tmp_path / "elsewhere"],
    )
    assert t.code_info["file"] == str(mod.resolve())


def test_unresolvable_module_is_a_recipe_problem(tmp_path):
    path = _recipe(tmp_path / "recipe", "python:fm_no_such_module_xyz:make")
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "cannot find module" in res.output


def test_trust_remote_code_is_said_too(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.testing import tiny_text_recipe

    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "runs code" not in res.output  # off by default: nothing runs
    recipe["targets"]["bert"]["trust_remote_code"] = True
    path.write_text(yaml.safe_dump(recipe))
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "this recipe runs code" in res.output and "trust_remote_code: true" in res.output
