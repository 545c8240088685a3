"""fmaudit.privacy.dp_finetune on tiny models: accounting, plain model back, errors, LoRA, images."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fmaudit.data import Dataset, member_split
from fmaudit.privacy import DPConfigError, DPPrivacyWarning, dp_finetune
from fmaudit.privacy.dp import epsilon_for
from fmaudit.targets.base import hook_count
from fmaudit.testing import make_sentences, opacus_leftovers


@pytest.fixture(scope="module")
def sents():
    texts, labels = make_sentences(160)
    ds = Dataset("s", "synthetic", "text", [f"s{i}" for i in range(160)], np.array(labels), texts=texts)
    return member_split(ds, member_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    from fmaudit.targets import load_target

    return load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2, max_length=32)


def test_bert_ghost_ledger_plain_model(bert, sents, tmp_path):
    before_sha = bert.weights_sha256()
    res = dp_finetune(
        clipping="ghost",
        model=bert,
        train_data=sents.members,
        validation_data=sents.nonmembers,
        target_epsilon=4.0,
        epochs=2,
        batch_size=16,
        lr=1e-3,
        accountant="rdp",
        max_physical_batch_size=8,
    )
    n = len(sents.members)
    # Poisson sampling rate and step count as the accountant assumes
    assert res.sample_rate == pytest.approx(1 / math.ceil(n / 16))
    assert res.steps == 2 * math.ceil(n / 16)
    assert res.clipping == "ghost" and res.accountant == "rdp"
    assert res.delta < 1 / n
    # the reported epsilon is Opacus' accountant's for (noise, rate, steps), and within the target
    assert res.epsilon == pytest.approx(
        epsilon_for(
            noise_multiplier=res.noise_multiplier,
            sample_rate=res.sample_rate,
            steps=res.steps,
            delta=res.delta,
            accountant="rdp",
        ),
        rel=1e-12,
    )
    assert 0.5 * 4.0 < res.epsilon <= 4.0
    assert len(res.epsilon_per_epoch) == 2 and res.epsilon_per_epoch[-1] == res.epsilon
    assert res.epsilon_per_epoch[0] < res.epsilon_per_epoch[1]
    assert res.ledger_steps[-1] == res.steps and res.ledger_epsilon[-1] == pytest.approx(res.epsilon)
    assert all(b >= a for a, b in zip(res.ledger_epsilon, res.ledger_epsilon[1:]))
    assert set(res.train_utility) >= {"accuracy", "loss"} and "accuracy" in res.validation_utility
    # the input target is untouched; the result is a plain, trained model
    assert bert.weights_sha256() == before_sha
    assert res.target.weights_sha256() != before_sha
    model = res.model
    assert type(model).__name__ == "BertForSequenceClassification"
    assert hook_count(model) == 0 and not opacus_leftovers(model)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    model.save_pretrained(tmp_path / "dp")
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dp")
    batch = res.target.encode_texts(["good movie", "awful day"])
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits, atol=1e-6)


def test_hooks_mode_matches_accounting_and_is_plain(bert, sents):
    res = dp_finetune(
        model=bert,
        train_data=sents.members,
        noise_multiplier=1.0,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        accountant="rdp",
        clipping="hooks",
        trainable="last_n_layers",
        n_layers=1,
    )
    assert res.clipping == "hooks" and res.target_epsilon is None
    assert res.epsilon == epsilon_for(
        noise_multiplier=1.0, sample_rate=res.sample_rate, steps=res.steps, delta=res.delta, accountant="rdp"
    )
    full = sum(p.numel() for p in bert.model.parameters())
    assert 0 < res.num_trainable_parameters < full
    assert hook_count(res.model) == 0 and not opacus_leftovers(res.model)


def test_noise_actually_applied(bert, sents):
    """Same seed: same weights; tiny vs huge noise: different weights (the noise reaches the update)."""
    kw = dict(
        model=bert, train_data=sents.members, epochs=1, batch_size=16, lr=1e-3, accountant="rdp", trainable="head"
    )
    a = dp_finetune(noise_multiplier=1e-3, **kw).model.classifier.weight
    b = dp_finetune(noise_multiplier=50.0, **kw).model.classifier.weight
    c = dp_finetune(noise_multiplier=1e-3, **kw).model.classifier.weight
    assert torch.equal(a, c)  # deterministic for a seed
    assert (a - b).abs().max() > 1e-4
    # AdamW normalizes step sizes, so huge noise shows as a random direction: far less aligned with the
    # low-noise update than two low-noise runs are with each other.
    w0 = bert.model.classifier.weight
    cos = torch.nn.functional.cosine_similarity((a - w0).flatten(), (b - w0).flatten(), dim=0)
    assert cos < 0.9


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be a positive"),
        ({"target_epsilon": -1.0}, "target_epsilon must be a positive"),
        ({"target_epsilon": 8.0, "delta": 1.0}, "delta must be in (0, 1)"),
        ({"target_epsilon": 8.0, "delta": 1.5}, "delta >= 1 gives no guarantee"),
        ({}, "give target_epsilon"),
        ({"target_epsilon": 8.0, "noise_multiplier": 1.0}, "not both"),
        ({"target_epsilon": 8.0, "batch_size": 500}, "fewer than batch_size 500"),
        ({"target_epsilon": 8.0, "accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_clear_errors(bert, sents, kw, needle):
    args = dict(model=bert, train_data=sents.members, epochs=1, batch_size=16, lr=1e-3)
    args.update(kw)
    with pytest.raises(DPConfigError) as err:
        dp_finetune(**args)
    assert needle in str(err.value)


def test_all_problems_listed_at_once(bert, sents):
    with pytest.raises(DPConfigError) as err:
        dp_finetune(
            model=bert, train_data=sents.members, target_epsilon=-1, delta=2.0, epochs=1, batch_size=500, lr=1e-3
        )
    assert len(err.value.problems) == 3


def _digits(n=120):
    rng = np.random.default_rng(0)
    images = rng.random((n, 1, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 10, n)
    return Dataset("digits", "synthetic", "image", [f"d{i}" for i in range(n)], labels, images=images)


def test_batchnorm_is_named_with_a_fix():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    )
    with pytest.raises(DPConfigError) as err:
        dp_finetune(model=model, train_data=_digits(), target_epsilon=8, epochs=1, batch_size=16, lr=1e-2)
    msg = str(err.value)
    assert "BatchNorm2d" in msg and "inner.1" in msg and "GroupNorm" in msg and "ModuleValidator.fix" in msg


def test_plain_torch_cnn_and_delta_warning():
    from fmaudit.targets.vision import digits_cnn

    data = _digits()
    split = member_split(data, member_fraction=0.5, seed=0)
    with pytest.warns(DPPrivacyWarning, match="not below 1/N"):
        res = dp_finetune(
            model=digits_cnn(),
            train_data=split.members,
            target_epsilon=8,
            delta=0.05,
            epochs=1,
            batch_size=12,
            lr=1e-2,
            accountant="rdp",
        )
    assert res.delta == 0.05 and any("1/N" in n for n in res.notes)
    assert res.epsilon <= 8 and res.steps == 5
    assert hook_count(res.model) == 0 and not opacus_leftovers(res.model)


def test_vit_last_layers(tiny_vit_dir):
    from fmaudit.targets import load_target

    vit = load_target(model=str(tiny_vit_dir), task="image-classification", num_labels=10)
    split = member_split(_digits(), member_fraction=0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = dp_finetune(
            model=vit,
            train_data=split.members,
            validation_data=split.nonmembers,
            target_epsilon=8,
            epochs=1,
            batch_size=12,
            lr=1e-3,
            accountant="rdp",
            trainable="last_n_layers",
            n_layers=1,
        )
    assert res.epsilon <= 8 and "accuracy" in res.validation_utility
    assert hook_count(res.model) == 0 and not opacus_leftovers(res.model)


def test_causal_lm_lora_merged_back(tiny_llama_dir):
    from fmaudit.targets import load_target

    lm = load_target(model=str(tiny_llama_dir), task="causal-lm", max_length=24)
    texts, _ = make_sentences(80, seed=1)
    ds = Dataset("lm", "synthetic", "text", [f"t{i}" for i in range(80)], texts=texts)
    split = member_split(ds, member_fraction=0.5, seed=0)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = dp_finetune(
        model=lm,
        train_data=split.members,
        validation_data=split.nonmembers,
        target_epsilon=8,
        epochs=1,
        batch_size=8,
        lr=5e-3,
        accountant="rdp",
        trainable="lora",
        lora_r=4,
    )
    model = res.model
    assert type(model).__name__ == "LlamaForCausalLM"  # adapters merged: no PEFT wrapper left
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert set(model.state_dict()) == set(before)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    assert 0 < res.num_trainable_parameters < sum(v.numel() for v in before.values()) / 10
    assert "perplexity" in res.validation_utility and res.epsilon <= 8
    assert hook_count(model) == 0 and not opacus_leftovers(model)
