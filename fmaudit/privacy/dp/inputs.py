"""Inputs: what users have -> what the DP loop trains.

The DP loop trains a Target (torch_dataset, collate, loss(reduction="none"), set_trainable, copy) on data that
target understands. `adapt_inputs` builds both from what a user has:
  model:      an fmaudit Target, any nn.Module, a Hugging Face PreTrainedModel (or a PEFT model around one);
  train_data: an fmaudit Dataset, a map-style torch Dataset ((x, y) tuples or dicts), a DataLoader, or a
              Hugging Face datasets.Dataset with tokenized columns;
  loss_fn:    optional per-example loss (model, batch) -> tensor[B].
fmaudit Target + fmaudit Dataset keeps the target's own tokenization / preprocessing; everything else goes
through `module_target`, which batches items the way the user's data gives them and calls the model on them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fmaudit.privacy.dp.module_target import LossFunction, TorchData, module_target, output_logits
from fmaudit.privacy.dp.utility import utility_summary
from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION

CLASSIFICATION = "classification"  # a Hugging Face / torch model that is neither a causal LM nor an image model
_DESCRIBED = {CAUSAL_LM: "causal LM", IMAGE_CLASSIFICATION: "image classifier"}  # else "classifier"


@dataclass
class DPInputs:
    """The adapted inputs. `target` is what the loop trains (never the caller's object: the run copies it);
    `train` / `validation` are data `target` understands; `release(work)` turns the trained work target into
    (model handed back, target handed back); `utility(target, data, seed=...)` measures a model on data."""

    target: Any
    train: Any
    validation: Any
    described: str
    batch_size: int | None = None  # from a DataLoader
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cacheable: bool = True
    release: Callable[[Any], tuple[Any, Any]] = lambda work: (work.model, work)
    utility: Callable[..., dict[str, float]] = utility_summary  # fmaudit targets on fmaudit Datasets


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def _is_fmaudit_dataset(obj: Any) -> bool:
    from fmaudit.data import Dataset

    return isinstance(obj, Dataset)


def _as_torch_data(obj: Any, role: str, problems: list[str], notes: list[str]) -> tuple[Any, int | None, Any]:
    """(TorchData or None, the DataLoader's batch size or None, the DataLoader's collate or None)."""
    import torch

    if obj is None:
        return None, None, None
    if isinstance(obj, torch.utils.data.DataLoader):
        loader = obj
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):
            problems.append(
                f"{role}: the DataLoader's dataset is an IterableDataset; DP-SGD's Poisson sampling "
                "needs a map-style dataset (len and indexing)"
            )
            return None, None, None
        collate: Any = loader.collate_fn
        if collate is torch.utils.data.default_collate or getattr(collate, "__name__", "") == "default_collate":
            collate = None
        if role == "train_data":
            notes.append(
                "train_data is a DataLoader: its dataset is used"
                + (
                    f" with its batch size {loader.batch_size} as the expected (Poisson) batch size"
                    if loader.batch_size
                    else ""
                )
                + (" and its collate_fn" if collate else "")
                + "; Poisson sampling (each example in each step independently with probability q) "
                "replaces its sampler / shuffling, as the DP accountant assumes"
            )
        data, _, _ = _as_torch_data(loader.dataset, role, problems, notes)
        return data, loader.batch_size, collate
    if _is_hf_dataset(obj):
        keep = [c for c in obj.column_names if _hf_column_is_numeric(obj, c)]
        dropped = [c for c in obj.column_names if c not in keep]
        if not keep:
            problems.append(
                f"{role}: the datasets.Dataset has no numeric columns (columns: {obj.column_names}); "
                "tokenize it first (input_ids, attention_mask, labels)"
            )
            return None, None, None
        if dropped and role == "train_data":
            notes.append(f"datasets.Dataset columns not passed to the model (not numeric): {', '.join(dropped)}")
        return TorchData(obj.with_format("torch", columns=keep), f"datasets.Dataset[{len(obj)}]"), None, None
    if isinstance(obj, torch.utils.data.IterableDataset):
        problems.append(
            f"{role}: an IterableDataset cannot be Poisson-sampled; give a map-style dataset (len and indexing)"
        )
        return None, None, None
    if isinstance(obj, torch.utils.data.Dataset) or (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        return TorchData(obj, type(obj).__name__), None, None
    problems.append(
        f"{role} must be an fmaudit Dataset, a map-style torch Dataset, a DataLoader or a "
        f"datasets.Dataset, got {type(obj).__name__}"
    )
    return None, None, None


def _hf_column_is_numeric(ds: Any, column: str) -> bool:
    feat = ds.features.get(column)
    while feat is not None and hasattr(feat, "feature"):  # Sequence / List features
        feat = feat.feature
    if isinstance(feat, list):  # old-style list features
        feat = feat[0] if feat else None
    dtype = getattr(feat, "dtype", None)
    # numbers and lists of numbers; not strings, and not PIL images (they need the model's image processor)
    return dtype is not None and not str(dtype).startswith(("string", "large_string", "PIL"))


def _hf_task(model: Any) -> str:
    """CAUSAL_LM, IMAGE_CLASSIFICATION or CLASSIFICATION, from the Hugging Face class (PEFT: its base)."""
    inner = model
    if hasattr(inner, "peft_config") and hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    name = type(inner).__name__
    try:
        from transformers.models.auto import modeling_auto as ma

        def names(mapping: dict) -> set[str]:
            out: set[str] = set()
            for v in mapping.values():
                out.update(v if isinstance(v, (tuple, list)) else [v])
            return out

        if name in names(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            return CAUSAL_LM
        if name in names(ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
            return IMAGE_CLASSIFICATION
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return CAUSAL_LM if name.endswith("ForCausalLM") or name.endswith("LMHeadModel") else CLASSIFICATION


def _dry_run(target: Any, data: TorchData, custom_loss: bool) -> list[str]:
    """Collate two training examples and compute their losses (eval mode, no gradients): catches a batch the
    model cannot take and a loss_fn that returns a batch mean instead of one loss per example."""
    import torch

    k = min(2, len(data))
    if k == 0:
        return []
    try:
        batch = target.to_device(target.collate([data.dataset[i] for i in range(k)]))
        was = target.model.training
        target.model.eval()
        try:
            with torch.no_grad():
                per = target.loss(target.model, batch, reduction="none")
        finally:
            target.model.train(was)
    except Exception as exc:
        what = "loss_fn" if custom_loss else "the default loss (cross-entropy on logits / labels, or the LM loss)"
        return [
            f"{what} failed on two training examples: {type(exc).__name__}: {str(exc)[:300]}"
            + ("" if custom_loss else "; give loss_fn(model, batch) -> per-example losses")
        ]
    if not torch.is_tensor(per) or tuple(per.shape) != (k,):
        shape = tuple(per.shape) if torch.is_tensor(per) else type(per).__name__
        return [
            f"loss_fn must return one loss per example (a tensor of shape [{k}] for {k} examples), got {shape}: "
            "DP-SGD clips each example's gradient, which a batch mean hides (use reduction='none')"
        ]
    if custom_loss and target.task != CAUSAL_LM:
        # Accuracy beside a custom loss: only when the default forward gives (B, C) logits for the batch's labels.
        labels = target.labels(batch)
        if labels is not None and labels.dim() == 1:
            try:
                with torch.no_grad():
                    logits = output_logits(target.forward(target.model.eval(), batch))
                target.accuracy_from_forward = logits.dim() == 2 and logits.shape[0] == k
            except Exception:  # the model takes its inputs another way: the custom loss is the utility
                target.accuracy_from_forward = False
            finally:
                target.model.train(was)
    return []


def adapt_inputs(
    model: Any, train_data: Any, validation_data: Any = None, loss_fn: LossFunction | None = None
) -> DPInputs:
    """Turn (model, train_data, validation_data, loss_fn) into what the DP loop trains (see the module
    docstring). Problems are collected, not raised: `dp_finetune` lists them with the others."""
    from torch import nn

    from fmaudit.targets.base import Target

    if not isinstance(model, (Target, nn.Module)):
        return DPInputs(
            target=None,
            train=None,
            validation=None,
            described="?",
            problems=[
                f"model must be an fmaudit Target, a torch nn.Module or a Hugging Face PreTrainedModel, got "
                f"{type(model).__name__}"
            ],
        )
    problems = ["train_data is missing"] if train_data is None else []
    native = _is_fmaudit_dataset(train_data)
    if isinstance(model, Target) and (native or train_data is None):
        return _native_inputs(model, train_data, validation_data, loss_fn, problems)
    if native:
        return _pixel_inputs(model, train_data, validation_data, loss_fn, problems)
    return _module_inputs(model, train_data, validation_data, loss_fn, problems)


def _native_inputs(
    model: Any, train_data: Any, validation_data: Any, loss_fn: LossFunction | None, problems: list[str]
) -> DPInputs:
    """fmaudit Target + fmaudit Dataset: the target's own preprocessing (tokenizer, pixels)."""
    if loss_fn is not None:
        problems.append(
            "loss_fn works with torch / Hugging Face data; an fmaudit Target on an fmaudit Dataset "
            "trains with the target's own loss"
        )
    if validation_data is not None and not _is_fmaudit_dataset(validation_data):
        problems.append("validation_data must be an fmaudit Dataset like train_data")
    if train_data is not None and len(train_data) and "classifier" in model.capabilities and train_data.labels is None:
        problems.append(f"dataset {train_data.name!r} has no labels; a classifier needs them")
    return DPInputs(
        target=model,
        train=train_data,
        validation=validation_data,
        described=f"fmaudit target {model.name!r} ({model.task})",
        problems=problems,
    )


def _pixel_inputs(
    model: Any, train_data: Any, validation_data: Any, loss_fn: LossFunction | None, problems: list[str]
) -> DPInputs:
    """A plain nn.Module on an fmaudit image Dataset: an image classifier over [0, 1] pixels."""
    if train_data.modality != "image" or _hf_task(model) not in (CLASSIFICATION, IMAGE_CLASSIFICATION):
        problems.append(
            "an nn.Module on an fmaudit text Dataset needs its tokenizer: load it with "
            "fmaudit.load_target(...), or give tokenized data (a datasets.Dataset with input_ids, "
            "attention_mask, labels, or a torch Dataset)"
        )
        return DPInputs(target=None, train=None, validation=None, described="?", problems=problems)
    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    params = list(model.parameters())
    hf = hasattr(model, "config") and _hf_task(model) == IMAGE_CLASSIFICATION
    t = ImageClassifier(
        name=type(model).__name__,
        model=PixelClassifier(model, hf=hf),
        source="python",
        kind="torch-module",
        device=str(params[0].device) if params else "cpu",
        label_names=train_data.label_names,
        num_classes=train_data.num_labels,
    )
    if train_data.labels is None:
        problems.append(f"dataset {train_data.name!r} has no labels; a classifier needs them")
    if loss_fn is not None:
        problems.append("loss_fn works with torch / Hugging Face data, not with an fmaudit Dataset")
    return DPInputs(
        target=t,
        train=train_data,
        validation=validation_data,
        problems=problems,
        described=f"{type(model).__name__} as an image classifier ([0, 1] pixels -> logits)",
        release=lambda work: (work.model.inner, work),
    )


def _pad_id(model: Any, inner: Any) -> int:
    """The pad token id: the model config's, the target tokenizer's, else the config's end-of-sequence id; 0."""
    from fmaudit.targets.base import Target

    cfg = getattr(inner, "config", None)
    pad_id = getattr(cfg, "pad_token_id", None)
    tokenizer = getattr(model, "tokenizer", None) if isinstance(model, Target) else None
    if pad_id is None and tokenizer is not None:
        pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if isinstance(pad_id, (list, tuple)):
        pad_id = pad_id[0] if pad_id else None
    return int(pad_id or 0)


def _module_inputs(
    model: Any, train_data: Any, validation_data: Any, loss_fn: LossFunction | None, problems: list[str]
) -> DPInputs:
    """Everything else: the module as it is, on the data as it is."""
    from fmaudit.targets.base import Target

    notes: list[str] = []
    train, loader_batch, collate = _as_torch_data(train_data, "train_data", problems, notes)
    if _is_fmaudit_dataset(validation_data):
        problems.append(
            "validation_data must be the same kind of data as train_data (torch / datasets), not an fmaudit Dataset"
        )
        validation = None
    else:
        validation, _, _ = _as_torch_data(validation_data, "validation_data", problems, [])
    inner = model.model if isinstance(model, Target) else model
    task = _hf_task(inner) if not isinstance(model, Target) or model.task != CAUSAL_LM else CAUSAL_LM
    t = module_target(
        inner,
        task=task,
        loss_fn=loss_fn,
        collate=collate,
        name=model.name if isinstance(model, Target) else type(inner).__name__,
        pad_id=_pad_id(model, inner),
    )
    flags = {name: p.requires_grad for name, p in inner.named_parameters()} if t.is_peft else {}
    if t.is_peft:
        notes.append(
            "a PEFT model: its own trainable parameters (adapters, modules_to_save) are trained with "
            "trainable='all'; the PEFT model comes back unmerged, with its requires_grad flags as given"
        )
    if train is not None and not problems:
        problems += _dry_run(t, train, loss_fn is not None)

    def release(work: Any) -> tuple[Any, Any]:
        for name, p in work.model.named_parameters():  # the loop leaves every flag on; a PEFT model keeps its own
            if name in flags:
                p.requires_grad_(flags[name])
        if isinstance(model, Target):  # a target like the caller's (tokenizer, preprocessing) around the model
            out = copy.copy(model)
            out.model = work.model
            out.weights_changed()
            return work.model, out
        return work.model, work

    return DPInputs(
        target=t,
        train=train,
        validation=validation,
        batch_size=loader_batch,
        problems=problems,
        notes=notes,
        cacheable=False,
        release=release,
        described=f"{type(inner).__name__} ({_DESCRIBED.get(task, 'classifier')}) on {type(train_data).__name__}",
        utility=lambda target, data, max_examples=1000, seed=0: target.evaluate(data, max_examples, seed),
    )
