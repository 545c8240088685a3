"""The recipe validator: every problem, with its path and YAML line, before any model loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fmaudit.recipe import RecipeError, load_recipe
from fmaudit.tasks import TEXT_CLASSIFICATION

GOOD = """\
version: 1
name: demo
data:
  tweets: {source: bundled:tweets, limit: 100}
targets:
  minilm:
    model: bundled:minilm
    finetune: {data: tweets, epochs: 1}
audits:
  - use: utility
    target: minilm
    params: {bootstrap: 10}
    fail_if: {accuracy: {lt: 0.5}}
"""


def problems(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    return {pr.path: pr for pr in ei.value.problems}, ei.value


def test_good_recipe_loads(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    loaded = load_recipe(p)
    assert loaded.recipe.audits[0].target == ["minilm"]
    assert len(loaded.recipe.sha256) == 64


def test_quickstart_is_valid():
    from pathlib import Path

    load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")


def test_malformed_yaml_reports_line(tmp_path):
    probs, _ = problems(tmp_path, "version: 1\nname: x\ntargets: {a: [\n  b: c\n")
    (p,) = probs.values()
    assert "malformed YAML" in p.message and p.line is not None


def test_top_level_not_a_mapping(tmp_path):
    probs, _ = problems(tmp_path, "- just\n- a list\n")
    assert "mapping" in probs[""].message


def test_every_problem_listed_with_paths_and_lines(tmp_path):
    bad = (
        GOOD.replace("epochs: 1", "epochz: 1")
        .replace("limit: 100", "limit: -3")
        .replace("bootstrap: 10", "bootstrap: lots")
    )
    bad += "  - use: utilty\n    target: minilm\n"
    probs, err = problems(tmp_path, bad)
    assert "targets.minilm.finetune.epochz" in probs
    assert "did you mean 'epochs'" in probs["targets.minilm.finetune.epochz"].message
    assert probs["targets.minilm.finetune.epochz"].line == 8
    assert "data.tweets.limit" in probs
    assert probs["data.tweets.limit"].line == 4
    assert "audits[0].params.bootstrap" in probs
    assert probs["audits[0].params.bootstrap"].line == 12
    assert "audits[1].use" in probs and "'utility'" in probs["audits[1].use"].message
    assert probs["audits[1].use"].line == 14
    assert len(err.problems) >= 4
    assert "audits[0].params.bootstrap" in str(err)


def test_unknown_param_key_suggests(tmp_path):
    probs, _ = problems(tmp_path, GOOD.replace("bootstrap: 10", "bootstrp: 10"))
    assert "did you mean 'bootstrap'" in probs["audits[0].params.bootstrp"].message


def test_missing_required_keys(tmp_path):
    probs, _ = problems(tmp_path, "version: 1\nname: x\n")
    assert "targets" in probs and "audits" in probs
    assert "missing" in probs["targets"].message


def test_wrong_types_and_versions(tmp_path):
    probs, _ = problems(tmp_path, GOOD.replace("version: 1", "version: 2").replace("name: demo", "name: 'bad name!'"))
    assert "version" in probs and "name" in probs


def test_cross_references(tmp_path):
    text = GOOD.replace("target: minilm", "target: minilmm").replace("data: tweets, epochs", "data: tweet, epochs")
    text += "  - use: utility\n    target: minilm-dp\n    data: nope\n"
    probs, _ = problems(tmp_path, text)
    assert "did you mean 'minilm'" in probs["audits[0].target"].message
    assert "did you mean 'tweets'" in probs["targets.minilm.finetune.data"].message
    assert "unknown target 'minilm-dp'" in probs["audits[1].target"].message
    assert "no dataset named 'nope'" in probs["audits[1].data"].message


def test_missing_files_and_non_model_folder(tmp_path):
    (tmp_path / "notamodel").mkdir()
    text = GOOD.replace("source: bundled:tweets, limit: 100", "source: missing.csv").replace(
        "model: bundled:minilm", f"model: {tmp_path / 'notamodel'}\n    task: {TEXT_CLASSIFICATION}"
    )
    probs, _ = problems(tmp_path, text)
    assert "does not exist" in probs["data.tweets.source"].message
    assert "no config.json" in probs["targets.minilm.model"].message


def test_unknown_bundled_names(tmp_path):
    probs, _ = problems(
        tmp_path, GOOD.replace("bundled:minilm", "bundled:minlm").replace("bundled:tweets", "bundled:tweet")
    )
    assert "did you mean 'bundled:minilm'" in probs["targets.minilm.model"].message
    assert "did you mean 'bundled:tweets'" in probs["data.tweets.source"].message


def test_gate_on_unknown_metric(tmp_path):
    probs, _ = problems(tmp_path, GOOD.replace("accuracy: {lt", "acuracy: {lt"))
    assert "did you mean 'accuracy'" in probs["audits[0].fail_if.acuracy"].message


def test_bad_gate_operator(tmp_path):
    probs, _ = problems(tmp_path, GOOD.replace("{lt: 0.5}", "{below: 0.5}"))
    assert any(k.startswith("audits[0].fail_if.accuracy") for k in probs)


def test_capability_mismatch(tmp_path, test_modules):
    probs, _ = problems(tmp_path, GOOD + "  - use: test.needs_image\n    target: minilm\n")
    assert "needs image" in probs["audits[1].target"].message


def test_target_produced_later_is_an_error(tmp_path):
    probs, _ = problems(tmp_path, GOOD.replace("target: minilm\n    params", "target: later\n    params"))
    assert "unknown target 'later'" in probs["audits[0].target"].message


def test_produces_on_module_that_does_not(tmp_path):
    probs, _ = problems(tmp_path, GOOD + "    produces: other\n")
    assert "does not produce a target" in probs["audits[0].produces"].message


def test_validate_cli_exit_code_and_no_model_loaded(tmp_path):
    """`fmaudit validate` exits 2 on a bad recipe and never imports torch (no model loads)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("epochs: 1", "epochs: 0"))
    code = (
        "import sys\nfrom fmaudit.cli import app\n"
        "try:\n    app([ 'validate', sys.argv[1]])\nexcept SystemExit as e:\n    rc = e.code\n"
        "assert 'torch' not in sys.modules, 'validate imported torch'\nsys.exit(rc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr + res.stdout
    assert "targets.minilm.finetune.epochs" in res.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    res = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout


def test_yaml_is_loaded_safely(tmp_path):
    probs, _ = problems(tmp_path, "!!python/object/apply:os.system ['echo pwned']\n")
    assert "malformed YAML" in next(iter(probs.values())).message


def test_recipe_json_schema_lists_module_params():
    from fmaudit.recipe import recipe_json_schema

    schema = recipe_json_schema()
    text = str(schema)
    assert "bootstrap" in text and "utility" in text
