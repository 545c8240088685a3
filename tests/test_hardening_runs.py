"""Faults during a run: a target that fails to load or fine-tune makes only its units errors (exit 3), the
others run and the report is written; units on a target that was never produced are skipped with the
reason; any other uncaught exception exits 3 with one line and is recorded in the report."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from fmaudit.cli import app
from fmaudit.recipe import load_recipe
from fmaudit.report import load_report
from fmaudit.run_report import EXIT_MODULE_ERROR
from fmaudit.runner import SKIPPED_UPSTREAM, Runner
from fmaudit.testing import tiny_text_recipe

cli = CliRunner()

BAD_MODULE = '''
import torch
from torch import nn


class Breaks(nn.Module):
    """Builds fine, fails in forward: like a 1-channel model fed RGB images."""

    def __init__(self, num_labels=10):
        super().__init__()
        self.lin = nn.Linear(64, num_labels)

    def forward(self, x):
        raise RuntimeError("Given groups=1, weight of size [8, 1, 3, 3], expected input to have 1 channels, "
                           "but got 3 channels instead")


def make(num_labels=10):
    return Breaks(num_labels)
'''


def _run_dir(tmp_path: Path) -> Path:
    (d,) = (tmp_path / "reports").iterdir()
    return d


def test_truncated_weights_after_validation_fail_only_their_units(tiny_bert_dir, sentiment_csv, tmp_path):
    """The checkpoint is damaged between validation and loading (a copy still in progress): the units on it are
    errors with a one-line cause and a next step, the other target's units run, the report is written."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["targets"]["broken"] = dict(recipe["targets"]["bert"], model=str(broken))
    recipe["audits"] = [{"use": "utility", "target": ["broken", "bert"]}]
    loaded = load_recipe(recipe)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    report = Runner(loaded).run()
    bad, good = report.result("utility", "broken"), report.result("utility", "bert")
    assert good.status == "ok" and good.metrics["accuracy"].value is not None
    assert bad.status == "error" and "could not be loaded" in bad.error.message
    assert "\n" not in bad.error.message and "save_pretrained" in bad.error.hint
    assert report.exit_code == EXIT_MODULE_ERROR and report.status == "complete"
    assert load_report(_run_dir(tmp_path)) == report
    assert "broken" not in report.targets and "bert" in report.targets


def test_vit_channel_mismatch_at_fine_tune_keeps_the_text_target(tiny_vit_dir, tiny_bert_dir, sentiment_csv, tmp_path):
    """The issue's four-target run in small: a real 1-channel ViT fine-tuned on RGB images fails inside its
    forward pass; the text target's results survive (validate refuses this recipe, so the data entry is
    changed after validation to reach the run-time path)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(tmp_path / "imgs" / c / f"{i}.png")
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["data"]["imgs"] = {"source": f"imagefolder:{tmp_path / 'imgs'}", "grayscale": True}
    recipe["targets"]["vit"] = {
        "model": str(tiny_vit_dir),
        "task": "image-classification",
        "finetune": {"data": "imgs", "epochs": 1, "batch_size": 4},
    }
    recipe["audits"] = [{"use": "utility", "target": ["vit", "bert"]}]
    loaded = load_recipe(recipe)
    loaded.recipe.data["imgs"].grayscale = False  # RGB from here on
    report = Runner(loaded).run()
    vit, bert = report.result("utility", "vit"), report.result("utility", "bert")
    assert bert.status == "ok"
    assert vit.status == "error" and "failed while fine-tuning on 'imgs'" in vit.error.message
    assert "grayscale" in vit.error.hint
    assert report.exit_code == EXIT_MODULE_ERROR


def _digits_recipe(tmp_path: Path) -> dict:
    ft = {"data": "digits", "epochs": 1, "batch_size": 32, "lr": 3e-3}
    return {
        "version": 1,
        "name": "isolation",
        "output_dir": str(tmp_path / "reports"),
        "data": {"digits": {"source": "bundled:digits", "limit": 120}},
        "targets": {
            "good": {"model": "bundled:digits-cnn", "finetune": ft},
            "bad": {"model": "python:fm_hardening_bad:make", "task": "image-classification", "finetune": ft},
        },
        "audits": [
            {"use": "test.produce_copy", "target": "bad", "produces": "bad-copy"},
            {"use": "utility", "target": ["good", "bad"]},
            {"use": "utility", "target": "bad-copy"},
        ],
    }


def test_cli_fine_tune_failure_exit_3_other_target_kept_and_unproduced_target_skipped(
    tmp_path, monkeypatch, test_modules
):
    (tmp_path / "fm_hardening_bad.py").write_text(BAD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fm_hardening_bad", raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_digits_recipe(tmp_path)))
    assert cli.invoke(app, ["validate", str(path)]).exit_code == 0
    res = cli.invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 3, (res.output, res.exception)
    assert "Traceback" not in res.output
    report = load_report(_run_dir(tmp_path))
    status = {r.unit_id: r.status for r in report.audits}
    assert status == {
        "0:test.produce_copy@bad": "error",
        "1:utility@good": "ok",
        "1:utility@bad": "error",
        "2:utility@bad-copy": "skipped",
    }
    bad = report.result("utility", "bad")
    assert "failed while fine-tuning on 'digits'" in bad.error.message and "expected input" in bad.error.message
    skipped = report.result("utility", "bad-copy")
    assert skipped.error.message.startswith(SKIPPED_UPSTREAM) and "0:test.produce_copy@bad" in skipped.error.message
    assert report.targets["good"].finetune is not None
    events = (_run_dir(tmp_path) / "events.jsonl").read_text()
    assert '"target_failed"' in events and "KeyError" not in events


def test_producer_error_skips_consumer_not_keyerror(tiny_bert_dir, sentiment_csv, tmp_path, test_modules):
    from fmaudit.registry import registry

    class ProduceFails(test_modules.ProduceCopy):
        name = "test.produce_fails"

        def run(self, target, ctx):
            raise RuntimeError("stack expects each tensor to be equal size")

    registry.unregister(ProduceFails.name)
    registry.register(ProduceFails)
    try:
        recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
        recipe["audits"] = [
            {"use": "test.produce_fails", "target": "bert", "produces": "bert-dp"},
            {"use": "utility", "target": ["bert", "bert-dp"]},
        ]
        report = Runner(load_recipe(recipe)).run()
    finally:
        registry.unregister(ProduceFails.name)
    assert [r.status for r in report.audits] == ["error", "ok", "skipped"]
    assert report.audits[2].error.type == "Skipped" and SKIPPED_UPSTREAM in report.audits[2].error.message
    assert report.exit_code == EXIT_MODULE_ERROR


def test_uncaught_exception_exit_3_recorded_in_report(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def explode(self, units):
        raise MemoryError("injected fault between units")

    monkeypatch.setattr(Runner, "_waves", explode)
    res = cli.invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 3, (res.output, res.exception)
    assert "Traceback" not in res.output and "injected fault between units" in " ".join(res.output.split())
    rep = load_report(_run_dir(tmp_path))
    assert rep.status == "failed" and rep.exit_code == 3 and rep.error.type == "MemoryError"
    assert "Traceback" in rep.error.traceback
    assert "bert" in rep.targets  # what was prepared before the fault is kept
    res = cli.invoke(app, ["report", str(_run_dir(tmp_path))])
    assert res.exit_code == 0


def test_exception_before_the_run_starts_gets_a_minimal_report(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def explode(self, session):
        raise ZeroDivisionError("injected fault before the run folder exists")

    monkeypatch.setattr(Runner, "_preflight", explode)
    res = cli.invoke(app, ["run", str(path), "-q"])
    assert res.exit_code == 3 and "Traceback" not in res.output and "--debug" in res.output
    rep = load_report(_run_dir(tmp_path))
    assert rep.status == "failed" and rep.error.type == "ZeroDivisionError" and rep.audits == []
    shutil.rmtree(tmp_path / "reports")
    res = cli.invoke(app, ["run", str(path), "-q", "--debug"])
    assert res.exit_code == 3 and "Traceback" in res.output


def test_failure_on_resume_keeps_completed_units_and_bad_output_dirs_exit_2(
    tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch
):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.invoke(app, ["run", str(path), "-q"]).exit_code == 0
    run_dir = _run_dir(tmp_path)
    done = load_report(run_dir).audits

    def explode(self, session):
        raise RuntimeError("injected fault while resuming")

    monkeypatch.setattr(Runner, "_preflight", explode)
    res = cli.invoke(app, ["run", str(path), "-q", "--resume"])
    assert res.exit_code == 3
    rep = load_report(run_dir)
    assert rep.status == "failed" and rep.audits == done  # the completed unit is still reported
    monkeypatch.undo()
    res = cli.invoke(app, ["run", str(path), "-q", "--resume-from", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not an fmaudit run folder" in " ".join(res.output.split())
    assert not (tmp_path / "nowhere").exists()
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    res = cli.invoke(app, ["run", str(path), "-q", "-o", str(blocker / "sub")])
    assert res.exit_code == 2 and "cannot create the run folder" in " ".join(res.output.split())


def test_validate_and_report_never_exit_1(tmp_path, monkeypatch):
    """An unexpected exception in `validate` exits 3 with one line; an unreadable report exits 2; an
    exception escaping any command through the console entry point exits 3, not Python's 1."""
    import subprocess

    import fmaudit.recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nname: x\ntargets: {t: {model: bundled:minilm}}\naudits: [{use: utility, target: t}]\n"
    )

    def broken_check(*a, **k):
        raise AttributeError("injected bug in a check")

    monkeypatch.setattr(fmaudit.recipe, "check_recipe", broken_check)
    res = cli.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 3 and "injected bug in a check" in res.output and "Traceback" not in res.output
    monkeypatch.undo()

    run_dir = tmp_path / "run"
    (run_dir / "report.json").mkdir(parents=True)  # a folder where the file should be
    res = cli.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 2 and "cannot read the report" in " ".join(res.output.split())

    code = (
        "import sys, fmaudit.cli as c\n"
        "def boom(*a, **k):\n    raise RuntimeError('escaped a command')\n"
        "c.print_summary = boom\nsys.argv = ['fmaudit', 'report', sys.argv[1]]\nc.main()\n"
    )
    good = tmp_path / "good"
    good.mkdir()
    from fmaudit.report import HostInfo, RunReport, write_report

    write_report(
        RunReport(
            run_id="r",
            name="x",
            fmaudit_version="0",
            created_at="now",
            seed=0,
            recipe={},
            recipe_sha256="0",
            host=HostInfo(hostname="h", platform="p", python="3", cpu_count=1, device="cpu"),
            versions={},
        ),
        good / "report.json",
    )
    res = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "escaped a command" in res.stderr and "Traceback" not in res.stderr
