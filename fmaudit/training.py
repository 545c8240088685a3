"""The one fine-tuning loop (targets, reference models and DP fine-tuning all use it), and the
fine-tune cache keyed by base weights + data + settings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmaudit.cache_lock import entry_lock, publish_dir
from fmaudit.data import Dataset, Split

TRAINING_VERSION = "2"  # bump when the loop changes in a way that changes weights: invalidates caches
# 2: seeds come from fmaudit.seeds streams (TRAIN_TORCH, TRAIN_SHUFFLE) instead of the bare seed


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.0
    trainable: str = "all"
    n_layers: int = 2
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: Any, seed: int) -> TrainConfig:
        return cls(
            epochs=spec.epochs,
            batch_size=spec.batch_size,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            trainable=spec.trainable,
            n_layers=spec.n_layers,
            seed=seed,
        )


@dataclass
class TrainStats:
    steps: int = 0
    examples_seen: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# A hook that wraps (model, optimizer, loader) before training, e.g. Opacus' make_private.
Wrap = Callable[[Any, Any, Any], tuple[Any, Any, Any]]
# A replacement for `target.loss(model, batch)`; returns something with `.backward()` and `.detach()`.
LossFn = Callable[[Any, dict], Any]


def train(
    target: Any,
    data: Dataset,
    config: TrainConfig,
    *,
    progress: Callable[[str, int], Any] | None = None,
    wrap: Wrap | None = None,
    on_step: Callable[[int, float], None] | None = None,
    label: str = "fine-tuning",
    loss_fn: LossFn | None = None,
    on_empty: Callable[[], None] | None = None,
    torch_stream: Any = None,
) -> TrainStats:
    """Train `target.model` in place on `data` with AdamW. Deterministic for a given seed.

    `wrap` may replace the model, optimizer and data loader (DP-SGD does); the loop stays the same.
    `loss_fn(model, batch)` replaces `target.loss` (DP-SGD needs a per-example mean, or Opacus' ghost-clipping
    loss object, whose `backward()` runs two passes). `config.trainable == "keep"` leaves `requires_grad` as
    the caller set it (LoRA adapters). An empty batch (Poisson sampling can draw one) calls `on_empty()` when
    given (DP-SGD takes a noise-only step there, and the accountant counts it), else it is skipped.
    Randomness: the torch global generator (dropout, new layers) is seeded from `torch_stream` (default
    `Stream.TRAIN_TORCH`) and the shuffling loader from `Stream.TRAIN_SHUFFLE`, both under `config.seed`.
    """
    import torch

    from fmaudit.seeds import Stream, derive

    if len(data) == 0:
        raise ValueError(f"cannot fine-tune on an empty dataset ({data.name!r})")
    torch.manual_seed(derive(config.seed, Stream.TRAIN_TORCH if torch_stream is None else torch_stream))
    if config.trainable != "keep":
        target.set_trainable(config.trainable, config.n_layers)
    model = target.model
    gen = torch.Generator().manual_seed(derive(config.seed, Stream.TRAIN_SHUFFLE))
    loader = torch.utils.data.DataLoader(
        target.torch_dataset(data), batch_size=config.batch_size, shuffle=True, generator=gen, collate_fn=target.collate
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if wrap is not None:
        model, optimizer, loader = wrap(model, optimizer, loader)
    stats = TrainStats()
    start = time.perf_counter()
    total = config.epochs * max(len(loader), 1)
    bar = progress(label, total) if progress else None
    model.train()
    try:
        for _epoch in range(config.epochs):
            losses, weights = [], []
            for batch in loader:
                if not batch or batch.get("labels", None) is not None and len(batch["labels"]) == 0:
                    if on_empty is not None:  # Poisson sampling can draw an empty batch
                        on_empty()
                        if bar is not None:
                            bar.advance()
                    continue
                batch = target.to_device(batch)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch) if loss_fn is not None else target.loss(model, batch)
                loss.backward()
                optimizer.step()
                n = int(next(iter(batch.values())).shape[0])
                losses.append(float(loss.detach()) * n)
                weights.append(n)
                stats.steps += 1
                stats.examples_seen += n
                if on_step is not None:
                    on_step(stats.steps, float(loss.detach()))
                if bar is not None:
                    bar.advance()
            stats.epoch_losses.append(sum(losses) / max(sum(weights), 1))
    finally:
        if bar is not None:
            bar.close()
        target.model.eval()
        for p in target.model.parameters():
            p.requires_grad_(True)
        target.weights_changed()
    stats.duration_s = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    env = os.environ.get("FMAUDIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fmaudit"


def cache_key(
    *,
    base_sha: str,
    split: Split,
    config: TrainConfig,
    task: str,
    kind: str = "finetune",
    extra: dict[str, Any] | None = None,
) -> str:
    """`extra`: more settings that change the weights (DP parameters); absent from the payload when None,
    so existing keys are unchanged."""
    ids = hashlib.sha256("\n".join(split.dataset.ids[i] for i in split.member_idx).encode()).hexdigest()
    payload = {
        "v": TRAINING_VERSION,
        "kind": kind,
        "base": base_sha,
        "data": split.dataset.fingerprint,
        "members": ids,
        "config": asdict(config),
        "task": task,
    }
    if extra is not None:
        payload["extra"] = extra
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def finetune_cached(
    target: Any,
    split: Split,
    config: TrainConfig,
    *,
    cache_dir: Path,
    progress: Callable[[str, int], Any] | None = None,
    label: str = "fine-tuning",
    kind: str = "finetune",
    key_extra: dict[str, Any] | None = None,
    train_fn: Callable[..., TrainStats] | None = None,
) -> tuple[TrainStats, bool, str]:
    """Fine-tune `target` in place on `split.members`, or load the cached result. Returns
    (stats, cache_hit, key). Cached weights are safetensors; metadata is JSON.

    `train_fn(target, data, config, progress=, label=)` replaces `train` (DP fine-tuning calls `train` with
    its wrap and fills `stats.extra`, which is cached too); `key_extra` goes into the cache key."""
    key = cache_key(
        base_sha=target.weights_sha256(), split=split, config=config, task=target.task, kind=kind, extra=key_extra
    )
    folder = Path(cache_dir) / kind / key[:32]
    # one process builds an entry at a time: a second one waits, then loads what the first wrote
    with entry_lock(Path(cache_dir) / kind, key[:32]):
        return _finetune_locked(
            target, split, config, key=key, folder=folder, progress=progress, label=label, train_fn=train_fn
        )


def _finetune_locked(
    target: Any,
    split: Split,
    config: TrainConfig,
    *,
    key: str,
    folder: Path,
    progress: Callable[[str, int], Any] | None,
    label: str,
    train_fn: Callable[..., TrainStats] | None,
) -> tuple[TrainStats, bool, str]:
    from safetensors.torch import load_model, save_model

    weights, meta_path = folder / "weights.safetensors", folder / "meta.json"
    if weights.exists() and meta_path.exists():
        base_state = {k: v.detach().clone() for k, v in target.model.state_dict().items()}
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                load_model(target.model, str(weights), device=str(target.device))
                target.weights_changed()
                if target.weights_sha256() == meta.get("weights_sha256"):
                    return TrainStats(**meta["stats"]), True, key
        except Exception:  # a damaged cache entry is retrained, never trusted
            pass
        target.model.load_state_dict(base_state)  # back to the base weights, then train
        target.weights_changed()
    stats = (train_fn or train)(target, split.members, config, progress=progress, label=label)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=folder.parent))
    try:
        save_model(target.model, str(tmp / "weights.safetensors"))
        meta = {
            "key": key,
            "weights_sha256": target.weights_sha256(),
            "stats": asdict(stats),
            "config": asdict(config),
            "member_count": int(len(split.member_idx)),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish_dir(tmp, folder)  # the old entry is renamed aside first: never a half-written folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return stats, False, key


def member_ids_sha256(split: Split) -> str:
    return hashlib.sha256("\n".join(np.asarray(split.dataset.ids)[split.member_idx]).encode()).hexdigest()
