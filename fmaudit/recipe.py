"""Recipes: YAML (safe_load only) validated in two passes.

Pass 1 checks the recipe's own shape with pydantic. Pass 2 checks each audit's params against that
module's own `Params` schema, names against the registry, cross-references (targets, data, produced
targets) and capabilities. Every problem is collected with its path (`audits[2].params.eps`) and YAML
line, and nothing heavy (no model, no dataset) is loaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fmaudit.tasks import BUNDLED_DATA, BUNDLED_MODELS, CAPABILITIES, MODALITY, TASKS

RECIPE_VERSION = 1
GateOp = Literal["gt", "ge", "lt", "le", "eq", "ne"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """A named dataset."""

    source: str = Field(description="bundled:tweets | bundled:digits | path/to.csv | path/to.jsonl | "
                                    "imagefolder:DIR | hf_disk:DIR (a Hugging Face dataset saved with save_to_disk)")
    limit: int | None = Field(default=None, gt=0, description="Keep a seeded random sample of at most this many.")
    text_column: str = "text"
    label_column: str | None = "label"
    id_column: str | None = Field(default=None, description="Column with stable example ids (default: row number).")
    labels: list[str] | None = Field(default=None, description="bundled:tweets only: which classes, in order.")
    split: str | None = Field(default=None, description="hf_disk only: which split of a DatasetDict.")
    image_size: int | None = Field(default=None, gt=0, description="imagefolder only: resize to this square size.")
    grayscale: bool = Field(default=False, description="imagefolder only: load as 1 channel.")


class FinetuneSpec(_Strict):
    """Fine-tune the target before auditing. Members = the examples it trains on (recorded)."""

    data: str = Field(description="Name of a dataset in `data`.")
    member_fraction: float = Field(default=0.5, gt=0, lt=1,
                                   description="Fraction of the dataset used for training (members).")
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    trainable: Literal["all", "last_n_layers", "head"] = "all"
    n_layers: int = Field(default=2, ge=1, description="With trainable: last_n_layers, how many blocks train.")


class TargetSpec(_Strict):
    """A model to audit."""

    model: str = Field(description="bundled:minilm | bundled:smollm2 | bundled:digits-cnn | bundled:digits-vit | "
                                   "a local Hugging Face checkpoint folder | python:package.module:factory")
    task: Literal["text-classification", "causal-lm", "image-classification"] | None = Field(
        default=None, description="What the model does; optional for bundled models.")
    num_labels: int | None = Field(default=None, ge=2, description="Classifier head size (default: from the data).")
    gguf_file: str | None = Field(default=None, description="Causal LMs: a GGUF file inside the model folder.")
    weights: str | None = Field(default=None, description="python: models only: a .safetensors (or .pt, loaded "
                                                          "with weights_only=True) state dict.")
    normalize_mean: list[float] | None = Field(default=None, description="Image models: per-channel mean applied "
                                                                         "inside the wrapper (inputs stay in [0, 1]).")
    normalize_std: list[float] | None = None
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the checkpoint. Off unless "
                                                               "you trust its author.")
    max_length: int = Field(default=128, ge=4, description="Text: tokens per example at inference.")
    finetune: FinetuneSpec | None = None


class ExecutorSpec(_Strict):
    """Where independent units run (audits over several targets in one wave, reference-model trainings,
    shards). It changes where, never what: reports and caches match a local run with the same seed."""

    kind: Literal["local", "ray"] = Field(default="local", description="local: in this process, one after another. "
                                          "ray: as Ray tasks (pip install 'fmaudit[ray]'); see docs/ray.md.")
    address: str | None = Field(default=None, description="ray: the cluster to join: auto (started with `ray start`),"
                                                          " ray://host:10001 (Ray Client); default: a local instance.")
    num_cpus_per_task: float = Field(default=1.0, gt=0, description="ray: CPUs each task holds (and torch threads).")
    num_gpus_per_task: float = Field(default=0.0, ge=0, description="ray: GPUs each task holds (fractions share one).")
    max_retries: int = Field(default=3, ge=0, description="ray: retries of a task whose worker died; then that "
                                                          "unit is reported as an error.")

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> "ExecutorSpec":
        if self.kind == "local":
            used = [k for k in ("address", "num_cpus_per_task", "num_gpus_per_task", "max_retries")
                    if k in self.model_fields_set]
            if used:
                raise ValueError(f"{', '.join(used)} {'applies' if len(used) == 1 else 'apply'} only to kind: ray")
        return self


class AuditSpec(_Strict):
    use: str = Field(description="Registered audit module name (`fmaudit list`).")
    target: list[str] = Field(description="Target name, or a list of names: the module runs on each.")
    data: str | None = Field(default=None, description="Dataset name; default: the target's fine-tune data.")
    params: dict[str, Any] = Field(default_factory=dict, description="The module's parameters (`fmaudit list -v`).")
    fail_if: dict[str, dict[GateOp, float]] = Field(
        default_factory=dict, description="Gates: metric -> {gt|ge|lt|le|eq|ne: threshold}; a hit fails the run.")
    produces: str | None = Field(default=None, description="Name for the new target this module produces.")

    @field_validator("target", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("target")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one target")
        return v


class Recipe(_Strict):
    """An audit recipe: datasets, targets (models) and the audits to run on them."""

    version: Literal[1] = Field(description="Recipe format version (1).")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; used in report folder names.")
    description: str | None = None
    seed: int = Field(default=0, ge=0)
    device: str = Field(default="cpu", pattern=r"^(cpu|auto|cuda(:\d+)?|mps)$",
                        description="cpu | auto (cuda when available) | cuda | cuda:N | mps")
    store_examples: bool = Field(default=False, description="Put raw examples (text, images) in the report. Off by "
                                                            "default: a privacy report must not itself leak.")
    output_dir: str | None = Field(default=None, description="Where run folders go (default: ./reports).")
    cache_dir: str | None = Field(default=None, description="Fine-tune cache (default: $FMAUDIT_CACHE_DIR or "
                                                            "~/.cache/fmaudit).")
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    data: dict[str, DataSpec] = Field(default_factory=dict)
    targets: dict[str, TargetSpec] = Field(min_length=1)
    audits: list[AuditSpec] = Field(min_length=1)

    def canonical_json(self) -> str:
        # Where units run never changes what they compute, so the executor stays out of the hash: the same
        # recipe run locally and on Ray has one hash (and a local run can be resumed on a cluster). Written
        # as the old default, so hashes of existing recipes are unchanged.
        data = self.model_dump(mode="json")
        data["executor"] = {"kind": "local"}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Problems, paths, YAML lines


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path or '<recipe>'}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


class RecipeError(ValueError):
    """A recipe with problems. `problems` lists every one of them."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_map(node: yaml.Node, prefix: tuple[Any, ...] = (), out: dict | None = None) -> dict[tuple, int]:
    """YAML node tree -> {path tuple: 1-based line}. Built with the safe composer: no objects made."""
    out = {} if out is None else out
    out.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[prefix + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, prefix + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _line_map(item, prefix + (i,), out)
    return out


def _line_for(lines: dict[tuple, int], loc: tuple[Any, ...]) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _unwrap_optional(t: Any) -> Any:
    import types

    while typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) != 1:
            return None
        t = args[0]
    return t


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str] | None:
    """Field names of the pydantic model that sits at `loc` inside `model` (for near-miss hints)."""
    current: Any = model
    for part in loc:
        current = _unwrap_optional(current)
        if typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]  # `part` is a key or an index
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return None
    current = _unwrap_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return None


def _pydantic_problems(exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...],
                       lines: dict[tuple, int]) -> list[Problem]:
    from fmaudit.registry import suggest

    out = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            fields = _fields_at(model, tuple(err["loc"])[:-1]) or set()
            close = suggest(str(err["loc"][-1]), fields)
            msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
            if fields:
                msg += f" (allowed: {', '.join(sorted(fields))})"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "literal_error":
            close = suggest(str(err.get("input")), [str(x) for x in (err.get("ctx") or {}).get("expected", "").replace("'", "").split(" or ")])
            msg = msg + (f"; did you mean {close[0]!r}?" if close else "")
        if "input" in err and err["type"] not in ("missing", "extra_forbidden") and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        out.append(Problem(format_path(loc), msg, _line_for(lines, loc)))
    return out


# ---------------------------------------------------------------------------------------------------
# Loading


# Limits on recipe files, checked before anything is built from them (PyYAML itself has none: a "billion
# laughs" document of nested aliases expands to 9**9 nodes, and deeply nested flow collections exhaust the
# recursion limit). Anchors and aliases stay allowed (they are handy for repeated params), but the document
# as expanded must stay small: a real recipe has a few hundred nodes.
MAX_RECIPE_BYTES = 1 << 20     # 1 MiB
MAX_YAML_DEPTH = 32            # nested mappings / sequences
MAX_YAML_NODES = 20_000        # scalars + collections, counting every alias as the node it repeats


def _yaml_loader() -> type:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check_yaml_limits(text: str) -> Problem | None:
    """Walk the YAML event stream once (no objects built, no recursion) and return a problem when the
    document nests deeper than MAX_YAML_DEPTH or expands (aliases included) to more than MAX_YAML_NODES
    nodes, or holds a recursive alias (one inside the collection it names: the document would contain itself,
    and everything that walks it would recurse forever). Stops at the first limit exceeded, so hostile input
    costs at most one linear scan."""
    if len(text) > MAX_RECIPE_BYTES:
        return Problem("", f"the recipe is {len(text):,} characters; recipes are limited to "
                           f"{MAX_RECIPE_BYTES:,} bytes (a real recipe is a few KiB)")
    stack: list[list[Any]] = [[0, None, None]]  # per open collection: [expanded size, anchor, start line]
    anchors: dict[str, int | None] = {}  # None: the anchored collection is still open
    for ev in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) > MAX_YAML_DEPTH:
                return Problem("", f"the recipe nests deeper than {MAX_YAML_DEPTH} levels; recipes are "
                                   "limited to that depth", ev.start_mark.line + 1)
            stack.append([1, ev.anchor, ev.start_mark.line + 1])
            if ev.anchor is not None:
                anchors[ev.anchor] = None
            continue
        if isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            size, anchor, _ = stack.pop()
            if anchor is not None:
                anchors[anchor] = size
        elif isinstance(ev, yaml.ScalarEvent):
            size = 1
            if ev.anchor is not None:
                anchors[ev.anchor] = 1
        elif isinstance(ev, yaml.AliasEvent):
            if ev.anchor in anchors and anchors[ev.anchor] is None:
                return Problem("", f"the alias *{ev.anchor} is inside the collection &{ev.anchor} it repeats: a "
                                   "recursive document, refused (a recipe cannot contain itself)",
                               ev.start_mark.line + 1)
            size = anchors.get(ev.anchor) or 1  # an unknown anchor: the composer reports it
        else:
            continue
        stack[-1][0] += size
        if stack[-1][0] > MAX_YAML_NODES or sum(s[0] for s in stack) > MAX_YAML_NODES:
            return Problem("", f"the recipe expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases "
                               "count as the nodes they repeat); refused to protect against alias bombs "
                               '("billion laughs")', getattr(ev.start_mark, "line", -1) + 1 or None)
    return None


def parse_yaml(text: str, source: str = "<recipe>") -> tuple[Any, dict[tuple, int]]:
    """`yaml.safe_load` semantics (no tags that build objects), within the limits above."""
    try:
        limit = check_yaml_limits(text)
        if limit is not None:
            raise RecipeError([limit], source)
        node = yaml.compose(text, Loader=_yaml_loader())
        raw = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([Problem("", f"malformed YAML: {problem}", line)], source) from None
    lines = _line_map(node) if node is not None else {}
    return raw, lines


def load_recipe(source: str | Path | dict[str, Any], *, base_dir: Path | None = None,
                allow_code_from: typing.Sequence[str | Path] = ()) -> "LoadedRecipe":
    """Read and fully validate a recipe (a YAML path, YAML text via a dict, or a dict).

    Raises RecipeError listing every problem. Loads no model and no dataset, and imports no code: the code
    of `python:` targets is located and must lie under the recipe's folder (`base_dir`; the working
    directory for a dict), in an installed package, or under one of `allow_code_from`.
    """
    lines: dict[tuple, int] = {}
    path: Path | None = None
    if isinstance(source, dict):
        raw, label = source, "<dict>"
    else:
        path = Path(source)
        label = str(path)
        try:
            if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
                raise RecipeError([Problem("", f"the recipe file is {path.stat().st_size:,} bytes; recipes are "
                                               f"limited to {MAX_RECIPE_BYTES:,} bytes")], label)
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError([Problem("", f"recipe file {path} does not exist")], label) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError([Problem("", f"cannot read recipe: {exc}")], label) from None
        raw, lines = parse_yaml(text, label)
    if base_dir is None:
        base_dir = path.parent.resolve() if path is not None else Path.cwd()
    if not isinstance(raw, dict):
        raise RecipeError([Problem("", "a recipe is a YAML mapping with version, name, targets and audits "
                                       f"(got {type(raw).__name__}); see recipes/quickstart.yaml")], label)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = _pydantic_problems(exc, Recipe, (), lines)
        # Still check the audits we can, so one pass reports everything.
        problems += _check_audits_loose(raw, lines)
        raise RecipeError(_dedupe(problems), label) from None
    allow = tuple(Path(a).expanduser().resolve() for a in allow_code_from)
    code: dict[str, CodeRef] = {}
    problems = check_recipe(recipe, lines=lines, base_dir=base_dir, allow_code_from=allow, code=code)
    if problems:
        raise RecipeError(problems, label)
    return LoadedRecipe(recipe=recipe, raw=raw, path=path, base_dir=base_dir, allow_code_from=allow, code=code)


@dataclass
class LoadedRecipe:
    recipe: Recipe
    raw: dict[str, Any]
    path: Path | None
    base_dir: Path
    allow_code_from: tuple[Path, ...] = ()  # folders the person running fmaudit allowed code from
    code: dict[str, "CodeRef"] = field(default_factory=dict)  # python: targets -> the code they import


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


def _check_audits_loose(raw: dict[str, Any], lines: dict[tuple, int]) -> list[Problem]:
    """Module names and params of audits in a recipe that failed pass 1 elsewhere."""
    audits = raw.get("audits")
    if not isinstance(audits, list):
        return []
    problems = []
    for i, a in enumerate(audits):
        if isinstance(a, dict) and isinstance(a.get("use"), str):
            problems += _check_module_params(i, a["use"], a.get("params") or {}, a.get("fail_if") or {}, lines)
    return problems


def _check_module_params(i: int, use: str, params: Any, fail_if: Any, lines: dict[tuple, int]) -> list[Problem]:
    from fmaudit.registry import RegistryError, registry

    try:
        cls = registry.get(use)
    except RegistryError as exc:
        return [Problem(f"audits[{i}].use", str(exc), _line_for(lines, ("audits", i, "use")))]
    if not isinstance(params, dict):
        return []  # reported by pass 1
    problems = []
    try:
        cls.Params.model_validate(params)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, cls.Params, ("audits", i, "params"), lines)
    if isinstance(fail_if, dict) and cls.metric_names:
        for metric in fail_if:
            if not any(fnmatch.fnmatchcase(str(metric), pat) for pat in cls.metric_names):
                from fmaudit.registry import suggest

                close = suggest(str(metric), [m for m in cls.metric_names if "*" not in m])
                loc = ("audits", i, "fail_if", metric)
                problems.append(Problem(
                    format_path(loc),
                    f"module {use!r} reports no metric {metric!r}"
                    + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" (metrics: {', '.join(cls.metric_names)})",
                    _line_for(lines, loc)))
    return problems


# ---------------------------------------------------------------------------------------------------
# File checks that need no model and no torch: a broken input is refused by `validate` (exit 2) instead of
# failing half-way through a run.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
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
                return (f"{path} is truncated or corrupt: its header claims {n:,} bytes but the file has {size:,} "
                        "(a half-copied checkpoint?)")
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
        return (f"{path} is truncated: its tensors need {8 + n + end:,} bytes but the file has {size:,} "
                "(a half-copied checkpoint?); copy or save it again")
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


def check_weights_file(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return check_safetensors_file(path)
    if suffix in (".bin", ".pt", ".pth"):
        return check_torch_file(path)
    if suffix == ".gguf":
        try:
            with open(path, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    return f"{path} is not a GGUF file (no GGUF magic bytes)"
        except OSError as exc:
            return f"cannot read {path}: {exc}"
    return None


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
    weights = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.pt"),
                      *folder.glob("*.pth")])
    weights = [w for w in weights if w.name not in ("training_args.bin", "optimizer.pt", "scheduler.pt",
                                                    "rng_state.pth")]
    if not weights:
        problems.append(f"{folder} has no weights (model.safetensors or pytorch_model.bin); save the model with "
                        "`save_pretrained`")
    for w in weights:
        bad = check_weights_file(w)
        if bad:
            problems.append(bad)
    if task in ("text-classification", "causal-lm"):
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            problems.append(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
                            "tokenizer next to the model with `tokenizer.save_pretrained`")
        else:
            cfg, _ = read_model_config(folder)
            rows = cfg.get("vocab_size") if cfg else None
            n = tokenizer_vocab_size(folder)
            if isinstance(rows, int) and n is not None and n > rows:
                problems.append(f"the tokenizer in {folder} produces token ids up to {n - 1:,} but the model's "
                                f"embedding has vocab_size {rows:,} rows (config.json); save the tokenizer that "
                                "belongs to this model")
    return problems


def tokenizer_vocab_size(folder: Path) -> int | None:
    """1 + the largest token id the tokenizer saved in `folder` can produce (tokenizer.json, else vocab.txt /
    vocab.json), or None when it cannot be told without loading the tokenizer."""
    try:
        if (folder / "tokenizer.json").is_file():
            tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = (tok.get("model") or {}).get("vocab")
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab))) if isinstance(vocab, list) else []
            ids += [a.get("id", -1) for a in tok.get("added_tokens") or [] if isinstance(a, dict)]
            ids = [i for i in ids if isinstance(i, int)]
            return max(ids) + 1 if ids else None
        if (folder / "vocab.txt").is_file():
            with open(folder / "vocab.txt", encoding="utf-8") as fh:
                return sum(1 for _ in fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
        return None
    return None


def _utf8_problem(path: Path) -> str | None:
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
                    return (f"{path} is not UTF-8 text (byte 0x{chunk[exc.start]:02x} at offset {pos}, line {line}); "
                            "re-save it as UTF-8")
                line += chunk.count(b"\n")
                offset += len(chunk)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text (it ends inside a multi-byte character); re-save it as UTF-8"
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    return None


def table_summary(path: Path, spec: "DataSpec") -> tuple[list[str], int | None]:
    """(problems, number of rows) of a CSV / JSONL data file, read without any heavy library. The row count
    is None when the file is too large to read through in `validate`."""
    import csv

    from fmaudit.registry import suggest

    if path.stat().st_size > MAX_SCANNED_TABLE_BYTES:
        return [], None
    bad = _utf8_problem(path)
    if bad:
        return [bad], None
    wanted = [c for c in (spec.text_column, spec.label_column, spec.id_column) if c]
    rows = 0
    columns: set[str] | None = None
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                columns = set(reader.fieldnames or [])
                for _ in reader:
                    rows += 1
        else:
            with open(path, encoding="utf-8") as fh:
                for ln, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        return [f"{path}:{ln}: not valid JSON ({exc.msg})"], None
                    if not isinstance(obj, dict):
                        return [f"{path}:{ln}: each line must be a JSON object"], None
                    if columns is None:
                        columns = set(obj)
                    rows += 1
    except csv.Error as exc:
        return [f"{path}: malformed CSV ({exc})"], None
    if rows == 0:
        return [f"{path} has no rows"], 0
    problems = []
    for col in wanted:
        if col not in (columns or set()):
            close = suggest(col, columns or set())
            problems.append(f"{path} has no column {col!r} (columns: {sorted(columns or [])})"
                            + (f"; did you mean {close[0]!r}?" if close else "")
                            + " — set text_column / label_column / id_column in the recipe's data entry")
    return problems, rows


def _image_channels(recipe: "Recipe", data_name: str) -> int | None:
    spec = recipe.data.get(data_name)
    if spec is None:
        return None
    if spec.source == "bundled:digits":
        return 1
    if spec.source.startswith("imagefolder:"):
        return 1 if spec.grayscale else 3
    return None


def check_recipe(recipe: Recipe, *, lines: dict[tuple, int] | None = None, base_dir: Path | None = None,
                 allow_code_from: typing.Sequence[str | Path] = (), code: dict[str, CodeRef] | None = None
                 ) -> list[Problem]:
    """Pass 2: module params, names, cross-references, files and capabilities. The code of `python:` targets
    is located (not imported) and refused outside the allowed places; `code` receives what would run."""
    from fmaudit.registry import RegistryError, registry, suggest

    lines = lines or {}
    base_dir = base_dir or Path.cwd()
    problems: list[Problem] = []

    def add(loc: tuple[Any, ...], msg: str) -> None:
        problems.append(Problem(format_path(loc), msg, _line_for(lines, loc)))

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base_dir / q

    data_names = set(recipe.data)
    table_rows: dict[str, int] = {}  # rows of CSV / JSONL datasets (after `limit`), when counted
    # -- data -------------------------------------------------------------------------------------------
    for name, spec in recipe.data.items():
        src = spec.source
        loc = ("data", name, "source")
        if src.startswith("bundled:"):
            if src not in BUNDLED_DATA:
                close = suggest(src, BUNDLED_DATA)
                add(loc, f"unknown bundled dataset {src!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" (bundled: {', '.join(BUNDLED_DATA)})")
        elif src.startswith(("imagefolder:", "hf_disk:")):
            if not resolve(src.split(":", 1)[1]).exists():
                add(loc, f"{resolve(src.split(':', 1)[1])} does not exist")
        else:
            p = resolve(src)
            if p.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
                add(loc, "unknown data source; use bundled:tweets, bundled:digits, a .csv/.jsonl file, "
                         "imagefolder:DIR or hf_disk:DIR")
            elif not p.exists():
                add(loc, f"data file {p} does not exist")
            elif not p.is_file():
                add(loc, f"{p} is not a file")
            else:
                try:
                    msgs, rows = table_summary(p, spec)
                except OSError as exc:
                    msgs, rows = [f"cannot read {p}: {exc}"], None
                for msg in msgs:
                    add(loc, msg)
                if rows is not None:
                    table_rows[name] = min(rows, spec.limit) if spec.limit else rows

    # -- targets ----------------------------------------------------------------------------------------
    target_task: dict[str, str | None] = {}
    for name, spec in recipe.targets.items():
        task = spec.task
        m = spec.model
        if m.startswith("bundled:"):
            if m not in BUNDLED_MODELS:
                close = suggest(m, BUNDLED_MODELS)
                add(("targets", name, "model"), f"unknown bundled model {m!r}"
                    + (f"; did you mean {close[0]!r}?" if close else "") + f" (bundled: {', '.join(BUNDLED_MODELS)})")
            else:
                if task is not None and task != BUNDLED_MODELS[m]:
                    add(("targets", name, "task"), f"{m} is a {BUNDLED_MODELS[m]} model, not {task}")
                task = BUNDLED_MODELS[m]
                if m in ("bundled:digits-cnn", "bundled:digits-vit") and spec.finetune is None:
                    add(("targets", name), f"{m} starts from random weights: add a `finetune:` entry (e.g. "
                                           "finetune: {data: digits, epochs: 10, lr: 3.0e-3} with a bundled:digits "
                                           "dataset) so it is trained before it is audited")
        elif m.startswith("python:"):
            ref = m.split(":", 1)[1]
            if ref.count(":") != 1:
                add(("targets", name, "model"), "write python models as python:package.module:factory_function")
            else:
                try:
                    cref = resolve_code_ref(m, base_dir=base_dir, allow_code_from=allow_code_from)
                except CodeRefError as exc:
                    add(("targets", name, "model"), str(exc))
                else:
                    if cref.allowed_by is None:
                        add(("targets", name, "model"), refused_code_message(cref, base_dir))
                    elif code is not None:
                        code[name] = cref
            if task is None:
                add(("targets", name, "task"), "python: models need `task:` (image-classification)")
            if spec.weights and not resolve(spec.weights).exists():
                add(("targets", name, "weights"), f"weights file {resolve(spec.weights)} does not exist")
            elif spec.weights:
                bad = check_weights_file(resolve(spec.weights))
                if bad:
                    add(("targets", name, "weights"), bad)
        else:
            p = resolve(m)
            if not p.exists():
                add(("targets", name, "model"), f"model folder {p} does not exist (give a local Hugging Face "
                                                f"checkpoint folder or one of {', '.join(BUNDLED_MODELS)})")
            elif not p.is_dir() or not (p / "config.json").exists():
                add(("targets", name, "model"), f"{p} is not a Hugging Face model folder (no config.json); "
                                                "save models with `save_pretrained`")
            else:
                for msg in check_checkpoint_folder(p, task, spec.gguf_file):
                    add(("targets", name, "model"), msg)
                cfg, _ = read_model_config(p)
                channels = cfg.get("num_channels") if cfg else None
                if task == "image-classification" and isinstance(channels, int) and spec.finetune is not None:
                    have = _image_channels(recipe, spec.finetune.data)
                    if have is not None and have != channels:
                        fix = ("set `grayscale: true` on that dataset" if channels == 1 and have == 3 else
                               "use a dataset with matching channels (imagefolder without grayscale loads RGB)")
                        add(("targets", name, "finetune", "data"),
                            f"the model takes {channels}-channel images (num_channels in {p / 'config.json'}) but "
                            f"dataset {spec.finetune.data!r} has {have} channel(s); {fix}")
            if task is None:
                add(("targets", name, "task"), f"say what the model does: task: one of {', '.join(TASKS)}")
            if spec.gguf_file and p.is_dir() and not (p / spec.gguf_file).exists():
                add(("targets", name, "gguf_file"), f"{p / spec.gguf_file} does not exist")
        target_task[name] = task
        if spec.finetune is not None:
            ft = spec.finetune
            if ft.data not in data_names:
                close = suggest(ft.data, data_names)
                add(("targets", name, "finetune", "data"), f"no dataset named {ft.data!r} in `data`"
                    + (f"; did you mean {close[0]!r}?" if close else ""))
            elif table_rows.get(ft.data):  # (an empty file is reported on its data entry)
                n = table_rows[ft.data]
                k = min(max(1, int(round(ft.member_fraction * n))), n - 1) if n >= 2 else 0
                if n < 2:
                    add(("targets", name, "finetune", "data"), f"dataset {ft.data!r} has {n} row(s); a member / "
                                                               "non-member split needs at least 2")
                elif k < ft.batch_size:
                    add(("targets", name, "finetune", "batch_size"),
                        f"{k} training examples (member_fraction {ft.member_fraction:g} of {n} rows in "
                        f"{ft.data!r}) is fewer than batch_size {ft.batch_size}; use more data or a smaller batch")
            if ft.data in data_names and task is not None:
                want = MODALITY[task]
                have = "image" if recipe.data[ft.data].source in ("bundled:digits",) or \
                    recipe.data[ft.data].source.startswith("imagefolder:") else "text"
                if want != have:
                    add(("targets", name, "finetune", "data"), f"a {task} target needs {want} data; {ft.data!r} is {have}")
        if (spec.normalize_mean is None) != (spec.normalize_std is None):
            add(("targets", name, "normalize_std" if spec.normalize_std is None else "normalize_mean"),
                "give both normalize_mean and normalize_std, or neither")

    # -- audits -----------------------------------------------------------------------------------------
    known_targets = dict(target_task)
    for i, audit in enumerate(recipe.audits):
        problems += _check_module_params(i, audit.use, audit.params, audit.fail_if, lines)
        try:
            cls = registry.get(audit.use)
        except RegistryError:
            cls = None
        for j, t in enumerate(audit.target):
            loc = ("audits", i, "target") + ((j,) if len(audit.target) > 1 else ())
            if t not in known_targets:
                later = [k for k, a in enumerate(recipe.audits) if a.produces == t and k >= i]
                close = suggest(t, known_targets)
                if later:
                    add(loc, f"target {t!r} is produced by audits[{later[0]}], which runs after this one; "
                             "move this audit below it")
                else:
                    add(loc, f"unknown target {t!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" (targets: {', '.join(known_targets) or 'none'})")
                continue
            task = known_targets[t]
            if cls is not None and task is not None:
                missing = set(cls.requires) - CAPABILITIES[task]
                if missing:
                    add(loc, f"module {audit.use!r} needs {', '.join(sorted(missing))}, which a {task} target "
                             f"({t!r}) does not have")
                elif cls.tasks and task not in cls.tasks:
                    add(loc, f"module {audit.use!r} works on {', '.join(cls.tasks)} targets, not {task} ({t!r})")
            if audit.data is None and task is not None and t in recipe.targets and \
                    recipe.targets[t].finetune is None and cls is not None and cls.needs_data:
                add(("audits", i, "data"), f"target {t!r} has no fine-tune data; name a dataset with `data:`")
        if audit.data is not None and audit.data not in data_names:
            close = suggest(audit.data, data_names)
            add(("audits", i, "data"), f"no dataset named {audit.data!r} in `data`"
                + (f"; did you mean {close[0]!r}?" if close else ""))
        if audit.produces is not None:
            if cls is not None and not cls.produces_target:
                add(("audits", i, "produces"), f"module {audit.use!r} does not produce a target")
            elif audit.produces in known_targets:
                add(("audits", i, "produces"), f"a target named {audit.produces!r} already exists; pick a new name")
            elif len(audit.target) != 1:
                add(("audits", i, "produces"), "an audit that produces a target must run on exactly one target")
            else:
                known_targets[audit.produces] = known_targets.get(audit.target[0])
    return _dedupe(problems)


# ---------------------------------------------------------------------------------------------------
# Code execution: `python:package.module:factory` targets import (run) code named in the recipe. Where that
# code comes from is resolved here, without importing anything, and allowed only from the recipe's folder,
# installed packages (site-packages, the standard library, editable installs of an installed distribution)
# or a folder the *person running fmaudit* names with `--allow-code-from` (never the recipe itself: a recipe
# from someone else must not be able to widen what it may run).

_MODULE_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"


@dataclass(frozen=True)
class CodeRef:
    """Where the code of a `python:` target comes from (resolved without importing it)."""

    ref: str                # python:pkg.module:factory
    module: str
    factory: str
    file: Path              # the module's file (resolved, symlinks followed)
    files: tuple[Path, ...]  # every file importing it runs first: parent packages' __init__.py, then the module
    allowed_by: str | None  # "recipe folder (DIR)" | "installed package" | "--allow-code-from DIR"; None: refused
    from_recipe_folder: bool = False  # found only in the recipe's folder (imported with it appended to sys.path)
    refused: Path | None = None  # the first file outside the allowed places

    def sha256(self) -> str:
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "module": self.module, "factory": self.factory, "file": str(self.file),
                "sha256": self.sha256(), "allowed_by": self.allowed_by}


class CodeRefError(ValueError):
    """A `python:` reference that cannot be resolved, or resolves outside the allowed places."""


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _installed_roots() -> list[Path]:
    import site
    import sysconfig

    roots = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # old virtualenv's site module
        pass
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    return [Path(r).resolve() for r in roots if r]


def _editable_root_for(top: str, file: Path) -> str | None:
    """The installed distribution that provides top-level package `top` as an editable install
    (`pip install -e`) whose source folder holds `file`, or None."""
    import importlib.metadata as md
    from urllib.parse import unquote, urlparse

    for dist in md.distributions():
        try:
            raw = dist.read_text("direct_url.json")
            info = json.loads(raw) if raw else {}
        except (OSError, ValueError):
            continue
        url = info.get("url", "") if isinstance(info, dict) else ""
        if not (isinstance(info.get("dir_info"), dict) and info["dir_info"].get("editable")) or \
                not url.startswith("file:"):
            continue
        root = Path(unquote(urlparse(url).path)).resolve()
        if not _under(file, root):
            continue
        tops = set((dist.read_text("top_level.txt") or "").split())
        if not tops:
            tops = {k for k, v in md.packages_distributions().items() if dist.metadata["Name"] in v}
        if top in tops:
            return dist.metadata["Name"]
    return None


def resolve_code_ref(ref: str, *, base_dir: Path, allow_code_from: typing.Sequence[str | Path] = ()) -> CodeRef:
    """Find the file `python:pkg.module:factory` would import, without importing (running) anything, and
    say whether it may run. Raises CodeRefError when the reference is malformed or the module is not found."""
    import importlib.machinery
    import importlib.util
    import re
    import sys

    body = ref.split(":", 1)[1] if ref.startswith("python:") else ref
    mod_name, _, fn_name = body.partition(":")
    if not re.fullmatch(_MODULE_NAME, mod_name) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", fn_name):
        raise CodeRefError("write python models as python:package.module:factory_function")
    parts = mod_name.split(".")
    base_dir = Path(base_dir).resolve()
    files: list[Path] = []
    from_recipe_folder = False
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__spec__", None) is not None:
            spec = loaded.__spec__
        elif i == 0:
            try:
                spec = importlib.util.find_spec(name)  # a top-level name: finds, imports nothing
            except (ImportError, ValueError):
                spec = None
            if spec is None:  # not on the Python path: the recipe's folder
                spec = importlib.machinery.PathFinder.find_spec(name, [str(base_dir)])
                from_recipe_folder = spec is not None
        else:
            locations = list(spec.submodule_search_locations or [])
            if not locations:
                raise CodeRefError(f"{'.'.join(parts[:i])} is a module, not a package: cannot find {name}")
            spec = importlib.machinery.PathFinder.find_spec(name, locations)
        if spec is None:
            raise CodeRefError(f"cannot find module {name!r} on the Python path or in the recipe's folder "
                               f"({base_dir})")
        origin = getattr(loaded, "__file__", None) if loaded is not None else None
        origin = origin or spec.origin
        if origin in ("built-in", "frozen"):
            continue
        if not origin or not Path(origin).is_file():
            raise CodeRefError(f"module {name!r} has no source file (a namespace package?); name a module file")
        files.append(Path(origin).resolve())
    if not files:
        raise CodeRefError(f"module {mod_name!r} is built into Python; name a module that defines the factory")
    module_file = files[-1]

    def allowed(f: Path) -> str | None:
        for a in allow_code_from:
            root = Path(a).expanduser().resolve()
            if f == root or _under(f, root):
                return f"--allow-code-from {root}"
        if _under(f, base_dir):
            return f"recipe folder ({base_dir})"
        if any(_under(f, r) for r in _installed_roots()):
            return "installed package"
        dist = _editable_root_for(parts[0], f)
        return f"installed package ({dist}, editable)" if dist else None

    verdicts = [allowed(f) for f in files]
    refused = next((f for f, v in zip(files, verdicts) if v is None), None)
    return CodeRef(ref=f"python:{mod_name}:{fn_name}", module=mod_name, factory=fn_name, file=module_file,
                   files=tuple(files), allowed_by=None if refused is not None else verdicts[-1],
                   from_recipe_folder=from_recipe_folder, refused=refused)


def refused_code_message(code: CodeRef, base_dir: Path) -> str:
    bad = code.refused or code.file
    return (f"{code.ref} would import (run) {bad}, which is outside the recipe's folder ({Path(base_dir).resolve()}) "
            f"and the installed packages; refused before anything ran. If you trust that code, allow it with "
            f"`--allow-code-from {bad.parent}` (fmaudit validate / run)")


# ---------------------------------------------------------------------------------------------------
# JSON Schema


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of recipes, with each registered module's params (for editor completion)."""
    from fmaudit.registry import registry

    schema = Recipe.model_json_schema()
    variants = []
    for name, cls in registry.all().items():
        params = cls.Params.model_json_schema()
        defs = params.pop("$defs", {})
        schema.setdefault("$defs", {}).update(defs)
        variants.append({
            "type": "object",
            "properties": {"use": {"const": name, "description": cls.description}, "params": params},
            "required": ["use"],
        })
    audit_def = schema["$defs"]["AuditSpec"]
    audit_def["properties"]["target"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    if variants:
        schema["$defs"]["AuditSpec"] = {"allOf": [audit_def, {"anyOf": variants}]}
    schema["title"] = "fmaudit recipe"
    return schema
