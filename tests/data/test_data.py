"""Dataset sources, stable ids, fingerprints and deterministic member splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmaudit.data import DataError, load_dataset, load_digits, load_tweets, member_split
from fmaudit.recipe import DataSpec


def test_bundled_tweets_are_clean_binary_and_unique():
    d = load_tweets()
    assert d.label_names == ["negative", "positive"]
    assert len(d) > 20_000 and set(np.unique(d.labels)) == {0, 1}
    assert len(set(d.texts)) == len(d.texts)
    assert not any("\u00d5\u00a2" in t for t in d.texts)  # the curly-quote mojibake is decoded
    assert not any("&amp;" in t for t in d.texts)
    assert d.ids[0].startswith("tweets:")
    three = load_tweets(labels=["negative", "neutral", "positive"])
    assert len(three) > len(d)
    with pytest.raises(DataError, match="unknown"):
        load_tweets(labels=["happy"])


def test_digits_in_unit_range():
    d = load_digits()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == np.float32
    assert d.images.min() >= 0.0 and d.images.max() <= 1.0 and d.num_labels == 10


def test_limit_is_seeded_and_fingerprint_stable():
    spec = DataSpec(source="bundled:tweets", limit=50)
    a, b = load_dataset("t", spec, seed=0), load_dataset("t", spec, seed=0)
    c = load_dataset("t", spec, seed=1)
    assert a.ids == b.ids and a.fingerprint == b.fingerprint
    assert a.ids != c.ids and a.fingerprint != c.fingerprint


def test_split_is_deterministic_disjoint_and_complete(sentiment_csv):
    d = load_dataset("s", DataSpec(source=str(sentiment_csv), id_column="id"))
    s1, s2 = member_split(d, member_fraction=0.3, seed=7), member_split(d, member_fraction=0.3, seed=7)
    assert np.array_equal(s1.member_idx, s2.member_idx)
    assert len(s1.member_idx) == 60 and len(s1.nonmember_idx) == 140
    assert not set(s1.member_idx) & set(s1.nonmember_idx)
    assert s1.members.ids[0].startswith("s:s")
    with pytest.raises(DataError):
        member_split(d, member_fraction=1.0, seed=0)


def test_csv_missing_column_suggests(sentiment_csv):
    with pytest.raises(DataError, match="did you mean 'text'"):
        load_dataset("s", DataSpec(source=str(sentiment_csv), text_column="txt"))


def test_jsonl_with_string_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}", "label": ["neg", "pos"][i % 2]}) for i in range(6)))
    d = load_dataset("j", DataSpec(source=str(p)))
    assert d.label_names == ["neg", "pos"] and list(d.labels[:2]) == [0, 1]
    p.write_text('{"text": "a", "label": 0}\n{broken\n')
    with pytest.raises(DataError, match=":2: not valid JSON"):
        load_dataset("j", DataSpec(source=str(p)))


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.full((6, 6, 3), 40 * i + (100 if cls == "dog" else 0), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = load_dataset("im", DataSpec(source=f"imagefolder:{tmp_path / 'imgs'}"))
    assert d.images.shape == (6, 3, 6, 6) and d.label_names == ["cat", "dog"]
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0
    g = load_dataset("im", DataSpec(source=f"imagefolder:{tmp_path / 'imgs'}", grayscale=True, image_size=4))
    assert g.images.shape == (6, 1, 4, 4)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"sentence": ["a b", "c d", "e f"], "y": [0, 1, 0]})}
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="name one with `split:`"):
        load_dataset("h", DataSpec(source=f"hf_disk:{tmp_path / 'hf'}", text_column="sentence", label_column="y"))
    d = load_dataset(
        "h", DataSpec(source=f"hf_disk:{tmp_path / 'hf'}", split="train", text_column="sentence", label_column="y")
    )
    assert d.texts == ["a b", "c d", "e f"] and list(d.labels) == [0, 1, 0]


def test_duplicate_ids_rejected(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("id,text,label\n1,a,0\n1,b,1\n")
    with pytest.raises(DataError, match="not unique"):
        load_dataset("d", DataSpec(source=str(p), id_column="id"))


def test_balance_keeps_the_same_number_of_each_class_seeded():
    imbalanced = DataSpec(source="bundled:tweets", limit=601, balance=True)
    a = load_dataset("t", imbalanced, seed=3)
    assert np.bincount(a.labels).tolist() == [300, 300]  # 601 // 2 each; tweets are ~70% negative
    assert a.ids == load_dataset("t", imbalanced, seed=3).ids  # same seed, same sample
    assert a.ids != load_dataset("t", imbalanced, seed=4).ids
    full = load_tweets()
    assert set(a.ids) <= set(full.ids) and a.ids == sorted(a.ids, key=full.ids.index)  # dataset order
    whole = load_dataset("t", DataSpec(source="bundled:tweets", balance=True), seed=0)
    counts = np.bincount(whole.labels)
    assert counts[0] == counts[1] == np.bincount(full.labels).min()  # no limit: the smallest class, all of it


def test_balance_needs_labels_and_more_than_one_class(tmp_path):
    from fmaudit.data import Dataset, balanced_sample

    unlabelled = Dataset("u", "u", "text", ["a", "b"], texts=["x", "y"])
    with pytest.raises(DataError, match="no labels"):
        balanced_sample(unlabelled, None, 0)
    one = Dataset("o", "o", "text", ["a", "b"], labels=np.array([1, 1]), texts=["x", "y"])
    with pytest.raises(DataError, match="one class"):
        balanced_sample(one, None, 0)
    with pytest.raises(DataError, match="no example per class"):
        balanced_sample(load_digits(), 5, 0)  # 10 classes


def test_recipe_balance_without_labels_is_a_problem_with_its_path(tmp_path):
    from fmaudit.recipe import RecipeError, load_recipe

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
    recipe = {
        "version": 1,
        "name": "b",
        "data": {"c": {"source": str(corpus), "label_column": None, "balance": True}},
        "targets": {"t": {"model": "bundled:smollm2"}},
        "audits": [{"use": "utility", "target": "t", "data": "c"}],
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert any(p.path == "data.c.balance" for p in info.value.problems), info.value.problems
