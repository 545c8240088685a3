"""Pass 2, section `data`: each dataset's source exists and is readable (CSV / JSONL files are read through
for their columns and row count), dispatched on the source's kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fmaudit.hints import did_you_mean
from fmaudit.recipe.checks.context import CheckContext
from fmaudit.recipe.files import TABLE_READERS, table_summary
from fmaudit.recipe.schema import DataSpec
from fmaudit.tasks import BUNDLED_DATA

BUNDLED_DIGITS = "bundled:digits"  # the one bundled image dataset (8x8 grayscale)


def _check_bundled(ctx: CheckContext, name: str, spec: DataSpec) -> None:
    if spec.source not in BUNDLED_DATA:
        ctx.add(
            ("data", name, "source"),
            f"unknown bundled dataset {spec.source!r}"
            + did_you_mean(spec.source, BUNDLED_DATA)
            + f" (bundled: {', '.join(BUNDLED_DATA)})",
        )


def _check_folder(ctx: CheckContext, name: str, spec: DataSpec) -> None:
    folder = ctx.resolve(spec.source.split(":", 1)[1])
    if not folder.exists():
        ctx.add(("data", name, "source"), f"{folder} does not exist")


def _check_table_file(ctx: CheckContext, name: str, spec: DataSpec) -> None:
    loc = ("data", name, "source")
    p = ctx.resolve(spec.source)
    if p.suffix.lower() not in TABLE_READERS:
        ctx.add(
            loc,
            "unknown data source; use bundled:tweets, bundled:digits, a .csv/.jsonl file, "
            "imagefolder:DIR or hf_disk:DIR",
        )
    elif not p.exists():
        ctx.add(loc, f"data file {p} does not exist")
    elif not p.is_file():
        ctx.add(loc, f"{p} is not a file")
    else:
        try:
            msgs, rows = table_summary(p, spec)
        except OSError as exc:
            msgs, rows = [f"cannot read {p}: {exc}"], None
        for msg in msgs:
            ctx.add(loc, msg)
        if rows is not None:
            ctx.table_rows[name] = min(rows, spec.limit) if spec.limit else rows  # balance: at most this


@dataclass(frozen=True)
class SourceKind:
    """How `validate` treats one kind of data source: its check, and what data it yields."""

    check: Callable[[CheckContext, str, DataSpec], None]
    modality: Callable[[DataSpec], str]  # "text" | "image"
    channels: Callable[[DataSpec], int | None]  # image channels; None: not an image source, or not known


def _bundled_modality(spec: DataSpec) -> str:
    return "image" if spec.source == BUNDLED_DIGITS else "text"


def _bundled_channels(spec: DataSpec) -> int | None:
    return 1 if spec.source == BUNDLED_DIGITS else None


def _image(spec: DataSpec) -> str:
    return "image"


def _imagefolder_channels(spec: DataSpec) -> int | None:
    return 1 if spec.grayscale else 3


def _text(spec: DataSpec) -> str:
    return "text"


def _no_channels(spec: DataSpec) -> int | None:
    return None


# source prefix before ":" -> its kind. A source without a registered prefix is a CSV / JSONL file.
SOURCE_KINDS: dict[str, SourceKind] = {
    "bundled": SourceKind(_check_bundled, modality=_bundled_modality, channels=_bundled_channels),
    "imagefolder": SourceKind(_check_folder, modality=_image, channels=_imagefolder_channels),
    "hf_disk": SourceKind(_check_folder, modality=_text, channels=_no_channels),
}
FILE_SOURCE = SourceKind(_check_table_file, modality=_text, channels=_no_channels)


def source_kind(spec: DataSpec) -> SourceKind:
    """The kind of a dataset's source: its registered `prefix:`, else a file."""
    prefix, sep, _ = spec.source.partition(":")
    return SOURCE_KINDS.get(prefix, FILE_SOURCE) if sep else FILE_SOURCE


def check_data(ctx: CheckContext) -> None:
    """Every dataset's source, by kind."""
    for name, spec in ctx.recipe.data.items():
        source_kind(spec).check(ctx, name, spec)
        if spec.balance and spec.label_column is None and not spec.source.startswith(("bundled:", "imagefolder:")):
            ctx.add(("data", name, "balance"), "balance needs labels: set label_column (or drop balance)")
