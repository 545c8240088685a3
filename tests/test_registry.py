"""One registry: lazy built-ins, entry-point plugins, collisions, near-miss suggestions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fmaudit.registry import Registry, RegistryError, registry


def test_builtins_are_lazy():
    code = (
        "import sys\nfrom fmaudit.registry import registry\nnames = registry.names()\n"
        "assert 'utility' in names\nassert 'fmaudit.audits.utility' not in sys.modules\n"
        "registry.get('utility')\nassert 'fmaudit.audits.utility' in sys.modules\n"
        "assert 'torch' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_unknown_name_suggests():
    with pytest.raises(RegistryError, match="did you mean 'utility'"):
        registry.get("utilty")


def test_entry_point_discovery(plugin_dist, monkeypatch):
    root = plugin_dist
    monkeypatch.syspath_prepend(str(root))
    reg = Registry()
    assert "thirdparty.label_balance" in reg.names()
    assert reg.origin("thirdparty.label_balance") == "fmaudit-testplugin"
    cls = reg.get("thirdparty.label_balance")
    assert cls.category == "utility"


def test_entry_point_collision_is_an_error(plugin_dist, monkeypatch):
    root = plugin_dist
    ep = root / "fmaudit_testplugin-0.1.dist-info" / "entry_points.txt"
    ep.write_text("[fmaudit.audits]\nutility = fmaudit_testplugin:LabelBalance\n")
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(RegistryError, match="declared twice"):
        Registry().names()


def test_register_and_wrong_name(test_modules):
    reg = Registry()
    reg.register(test_modules.AlwaysFails)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(test_modules.AlwaysFails)
    reg2 = Registry(builtins={"other.name": "fmaudit_testplugin:AlwaysFails"})
    with pytest.raises(RegistryError, match="declares name"):
        reg2.get("other.name")
    reg3 = Registry(builtins={"x": "fmaudit_testplugin:nothing_here"})
    with pytest.raises(RegistryError, match="failed to import"):
        reg3.get("x")


def test_plugin_runs_from_cli_via_entry_point(tmp_path, tiny_bert_dir, sentiment_csv, plugin_dist):
    """A pip-style plugin (entry point) is usable in a recipe run from the command line."""
    import os

    import yaml

    from fmaudit.testing import tiny_text_recipe

    root = plugin_dist
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["audits"] = [
        {"use": "thirdparty.label_balance", "target": "bert", "fail_if": {"majority_fraction": {"gt": 0.9}}}
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, PYTHONPATH=str(root))
    res = subprocess.run(
        [sys.executable, "-m", "fmaudit.cli", "run", str(path), "-q"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr + res.stdout
    from fmaudit.report import load_report

    (run,) = (tmp_path / "reports").iterdir()
    rep = load_report(run)
    assert rep.audits[0].metrics["majority_fraction"].value == pytest.approx(0.5)
