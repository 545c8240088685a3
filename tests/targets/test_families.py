"""Every model family through every module that accepts it (issue 19, item 8).

Tiny DistilBERT-, RoBERTa-, BERT-, GPT-2- (causal LM and sequence classifier), Llama- and ViT-style (1-channel
8x8) checkpoints are built from their Hugging Face configs and saved as real local checkpoints with a tokenizer /
image processor (GPT-2 as it ships: byte-level BPE, no pad token), then run through one small recipe each with
the real runner: utility, DP fine-tuning (all parameters, and LoRA) producing DP twins, membership inference
(loss + RMIA, two reference models) on the source and on its DP twin, the canary audit, the task's robustness
modules and attribution; every unit must end ok. Beside it, per family: the target feeds the model what its own
forward would build (RoBERTa's positions start after the padding index; GPT-2 embeds token_type_ids with its word
embeddings), and the per-example gradient norms DP-SGD clips (hooks and ghost clipping) equal each example's
own (DistilBERT's broadcast position ids, GPT-2's Conv1D and tied embeddings, ViT's bare parameters).
Architecture differences must fail here before they fail a user. Parametrized by family, so `-n auto` spreads
them over workers and a failure names the family and each failing unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT_CLS, CAUSAL_LM, IMAGE_CLS = "text-classification", "causal-lm", "image-classification"
MAX_LENGTH = 24
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

FAMILIES: dict[str, str] = {
    "distilbert": TEXT_CLS,
    "roberta": TEXT_CLS,
    "bert": TEXT_CLS,
    "gpt2": CAUSAL_LM,
    "llama": CAUSAL_LM,
    "vit": IMAGE_CLS,
    "gpt2-cls": TEXT_CLS,  # GPT-2 as a sequence classifier: last-token pooling, no token type embeddings
}


AUTO_CLIPPING = {
    "distilbert": "bookkeeping",
    "roberta": "bookkeeping",
    "bert": "bookkeeping",
    "gpt2": "hooks",
    "llama": "ghost",  # RMSNorm: no book-keeping rule
    "vit": "ghost",  # bare class-token and position parameters
    "gpt2-cls": "ghost",  # Conv1D
}


def _wordpiece(minilm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _byte_level_bpe():
    """A small byte-level BPE tokenizer (GPT-2's kind) trained on the synthetic sentences; eos only, no pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from fmaudit.testing import make_sentences

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        make_sentences(400)[0], vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    eos = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos)


def build_checkpoint(family: str, root: Path, minilm_dir: Path) -> Path:
    """A tiny, randomly initialized checkpoint of `family`, saved under root/family with its preprocessor."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    d = root / family
    if family == "vit":
        cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=10, **SMALL)
        tf.ViTForImageClassification(cfg).save_pretrained(d)
        tf.ViTImageProcessor(do_resize=False, do_rescale=False, image_mean=[0.5], image_std=[0.5]).save_pretrained(d)
        return d
    if family in ("gpt2", "gpt2-cls"):
        # GPT-2 as it ships: a byte-level BPE tokenizer with no pad token, and no pad_token_id in its config
        # (the target pads with the eos token; last-token pooling needs the config to know it)
        tok = _byte_level_bpe()
        cfg = tf.GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_inner=64,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            num_labels=2,
        )
        assert tok.pad_token_id is None and cfg.pad_token_id is None
        # GPT2LMHeadModel ties its input / output embeddings; GPT2ForSequenceClassification pools the last token
        model = tf.GPT2LMHeadModel(cfg) if family == "gpt2" else tf.GPT2ForSequenceClassification(cfg)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        return d
    # The other text families take MiniLM's WordPiece tokenizer (these architectures accept any vocabulary).
    tok = _wordpiece(minilm_dir)
    vocab, pad = tok.vocab_size, tok.pad_token_id
    if family == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=vocab,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
            pad_token_id=pad,
            num_labels=2,
        )
        model = tf.DistilBertForSequenceClassification(cfg)
    elif family == "roberta":
        # position ids start at padding_idx + 1: the table must hold max_length + padding_idx + 1 rows
        cfg = tf.RobertaConfig(
            vocab_size=vocab,
            max_position_embeddings=MAX_LENGTH + pad + 2,
            pad_token_id=pad,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            type_vocab_size=1,
            num_labels=2,
            **SMALL,
        )
        model = tf.RobertaForSequenceClassification(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, max_position_embeddings=64, pad_token_id=pad, num_labels=2, **SMALL)
        model = tf.BertForSequenceClassification(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=pad, **SMALL
        )
        model = tf.LlamaForCausalLM(cfg)
    else:  # pragma: no cover
        raise ValueError(family)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def family_recipe(family: str, model_dir: Path, csv_path: Path, out: Path) -> dict[str, Any]:
    task = FAMILIES[family]
    dp = f"{family}-dp"
    if task == IMAGE_CLS:
        data = {"source": "bundled:digits", "limit": 100}
        finetune = {"data": "d", "epochs": 1, "batch_size": 16, "lr": 3e-3}
    else:
        data = {"source": str(csv_path), "id_column": "id", "limit": 80}
        if task == CAUSAL_LM:
            data["label_column"] = None
        finetune = {"data": "d", "epochs": 1, "batch_size": 16, "lr": 1e-3}
    target: dict[str, Any] = {"model": str(model_dir), "task": task, "finetune": finetune}
    if task != IMAGE_CLS:
        target["max_length"] = MAX_LENGTH
    audits: list[dict[str, Any]] = [
        {"use": "utility", "target": family, "params": {"bootstrap": 0}},
        # trainable: all (the default): every parameter gets per-example gradients, embeddings included
        {
            "use": "privacy.dp_finetune",
            "target": family,
            "produces": dp,
            "params": {"target_epsilon": 8.0, "epochs": 1, "accountant": "rdp", "lr": 1e-2, "eval_examples": 40},
        },
        # LoRA adapters on the attention projections, found by their names in each family
        {
            "use": "privacy.dp_finetune",
            "target": family,
            "produces": f"{family}-dp-lora",
            "params": {
                "target_epsilon": 8.0,
                "epochs": 1,
                "accountant": "rdp",
                "lr": 1e-2,
                "eval_examples": 20,
                "trainable": "lora",
                "lora_r": 2,
            },
        },
        {
            "use": "privacy.membership",
            "target": [family, dp],
            "params": {
                "attacks": ["loss", "rmia"],
                "reference_models": 2,  # default: last block + head train
                "bootstrap": 0,
                "null_permutations": 0,
                "evidence": 2,
            },
        },
    ]
    canary: dict[str, Any] = {"num_canaries": 20, "max_members": 40}
    if task == CAUSAL_LM:
        canary.update(secret_digits=4, exposure_candidates=50)
    audits.append({"use": "privacy.canary_audit", "target": family, "params": canary})
    explain = {
        "num_examples": 2,
        "quality": ["deletion", "randomization"],
        "bootstrap": 0,
        "curve_steps": 3,
        "random_orderings": 1,
        "sensitivity_examples": 0,
        "n_steps": 4,
        "internal_batch_size": 8,
    }
    if task == TEXT_CLS:
        audits.append(
            {
                "use": "robustness.text_attack",
                "target": family,
                "params": {"attack": "deepwordbug", "num_examples": 2, "max_evidence": 2},
            }
        )
        explain["methods"] = ["integrated_gradients", "gradient_x_input"]
    elif task == CAUSAL_LM:
        explain["methods"] = ["feature_ablation", "integrated_gradients"]
    else:
        audits.append(
            {
                "use": "robustness.image_attack",
                "target": family,
                "params": {
                    "attacks": ["fgsm", {"name": "pgd", "steps": 5}],
                    "epsilons": [0.1],
                    "num_examples": 4,
                    "num_images": 0,
                },
            }
        )
        audits.append(
            {
                "use": "robustness.certify",
                "target": family,
                "params": {
                    "n0": 10,
                    "n": 50,
                    "predict_n": 20,
                    "batch_size": 50,
                    "num_examples": 2,
                    "radii": [0.25],
                    "attack_steps": 2,
                    "attack_noise_samples": 2,
                },
            }
        )
        explain["methods"] = ["integrated_gradients", "saliency"]
        explain["heatmaps"] = False
    audits.append({"use": "explain.attribution", "target": family, "params": explain})
    return {
        "version": 1,
        "name": f"family-{family}",
        "seed": 0,
        "output_dir": str(out),
        "data": {"d": data},
        "targets": {family: target},
        "audits": audits,
    }


EXPECTED_UNITS: dict[str, set[tuple[str, str]]] = {}
for _f, _task in FAMILIES.items():
    _units = {
        ("utility", _f),
        ("privacy.dp_finetune", _f),
        ("privacy.dp_finetune#lora", _f),
        ("privacy.membership", _f),
        ("privacy.membership", f"{_f}-dp"),
        ("privacy.canary_audit", _f),
        ("explain.attribution", _f),
    }
    if _task == TEXT_CLS:
        _units.add(("robustness.text_attack", _f))
    if _task == IMAGE_CLS:
        _units |= {("robustness.image_attack", _f), ("robustness.certify", _f)}
    EXPECTED_UNITS[_f] = _units


TEXTS = ["the movie was good 1", "bad day today really so bad and boring 2", "love it 3"]


def assert_default_inputs(family: str, model_dir: Path) -> bool:
    """The target (and the DP API's module wrapper) feed the model what its own forward builds by default: the
    explicit position / token type ids they pass (for Opacus' per-example gradients) change nothing. RoBERTa
    numbers positions from padding_idx + 1; GPT-2 embeds token_type_ids with its word embeddings.
    Returns whether the model ties its input and output embeddings."""
    import torch

    from fmaudit.data import Dataset
    from fmaudit.privacy.dp import module_target
    from fmaudit.targets import load_target

    task = FAMILIES[family]
    target = load_target(model=str(model_dir), task=task, max_length=MAX_LENGTH)
    model = target.model
    if task == IMAGE_CLS:
        x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model.inner(pixel_values=(x - 0.5) / 0.5).logits.double().numpy()
        assert abs(target.logits_images(x) - ref).max() < 1e-5
        return False
    ref_rows, got_rows = [], []
    wrapped = module_target(model, task=task, pad_id=target.tokenizer.pad_token_id)
    for text in TEXTS:  # one at a time: no padding in the reference
        enc = target.tokenizer([text], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with torch.no_grad():
            out = model(**enc, **({"labels": enc["input_ids"]} if task == CAUSAL_LM else {}))
            ref_rows.append(float(out.loss) if task == CAUSAL_LM else out.logits[0].double().numpy())
            item = {"input_ids": enc["input_ids"][0]}
            batch = wrapped.collate([item])
            assert set(batch) <= {"input_ids", "attention_mask", "position_ids", "token_type_ids"}
            got = wrapped.forward(model, batch)
            if task != CAUSAL_LM:
                got_rows.append(got.logits[0].double().numpy())
    data = Dataset("texts", "texts", "text", [str(i) for i in range(len(TEXTS))], texts=TEXTS)
    if task == CAUSAL_LM:  # padded batch: the per-sequence mean next-token loss of each text
        diff = abs(target.per_example_loss(data) - ref_rows).max()
    else:
        import numpy as np

        diff = max(
            abs(target.logits_texts(TEXTS) - np.stack(ref_rows)).max(),
            abs(np.stack(got_rows) - np.stack(ref_rows)).max(),
        )
    assert diff < 1e-5, f"{family}: the target's inputs change the model's output by {diff:.2e}"
    out_emb = model.get_output_embeddings()
    return out_emb is not None and out_emb.weight is model.get_input_embeddings().weight  # tied weights


def _run_in_subprocess(recipe: dict, tmp_path: Path):
    """`run_recipe` in a fresh interpreter, as a user's `fmaudit run` would: under pytest's output capture,
    a run that follows a test which imported Google's dp-accounting (absl logging) in the same worker ended
    with pytest's captured stderr closed (seen only in that combination, never in a real process), which
    then failed every later test in the worker. A fresh process keeps each family independent of test order."""
    import json
    import subprocess
    import sys

    from fmaudit import load_report

    spec = tmp_path / "recipe.json"
    spec.write_text(json.dumps(recipe))
    code = (
        "import json, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from fmaudit.runner import run_recipe\n"
        "report = run_recipe(json.load(open(sys.argv[1])))\n"
        "print(report.run_id)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = [p for p in Path(recipe["output_dir"]).iterdir() if (p / "report.json").exists()]
    return load_report(run_dir)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_through_every_module(family, tmp_path, minilm_tokenizer_dir, sentiment_csv):
    model_dir = build_checkpoint(family, tmp_path / "models", minilm_tokenizer_dir)
    tied = assert_default_inputs(family, model_dir)
    assert tied == (family == "gpt2")  # GPT-2's LM head is its input embedding matrix
    report = _run_in_subprocess(family_recipe(family, model_dir, sentiment_csv, tmp_path / "reports"), tmp_path)

    assert report.error is None, f"{report.error.type}: {report.error.message}\n{report.error.traceback}"
    units = {
        (r.module + ("#lora" if r.produces and r.produces.endswith("-lora") else ""), r.target): r
        for r in report.audits
    }
    assert set(units) == EXPECTED_UNITS[family]
    problems = []
    for key, res in sorted(units.items()):  # every module accepts every family here: each unit must be ok
        if res.status != "ok":
            err = res.error
            detail = f"{err.type}: {err.message}\n{err.traceback or ''}" if err is not None else ""
            problems.append(f"{family} / {key[0]} on {key[1]}: {res.status}: {detail}")
    assert not problems, "\n\n".join(problems)

    # The DP twin really is another model of this family's architecture, trained on the same members.
    src, dp = report.targets[family], report.targets[f"{family}-dp"]
    assert dp.architecture == src.architecture and dp.weights_sha256 != src.weights_sha256
    assert dp.split.member_ids == src.split.member_ids
    dp_unit = units[("privacy.dp_finetune", family)]
    assert dp_unit.metrics["epsilon"].value <= 8.0 + 1e-6
    # trainable: all means every parameter (nothing of the architecture silently frozen: ViT's class token and
    # position embeddings are bare parameters, GPT-2's Conv1D weights are transposed, tied weights count once) ...
    params = dp_unit.tables["dp_parameters"]
    assert params["num_trainable_parameters"] == src.num_parameters
    # ... clipping "auto" is book-keeping where it covers every trainable layer, ghost clipping where it does not
    # (ViT's bare class token and position embeddings), and weights shared between modules (GPT-2's tied input /
    # output embeddings) switch to per-sample gradient hooks (ghost clipping's per-module norms would be wrong).
    assert params["clipping"] == AUTO_CLIPPING[family]
    lora = units[("privacy.dp_finetune#lora", family)].tables["dp_parameters"]
    assert lora["trainable"] == "lora" and 0 < lora["num_trainable_parameters"] < src.num_parameters / 2


def _no_dropout(model) -> None:
    """Dropout off in training mode (Opacus' hooks only fire in training mode): batch and single passes agree."""
    from torch import nn

    for key, value in model.config.to_dict().items() if hasattr(model, "config") else ():
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
            setattr(model.config, key, 0.0)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if isinstance(value, float) and "dropout" in key:
                setattr(m, key, 0.0)


@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_example_gradient_norms(family, clipping, tmp_path, minilm_tokenizer_dir):
    """What DP-SGD clips: the per-example gradient norm Opacus computes on a padded batch (per-sample gradients
    with hooks, ghost clipping's norms, or book-keeping's), with the inputs the DP loop feeds (the target's collate and the
    broadcast-id hooks), equals the norm of each example's gradient computed alone, for every family: tied
    weights sum both uses, GPT-2's Conv1D, ViT's bare class-token / position parameters and RoBERTa's shifted
    positions included. Tied weights under ghost clipping are refused by the DP pre-flight instead, and layers
    book-keeping does not cover send it to hooks with a note."""
    import torch
    from opacus import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    from fmaudit.privacy.dp import preflight
    from fmaudit.privacy.dp.training import _repeat_broadcast_ids
    from fmaudit.targets import load_target

    model_dir = build_checkpoint(family, tmp_path, minilm_tokenizer_dir)
    task = FAMILIES[family]
    target = load_target(model=str(model_dir), task=task, max_length=MAX_LENGTH)
    model = target.model
    _no_dropout(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    problems, _notes, mode = preflight(target, clipping=clipping)
    tied = family == "gpt2"
    if clipping == "ghost" and tied:
        assert any("shared between modules" in p for p in problems), problems
        return
    if clipping == "bookkeeping" and AUTO_CLIPPING[family] != "bookkeeping":
        assert not problems and mode == "hooks" and any("book-keeping" in n for n in _notes), (problems, _notes)
        return
    assert not problems and mode == clipping

    if task == IMAGE_CLS:
        x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        items = [{"pixels": x[i], "label": i} for i in range(3)]
    else:
        texts = ["good day", "awful awful movie today 2", "so happy with the show 3"]  # three lengths: padding
        items = [
            {"input_ids": ids, **({"label": i % 2} if task == TEXT_CLS else {})}
            for i, ids in enumerate(target.tokenize(texts))
        ]
    single = []
    for item in items:  # each example alone (no padding)
        model.zero_grad()
        target.loss(model, target.collate([item]), reduction="sum").backward()
        single.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))
    model.zero_grad()
    batch = target.collate(items)
    handles = _repeat_broadcast_ids(model)
    try:
        if clipping == "hooks":
            gsm = GradSampleModule(model, loss_reduction="sum")
            target.loss(gsm, batch, reduction="sum").backward()
            norms = torch.sqrt(sum((p.grad_sample.double().reshape(len(items), -1) ** 2).sum(1) for p in params))
        elif clipping == "bookkeeping":
            from fmaudit.privacy.dp.bookkeeping import BookkeepingModule

            gsm = BookkeepingModule(model)
            norms = gsm.clipped_backward(target.loss(gsm, batch, reduction="none"), 1e9).double()
            gsm._close = gsm.cleanup
        else:
            gsm = GradSampleModuleFastGradientClipping(
                model, loss_reduction="sum", use_ghost_clipping=True, max_grad_norm=1.0
            )
            target.loss(gsm, batch, reduction="sum").backward()
            norms = gsm.get_norm_sample().double()
        gsm._close()
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(
        norms,
        torch.stack(single),
        rtol=1e-3,
        atol=1e-6,
        msg=lambda m: f"{family} / {clipping}: per-example gradient norms differ: {m}",
    )


def test_random_token_canaries_from_byte_level_bpe(tmp_path, minilm_tokenizer_dir):
    """random_tokens canaries draw whole words from the vocabulary: byte-level BPE (GPT-2, RoBERTa) spells a
    word's start 'Ġword', which the word filter dropped, so every such tokenizer was refused at run time, after
    fine-tuning. Now: its words are used; a vocabulary with too few words is refused in the pre-flight check."""
    import numpy as np
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from fmaudit.audits.privacy.canary import CanaryAudit
    from fmaudit.data import Split
    from fmaudit.privacy.canary import make_canaries, random_token_words
    from fmaudit.targets import load_target

    rng = np.random.default_rng(0)
    words = sorted({"".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=5)) for _ in range(300)})
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" " + " ".join(words)] * 3,
        vocab_size=2000,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    eos = "<|endoftext|>"
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos)
    assert f"\u0120{words[0]}" in tok.get_vocab()
    found = random_token_words(tok)
    assert len(found) >= 100 and set(words) <= set(found)  # every word, and word-start pieces ('Ġabh'), no middles
    assert all(any(w.startswith(f) for w in words) for f in found)

    class _Target:  # what make_canaries reads of a target
        tokenizer = tok

    canaries = make_canaries("random_tokens", m=10, seed=0, pool=None, target=_Target(), num_labels=2)
    assert len(canaries) == 10 and all(len(t.split()) == 8 and set(t.split()) <= set(found) for t in canaries.texts)

    # pre-flight: the tiny GPT-2 classifier's vocabulary (a few dozen words) is refused before any training
    small = load_target(
        model=str(build_checkpoint("gpt2-cls", tmp_path, minilm_tokenizer_dir)), task=TEXT_CLS, max_length=MAX_LENGTH
    )
    small.split = Split.__new__(Split)  # stands for a recipe fine-tune (the check only asks whether there is one)
    problems = CanaryAudit({"kind": "random_tokens"}).check(small, None)
    assert len(problems) == 1 and "fewer than 100" in problems[0], problems
    bert = load_target(
        model=str(build_checkpoint("bert", tmp_path, minilm_tokenizer_dir)), task=TEXT_CLS, max_length=MAX_LENGTH
    )
    bert.split = small.split
    assert CanaryAudit({"kind": "random_tokens"}).check(bert, None) == []
