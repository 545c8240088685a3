"""A kit for module authors: run a module outside a recipe.

from fmaudit.testing import audit_context
outcome = MyModule({"max_examples": 8}).run(target, audit_context(tmp_path, data=my_data))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fmaudit.audits.base import AuditContext
    from fmaudit.data import Dataset, Split
    from fmaudit.targets.base import Target


def audit_context(
    work: str | Path,
    *,
    data: Dataset | None = None,
    split: Split | None = None,
    base: Target | None = None,
    targets: dict[str, Target] | None = None,
    seed: int = 0,
    unit_id: str = "0:module@target",
    store_examples: bool = False,
    device: str = "cpu",
    executor: Any = None,
    progress: Any = None,
) -> AuditContext:
    """An AuditContext writing under `work` (artifacts in work/, cache in work/cache). `base`: the weights the
    audited target was fine-tuned from (reference models, DP twins and canary runs start there);
    `targets`: other targets a module may name. Work runs in this process unless `executor` is given."""
    from fmaudit.audits.base import AuditContext
    from fmaudit.audits.services import FixedServices
    from fmaudit.executor import LocalExecutor

    work = Path(work)
    services = FixedServices(base=base, targets=targets) if base is not None or targets else None
    return AuditContext(
        unit_id=unit_id,
        seed=seed,
        device=device,
        run_dir=work,
        cache_dir=work / "cache",
        store_examples=store_examples,
        data=data,
        split=split,
        progress=progress,
        executor=executor or LocalExecutor(),
        services=services,
    )


# -- checks ------------------------------------------------------------------------------------------------


def opacus_leftovers(model: Any) -> list[str]:
    """What Opacus attaches to a model and a DP run must not leave behind, found on `model`: per-sample
    state on modules ("name.attr") and parameters. Kept apart from the package's own cleanup lists, so a test
    with it checks the cleanup rather than restating it."""
    left = [
        f"{n}.{a}"
        for n, m in model.named_modules()
        for a in m.__dict__
        if a in ("autograd_grad_sample_hooks", "ft_compute_sample_grad", "activations", "max_batch_len")
    ]
    left += [
        f"{n}.{a}"
        for n, p in model.named_parameters()
        for a in ("grad_sample", "_forward_counter", "summed_grad", "_norm_sample")
        if hasattr(p, a)
    ]
    return left


# -- tiny data and models ----------------------------------------------------------------------------------

POS_WORDS = ["good", "great", "happy", "love", "wonderful", "nice", "best", "fun", "excellent", "amazing"]
NEG_WORDS = ["bad", "awful", "sad", "hate", "terrible", "worst", "boring", "poor", "ugly", "angry"]
FILLER = ["the", "movie", "day", "was", "today", "really", "so", "this", "my", "weekend", "food", "show"]


def make_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Synthetic sentiment sentences, alternating labels: label 1 holds one positive word, label 0 one
    negative word, among filler; a trailing number keeps every text unique."""
    import numpy as np

    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 7))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POS_WORDS if y else NEG_WORDS)))
        texts.append(" ".join(words) + f" {i}")
        labels.append(y)
    return texts, labels


def write_sentences_csv(path: str | Path, n: int = 200, seed: int = 0) -> Path:
    """`make_sentences(n, seed)` as a CSV with columns id, text, label."""
    import csv

    path = Path(path)
    texts, labels = make_sentences(n, seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "label"])
        for i, (t, y) in enumerate(zip(texts, labels)):
            w.writerow([f"s{i}", t, y])
    return path


def save_tiny_bert(folder: str | Path, tokenizer_dir: str | Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier with the tokenizer in `tokenizer_dir`, saved as a local
    checkpoint (so the real loading code runs)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide Llama causal LM (SmolLM2's architecture) with the tokenizer in `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_vit(
    folder: str | Path, *, image_size: int = 8, channels: int = 1, num_labels: int = 10, seed: int = 0
) -> Path:
    """A 2-layer ViT (patch 4) for small images, with a preprocessor config (mean / std 0.5, no resize)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    folder = Path(folder)
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=channels,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(
        do_resize=False, do_rescale=False, image_mean=[0.5] * channels, image_std=[0.5] * channels
    ).save_pretrained(folder)
    return folder


def tiny_text_recipe(model_dir: str | Path, csv_path: str | Path, work: str | Path, **overrides: Any) -> dict:
    """A small, fast recipe (as a dict) over a tiny text classifier checkpoint and a CSV of id, text, label:
    one fine-tune and a utility audit; `overrides` replace top-level keys (e.g. audits=[...])."""
    from fmaudit.tasks import TEXT_CLASSIFICATION

    recipe: dict[str, Any] = {
        "version": 1,
        "name": "tiny",
        "seed": 0,
        "output_dir": str(Path(work) / "reports"),
        "data": {"sents": {"source": str(csv_path), "id_column": "id"}},
        "targets": {
            "bert": {
                "model": str(model_dir),
                "task": TEXT_CLASSIFICATION,
                "max_length": 32,
                "finetune": {"data": "sents", "epochs": 1, "batch_size": 16, "lr": 1e-3},
            }
        },
        "audits": [{"use": "utility", "target": "bert"}],
    }
    recipe.update(overrides)
    return recipe
