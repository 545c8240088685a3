"""privacy.membership on tiny models: power on an overfitted model, no signal on an untrained one,
clear errors, the recipe path (base weights reloaded by the Session, reference-model cache, gates) and
causal-LM attacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmaudit.audits.base import AuditContext
from fmaudit.audits.privacy.membership import MembershipAudit
from fmaudit.data import Dataset, Split, load_digits, member_split
from fmaudit.provenance import Provenance
from fmaudit.testing import audit_context, make_sentences, tiny_text_recipe
from fmaudit.training import TrainConfig


def _mlp_target(seed: int = 0):
    import torch
    from torch import nn

    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return ImageClassifier(name="mlp", model=PixelClassifier(mlp), source="test", kind="torch-module", num_classes=10)


def _noisy_digits(n: int, noise: float, seed: int = 0) -> Dataset:
    """A digits sample with a fraction of labels flipped: the atypical examples a model must memorize."""
    ds = load_digits()
    rng = np.random.default_rng(seed)
    ds = ds.subset(np.sort(rng.choice(len(ds), n, replace=False)))
    labels = ds.labels.copy()
    flip = rng.random(n) < noise
    labels[flip] = (labels[flip] + rng.integers(1, 10, int(flip.sum()))) % 10
    return Dataset(ds.name, ds.source, "image", ds.ids, labels, images=ds.images, label_names=ds.label_names)


def _ctx(tmp_path: Path, data, split, base=None, **kw) -> AuditContext:
    return audit_context(
        tmp_path,
        data=data,
        split=split,
        base=base,
        unit_id="0:privacy.membership@t",
        store_examples=kw.pop("store_examples", False),
    )


def _finetuned(base, split: Split, epochs: int, lr: float, batch_size: int = 16):
    from fmaudit.training import TrainConfig, train

    target = base.copy("mlp")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, trainable="all", seed=0)
    stats = train(target, split.members, cfg)
    target.split = split
    target.provenance = Provenance(train=cfg, train_seconds=stats.duration_s, base_weights_sha256=base.weights_sha256())
    return target


ALL_CLASSIFIER = [
    "loss",
    "confidence",
    "entropy",
    "calibrated_loss",
    "quantile",
    "lira_online",
    "lira_offline",
    "rmia",
    "rmia_offline",
]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    data = _noisy_digits(200, noise=0.2)  # 100 members, a fifth of them with flipped labels
    split = member_split(data, member_fraction=0.5, seed=0)
    base = _mlp_target()
    target = _finetuned(base, split, epochs=40, lr=1e-2)
    tmp = tmp_path_factory.mktemp("mia-overfit")
    mod = MembershipAudit(
        {"attacks": ALL_CLASSIFIER, "reference_models": 4, "reference_trainable": "all", "bootstrap": 300}
    )
    assert mod.check(target, data) == []
    out = mod.run(target, _ctx(tmp, data, split, base))
    return out, target, data, split, base, tmp


def test_every_attack_finds_members_of_an_overfitted_model(overfit):
    out = overfit[0]
    m = out.metrics
    for a in ALL_CLASSIFIER:
        assert m[f"{a}.auc"].value > 0.68, a
        assert m[f"{a}.auc"].ci_low > 0.6, a  # simultaneous (Bonferroni) intervals over the 8 attacks
    # reference models calibrate per-example difficulty: far more members found at low FPR
    for a in ("lira_online", "lira_offline", "rmia", "rmia_offline"):
        assert m[f"{a}.tpr_at_1pct_fpr"].value > m["loss.tpr_at_1pct_fpr"].value + 0.1, a
        assert m[f"{a}.tpr_at_0pct_fpr"].value > m["loss.tpr_at_0pct_fpr"].value, a
        assert m[f"{a}.auc"].value > m["loss.auc"].value, a
    # headline: the attack chosen on the selection half, measured on the other half, above its null
    from sklearn.metrics import roc_auc_score

    head = out.tables["headline"]
    chosen = head["metrics"]["auc"]["attack"]
    assert chosen in ("lira_online", "lira_offline", "rmia", "rmia_offline")
    table = out.tables["per_example"]
    sel = set(head["selection_ids"])
    ev = [i for i, x in enumerate(table["ids"]) if x not in sel]
    assert len(sel) == len(ev) == 100
    y = [table["is_member"][i] for i in ev]
    assert m["auc"].value == pytest.approx(roc_auc_score(y, [table["scores"][chosen][i] for i in ev]))
    assert m["auc"].value > m["auc_null"].value and m["auc_p_value"].value < 0.01
    assert 0.5 < m["auc_null"].value < 0.65 and m["fpr_resolution"].value == pytest.approx(1 / 50)


def test_report_contents(overfit):
    from sklearn.metrics import roc_auc_score

    out, target, data, split = overfit[:4]
    table = out.tables["per_example"]
    assert len(table["ids"]) == len(data) and sum(table["is_member"]) == len(split.member_idx)
    member_ids = {data.ids[i] for i in split.member_idx}
    assert all((i in member_ids) == flag for i, flag in zip(table["ids"], table["is_member"]))
    # the per-example scores reproduce the reported AUC
    assert roc_auc_score(table["is_member"], table["scores"]["rmia"]) == pytest.approx(out.metrics["rmia.auc"].value)
    assert "texts" not in table and all("text" not in ev for ev in out.evidence)
    assert set(out.curves) == {f"roc.{a}" for a in ALL_CLASSIFIER}
    c = out.curves["roc.lira_online"]
    assert c.log_x and c.log_y and c.x[0] == 0 and c.x[-1] == 1
    refs = out.tables["reference_models"]
    assert refs["count"] == 4 and len({r["seed"] for r in refs["models"]}) == 4
    assert all(r["members"] == len(data) // 2 for r in refs["models"])
    # the report says which examples each reference model saw (pair j: model 2j on these, 2j+1 on the rest)
    assert [p["models"] for p in refs["pairs"]] == [[0, 1], [2, 3]]
    assert all(len(p["in_ids_of_first"]) == len(data) // 2 for p in refs["pairs"])
    assert set(refs["pairs"][0]["in_ids_of_first"]) != set(refs["pairs"][1]["in_ids_of_first"])
    assert out.metrics["reference_cost_ratio"].value > 0
    costs = {a: out.tables["attacks"][a]["cost_seconds"] for a in ALL_CLASSIFIER}
    assert all(c > 0 for c in costs.values()) and costs["rmia"] > costs["loss"] and costs["quantile"] > costs["loss"]
    assert out.tables["attacks"]["rmia"]["cost_target_finetunes"] > 0
    titles = [f.title for f in out.findings]
    assert any("Too few non-members to measure TPR at 0.1% FPR" in t for t in titles)
    # 100 non-members resolve 1% FPR, but the headline is measured on the 50 that did not choose the attack
    assert any("at 1.0% FPR" in t for t in titles)
    assert all(abs(r["member_overlap"] - 0.5) < 0.2 and abs(r["nonmember_overlap"] - 0.5) < 0.2 for r in refs["models"])
    assert not any("differ in" in t for t in titles)  # random split: no distribution shift


def test_reference_models_are_cached(overfit):
    out, target, data, split, base, tmp = overfit
    mod = MembershipAudit({"attacks": ["rmia"], "reference_models": 2, "reference_trainable": "all", "bootstrap": 0})
    again = mod.run(target, _ctx(tmp, data, split, base))
    rows = again.tables["reference_models"]["models"]
    assert all(r["cache_hit"] for r in rows)
    first = {r["index"]: r["cache_key"] for r in out.tables["reference_models"]["models"]}
    assert all(first[r["index"]] == r["cache_key"] for r in rows)  # 2 refs = the first pair of the 4


def test_reference_training_ships_to_another_process(overfit):
    """What a remote executor does with a reference-model item: pickle the callable, run it elsewhere."""
    import pickle

    from fmaudit.privacy.membership.reference_models import TrainReference, paired_halves
    from fmaudit.training import TrainConfig

    out, target, data, split, base, tmp = overfit
    fn = TrainReference(
        base=base,
        population=data,
        audit=data,
        masks=paired_halves(len(data), 2, 0),
        seeds=[1, 2],
        configs=[TrainConfig(epochs=1, batch_size=16, lr=1e-2, seed=1)] * 2,
        is_clf=True,
        cache_dir=tmp / "cache-pickle",
        progress=None,
        batch_size=64,
        min_k=0.2,
        label="mlp",
    )
    here = fn(0)
    there = pickle.loads(pickle.dumps(fn))(0)
    assert "error" not in here and there["cache_hit"] and there["cache_key"] == here["cache_key"]
    np.testing.assert_allclose(there["phi"], here["phi"])


def test_untrained_model_shows_no_membership_signal(tmp_path):
    data = _noisy_digits(400, noise=0.0, seed=1)
    split = member_split(data, member_fraction=0.5, seed=1)
    base = _mlp_target(seed=1)
    target = base.copy("untrained")
    target.split = split
    target.provenance = Provenance(
        train=TrainConfig(epochs=3, batch_size=32, lr=3e-3, trainable="all"), base_weights_sha256=base.weights_sha256()
    )
    attacks = ["loss", "confidence", "entropy", "lira_online", "rmia"]
    mod = MembershipAudit({"attacks": attacks, "reference_models": 2, "reference_trainable": "all", "bootstrap": 300})
    out = mod.run(target, _ctx(tmp_path, data, split, base))
    for a in attacks:
        m = out.metrics[f"{a}.auc"]
        assert m.ci_low <= 0.5 <= m.ci_high, (a, m)
        assert abs(m.value - 0.5) < 0.08, a


# -- errors ---------------------------------------------------------------------------------------------


def test_overlapping_or_empty_sets_are_clear_errors(tmp_path):
    data = _noisy_digits(60, noise=0.0)
    target = _mlp_target()
    ids = data.ids
    cases = [
        ({"members": ids[:10], "nonmembers": ids[5:20]}, "overlap in 5 example"),
        ({"members": [], "nonmembers": ids[:5]}, "member set is empty"),
        ({"members": ids[:5], "nonmembers": []}, "non-member set is empty"),
        ({"members": ids[:5] + ["nope"]}, "not in the data"),
        ({"members": list(ids)}, "0 non-member"),
    ]
    for params, msg in cases:
        mod = MembershipAudit({"attacks": ["loss"], "bootstrap": 0, **params})
        assert mod.check(target, data) == []
        with pytest.raises(ValueError, match=msg):
            mod.run(target, _ctx(tmp_path, data, None))
    # a split without non-members
    split = Split(data, np.arange(len(data)), np.zeros(0, dtype=np.int64), 0, 0.99)
    target.split = split
    with pytest.raises(ValueError, match="non-member set is empty"):
        MembershipAudit({"attacks": ["loss"], "bootstrap": 0}).run(target, _ctx(tmp_path, data, split))


def test_explicit_member_ids_work(tmp_path):
    data = _noisy_digits(80, noise=0.0)
    mod = MembershipAudit({"attacks": ["loss", "entropy"], "bootstrap": 50, "members": data.ids[:30]})
    out = mod.run(_mlp_target(), _ctx(tmp_path, data, None))
    assert out.metrics["num_members"].value == 30 and out.metrics["num_nonmembers"].value == 50
    assert out.tables["sets"]["source"] == "params"


def test_reference_attack_on_untrainable_target_is_refused(tmp_path):
    from fmaudit.targets.vision import ImageClassifier

    class Frozen(ImageClassifier):
        @property
        def capabilities(self):
            return super().capabilities - {"trainable"}

    data = _noisy_digits(60, noise=0.0)
    t = _mlp_target()
    frozen = Frozen(name="api", model=t.model, source="api", kind="torch-module", num_classes=10)
    frozen.split = member_split(data, member_fraction=0.5, seed=0)
    problems = MembershipAudit({"attacks": ["loss", "rmia"]}).check(frozen, data)
    assert any("cannot be fine-tuned" in p and "rmia" in p for p in problems)
    assert MembershipAudit({"attacks": ["loss"]}).check(frozen, data) == []
    # a trainable target whose base weights are unknown: reference attacks explain what is missing
    t.split = frozen.split
    with pytest.raises(ValueError, match="base \\(pre-fine-tune\\) weights"):
        MembershipAudit({"attacks": ["rmia"], "bootstrap": 0}).run(t, _ctx(tmp_path, data, t.split))


def test_bad_params_and_wrong_attacks():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        MembershipAudit({"attacks": ["lira"]})
    with pytest.raises(ValidationError):
        MembershipAudit({"reference_models": 0})
    data = _noisy_digits(40, noise=0.0)
    t = _mlp_target()
    t.split = member_split(data, member_fraction=0.5, seed=0)
    assert any("zlib" in p for p in MembershipAudit({"attacks": ["zlib"]}).check(t, data))
    t.split = None
    assert any("no member / non-member split" in p for p in MembershipAudit({"attacks": ["loss"]}).check(t, data))


# -- through a recipe -----------------------------------------------------------------------------------


def test_recipe_run_with_reference_models_and_gates(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.runner import run_recipe

    audit = {
        "use": "privacy.membership",
        "target": "bert",
        "params": {"attacks": ["loss", "rmia", "lira_offline"], "reference_models": 2, "bootstrap": 100},
        "fail_if": {"auc": {"gt": 0.99}, "rmia.tpr_at_0pct_fpr": {"lt": 0.0}},
    }
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=[audit])
    report = run_recipe(recipe)
    res = report.result("privacy.membership", "bert")
    assert res.status == "ok", res.error
    assert report.exit_code == 0 and all(g.passed for g in res.gates)
    refs = res.tables["reference_models"]
    # reloaded through the Session: the very weights the target was fine-tuned from
    assert refs["base_weights_sha256"] == report.targets["bert"].finetune["base_weights_sha256"]
    assert refs["config"]["trainable"] == "last_n_layers" and refs["config"]["epochs"] == 1
    assert not any(r["cache_hit"] for r in refs["models"])
    assert {"auc", "rmia.auc", "lira_offline.tpr_at_1pct_fpr", "blind_baseline_auc"} <= set(res.metrics)
    assert res.metrics["num_members"].value == 100

    audit["fail_if"] = {"rmia.auc": {"gt": 0.0}}
    report2 = run_recipe(tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=[audit]))
    res2 = report2.result("privacy.membership", "bert")
    assert report2.exit_code == 1 and not res2.gates[0].passed
    assert all(r["cache_hit"] for r in res2.tables["reference_models"]["models"])
    assert res2.metrics["rmia.auc"].value == pytest.approx(res.metrics["rmia.auc"].value)


@pytest.mark.integration  # DP fine-tuning (Opacus) makes this the slowest test here
def test_recipe_dp_and_non_private_side_by_side_share_reference_models(tiny_bert_dir, sentiment_csv, tmp_path):
    """The quickstart's shape: a DP target produced from a recipe target is attacked with the same
    reference models (same base weights, population and settings), trained once."""
    from fmaudit.registry import registry
    from fmaudit.runner import run_recipe

    if "privacy.dp_finetune" not in registry:
        pytest.skip("privacy.dp_finetune is not registered")
    audits = [
        {
            "use": "privacy.dp_finetune",
            "target": "bert",
            "produces": "bert-dp",
            "params": {"target_epsilon": 8, "trainable": "last_n_layers", "lr": 1e-3, "eval_examples": 50},
        },
        {
            "use": "privacy.membership",
            "target": ["bert", "bert-dp"],
            "params": {"attacks": ["loss", "rmia"], "reference_models": 2, "bootstrap": 50},
        },
    ]
    report = run_recipe(tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=audits))
    plain = report.result("privacy.membership", "bert")
    dp = report.result("privacy.membership", "bert-dp")
    assert plain.status == "ok", plain.error
    assert dp.status == "ok", dp.error
    keys = [r["cache_key"] for r in plain.tables["reference_models"]["models"]]
    assert [r["cache_key"] for r in dp.tables["reference_models"]["models"]] == keys
    assert all(r["cache_hit"] for r in dp.tables["reference_models"]["models"])
    assert dp.metrics["num_members"].value == plain.metrics["num_members"].value == 100


def test_recipe_rejects_unknown_gate_metric(tiny_bert_dir, sentiment_csv, tmp_path):
    from fmaudit.recipe import RecipeError, load_recipe

    audit = {"use": "privacy.membership", "target": "bert", "fail_if": {"tpr_at_1_fpr": {"gt": 0.1}}}
    with pytest.raises(RecipeError, match="reports no metric 'tpr_at_1_fpr'"):
        load_recipe(tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=[audit]))
    audit["fail_if"] = {"lira_online.tpr_at_0.1pct_fpr": {"gt": 0.1}, "tpr_at_0.1pct_fpr": {"gt": 0.1}}
    load_recipe(tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=[audit]))


# -- causal LMs -----------------------------------------------------------------------------------------


def test_causal_lm_attacks_on_an_overfitted_lm(tiny_llama_dir, tmp_path):
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    texts, _ = make_sentences(64, seed=5)
    data = Dataset("sents", "test", "text", [f"s{i}" for i in range(len(texts))], texts=texts)
    split = member_split(data, member_fraction=0.5, seed=0)
    base = load_target(model=str(tiny_llama_dir), task="causal-lm", name="llama", max_length=32)
    target = base.copy("llama")
    cfg = TrainConfig(epochs=12, batch_size=8, lr=3e-3, trainable="all", seed=0)
    stats = train(target, split.members, cfg)
    target.split = split
    target.provenance = Provenance(train=cfg, train_seconds=stats.duration_s, base_weights_sha256=base.weights_sha256())
    attacks = ["loss", "zlib", "min_k", "min_k_pp", "calibrated_loss", "quantile", "rmia"]
    mod = MembershipAudit(
        {
            "attacks": attacks,
            "reference_models": 2,
            "reference_trainable": "all",
            "reference_epochs": 6,
            "bootstrap": 200,
            "evidence": 3,
        }
    )
    assert mod.check(target, data) == []
    assert any("confidence" in p for p in MembershipAudit({"attacks": ["confidence"]}).check(target, data))
    out = mod.run(target, _ctx(tmp_path, data, split, base, store_examples=True))
    for a in attacks:
        assert out.metrics[f"{a}.auc"].value > 0.7, (a, out.metrics[f"{a}.auc"])
    assert out.tables["per_example"]["texts"] == list(data.subset(np.r_[split.member_idx, split.nonmember_idx]).texts)
    assert len(out.evidence) == 3 and all("text" in ev for ev in out.evidence)
    assert all(ev["id"] in {data.ids[i] for i in split.member_idx} for ev in out.evidence)
