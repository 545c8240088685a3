"""The command line: help, list, schema, run / report exit codes."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from conftest import tiny_text_recipe
from fmaudit.cli import app

runner = CliRunner()


def test_help_lists_commands_and_exit_codes():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for word in ("run", "validate", "list", "schema", "report", "Exit codes"):
        assert word in res.output


def test_list_shows_utility():
    res = runner.invoke(app, ["list", "-v"])
    assert res.exit_code == 0 and "utility" in res.output and "bootstrap" in res.output


def test_schema_commands_print_json():
    for which in ("recipe", "report"):
        res = runner.invoke(app, ["schema", which])
        assert res.exit_code == 0
        assert "properties" in json.loads(res.output)
    assert runner.invoke(app, ["schema", "nope"]).exit_code == 2


def test_run_and_report_exit_codes(tiny_bert_dir, sentiment_csv, tmp_path):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["audits"][0]["fail_if"] = {"accuracy": {"ge": 0.0}}  # always fails
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 1, res.output
    assert "gate(s) failed" in res.output
    (run_dir,) = (tmp_path / "reports").iterdir()
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0 and "utility" in res.output
    # the verdict per area (fmaudit.verdict) sits under the table; the failed gate raises utility's level
    verdicts = res.output.split("Verdict per area", 1)[1].split("gate(s) failed")[0]
    assert "utility" in verdicts.lower() and "privacy" in verdicts.lower()
    assert all(len(line) <= 80 for line in verdicts.splitlines())
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code == 2
    # --resume continues the latest run of this recipe
    res = runner.invoke(app, ["run", str(path), "-q", "--resume"])
    assert res.exit_code == 1
    assert len(list((tmp_path / "reports").iterdir())) == 1


def test_bad_recipe_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nname: x\ntargets: {}\naudits: []\n")
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2


def test_preparation_error_exit_2(tiny_bert_dir, sentiment_csv, tmp_path):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["data"]["sents"]["label_column"] = "lbl"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
