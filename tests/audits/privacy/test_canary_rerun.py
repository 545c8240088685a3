"""The DP canary run is the audited procedure (issue 13, item 5): every recorded setting is re-run, what
was re-run is recorded, and a delta other than the DP run's is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fmaudit.data import Dataset
from fmaudit.privacy.canary import canary_audit, check_delta, dp_rerun_settings
from fmaudit.seeds import Stream, derive
from fmaudit.testing import make_sentences

RECORD = {
    "epsilon": 3.2,
    "delta": 2e-5,
    "noise_multiplier": 1.3,
    "sample_rate": 0.1,
    "steps": 30,
    "epochs": 3,
    "batch_size": 4,
    "max_grad_norm": 0.7,
    "accountant": "rdp",
    "clipping": "hooks",
    "trainable": "lora",
    "n_layers": 1,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
    "lr": 2e-3,
    "weight_decay": 0.05,
    "max_physical_batch_size": 5,
}


class _Stop(Exception):
    pass


@pytest.fixture()
def base_and_members(tiny_bert_dir):
    from fmaudit.targets import load_target

    base = load_target(model=str(tiny_bert_dir), task="text-classification", max_length=16)
    texts, labels = make_sentences(20)
    return base, Dataset("sents", "sents", "text", [f"s{i}" for i in range(20)], labels, texts=texts)


def _captured_dp_call(monkeypatch, base, members, record, **kw) -> dict:
    import fmaudit.privacy.dp as dp_mod

    seen: dict = {}

    def fake_dp_finetune(**kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(dp_mod, "dp_finetune", fake_dp_finetune)
    with pytest.raises(_Stop):
        canary_audit(
            base=base,
            members=members,
            train={"n_layers": 4, "weight_decay": 0.0, "lr": 1.0},
            num_canaries=20,
            kind="random_tokens",
            dp=record,
            score="loss",
            seed=7,
            **kw,
        )
    return seen


@pytest.mark.parametrize("trainable", ["lora", "last_n_layers"])
def test_dp_canary_run_re_runs_every_recorded_setting(monkeypatch, base_and_members, trainable):
    base, members = base_and_members
    record = {**RECORD, "trainable": trainable}
    if trainable != "lora":
        record["lora"] = None
    seen = _captured_dp_call(monkeypatch, base, members, record)
    expected = {
        "epochs": 3,
        "batch_size": 4,
        "noise_multiplier": 1.3,
        "delta": 2e-5,
        "max_grad_norm": 0.7,
        "accountant": "rdp",
        "clipping": "hooks",
        "trainable": trainable,
        "n_layers": 1,
        "lr": 2e-3,
        "weight_decay": 0.05,
        "max_physical_batch_size": 5,
    }
    if trainable == "lora":
        expected.update(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["query", "value"])
    assert {k: seen.get(k) for k in expected} == expected
    if trainable != "lora":
        assert not any(k.startswith("lora_") for k in seen)
    # the non-private fine-tune config (train=...) plays no part in a DP re-run
    assert seen["n_layers"] != 4 and seen["lr"] != 1.0
    # its own training stream, not the audit's bare seed
    assert seen["seed"] == derive(7, Stream.CANARY_TRAIN)


def test_older_records_fall_back_to_defaults_and_say_so():
    legacy = {
        k: RECORD[k]
        for k in (
            "epsilon",
            "delta",
            "noise_multiplier",
            "epochs",
            "batch_size",
            "max_grad_norm",
            "accountant",
            "clipping",
            "trainable",
            "max_physical_batch_size",
        )
    }
    kw, defaulted = dp_rerun_settings(legacy)
    assert set(defaulted) == {"lr", "weight_decay", "n_layers", "lora"}
    assert (kw["lr"], kw["weight_decay"], kw["n_layers"], kw["lora_r"], kw["lora_alpha"]) == (5e-4, 0.0, 2, 8, 16)
    kw, defaulted = dp_rerun_settings(RECORD)
    assert defaulted == []
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp_rerun_settings({k: v for k, v in RECORD.items() if k != "noise_multiplier"})


def test_non_private_canary_run_uses_the_recorded_config_and_its_own_stream(monkeypatch, base_and_members):
    import fmaudit.training as training

    base, members = base_and_members
    seen = {}

    def fake_finetune_cached(model, split, cfg, **kw):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(training, "finetune_cached", fake_finetune_cached)
    with pytest.raises(_Stop):
        canary_audit(
            base=base,
            members=members,
            num_canaries=20,
            kind="random_tokens",
            score="loss",
            seed=7,
            train={
                "epochs": 3,
                "batch_size": 4,
                "lr": 2e-3,
                "weight_decay": 0.05,
                "trainable": "last_n_layers",
                "n_layers": 1,
            },
        )
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.trainable, cfg.n_layers) == (
        3,
        4,
        2e-3,
        0.05,
        "last_n_layers",
        1,
    )
    assert cfg.seed == derive(7, Stream.CANARY_TRAIN)


@pytest.mark.parametrize("delta", [1e-6, 1e-4])
def test_a_delta_other_than_the_dp_runs_is_refused(base_and_members, delta):
    base, members = base_and_members
    with pytest.raises(ValueError, match="use the DP run's delta"):
        canary_audit(
            base=base, members=members, train={}, num_canaries=20, kind="random_tokens", dp=RECORD, delta=delta
        )
    assert "smaller than" in check_delta(1e-6, RECORD) and "larger than" in check_delta(1e-4, RECORD)
    assert check_delta(None, RECORD) is None and check_delta(2e-5, RECORD) is None
    assert check_delta(1e-6, None) is None  # non-private runs: any delta


def test_module_check_refuses_a_mismatched_delta():
    from fmaudit.audits.privacy.canary import CanaryAudit
    from fmaudit.provenance import DPRecord, Provenance

    target = SimpleNamespace(
        split=object(), task="text-classification", provenance=Provenance(dp=DPRecord.from_params(RECORD))
    )
    problems = CanaryAudit({"delta": 1e-6}).check(target, None)
    assert any("use the DP run's delta" in p for p in problems), problems
    assert CanaryAudit({}).check(target, None) == []
    assert CanaryAudit({"delta": 2e-5}).check(target, None) == []
