"""The recipe's own shape (pass 1 of validation): pydantic models of every section, and its JSON Schema."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fmaudit.registry import registry
from fmaudit.report import GateOp
from fmaudit.tasks import ModelTask

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """A named dataset."""

    source: str = Field(
        description="bundled:tweets | bundled:digits | path/to.csv | path/to.jsonl | "
        "imagefolder:DIR | hf_disk:DIR (a Hugging Face dataset saved with save_to_disk)"
    )
    limit: int | None = Field(default=None, gt=0, description="Keep a seeded random sample of at most this many.")
    balance: bool = Field(
        default=False,
        description="Keep the same number of examples of every class (a seeded "
        "sample of each; with `limit`, limit // classes each), so the "
        "majority-class baseline is 1 / classes.",
    )
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
    member_fraction: float = Field(
        default=0.5, gt=0, lt=1, description="Fraction of the dataset used for training (members)."
    )
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    trainable: Literal["all", "last_n_layers", "head"] = "all"
    n_layers: int = Field(default=2, ge=1, description="With trainable: last_n_layers, how many blocks train.")


class PromptSpec(_Strict):
    """A causal LM used as a zero- / few-shot text classifier: the prompt around each text and the label words
    scored as its next token (fmaudit.targets.prompted)."""

    template: str = Field(
        description="The prompt, with {text} where the example goes and the cue after it, e.g. "
        "'Tweet: {text}\\nSentiment:'. Few-shot examples go in the template."
    )
    label_words: dict[str, str | list[str]] = Field(
        description="Label -> its word(s), in the data's label order, e.g. {negative: [' negative'], positive: "
        "[' positive']}; each word is scored by its first token's next-token log-probability."
    )


class TargetSpec(_Strict):
    """A model to audit."""

    model: str = Field(
        description="bundled:minilm | bundled:smollm2 | bundled:digits-cnn | bundled:digits-vit | "
        "a local Hugging Face checkpoint folder | python:package.module:factory"
    )
    task: ModelTask | None = Field(default=None, description="What the model does; optional for bundled models.")
    num_labels: int | None = Field(default=None, ge=2, description="Classifier head size (default: from the data).")
    gguf_file: str | None = Field(default=None, description="Causal LMs: a GGUF file inside the model folder.")
    weights: str | None = Field(
        default=None,
        description="python: models only: a .safetensors (or .pt, loaded with weights_only=True) state dict.",
    )
    normalize_mean: list[float] | None = Field(
        default=None, description="Image models: per-channel mean applied inside the wrapper (inputs stay in [0, 1])."
    )
    normalize_std: list[float] | None = None
    trust_remote_code: bool = Field(
        default=False, description="Run code shipped with the checkpoint. Off unless you trust its author."
    )
    max_length: int = Field(default=128, ge=4, description="Text: tokens per example at inference.")
    finetune: FinetuneSpec | None = None
    prompt: PromptSpec | None = Field(
        default=None, description="Causal LMs: use the model as a text classifier through this prompt and verbalizer."
    )


class ExecutorSpec(_Strict):
    """Where independent units run (audits over several targets in one wave, reference-model trainings,
    shards). It changes where, never what: reports and caches match a local run with the same seed."""

    kind: Literal["local", "ray"] = Field(
        default="local",
        description="local: in this process, one after another. "
        "ray: as Ray tasks (pip install 'fmaudit[ray]'); see docs/ray.md.",
    )
    address: str | None = Field(
        default=None,
        description="ray: the cluster to join: auto (started with `ray start`),"
        " ray://host:10001 (Ray Client); default: a local instance.",
    )
    num_cpus_per_task: float = Field(default=1.0, gt=0, description="ray: CPUs each task holds (and torch threads).")
    num_gpus_per_task: float = Field(default=0.0, ge=0, description="ray: GPUs each task holds (fractions share one).")
    max_retries: int = Field(
        default=3, ge=0, description="ray: retries of a task whose worker died; then that unit is reported as an error."
    )

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> ExecutorSpec:
        if self.kind == "local":
            used = [
                k
                for k in ("address", "num_cpus_per_task", "num_gpus_per_task", "max_retries")
                if k in self.model_fields_set
            ]
            if used:
                raise ValueError(f"{', '.join(used)} {'applies' if len(used) == 1 else 'apply'} only to kind: ray")
        return self


class AuditSpec(_Strict):
    use: str = Field(description="Registered audit module name (`fmaudit list`).")
    target: list[str] = Field(description="Target name, or a list of names: the module runs on each.")
    data: str | None = Field(default=None, description="Dataset name; default: the target's fine-tune data.")
    params: dict[str, Any] = Field(default_factory=dict, description="The module's parameters (`fmaudit list -v`).")
    fail_if: dict[str, dict[GateOp, float]] = Field(
        default_factory=dict, description="Gates: metric -> {gt|ge|lt|le|eq|ne: threshold}; a hit fails the run."
    )
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
    device: str = Field(
        default="cpu",
        pattern=r"^(cpu|auto|cuda(:\d+)?|mps)$",
        description="cpu | auto (cuda when available) | cuda | cuda:N | mps",
    )
    store_examples: bool = Field(
        default=False,
        description="Put raw examples (text, images) in the report. Off by "
        "default: a privacy report must not itself leak.",
    )
    output_dir: str | None = Field(default=None, description="Where run folders go (default: ./reports).")
    cache_dir: str | None = Field(
        default=None, description="Fine-tune cache (default: $FMAUDIT_CACHE_DIR or ~/.cache/fmaudit)."
    )
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
        for target in data["targets"].values():  # a target without a prompt hashes as before prompts existed
            if target.get("prompt") is None:
                target.pop("prompt", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of recipes, with each registered module's params (for editor completion)."""
    schema = Recipe.model_json_schema()
    variants = []
    for name, cls in registry.all().items():
        params = cls.Params.model_json_schema()
        defs = params.pop("$defs", {})
        schema.setdefault("$defs", {}).update(defs)
        variants.append(
            {
                "type": "object",
                "properties": {"use": {"const": name, "description": cls.description}, "params": params},
                "required": ["use"],
            }
        )
    audit_def = schema["$defs"]["AuditSpec"]
    audit_def["properties"]["target"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    if variants:
        schema["$defs"]["AuditSpec"] = {"allOf": [audit_def, {"anyOf": variants}]}
    schema["title"] = "fmaudit recipe"
    return schema
