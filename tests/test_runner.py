"""Running recipes: failure isolation, gates and exit codes, resume, the fine-tune cache,
reproducibility, and bad input that stops before anything is written."""

from __future__ import annotations

import json

import pytest

from fmaudit.recipe import RecipeError
from fmaudit.report import load_report
from fmaudit.run_errors import PreparationError
from fmaudit.run_report import EXIT_GATE_FAILED, EXIT_MODULE_ERROR, EXIT_OK
from fmaudit.runner import run_recipe
from fmaudit.testing import tiny_text_recipe


@pytest.fixture()
def recipe(tiny_bert_dir, sentiment_csv, tmp_path):
    return tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)


def _run_dir(tmp_path):
    (d,) = (tmp_path / "reports").iterdir()
    return d


def test_failure_isolation_keeps_other_results(recipe, tmp_path, test_modules):
    recipe["audits"] = [
        {"use": "test.always_fails", "target": "bert", "params": {"message": "kaboom"}},
        {"use": "utility", "target": "bert"},
    ]
    report = run_recipe(recipe)
    assert [r.status for r in report.audits] == ["error", "ok"]
    assert report.audits[0].error.message == "kaboom" and "RuntimeError" in report.audits[0].error.type
    assert report.audits[1].metrics["accuracy"].value is not None
    assert report.exit_code == EXIT_MODULE_ERROR
    on_disk = load_report(_run_dir(tmp_path))
    assert on_disk == report
    events = [json.loads(x) for x in (_run_dir(tmp_path) / "events.jsonl").read_text().splitlines()]
    kinds = [e["entry_type"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("audit_result") == 2


def test_gates_and_exit_codes(recipe, tmp_path):
    recipe["audits"] = [{"use": "utility", "target": "bert", "fail_if": {"accuracy": {"ge": 0.0}}}]
    report = run_recipe(recipe)
    assert report.exit_code == EXIT_GATE_FAILED and not report.gates_passed
    (gate,) = report.audits[0].gates
    assert not gate.passed and gate.metric == "accuracy"
    assert any(f.gate is not None and f.severity == "high" for f in report.audits[0].findings)
    recipe["audits"][0]["fail_if"] = {"accuracy": {"gt": 1.0}, "num_examples": {"lt": 1}}
    report = run_recipe(recipe)
    assert report.exit_code == EXIT_OK and report.gates_passed
    assert len(report.audits[0].gates) == 2


def test_fine_tune_is_cached_and_runs_reproduce(recipe, tmp_path):
    recipe["cache_dir"] = str(tmp_path / "own-cache")
    first = run_recipe(recipe)
    second = run_recipe(recipe)
    assert first.targets["bert"].cache_hit is False
    assert second.targets["bert"].cache_hit is True
    assert first.targets["bert"].weights_sha256 == second.targets["bert"].weights_sha256
    m1, m2 = first.audits[0].metrics, second.audits[0].metrics
    assert {k: v.value for k, v in m1.items()} == {k: v.value for k, v in m2.items()}
    assert first.targets["bert"].split == second.targets["bert"].split
    # Members and non-members are disjoint and cover the data.
    split = first.targets["bert"].split
    assert not set(split.member_ids) & set(split.nonmember_ids)
    assert split.num_members + split.num_nonmembers == 200
    # Everything needed to re-run is recorded.
    assert first.recipe_sha256 and first.versions["torch"] and first.datasets["sents"].fingerprint


def test_different_seed_changes_the_split(recipe):
    a = run_recipe(recipe)
    recipe["seed"] = 1
    b = run_recipe(recipe)
    assert a.targets["bert"].split.member_ids != b.targets["bert"].split.member_ids


def test_resume_skips_completed_units(recipe, tmp_path, test_modules):
    recipe["audits"] = [{"use": "utility", "target": "bert"}, {"use": "test.always_fails", "target": "bert"}]
    report = run_recipe(recipe)
    run_dir = _run_dir(tmp_path)
    # Simulate a crash after the first unit: drop the rest of the event stream and the report.
    events = (run_dir / "events.jsonl").read_text().splitlines()
    keep = []
    for line in events:
        keep.append(line)
        if json.loads(line)["entry_type"] == "audit_result":
            break
    (run_dir / "events.jsonl").write_text("\n".join(keep) + "\n")
    (run_dir / "report.json").unlink()
    resumed = run_recipe(recipe, resume=run_dir)
    assert resumed.run_id == report.run_id
    assert resumed.audits[0] == report.audits[0]  # reused, not recomputed
    assert resumed.audits[1].status == "error"
    kinds = [json.loads(x)["entry_type"] for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "run_resumed" in kinds and "audit_skipped" in kinds


def test_resume_refuses_a_different_recipe(recipe, tmp_path):
    run_recipe(recipe)
    recipe["seed"] = 5
    with pytest.raises(PreparationError, match="different recipe"):
        run_recipe(recipe, resume=_run_dir(tmp_path))


def test_produced_targets_are_audited(recipe, test_modules):
    recipe["audits"] = [
        {"use": "test.produce_copy", "target": "bert", "produces": "bert-copy"},
        {"use": "utility", "target": ["bert", "bert-copy"]},
    ]
    report = run_recipe(recipe)
    assert [r.status for r in report.audits] == ["ok", "ok", "ok"]
    a, b = report.result("utility", "bert"), report.result("utility", "bert-copy")
    assert a.metrics["accuracy"].value == b.metrics["accuracy"].value
    assert report.targets["bert-copy"].produced_by == "0:test.produce_copy@bert"
    assert report.targets["bert-copy"].weights_sha256 == report.targets["bert"].weights_sha256


def test_bad_data_stops_before_writing(tiny_bert_dir, sentiment_csv, tmp_path):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["data"]["sents"]["text_column"] = "txt"
    with pytest.raises(RecipeError, match="did you mean 'text'"):  # found by validation, before anything loads
        run_recipe(recipe)
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


def test_empty_dataset_and_check_problems(tiny_bert_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    recipe = tiny_text_recipe(tiny_bert_dir, empty, tmp_path)
    recipe["data"]["sents"].pop("id_column")
    with pytest.raises(RecipeError, match="no rows"):
        run_recipe(recipe)
    three = tmp_path / "three.csv"
    three.write_text("text,label\n" + "".join(f"t{i} words,{i % 3}\n" for i in range(60)))
    recipe = tiny_text_recipe(tiny_bert_dir, three, tmp_path)
    recipe["data"]["sents"].pop("id_column")
    recipe["targets"]["bert"]["num_labels"] = 3
    recipe["data"]["other"] = {"source": str(three)}
    recipe["targets"]["bert"]["finetune"]["data"] = "other"
    report = run_recipe(recipe)  # 3-label data on a 3-label head works
    assert report.audits[0].status == "ok"


def test_label_count_mismatch_is_a_clear_error(tiny_bert_dir, tmp_path):
    three = tmp_path / "three.csv"
    three.write_text("text,label\n" + "".join(f"t{i} words,{i % 3}\n" for i in range(60)))
    recipe = tiny_text_recipe(tiny_bert_dir, three, tmp_path)
    recipe["data"]["sents"].pop("id_column")
    recipe["targets"]["bert"]["num_labels"] = 2
    with pytest.raises(PreparationError, match="num_labels"):
        run_recipe(recipe)


def test_invalid_recipe_raises_before_anything(tmp_path):
    with pytest.raises(RecipeError):
        run_recipe({"version": 1, "name": "x", "targets": {}, "audits": []})
