"""File checks that need no model and no torch, so a broken input is refused by `validate` (exit 2) instead
of failing half-way through a run: weights files, checkpoint folders, tokenizers, CSV / JSONL tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmaudit.hints import did_you_mean
from fmaudit.recipe.schema import DataSpec
from fmaudit.tasks import MODALITY

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
MAX_SCANNED_TABLE_BYTES = 256 << 20  # CSV / JSONL files up to this size are read through in validate


def check_safetensors_file(path: Path) -> str | None:
    """Why a .safetensors file is unusable (truncated, corrupt header), or None. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes; not even a safetensors header)"
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 << 20):
                return (
                    f"{path} is truncated or corrupt: its header claims {n:,} bytes but the file has {size:,} "
                    "(a half-copied checkpoint?)"
                )
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc})"
    if not isinstance(header, dict):
        return f"{path} is not a valid safetensors file (its header is not a JSON object)"
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{path} is not a valid safetensors file (tensor {k!r} has no data_offsets)"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return (
            f"{path} is truncated: its tensors need {8 + n + end:,} bytes but the file has {size:,} "
            "(a half-copied checkpoint?); copy or save it again"
        )
    return None


def check_torch_file(path: Path) -> str | None:
    """Why a torch .bin/.pt file is unusable (empty, or a zip archive cut short), or None. No unpickling."""
    import zipfile

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    if size == 0:
        return f"{path} is empty"
    if magic.startswith(b"PK") and not zipfile.is_zipfile(path):
        return f"{path} is truncated (a torch zip archive without its directory; a half-copied file?)"
    return None


def check_gguf_file(path: Path) -> str | None:
    """Why a .gguf file is unusable (no GGUF magic bytes), or None."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return f"{path} is not a GGUF file (no GGUF magic bytes)"
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    return None


# weights file suffix -> its check (header / magic bytes only; nothing is loaded)
WEIGHTS_CHECKS: dict[str, Callable[[Path], str | None]] = {
    ".safetensors": check_safetensors_file,
    ".bin": check_torch_file,
    ".pt": check_torch_file,
    ".pth": check_torch_file,
    ".gguf": check_gguf_file,
}


def check_weights_file(path: Path) -> str | None:
    """Why a weights file is unusable, or None (also for suffixes without a check)."""
    check = WEIGHTS_CHECKS.get(path.suffix.lower())
    return check(path) if check is not None else None


def read_model_config(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A checkpoint's config.json as a dict, or the reason it cannot be read."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{folder / 'config.json'} cannot be read as JSON ({type(exc).__name__}: {exc})"
    if not isinstance(cfg, dict):
        return None, f"{folder / 'config.json'} is not a JSON object"
    return cfg, None


def check_checkpoint_folder(folder: Path, task: str | None, gguf_file: str | None) -> list[str]:
    """Problems of a local Hugging Face checkpoint folder that show before loading it."""
    problems = []
    _, why = read_model_config(folder)
    if why:
        problems.append(why)
    if gguf_file:
        if (folder / gguf_file).is_file():
            bad = check_weights_file(folder / gguf_file)
            if bad:
                problems.append(bad)
        return problems
    weights = sorted(
        [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")]
    )
    weights = [
        w for w in weights if w.name not in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")
    ]
    if not weights:
        problems.append(
            f"{folder} has no weights (model.safetensors or pytorch_model.bin); save the model with `save_pretrained`"
        )
    for w in weights:
        bad = check_weights_file(w)
        if bad:
            problems.append(bad)
    if MODALITY.get(task or "") == "text":  # text models need their tokenizer
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            problems.append(
                f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
                "tokenizer next to the model with `tokenizer.save_pretrained`"
            )
        else:
            cfg, _ = read_model_config(folder)
            rows = cfg.get("vocab_size") if cfg else None
            n = tokenizer_vocab_size(folder)
            if isinstance(rows, int) and n is not None and n > rows:
                problems.append(
                    f"the tokenizer in {folder} produces token ids up to {n - 1:,} but the model's "
                    f"embedding has vocab_size {rows:,} rows (config.json); save the tokenizer that "
                    "belongs to this model"
                )
    return problems


def tokenizer_vocab_size(folder: Path) -> int | None:
    """1 + the largest token id the tokenizer saved in `folder` can produce (tokenizer.json, else vocab.txt /
    vocab.json), or None when it cannot be told without loading the tokenizer."""
    try:
        if (folder / "tokenizer.json").is_file():
            tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = (tok.get("model") or {}).get("vocab")
            ids = (
                list(vocab.values())
                if isinstance(vocab, dict)
                else list(range(len(vocab)))
                if isinstance(vocab, list)
                else []
            )
            ids += [a.get("id", -1) for a in tok.get("added_tokens") or [] if isinstance(a, dict)]
            ids = [i for i in ids if isinstance(i, int)]
            return max(ids) + 1 if ids else None
        if (folder / "vocab.txt").is_file():
            with open(folder / "vocab.txt", encoding="utf-8") as fh:
                return sum(1 for _ in fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
        return None
    return None


class _TableError(ValueError):
    """A CSV / JSONL file that cannot be read as a table (the message says where)."""


def _scan_csv(path: Path) -> tuple[set[str] | None, int]:
    """(columns, rows) of a CSV file."""
    import csv

    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = set(reader.fieldnames or [])
            return columns, sum(1 for _ in reader)
    except csv.Error as exc:
        raise _TableError(f"{path}: malformed CSV ({exc})") from None


def _scan_jsonl(path: Path) -> tuple[set[str] | None, int]:
    """(columns of the first object, rows) of a JSON-lines file; blank lines are skipped."""
    rows = 0
    columns: set[str] | None = None
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _TableError(f"{path}:{ln}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise _TableError(f"{path}:{ln}: each line must be a JSON object")
            if columns is None:
                columns = set(obj)
            rows += 1
    return columns, rows


# data file suffix -> how its columns and rows are read (the suffixes `source:` accepts as files)
TABLE_READERS: dict[str, Callable[[Path], tuple[set[str] | None, int]]] = {
    ".csv": _scan_csv,
    ".jsonl": _scan_jsonl,
    ".ndjson": _scan_jsonl,
}


def _utf8_problem(path: Path) -> str | None:
    """Where a file stops being UTF-8 text (byte, offset, line), or None."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as exc:
                    pos = offset + exc.start
                    line += chunk[: exc.start].count(b"\n")
                    return (
                        f"{path} is not UTF-8 text (byte 0x{chunk[exc.start]:02x} at offset {pos}, line {line}); "
                        "re-save it as UTF-8"
                    )
                line += chunk.count(b"\n")
                offset += len(chunk)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text (it ends inside a multi-byte character); re-save it as UTF-8"
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    return None


def table_summary(path: Path, spec: DataSpec) -> tuple[list[str], int | None]:
    """(problems, number of rows) of a CSV / JSONL data file, read without any heavy library. The row count
    is None when the file is too large to read through in `validate`."""
    if path.stat().st_size > MAX_SCANNED_TABLE_BYTES:
        return [], None
    bad = _utf8_problem(path)
    if bad:
        return [bad], None
    wanted = [c for c in (spec.text_column, spec.label_column, spec.id_column) if c]
    try:
        columns, rows = TABLE_READERS[path.suffix.lower()](path)
    except _TableError as exc:
        return [str(exc)], None
    if rows == 0:
        return [f"{path} has no rows"], 0
    problems = []
    for col in wanted:
        if col not in (columns or set()):
            problems.append(
                f"{path} has no column {col!r} (columns: {sorted(columns or [])})"
                + did_you_mean(col, columns or set())
                + " — set text_column / label_column / id_column in the recipe's data entry"
            )
    return problems, rows
