"""dp_finetune takes what users have (issue 15): any nn.Module on a TensorDataset, a Hugging Face model instance
on a tokenized datasets.Dataset, a DataLoader, a custom per-example loss; the moved-tensor guard; DP defaults.

Every training test checks epsilon <= target, a plain model back (no Opacus hooks or attributes) and held-out
utility well above chance."""

import math
import warnings

import pytest
import torch
from torch import nn

from fmaudit.privacy import DPConfigError, dp_finetune
from fmaudit.privacy.dp import DPTrainingError, dp_defaults, epsilon_for
from fmaudit.privacy.dp.training import _fingerprints, _unmoved
from fmaudit.targets.base import hook_count
from fmaudit.testing import make_sentences, opacus_leftovers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' "Secure RNG turned off" (pinned in test_dp_defects)
        yield


def _assert_plain(model: nn.Module, cls: type) -> None:
    assert type(model) is cls  # the caller's class: no GradSampleModule, no wrapper
    assert hook_count(model) == 0 and not opacus_leftovers(model)
    assert not model.training


@pytest.fixture(scope="module")
def digits():
    """sklearn digits as features in [0, 1] (64 columns): 1,200 training, 597 held-out examples."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[va], y[va]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _chance_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# --- 1. the most common case: an nn.Module on a TensorDataset --------------------------------------------------


def test_mlp_on_tensor_dataset_at_epsilon_2(digits):
    xt, yt, xv, yv = digits
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start_acc = _chance_accuracy(model, xv, yv)
    res = dp_finetune(
        model=model,
        train_data=torch.utils.data.TensorDataset(xt, yt),
        validation_data=torch.utils.data.TensorDataset(xv, yv),
        target_epsilon=2.0,
        epochs=10,
        batch_size=120,
        lr=5e-3,
        accountant="rdp",
    )
    assert 1.5 < res.epsilon <= 2.0
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
    assert res.steps == 10 * math.ceil(1200 / 120) and res.delta == 1e-5 and res.noise_multiplier > 1
    assert len(res.epsilon_per_epoch) == 10 and res.ledger_steps[-1] == res.steps
    _assert_plain(res.model, nn.Sequential)
    # the caller's model is untouched; the returned one trained
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # ten classes: chance is 0.1; the untrained MLP is near it, the DP model far above
    assert start_acc < 0.2
    assert res.validation_utility["accuracy"] > 0.6 and res.validation_utility["num_examples"] == 597
    assert res.validation_utility["accuracy"] == pytest.approx(_chance_accuracy(res.model, xv, yv))
    assert "accuracy" in res.train_utility and res.inputs.startswith("Sequential (classifier) on TensorDataset")


def test_dataloader_batch_size_used_and_poisson_said(digits):
    xt, yt, xv, yv = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=150, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=64)
    res = dp_finetune(
        model=_mlp(), train_data=loader, validation_data=val, target_epsilon=4.0, epochs=8, lr=5e-3, accountant="rdp"
    )
    assert res.batch_size == 150 and res.sample_rate == 1 / 8 and res.steps == 64
    assert res.epsilon <= 4.0
    assert any("DataLoader" in n and "Poisson sampling" in n and "replaces its sampler" in n for n in res.notes)
    _assert_plain(res.model, nn.Sequential)
    assert res.validation_utility["accuracy"] > 0.6


class _DictDigits(torch.utils.data.Dataset):
    """Dict items with names the default loss does not know: the custom loss reads them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "digit": self.y[i]}


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, features):
        return self.net(features)


def test_custom_per_example_loss_on_dict_items(digits):
    xt, yt, xv, yv = digits
    calls = []

    def loss_fn(model, batch):
        calls.append(sorted(batch))
        logits = model(features=batch["features"])
        return nn.functional.cross_entropy(logits, batch["digit"], reduction="none", label_smoothing=0.1)

    res = dp_finetune(
        model=_TwoInputs(),
        train_data=_DictDigits(xt, yt),
        validation_data=_DictDigits(xv, yv),
        loss_fn=loss_fn,
        target_epsilon=3.0,
        epochs=10,
        batch_size=120,
        lr=5e-3,
        accountant="rdp",
    )
    assert res.epsilon <= 3.0
    assert calls and all(c == ["digit", "features"] for c in calls)  # the user's keys, nothing added
    _assert_plain(res.model, _TwoInputs)
    # no 'labels' key: accuracy cannot be read off the batch, the custom loss is the utility
    assert "accuracy" not in res.validation_utility
    assert res.validation_utility["loss"] < 0.75 * math.log(10)  # chance: log(10) = 2.30 (+ smoothing)
    with torch.no_grad():
        assert float((res.model(xv).argmax(1) == yv).float().mean()) > 0.6


def test_a_batch_mean_loss_is_refused_with_every_other_problem(digits):
    xt, yt, _, _ = digits
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    def mean_loss(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)  # a batch mean: cannot be clipped per example

    with pytest.raises(DPConfigError) as err:
        dp_finetune(
            model=model,
            train_data=torch.utils.data.TensorDataset(xt, yt),
            loss_fn=mean_loss,
            target_epsilon=-1,
            epochs=1,
            batch_size=16,
            lr=1e-3,
        )
    msg = str(err.value)
    assert len(err.value.problems) == 3
    assert "one loss per example" in msg and "shape [2]" in msg
    assert "BatchNorm1d" in msg and "ModuleValidator.fix" in msg and "GroupNorm" in msg
    assert "target_epsilon must be a positive" in msg


def test_refusals_name_what_is_wrong(digits):
    xt, yt, _, _ = digits
    feats_only = torch.utils.data.TensorDataset(xt)
    with pytest.raises(DPConfigError, match="the batch has no labels"):
        dp_finetune(model=_mlp(), train_data=feats_only, target_epsilon=2, epochs=1, batch_size=16, lr=1e-3)
    with pytest.raises(DPConfigError, match="map-style"):
        dp_finetune(model=_mlp(), train_data=_Stream(), target_epsilon=2, epochs=1, batch_size=16, lr=1e-3)
    with pytest.raises(DPConfigError, match="model must be"):
        dp_finetune(model=lambda x: x, train_data=feats_only, target_epsilon=2, epochs=1, batch_size=16, lr=1e-3)


def test_fmaudit_target_on_torch_images_with_a_custom_tuple_loss():
    """An fmaudit target (the bundled digits CNN, [0, 1] pixels inside) on a TensorDataset of sklearn's digit
    images, with a custom per-example loss on the (x, y) tuple: the target comes back around the trained model,
    and accuracy is still reported (the default forward gives logits for the tuple's labels)."""
    from sklearn.datasets import load_digits

    import fmaudit
    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    target = fmaudit.load_target(model="bundled:digits-cnn", seed=0)
    before = target.weights_sha256()
    seen = []

    def loss_fn(model, batch):
        images, labels = batch
        seen.append(len(batch))
        return nn.functional.cross_entropy(model(images), labels, reduction="none")

    res = dp_finetune(
        model=target,
        train_data=torch.utils.data.TensorDataset(x[:1200], y[:1200]),
        validation_data=torch.utils.data.TensorDataset(x[1200:], y[1200:]),
        loss_fn=loss_fn,
        target_epsilon=4.0,
        epochs=8,
        batch_size=100,
        lr=5e-3,
        accountant="rdp",
    )
    assert res.epsilon <= 4.0 and set(seen) == {2}
    _assert_plain(res.model, PixelClassifier)
    assert isinstance(res.target, ImageClassifier) and res.target.model is res.model
    assert target.weights_sha256() == before and res.target.weights_sha256() != before
    assert res.validation_utility["accuracy"] > 0.5  # ten classes: chance 0.1
    predicted = res.target.logits_images(x[1200:]).argmax(1)
    assert res.validation_utility["accuracy"] == pytest.approx(float((predicted == y[1200:].numpy()).mean()))


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(64), 0


# --- 2. a Hugging Face model instance on a tokenized datasets.Dataset -------------------------------------------


@pytest.fixture(scope="module")
def pretrained_bert(tiny_bert_dir):
    """The tiny BERT 'pre-trained' non-privately on public sentences (DP fine-tuning starts from public
    pre-trained weights), then given a zero classification head: it predicts one class for everything, so its
    held-out accuracy is exactly chance (0.5) until the private data trains the head."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir)
    texts, labels = make_sentences(800, seed=11)  # public data, not the private set below
    enc = tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    y = torch.tensor(labels)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _epoch in range(3):
        for idx in torch.randperm(len(y)).split(32):
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def tokenized(pretrained_bert):
    import datasets

    _, tok = pretrained_bert
    texts, labels = make_sentences(700, seed=3)
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=32), batched=True)  # unpadded input_ids
    return ds.select(range(500)), ds.select(range(500, 700))


def test_hf_model_instance_on_tokenized_datasets(pretrained_bert, tokenized):
    from transformers import BertForSequenceClassification

    model, _ = pretrained_bert
    train, val = tokenized
    res = dp_finetune(
        model=model,
        train_data=train,
        validation_data=val,
        target_epsilon=8.0,
        epochs=2,
        batch_size=50,
        lr=5e-3,
        trainable="last_n_layers",
        n_layers=1,
        accountant="rdp",
    )
    assert res.epsilon <= 8.0 and res.steps == 20 and res.clipping == "bookkeeping"  # auto: it covers BERT
    _assert_plain(res.model, BertForSequenceClassification)
    assert any("not passed to the model" in n and "text" in n for n in res.notes)
    assert not torch.equal(res.model.classifier.weight, model.classifier.weight)  # trained a copy
    assert float(model.classifier.weight.abs().sum()) == 0.0  # the caller's model is untouched
    # a zero head scores exactly 0.5 on the balanced held-out set; the DP model far above it
    assert res.validation_utility["accuracy"] >= 0.8 and res.validation_utility["num_examples"] == 200
    assert callable(res.model.save_pretrained)  # a plain PreTrainedModel: saveable
    assert res.inputs.startswith("BertForSequenceClassification (classifier) on Dataset")


def test_hf_causal_lm_instance_default_lm_loss(tiny_llama_dir):
    """A causal LM instance on tokenized text (no labels column): the default loss is the per-sequence
    next-token loss, and utility is perplexity."""
    import datasets
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    texts, _ = make_sentences(160, seed=5)
    ds = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=16), batched=True, remove_columns=["text"]
    )
    res = dp_finetune(
        model=model,
        train_data=ds.select(range(120)),
        validation_data=ds.select(range(120, 160)),
        target_epsilon=8.0,
        epochs=2,
        batch_size=20,
        lr=2e-2,
        accountant="rdp",
    )
    assert res.epsilon <= 8.0 and res.steps == 12
    _assert_plain(res.model, LlamaForCausalLM)
    ppl = res.validation_utility["perplexity"]
    # the random-init model is a near-uniform guess over the vocabulary (perplexity ~ V = 30,522); DP training
    # on 120 sequences learns the repeated filler words
    assert ppl < tok.vocab_size / 3
    assert res.validation_utility["loss"] == pytest.approx(math.log(ppl), rel=0.05)


# --- 3. the moved-tensor guard -------------------------------------------------------------------------------


class _UndoesItsUpdates(nn.Module):
    """A model whose body silently throws its training away: it keeps a pristine copy of its body and puts it
    back whenever it is switched to eval mode (a weight-swapping wrapper with a bug). DP training reports
    epsilon as usual, but the body that comes back never moved."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        self.pristine = {k: v.detach().clone() for k, v in self.body.state_dict().items()}

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            with torch.no_grad():
                for k, v in self.body.named_parameters():
                    v.copy_(self.pristine[k])
        return self


def test_a_tensor_that_did_not_move_is_an_error(digits):
    xt, yt, _, _ = digits
    with pytest.raises(DPTrainingError) as err:
        dp_finetune(
            model=_UndoesItsUpdates(),
            train_data=torch.utils.data.TensorDataset(xt, yt),
            target_epsilon=8,
            epochs=1,
            batch_size=120,
            lr=1e-3,
            accountant="rdp",
        )
    assert sorted(err.value.tensors) == ["body.bias", "body.weight"]  # the head moved, and is not named
    assert "10 noisy steps" in str(err.value) and "opacus#820" in str(err.value)


def test_guard_names_a_replaced_parameter_the_optimizer_does_not_hold():
    """The opacus#820 pattern: a parameter object replaced after the optimizer captured it (lazy placement)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = _fingerprints(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())  # what the model now uses
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert _unmoved(model, before, opt) == ["0.weight (not the tensor the optimizer updates)"]


# --- 4. DP defaults ------------------------------------------------------------------------------------------


def test_dp_defaults_are_picked_and_said(digits):
    assert dp_defaults(1200, epochs=None, batch_size=None, lr=None, trainable="all") == (
        3,
        120,
        5e-4,
        {"batch_size": 120, "lr": 5e-4, "epochs": 3},
    )
    assert dp_defaults(100_000, epochs=2, batch_size=None, lr=None, trainable="lora")[1:] == (
        1024,
        1e-3,
        {"batch_size": 1024, "lr": 1e-3},
    )
    assert dp_defaults(40, epochs=1, batch_size=8, lr=0.1, trainable="all") == (1, 8, 0.1, {})
    xt, yt, xv, yv = digits
    res = dp_finetune(
        model=_mlp(), train_data=torch.utils.data.TensorDataset(xt, yt), target_epsilon=8.0, accountant="rdp"
    )
    assert (res.batch_size, res.lr, res.epochs) == (120, 5e-4, 3) and res.picked_defaults == {
        "batch_size": 120,
        "lr": 5e-4,
        "epochs": 3,
    }
    note = next(n for n in res.notes if n.startswith("DP training defaults picked"))
    assert "Li et al." in note and "batch_size=120" in note and "does not count" in note
    assert res.epsilon <= 8.0


def test_peft_model_instance_trains_its_adapters_and_comes_back_as_given(pretrained_bert, tokenized):
    """A PEFT model built by the user (device placement first, then get_peft_model, as opacus#820 advises):
    trainable='all' means its own trainable tensors; it comes back unmerged, flags as given, adapters moved."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model

    base, _ = pretrained_bert
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    train, val = tokenized
    res = dp_finetune(
        model=peft_model,
        train_data=train,
        validation_data=val,
        target_epsilon=8.0,
        epochs=2,
        batch_size=50,
        lr=1e-2,
        accountant="rdp",
    )
    assert res.epsilon <= 8.0
    assert isinstance(res.model, PeftModel) and hook_count(res.model) == 0 and not opacus_leftovers(res.model)
    assert {n: p.requires_grad for n, p in res.model.named_parameters()} == flags
    trained = dict(res.model.named_parameters())
    assert any("lora_A" in n for n in start) and any("classifier" in n for n in start)
    assert all(not torch.equal(trained[n], v) for n, v in start.items())  # every adapter / head tensor moved
    assert res.num_trainable_parameters == sum(v.numel() for v in start.values())
    assert any("PEFT model" in n for n in res.notes)
    assert res.validation_utility["accuracy"] >= 0.8
