"""Broken inputs found before any model loads: `validate` and `run` exit 2, name the file and the problem,
print no traceback and leave no run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fmaudit.cli import app
from fmaudit.data import DataError, load_image_folder, load_table
from fmaudit.testing import tiny_text_recipe

cli = CliRunner()


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _both_refuse(recipe: dict, tmp_path: Path, *needles: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outputs = []
    for cmd in (["validate", str(path)], ["run", str(path), "-q"]):
        res = cli.invoke(app, cmd)
        out = "".join(res.output.split())  # rich wraps long paths mid-word: compare without whitespace
        assert res.exit_code == 2, (cmd, res.output, res.exception)
        assert "Traceback" not in out
        for needle in needles:
            assert "".join(needle.split()) in out, (needle, res.output)
        outputs.append(out)
    reports = tmp_path / "reports"
    assert not reports.exists() or not any(reports.iterdir())
    return outputs[0]


def test_truncated_safetensors_is_refused_before_loading(tiny_bert_dir, sentiment_csv, tmp_path):
    model = _copy_model(tiny_bert_dir, tmp_path / "model")
    _truncate(model / "model.safetensors")
    _both_refuse(tiny_text_recipe(model, sentiment_csv, tmp_path), tmp_path, "model.safetensors is truncated")


def test_corrupt_safetensors_header(tiny_bert_dir, sentiment_csv, tmp_path):
    model = _copy_model(tiny_bert_dir, tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    _both_refuse(tiny_text_recipe(model, sentiment_csv, tmp_path), tmp_path, "not a valid safetensors file")


def test_truncated_torch_bin(tiny_bert_dir, sentiment_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _copy_model(tiny_bert_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).save_pretrained(model, safe_serialization=False)
    assert (model / "pytorch_model.bin").exists()
    _truncate(model / "pytorch_model.bin", 0.7)
    _both_refuse(tiny_text_recipe(model, sentiment_csv, tmp_path), tmp_path, "pytorch_model.bin is truncated")


def test_checkpoint_without_tokenizer_weights_or_valid_config(tiny_bert_dir, sentiment_csv, tmp_path):
    model = _copy_model(tiny_bert_dir, tmp_path / "model")
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    _both_refuse(tiny_text_recipe(model, sentiment_csv, tmp_path), tmp_path, "has no tokenizer files")
    (model / "model.safetensors").unlink()
    (model / "config.json").write_text("{not json")
    out = _both_refuse(
        tiny_text_recipe(model, sentiment_csv, tmp_path), tmp_path, "has no weights", "cannot be read as JSON"
    )
    assert "hasnotokenizerfiles" in out  # every problem listed at once


def test_tokenizer_larger_than_the_model_vocabulary(tiny_bert_dir, sentiment_csv, tmp_path):
    import json

    model = _copy_model(tiny_bert_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (model / "config.json").write_text(json.dumps(cfg))
    _both_refuse(
        tiny_text_recipe(model, sentiment_csv, tmp_path),
        tmp_path,
        "produces token ids up to 30,521",
        "vocab_size 1,000",
    )


def test_csv_missing_column_non_utf8_and_too_small(tiny_bert_dir, sentiment_csv, tmp_path):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    recipe["data"]["sents"]["label_column"] = "lable"
    _both_refuse(recipe, tmp_path, "has no column 'lable'", "did you mean 'label'")

    latin = tmp_path / "latin.csv"
    latin.write_bytes(sentiment_csv.read_bytes().replace(b"movie", b"caf\xe9", 1))
    _both_refuse(tiny_text_recipe(tiny_bert_dir, latin, tmp_path), tmp_path, "latin.csv is not UTF-8 text", "line")

    small = tmp_path / "small.csv"
    small.write_text("id,text,label\n" + "".join(f"s{i},word {i},{i % 2}\n" for i in range(20)))
    _both_refuse(tiny_text_recipe(tiny_bert_dir, small, tmp_path), tmp_path, "is fewer than batch_size 16")
    one = tmp_path / "one.csv"
    one.write_text("id,text,label\ns0,only one,1\n")
    _both_refuse(tiny_text_recipe(tiny_bert_dir, one, tmp_path), tmp_path, "needs at least 2")


def _image_folder(root: Path, n: int = 12, size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (rng.random((size, size, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def _vit_recipe(vit_dir: Path, images: Path, tmp_path: Path, grayscale: bool) -> dict:
    return {
        "version": 1,
        "name": "vit",
        "output_dir": str(tmp_path / "reports"),
        "data": {"imgs": {"source": f"imagefolder:{images}", "grayscale": grayscale}},
        "targets": {
            "vit": {
                "model": str(vit_dir),
                "task": "image-classification",
                "finetune": {"data": "imgs", "epochs": 1, "batch_size": 4, "lr": 1e-3},
            }
        },
        "audits": [{"use": "utility", "target": "vit"}],
    }


def test_one_channel_model_on_rgb_images_is_caught_by_validate(tiny_vit_dir, tmp_path):
    images = _image_folder(tmp_path / "imgs")
    _both_refuse(
        _vit_recipe(tiny_vit_dir, images, tmp_path, grayscale=False),
        tmp_path,
        "takes 1-channel images",
        "grayscale: true",
    )
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(_vit_recipe(tiny_vit_dir, images, tmp_path, grayscale=True)))
    assert cli.invoke(app, ["validate", str(path)]).exit_code == 0


def test_data_loaders_turn_bad_bytes_into_data_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nok,1\ncaf\xe9,0\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_table(bad, text_column="text", label_column="label", id_column=None, name="bad")
    images = _image_folder(tmp_path / "imgs", n=2)
    (images / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(images, name="imgs", image_size=None, grayscale=False)


def test_unreadable_image_stops_run_with_exit_2(tiny_vit_dir, tmp_path):
    images = _image_folder(tmp_path / "imgs", n=6)
    (images / "b" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_vit_recipe(tiny_vit_dir, images, tmp_path, grayscale=True)))
    res = cli.invoke(app, ["run", str(path), "-q"])
    out = "".join(res.output.split())
    assert res.exit_code == 2 and "cut.png" in out and "Traceback" not in out, (res.output, res.exception)
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())
