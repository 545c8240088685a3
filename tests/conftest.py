"""Shared fixtures: tiny models built from configs (saved as real local checkpoints, so the real
loading code runs) and small datasets written to disk."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POS_WORDS = ["good", "great", "happy", "love", "wonderful", "nice", "best", "fun", "excellent", "amazing"]
NEG_WORDS = ["bad", "awful", "sad", "hate", "terrible", "worst", "boring", "poor", "ugly", "angry"]
FILLER = ["the", "movie", "day", "was", "today", "really", "so", "this", "my", "weekend", "food", "show"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Fine-tune caches of the test session live in a temporary folder."""
    old = os.environ.get("FMAUDIT_CACHE_DIR")
    os.environ["FMAUDIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fmaudit-cache"))
    import torch

    # Under pytest-xdist (`-n auto`) every worker gets one thread: the workers already fill the cores,
    # and oversubscribed threads make small-batch torch code many times slower.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers) if workers > 1 else max(1, min(2, os.cpu_count() or 1)))
    yield
    if old is None:
        os.environ.pop("FMAUDIT_CACHE_DIR", None)
    else:
        os.environ["FMAUDIT_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (use: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`).
    Attack and DP loops on tiny models are many times slower with two threads on a loaded 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Synthetic sentiment sentences: label 1 has positive words, label 0 negative ones."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 7))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POS_WORDS if y else NEG_WORDS)))
        texts.append(" ".join(words) + f" {i}")  # the number keeps texts unique
        labels.append(y)
    return texts, labels


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> Path:
    from fmaudit.targets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer_dir) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier with MiniLM's tokenizer, saved as a checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_tokenizer_dir) -> Path:
    """A 2-layer, 32-wide Llama causal LM (SmolLM2's architecture) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A 2-layer ViT for 8x8 one-channel images (digits), with a preprocessor config (mean/std 0.5)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    ViTForImageClassification(cfg).save_pretrained(d)
    ViTImageProcessor(do_resize=False, do_rescale=False, image_mean=[0.5], image_std=[0.5]).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """200 synthetic labelled sentences as CSV (columns: id, text, label)."""
    d = tmp_path_factory.mktemp("data")
    texts, labels = make_sentences(200)
    path = d / "sentiment.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "label"])
        for i, (t, y) in enumerate(zip(texts, labels)):
            w.writerow([f"s{i}", t, y])
    return path


@pytest.fixture()
def write_recipe(tmp_path):
    """Write a recipe dict (or YAML text) into tmp_path and return its path."""
    import yaml

    def _write(recipe, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return p

    return _write


def tiny_text_recipe(model_dir: Path, csv_path: Path, tmp_path: Path, **overrides) -> dict:
    """A small, fast recipe over the tiny BERT and the synthetic CSV."""
    recipe = {
        "version": 1,
        "name": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "reports"),
        "data": {"sents": {"source": str(csv_path), "id_column": "id"}},
        "targets": {"bert": {"model": str(model_dir), "task": "text-classification", "max_length": 32,
                             "finetune": {"data": "sents", "epochs": 1, "batch_size": 16, "lr": 1e-3}}},
        "audits": [{"use": "utility", "target": "bert"}],
    }
    recipe.update(overrides)
    return recipe


PLUGIN_DIR = Path(__file__).parent / "plugin_pkg"


def make_plugin_dist(root: Path) -> Path:
    """A real installed-distribution layout (dist-info with entry_points.txt) that importlib.metadata
    discovers when `root` is on sys.path: the same mechanism pip-installed plugins use."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PLUGIN_DIR / "fmaudit_testplugin.py", root / "fmaudit_testplugin.py")
    info = root / "fmaudit_testplugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fmaudit-testplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fmaudit.audits]\nthirdparty.label_balance = fmaudit_testplugin:LabelBalance\n")
    return root


@pytest.fixture()
def test_modules():
    """Register the always-failing and image-only test modules on the global registry."""
    import sys

    sys.path.insert(0, str(PLUGIN_DIR))
    import fmaudit_testplugin as tp

    from fmaudit.registry import registry

    for cls in (tp.AlwaysFails, tp.NeedsImage, tp.ProduceCopy):
        registry.unregister(cls.name)
        registry.register(cls)
    yield tp
    for cls in (tp.AlwaysFails, tp.NeedsImage, tp.ProduceCopy):
        registry.unregister(cls.name)
    sys.path.remove(str(PLUGIN_DIR))
