"""Book-keeping clipping (clipping="bookkeeping"): the clipped, summed gradient of one backward pass equals the
reference built from Opacus' per-sample gradients (clip each to C, sum) on a tiny BERT, full MiniLM, the bundled
digits CNN and a tiny ViT, before any noise; a planted wrong norm is caught by the same comparison; unsupported layers fall back
to Opacus' hooks and say so; and dp_finetune with it spends the same epsilon as hooks and trains."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmaudit.privacy.dp import bookkeeping_layers
from fmaudit.privacy.dp.bookkeeping import CLIP_EPS, BookkeepingModule, unsupported_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5


def opacus_reference(model: nn.Module, loss_fn, batch, max_grad_norm: float) -> tuple[dict, torch.Tensor, dict]:
    """Opacus' per-sample gradients (hooks) of `loss_fn(model, batch)` ([B] losses), each example's clipped to C
    with Opacus' factor min(1, C / (norm + 1e-6)), summed. Returns (grads by name, per-example norms, scale by
    name: sum_i ||c_i grad_i||, the size of the sum before the examples' gradients cancel)."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    loss_fn(gsm, batch).sum().backward()
    named = [(n, p) for n, p in gsm._module.named_parameters() if p.requires_grad]
    flat = {n: p.grad_sample.reshape(p.grad_sample.shape[0], -1) for n, p in named}
    norms = torch.stack([g.pow(2).sum(1) for g in flat.values()]).sum(0).sqrt()
    c = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    grads = {n: torch.einsum("b,b...->...", c, p.grad_sample) for n, p in named}
    scale = {n: float((c * g.norm(dim=1)).sum()) for n, g in flat.items()}
    gsm._close()
    return grads, norms, scale


def bookkeeping_grads(model: nn.Module, loss_fn, batch, max_grad_norm: float) -> tuple[dict, torch.Tensor]:
    """The clipped summed gradient of one book-keeping backward pass (no noise), by name, and the norms."""
    work = copy.deepcopy(model)
    bk = BookkeepingModule(work)
    norms = bk.clipped_backward(loss_fn(bk, batch), max_grad_norm)
    bk.cleanup()
    return {n: p.grad for n, p in work.named_parameters() if p.requires_grad}, norms


def worst_relative_error(got: dict, ref: dict, scale: dict | None = None) -> float:
    """max over tensors of ||got - ref|| / ||ref|| (or / scale[name] when given)."""
    assert set(got) == set(ref)
    return max(float((got[k] - ref[k]).norm()) / (scale[k] if scale else float(ref[k].norm())) for k in ref)


def check_against_opacus(
    model: nn.Module, loss_fn, batch, *, dtype: torch.dtype = torch.float64, planted: bool = False
) -> float:
    """Compare with C at the median per-example norm (half the examples clipped, half not). In float64 the error
    is relative to the summed gradient itself; in float32 relative to its size before the examples' gradients
    cancel (float32 summation order alone moves a strongly cancelled sum by ~1e-4 of itself)."""
    model = copy.deepcopy(model).to(dtype).train()
    batch = _cast(batch, dtype)
    _, norms, _ = opacus_reference(model, loss_fn, batch, 1e9)
    c = float(norms.median())
    ref, ref_norms, scale = opacus_reference(model, loss_fn, batch, c)
    got, got_norms = bookkeeping_grads(model, loss_fn, batch, c)
    if not planted:
        assert torch.allclose(got_norms, ref_norms, rtol=TOL)
    assert bool((ref_norms > c).any()) and bool((ref_norms < c).any())
    return worst_relative_error(got, ref, None if dtype == torch.float64 else scale)


def _cast(batch, dtype):
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast(v, dtype) for v in batch)
    return batch.to(dtype) if torch.is_floating_point(batch) else batch


# --- models --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [
        "a good film",
        "awful, slow and far too long for what it is",
        "fine",
        "the best day of my life so far",
        "meh",
        "I would not watch it again",
        "brilliant acting",
        "the plot made no sense at all to me",
    ]
    enc = tok(texts, padding=True, return_tensors="pt")  # padded: different lengths in one batch
    b, length = enc["input_ids"].shape
    batch = {**enc, "position_ids": torch.arange(length).repeat(b, 1), "labels": torch.tensor([1, 0] * 4)}
    return model, batch


def _bert_loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits, batch["labels"], reduction="none")


def _image_loss(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(getattr(out, "logits", out), y, reduction="none")


def _digits(n: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y[:n])


@pytest.fixture(scope="module")
def digits_cnn():
    from fmaudit.targets import load_target

    return load_target(model="bundled:digits-cnn", seed=0).model


@pytest.fixture(scope="module")
def tiny_vit(tiny_vit_dir):
    """The tiny ViT with its bare position / CLS tensors frozen (ViTEmbeddings holds them as plain parameters:
    neither book-keeping nor Opacus' hooks have a per-sample rule for them); patch conv, attention, MLP,
    LayerNorms and head trainable."""
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(
        tiny_vit_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.vit.embeddings.cls_token.requires_grad_(False)
    model.vit.embeddings.position_embeddings.requires_grad_(False)
    return model


# --- equality with Opacus' per-sample reference --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiny_bert_matches_opacus(tiny_bert, dtype):
    model, batch = tiny_bert
    assert check_against_opacus(model, _bert_loss, batch, dtype=dtype) <= TOL


def test_full_minilm_matches_opacus(minilm_tokenizer_dir):
    """The benchmark's model itself: all of pre-trained MiniLM (22.7M parameters) trainable, a padded batch."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(
        minilm_tokenizer_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    enc = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)(
        ["a good film", "awful, slow and far too long for what it is", "fine", "the best day of my life so far"],
        padding=True,
        return_tensors="pt",
    )
    b, length = enc["input_ids"].shape
    batch = {**enc, "position_ids": torch.arange(length).repeat(b, 1), "labels": torch.tensor([1, 0, 1, 1])}
    assert check_against_opacus(model, _bert_loss, batch) <= TOL


def test_digits_cnn_matches_opacus(digits_cnn):
    assert any(isinstance(m, nn.Conv2d) for m in digits_cnn.modules())
    assert check_against_opacus(digits_cnn, _image_loss, _digits(12)) <= TOL


def test_tiny_vit_matches_opacus(tiny_vit):
    assert check_against_opacus(tiny_vit, _image_loss, _digits(10)) <= TOL


@pytest.mark.parametrize("which", ["cnn", "bert"])
def test_both_norm_strategies_match_opacus(which, digits_cnn, tiny_bert, monkeypatch):
    """The hybrid picks ghost norms or instantiation per layer; force each everywhere: same result."""
    model, loss_fn, batch = (
        (digits_cnn, _image_loss, _digits(8)) if which == "cnn" else (tiny_bert[0], _bert_loss, tiny_bert[1])
    )
    for ghost in (True, False):
        monkeypatch.setattr(bookkeeping_layers, "use_ghost", lambda *_a, _g=ghost: _g)
        assert check_against_opacus(model, loss_fn, batch) <= TOL


def test_planted_wrong_norm_is_caught(tiny_bert, monkeypatch):
    """A LayerNorm norm that leaves out its bias (a plausible bug) shifts the clip factors: the comparison
    sees it, far above the tolerance."""
    rule = bookkeeping_layers.LAYER_RULES[nn.LayerNorm]

    def wrong_norms(layer, calls, grams):
        sq, per_example = rule.norms(layer, calls, grams)
        return sq - per_example["bias"].pow(2).sum(1), per_example

    monkeypatch.setitem(
        bookkeeping_layers.LAYER_RULES,
        nn.LayerNorm,
        bookkeeping_layers.LayerRule(rule.run, rule.input_grad, wrong_norms, rule.grads, rule.unsupported),
    )
    model, batch = tiny_bert
    assert check_against_opacus(model, _bert_loss, batch, planted=True) > 100 * TOL


# --- fallback and the training path ----------------------------------------------------------------------------


class _WithGroupNorm(nn.Module):
    """GroupNorm: Opacus' hooks have a per-sample rule for it, book-keeping does not."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.norm(self.inp(x)))


def test_unsupported_layers_are_named_and_fall_back_to_hooks():
    from opacus import PrivacyEngine

    from fmaudit.privacy.dp.clipping import CLIPPING_MODES

    model = _WithGroupNorm()
    assert [u.split(" ")[0] for u in unsupported_layers(model)] == ["norm"]
    with pytest.raises(ValueError, match="Opacus' per-sample gradient hooks"):
        BookkeepingModule(model)
    model.norm.requires_grad_(False)  # frozen: nothing to clip there
    assert unsupported_layers(model) == []
    model.norm.requires_grad_(True)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert any("shared" in u for u in unsupported_layers(tied))

    data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 2, (16,)))
    kw = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode="bookkeeping",
    )
    with pytest.warns(UserWarning, match=r"norm \(GroupNorm: no book-keeping rule.*hooks instead"):
        gsm, opt, _dl = CLIPPING_MODES["bookkeeping"].make_private(PrivacyEngine(accountant="rdp"), kw)
    assert type(gsm).__name__ == "GradSampleModule"
    x, y = data.tensors
    CLIPPING_MODES["bookkeeping"].loss(gsm, opt, F.cross_entropy(gsm(x[:4]), y[:4], reduction="none")).backward()
    opt.step()


def test_cleanup_restores_the_model(tiny_bert):
    model, batch = tiny_bert
    work = copy.deepcopy(model)
    with torch.no_grad():
        before = _bert_loss(work, batch)
    bk = BookkeepingModule(work)
    assert bk.config is work.config  # attributes pass through, like Opacus' GradSampleModule
    bk.clipped_backward(_bert_loss(bk, batch), 1.0)
    with pytest.raises(ValueError, match="second backward"):
        bk.forbid_grad_accumulation()
        bk.clipped_backward(_bert_loss(bk, batch), 1.0)
    bk.cleanup()
    assert not any("forward" in m.__dict__ for m in work.modules())
    with torch.no_grad():
        assert torch.equal(_bert_loss(work, batch), before)


def test_dp_finetune_bookkeeping_same_epsilon_as_hooks_and_learns():
    """Digits CNN on a TensorDataset at epsilon 4: book-keeping spends exactly the epsilon hooks does (same noise,
    sample rate and steps) and trains far above chance (0.1), as hooks does (0.72 both when written)."""
    from fmaudit.privacy import dp_finetune
    from fmaudit.targets import load_target

    x, y = _digits(1500)
    train = torch.utils.data.TensorDataset(x[:1200], y[:1200])
    val = torch.utils.data.TensorDataset(x[1200:], y[1200:])
    target = load_target(model="bundled:digits-cnn", seed=0)
    runs = {
        mode: dp_finetune(
            model=target,
            train_data=train,
            validation_data=val,
            target_epsilon=4.0,
            epochs=8,
            batch_size=100,
            lr=5e-3,
            accountant="rdp",
            clipping=mode,
        )
        for mode in ("bookkeeping", "hooks")
    }
    bk, hooks = runs["bookkeeping"], runs["hooks"]
    assert bk.clipping == "bookkeeping" and hooks.clipping == "hooks"
    assert bk.epsilon == hooks.epsilon and bk.epsilon <= 4.0
    assert (bk.noise_multiplier, bk.sample_rate, bk.steps) == (hooks.noise_multiplier, hooks.sample_rate, hooks.steps)
    assert bk.validation_utility["accuracy"] > 0.5
    # same noise stream and the same clipped sums (up to float rounding): the two runs end up alike
    assert abs(bk.validation_utility["accuracy"] - hooks.validation_utility["accuracy"]) <= 0.05
    assert not any("forward" in m.__dict__ for m in bk.model.modules())
    assert not any(hasattr(p, a) for p in bk.model.parameters() for a in ("grad_sample", "summed_grad"))
    assert np.isfinite(bk.epoch_losses).all()


def test_dp_finetune_bookkeeping_bert_split_physical_batches(tiny_bert_dir):
    """A text target with Poisson batches split into physical ones (BatchMemoryManager): the clipped sums of the
    pieces accumulate into one noisy step per logical batch; the model comes back plain and moved."""
    from fmaudit.data import Dataset
    from fmaudit.privacy import dp_finetune
    from fmaudit.targets import load_target
    from fmaudit.testing import make_sentences

    texts, labels = make_sentences(96)
    data = Dataset("s", "synthetic", "text", [f"s{i}" for i in range(96)], np.array(labels), texts=texts)
    bert = load_target(model=str(tiny_bert_dir), task="text-classification", num_labels=2, max_length=32)
    res = dp_finetune(
        model=bert,
        train_data=data,
        noise_multiplier=1.0,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        accountant="rdp",
        clipping="bookkeeping",
        max_physical_batch_size=6,
    )
    assert res.clipping == "bookkeeping" and res.steps == 6
    assert res.target.weights_sha256() != bert.weights_sha256()
    assert not any("forward" in m.__dict__ for m in res.model.modules())
    assert np.isfinite(res.epoch_losses).all()


def test_optimizer_update_is_opacus_bit_for_bit():
    """The book-keeping optimizer (no copy of the clipped sum, noise added in place) gives exactly the update of
    Opacus' fast-gradient-clipping optimizer for the same gradients and noise seed, and is accounted alike."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fmaudit.privacy.dp.bookkeeping import _optimizer_class

    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(3)]
    results = []
    for cls in (DPOptimizerFastGradientClipping, _optimizer_class()):
        params = [nn.Parameter(torch.ones_like(g)) for g in grads]
        opt = cls(
            torch.optim.SGD(params, lr=0.5),
            noise_multiplier=1.3,
            max_grad_norm=0.7,
            expected_batch_size=4,
            generator=torch.Generator().manual_seed(1),
        )
        for _ in range(2):  # second round: a zero_grad() without set_to_none must not disturb the next step
            opt.zero_grad(set_to_none=False)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_dp_finetune_says_when_bookkeeping_falls_back_to_hooks():
    """The result names the mode that ran: a model with a layer book-keeping does not cover reports "hooks", and
    its notes say why."""
    import warnings

    from fmaudit.privacy.dp import DPPrivacyWarning, dp_finetune

    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 2, (64,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DPPrivacyWarning)
        res = dp_finetune(
            model=_WithGroupNorm(),
            train_data=data,
            target_epsilon=8.0,
            epochs=1,
            batch_size=16,
            lr=1e-2,
            clipping="bookkeeping",
        )
    assert res.clipping == "hooks"
    assert any("book-keeping clipping handles" in n and "norm (GroupNorm" in n for n in res.notes), res.notes
