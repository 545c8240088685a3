"""The command line: help, list, schema, run / report exit codes."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from fmaudit.cli import app
from fmaudit.testing import tiny_text_recipe

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


# -- terminal summary (issue 20 item 4) --------------------------------------------------------------------


def _summary_report():
    from report_fixtures import leaky_report, metric, unit

    from fmaudit.report import ErrorInfo, Finding

    rep = leaky_report()
    rep.audits += [
        unit(
            "robustness.image_attack",
            "a-very-long-target-name",
            {
                "clean_accuracy": metric(0.97, better=True),
                "robust_accuracy.fgsm": metric(0.61, ci=(0.55, 0.66), better=True),
                "worst_robust_accuracy.pgd": metric(0.42, ci=(0.36, 0.48), better=True),
            },
            [
                Finding(severity="high", title="Fooled by small perturbations"),
                Finding(severity="medium", title="m1"),
                Finding(severity="medium", title="m2"),
                Finding(severity="low", title="l"),
            ],
            index=3,
        ),
        unit(
            "explain.attribution",
            "bert",
            {
                "integrated_gradients.completeness_relative_error": metric(0.01, better=False),
                "integrated_gradients.deletion_aopc": metric(0.31, ci=(0.25, 0.37), better=True),
            },
            index=4,
        ),
        unit(
            "robustness.text_attack",
            "bert",
            status="error",
            index=5,
            error=ErrorInfo(type="RuntimeError", message="stack expects each tensor to be equal size " * 4),
        ),
        unit(
            "utility",
            "bert-dp-dp",
            status="skipped",
            index=6,
            error=ErrorInfo(type="Skipped", message="skipped: the audit that produces this target failed"),
        ),
    ]
    return rep


def _report_cli(run_dir, *args, columns="80"):
    import os
    import subprocess
    import sys

    env = dict(os.environ, COLUMNS=columns, TERM="dumb")
    return subprocess.run(
        [sys.executable, "-m", "fmaudit.cli", "report", str(run_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_summary_fits_80_columns_one_row_per_unit_with_its_headline(tmp_path):
    from fmaudit.report import write_report

    rep = _summary_report()
    write_report(rep, tmp_path / "report.json")
    for columns in ("80", "200"):  # a wide terminal still gets the 80-column summary
        res = _report_cli(tmp_path, columns=columns)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
        text = res.stdout
        # the headline named for each module, its name never cut: privacy.membership -> tpr_at_1pct_fpr, ...
        for head in (
            "tpr_at_1pct_fpr 0.12",
            "epsilon 8",
            "accuracy 0.9",
            "worst_robust_accuracy.pgd 0.42",
            "integrated_gradients.deletion_aopc",
        ):
            assert head in text, head
        assert "1H 2M 1L" in text  # findings by severity
        assert "error: RuntimeError" in text and "skipped: the audit" in text
        assert "Verdict per area" in text and "privacy" in text
        # one row per unit: each unit's module starts one line of the table
        rows = [line for line in lines if line.split()[:1] and line.split()[0] in {r.module for r in rep.audits}]
        assert len(rows) == len(rep.audits)
        assert "reference_cost_ratio" not in text  # not a headline: only with --full


def test_report_full_prints_every_metric(tmp_path):
    from fmaudit.report import write_report

    rep = _summary_report()
    write_report(rep, tmp_path / "report.json")
    res = _report_cli(tmp_path, "--full")
    assert res.returncode == 0, res.stderr
    flat = "".join(res.stdout.split())
    for r in rep.audits:
        for name in r.metrics:
            assert name in flat, (r.unit_id, name)
