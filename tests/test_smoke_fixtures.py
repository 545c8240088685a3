from fmaudit.runner import run_recipe
from fmaudit.testing import tiny_text_recipe


def test_tiny_recipe_end_to_end(tiny_bert_dir, sentiment_csv, tmp_path):
    report = run_recipe(tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path))
    res = report.result("utility", "bert")
    assert res.status == "ok", res.error
    assert 0.0 <= res.metrics["accuracy"].value <= 1.0
    assert report.targets["bert"].split.num_members == 100
