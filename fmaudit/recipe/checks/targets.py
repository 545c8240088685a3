"""Pass 2, section `targets`: each target's model (dispatched on its kind: bundled, python: code, local
checkpoint folder), its model task, its fine-tune (data exists, fits the task, enough rows for a batch) and its
prompt (a causal LM used as a classifier: template, label words, labels against the data)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fmaudit.hints import did_you_mean
from fmaudit.recipe.checks.context import CheckContext
from fmaudit.recipe.checks.data import source_kind
from fmaudit.recipe.code_refs import CodeRefError, refused_code_message, resolve_code_ref
from fmaudit.recipe.files import check_checkpoint_folder, check_weights_file, read_model_config
from fmaudit.recipe.schema import FinetuneSpec, TargetSpec
from fmaudit.tasks import BUNDLED_MODELS, CAUSAL_LM, IMAGE_CLASSIFICATION, MODALITY, TASKS, TEXT_CLASSIFICATION

# Bundled models that start from random weights: auditing them untrained measures nothing.
RANDOM_INIT_MODELS = ("bundled:digits-cnn", "bundled:digits-vit")


def _check_bundled_model(ctx: CheckContext, name: str, spec: TargetSpec) -> str | None:
    m, task = spec.model, spec.task
    if m not in BUNDLED_MODELS:
        ctx.add(
            ("targets", name, "model"),
            f"unknown bundled model {m!r}"
            + did_you_mean(m, BUNDLED_MODELS)
            + f" (bundled: {', '.join(BUNDLED_MODELS)})",
        )
        return task
    if task is not None and task != BUNDLED_MODELS[m]:
        ctx.add(("targets", name, "task"), f"{m} is a {BUNDLED_MODELS[m]} model, not {task}")
    if m in RANDOM_INIT_MODELS and spec.finetune is None:
        ctx.add(
            ("targets", name),
            f"{m} starts from random weights: add a `finetune:` entry (e.g. "
            "finetune: {data: digits, epochs: 10, lr: 3.0e-3} with a bundled:digits "
            "dataset) so it is trained before it is audited",
        )
    return BUNDLED_MODELS[m]


def _check_python_model(ctx: CheckContext, name: str, spec: TargetSpec) -> str | None:
    """Locate (never import) the factory's code and refuse it outside the allowed places."""
    if spec.model.split(":", 1)[1].count(":") != 1:
        ctx.add(("targets", name, "model"), "write python models as python:package.module:factory_function")
    else:
        try:
            cref = resolve_code_ref(spec.model, base_dir=ctx.base_dir, allow_code_from=ctx.allow_code_from)
        except CodeRefError as exc:
            ctx.add(("targets", name, "model"), str(exc))
        else:
            if cref.allowed_by is None:
                ctx.add(("targets", name, "model"), refused_code_message(cref, ctx.base_dir))
            elif ctx.code is not None:
                ctx.code[name] = cref
    if spec.task is None:
        ctx.add(("targets", name, "task"), f"python: models need `task:` ({IMAGE_CLASSIFICATION})")
    if spec.weights:
        weights = ctx.resolve(spec.weights)
        bad = check_weights_file(weights) if weights.exists() else f"weights file {weights} does not exist"
        if bad:
            ctx.add(("targets", name, "weights"), bad)
    return spec.task


def _check_channels(ctx: CheckContext, name: str, spec: TargetSpec, folder: Path) -> None:
    """An image checkpoint's num_channels against the channels of its fine-tune data."""
    cfg, _ = read_model_config(folder)
    channels = cfg.get("num_channels") if cfg else None
    if spec.task != IMAGE_CLASSIFICATION or not isinstance(channels, int) or spec.finetune is None:
        return
    data = ctx.recipe.data.get(spec.finetune.data)
    have = source_kind(data).channels(data) if data is not None else None
    if have is not None and have != channels:
        fix = (
            "set `grayscale: true` on that dataset"
            if channels == 1 and have == 3
            else "use a dataset with matching channels (imagefolder without grayscale loads RGB)"
        )
        ctx.add(
            ("targets", name, "finetune", "data"),
            f"the model takes {channels}-channel images (num_channels in {folder / 'config.json'}) but "
            f"dataset {spec.finetune.data!r} has {have} channel(s); {fix}",
        )


def _check_model_folder(ctx: CheckContext, name: str, spec: TargetSpec) -> str | None:
    """A local Hugging Face checkpoint folder: config, weights, tokenizer, channels, GGUF file."""
    p = ctx.resolve(spec.model)
    if not p.exists():
        ctx.add(
            ("targets", name, "model"),
            f"model folder {p} does not exist (give a local Hugging Face "
            f"checkpoint folder or one of {', '.join(BUNDLED_MODELS)})",
        )
    elif not p.is_dir() or not (p / "config.json").exists():
        ctx.add(
            ("targets", name, "model"),
            f"{p} is not a Hugging Face model folder (no config.json); save models with `save_pretrained`",
        )
    else:
        for msg in check_checkpoint_folder(p, spec.task, spec.gguf_file):
            ctx.add(("targets", name, "model"), msg)
        _check_channels(ctx, name, spec, p)
    if spec.task is None:
        ctx.add(("targets", name, "task"), f"say what the model does: task: one of {', '.join(TASKS)}")
    if spec.gguf_file and p.is_dir() and not (p / spec.gguf_file).exists():
        ctx.add(("targets", name, "gguf_file"), f"{p / spec.gguf_file} does not exist")
    return spec.task


ModelCheck = Callable[[CheckContext, str, TargetSpec], str | None]

# model prefix before ":" -> its check, which returns the target's model task (None: unknown). A model
# without a registered prefix is a local checkpoint folder.
MODEL_KINDS: dict[str, ModelCheck] = {"bundled": _check_bundled_model, "python": _check_python_model}


def _model_check(model: str) -> ModelCheck:
    prefix, sep, _ = model.partition(":")
    return MODEL_KINDS.get(prefix, _check_model_folder) if sep else _check_model_folder


def _check_finetune(ctx: CheckContext, name: str, ft: FinetuneSpec, task: str | None) -> None:
    """The fine-tune data exists, has rows for a member / non-member split and a batch, and fits the task."""
    loc = ("targets", name, "finetune", "data")
    if ft.data not in ctx.recipe.data:
        ctx.add(loc, f"no dataset named {ft.data!r} in `data`" + did_you_mean(ft.data, ctx.recipe.data))
        return
    n = ctx.table_rows.get(ft.data)
    if n:  # (an empty file is reported on its data entry)
        k = min(max(1, int(round(ft.member_fraction * n))), n - 1) if n >= 2 else 0
        if n < 2:
            ctx.add(loc, f"dataset {ft.data!r} has {n} row(s); a member / non-member split needs at least 2")
        elif k < ft.batch_size:
            ctx.add(
                ("targets", name, "finetune", "batch_size"),
                f"{k} training examples (member_fraction {ft.member_fraction:g} of {n} rows in "
                f"{ft.data!r}) is fewer than batch_size {ft.batch_size}; use more data or a smaller batch",
            )
    if task is not None:
        data = ctx.recipe.data[ft.data]
        want, have = MODALITY[task], source_kind(data).modality(data)
        if want != have:
            ctx.add(loc, f"a {task} target needs {want} data; {ft.data!r} is {have}")


def _prompt_label_sets(ctx: CheckContext, name: str, spec: TargetSpec) -> dict[str, list[str]]:
    """Dataset name -> its label names, for the datasets this target is fine-tuned on or audited with whose labels
    are known without reading them (bundled:tweets)."""
    from fmaudit.data import TWEET_LABELS

    used = {spec.finetune.data} if spec.finetune is not None else set()
    used |= {a.data for a in ctx.recipe.audits if a.data is not None and name in a.target}
    out = {}
    for d in sorted(used):
        data = ctx.recipe.data.get(d)
        if data is not None and data.source == "bundled:tweets":
            out[d] = list(data.labels or (TWEET_LABELS[0], TWEET_LABELS[-1]))
    return out


def _prompt_tokenizer(ctx: CheckContext, spec: TargetSpec):
    """The tokenizer of a local checkpoint folder (fast to load), or None: GGUF tokenizers (bundled:smollm2,
    gguf_file) take seconds to read, so their label words are checked when the model loads."""
    if spec.gguf_file or ":" in spec.model:
        return None
    folder = ctx.resolve(spec.model)
    if not (folder / "config.json").exists():
        return None  # reported by the folder check
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError):
        return None  # the folder check reports missing tokenizer files


def _check_prompt(ctx: CheckContext, name: str, spec: TargetSpec, task: str | None) -> str | None:
    """A prompt on a causal LM makes a text classifier: template with {text} and a cue after it, label words that
    tokenize to distinct first tokens, labels equal to the data's (in order). Returns the target's task."""
    from fmaudit.targets.base import TargetError
    from fmaudit.targets.prompted import label_first_tokens, normalize_label_words, split_template

    loc = ("targets", name, "prompt")
    if task is not None and task != CAUSAL_LM:
        ctx.add(loc, f"a prompt turns a causal LM into a classifier; this is a {task} model")
        return task
    prompt = spec.prompt
    assert prompt is not None  # called for targets with a prompt
    try:
        split_template(prompt.template)
    except TargetError as exc:
        ctx.add(loc + ("template",), str(exc))
    try:
        words = normalize_label_words(prompt.label_words)
    except TargetError as exc:
        ctx.add(loc + ("label_words",), str(exc))
        return TEXT_CLASSIFICATION
    for d, labels in _prompt_label_sets(ctx, name, spec).items():
        if list(words) != labels:
            ctx.add(
                loc + ("label_words",),
                f"the labels {list(words)} must be those of dataset {d!r}, in its order: {labels}",
            )
    tok = _prompt_tokenizer(ctx, spec)
    if tok is not None:
        try:
            label_first_tokens(tok, words)
        except TargetError as exc:
            ctx.add(loc + ("label_words",), str(exc))
    return TEXT_CLASSIFICATION


def check_targets(ctx: CheckContext) -> None:
    """Every target's model (by kind), fine-tune, prompt and normalization; records each target's model task (a
    prompted causal LM is a text classifier)."""
    for name, spec in ctx.recipe.targets.items():
        task = _model_check(spec.model)(ctx, name, spec)
        if spec.prompt is not None:
            task = _check_prompt(ctx, name, spec, task)
        ctx.target_tasks[name] = task
        if spec.finetune is not None:
            _check_finetune(ctx, name, spec.finetune, task)
        if (spec.normalize_mean is None) != (spec.normalize_std is None):
            ctx.add(
                ("targets", name, "normalize_std" if spec.normalize_std is None else "normalize_mean"),
                "give both normalize_mean and normalize_std, or neither",
            )
