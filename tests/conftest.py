"""Shared fixtures: tiny models built from configs (saved as real local checkpoints, so the real
loading code runs) and small datasets written to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fmaudit.testing import save_tiny_bert, save_tiny_llama, save_tiny_vit, write_sentences_csv

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Fine-tune caches of the test session live in a temporary folder."""
    old = os.environ.get("FMAUDIT_CACHE_DIR")
    os.environ["FMAUDIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fmaudit-cache"))
    import torch

    # Under pytest-xdist (`-n auto`) every worker gets one thread: the workers already fill the cores,
    # and oversubscribed threads make small-batch torch code many times slower.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // workers) if workers > 1 else max(1, min(2, os.cpu_count() or 1))
    )
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


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> Path:
    from fmaudit.targets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer_dir) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier with MiniLM's tokenizer, saved as a checkpoint."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_tokenizer_dir) -> Path:
    """A 2-layer, 32-wide Llama causal LM (SmolLM2's architecture) with MiniLM's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), minilm_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A 2-layer ViT for 8x8 one-channel images (digits), with a preprocessor config (mean/std 0.5)."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """200 synthetic labelled sentences as CSV (columns: id, text, label)."""
    return write_sentences_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", 200)


@pytest.fixture()
def write_recipe(tmp_path):
    """Write a recipe dict (or YAML text) into tmp_path and return its path."""
    import yaml

    def _write(recipe, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return p

    return _write


PLUGIN_DIR = Path(__file__).parent / "plugin_pkg"


@pytest.fixture()
def plugin_dist(tmp_path) -> Path:
    """A real installed-distribution layout (dist-info with entry_points.txt) that importlib.metadata
    discovers when the returned folder is on sys.path: the same mechanism pip-installed plugins use."""
    import shutil

    root = tmp_path / "site"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PLUGIN_DIR / "fmaudit_testplugin.py", root / "fmaudit_testplugin.py")
    info = root / "fmaudit_testplugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fmaudit-testplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fmaudit.audits]\nthirdparty.label_balance = fmaudit_testplugin:LabelBalance\n"
    )
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
