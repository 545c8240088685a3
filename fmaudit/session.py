"""The datasets and targets of one run, loaded on demand and kept for the run: the `RunServices` that audit
modules reach through `ctx.services` (base weights, other targets, where a produced target came from)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmaudit.cache_lock import entry_lock
from fmaudit.data import DataError, Dataset, Split, load_dataset, member_split
from fmaudit.recipe import LoadedRecipe
from fmaudit.report import ErrorInfo
from fmaudit.run_errors import PreparationError, TargetUnavailable, target_error_info

ProgressFactory = Callable[[str, int], Any]


@dataclass
class Session:
    """Datasets and targets of one run, loaded on demand and kept for the run's duration."""

    loaded: LoadedRecipe
    device: str
    cache_dir: Path
    progress: ProgressFactory | None
    datasets: dict[str, Dataset] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    target_data: dict[str, str | None] = field(default_factory=dict)
    target_errors: dict[str, ErrorInfo] = field(default_factory=dict)
    notify: Any = None  # LocalOnly(events.emit) while a run records events: "finetune_started" goes there

    @property
    def recipe(self):
        return self.loaded.recipe

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            spec = self.recipe.data[name]
            try:
                self.datasets[name] = load_dataset(name, spec, base_dir=self.loaded.base_dir, seed=self.recipe.seed)
            except (DataError, OSError, ValueError) as exc:  # unreadable files and bad contents: input problems
                raise PreparationError(f"data.{name}: {exc}") from exc
        return self.datasets[name]

    def base_target(self, name: str, *, as_name: str | None = None):
        """Recipe target `name` as loaded, before its fine-tune: a fresh copy each call (never cached in
        `targets`), for modules that train reference models from the same starting weights. `target()`
        loads through here too, so the hash equals the target's recorded `base_weights_sha256`."""
        from fmaudit.targets import TargetError, load_target

        spec = self.recipe.targets[name]
        ft = spec.finetune
        data = self.dataset(ft.data) if ft is not None else None
        try:
            return load_target(
                model=spec.model,
                task=spec.task,
                name=as_name or f"{name}-base",
                num_labels=spec.num_labels or (data.num_labels if data is not None else None),
                label_names=data.label_names if data is not None else None,
                device=self.device,
                max_length=spec.max_length,
                gguf_file=spec.gguf_file,
                weights=spec.weights,
                trust_remote_code=spec.trust_remote_code,
                normalize_mean=spec.normalize_mean,
                normalize_std=spec.normalize_std,
                base_dir=self.loaded.base_dir,
                seed=self.recipe.seed,
                allow_code_from=getattr(self.loaded, "allow_code_from", ()),
                prompt=spec.prompt,
            )
        except TargetError as exc:
            raise PreparationError(f"targets.{name}: {exc}") from exc

    def preflight(self, name: str) -> None:
        """Checks of recipe target `name` that need its data but no model (exit 2 before anything runs):
        labels to train a classifier on, enough examples for the member split and the batch size."""
        from fmaudit.tasks import BUNDLED_MODELS, CAPABILITIES

        spec = self.recipe.targets[name]
        ft = spec.finetune
        if ft is None:
            return
        data = self.dataset(ft.data)
        task = spec.task or BUNDLED_MODELS.get(spec.model)
        if data.labels is None and task is not None and "classifier" in CAPABILITIES[task]:
            raise PreparationError(f"targets.{name}.finetune: dataset {ft.data!r} has no labels to train on")
        if spec.num_labels is not None and data.num_labels is not None and data.num_labels > spec.num_labels:
            raise PreparationError(
                f"targets.{name}: num_labels is {spec.num_labels} but dataset {ft.data!r} has "
                f"{data.num_labels} labels; set num_labels: {data.num_labels} (or drop it)"
            )
        self._split(name, ft, data)

    def _split(self, name: str, ft, data):
        """The recorded member / non-member split of target `name`'s fine-tune, with enough members for
        one batch; a clear PreparationError otherwise."""
        try:
            split = member_split(data, member_fraction=ft.member_fraction, seed=self.recipe.seed)
        except DataError as exc:
            raise PreparationError(f"targets.{name}.finetune: {exc}") from exc
        if len(split.member_idx) < ft.batch_size:
            raise PreparationError(
                f"targets.{name}.finetune: {len(split.member_idx)} training examples is fewer "
                f"than batch_size {ft.batch_size}; use more data or a smaller batch"
            )
        return split

    def target(self, name: str):
        """Recipe target `name`, loaded and fine-tuned once. A failure is remembered: this and every later
        call raise TargetUnavailable (one cause, recorded once), so the units that need the target become
        errors while the rest of the run goes on."""
        if name in self.targets:
            return self.targets[name]
        if name not in self.recipe.targets:
            raise KeyError(
                f"no target {name!r} in this run (targets: {sorted(set(self.recipe.targets) | set(self.targets))})"
            )
        if name in self.target_errors:
            raise TargetUnavailable(name, self.target_errors[name])
        phase = ["load"]
        try:
            return self._build_target(name, phase)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            info = target_error_info(name, self.recipe.targets[name], phase[0], exc)
            self.target_errors[name] = info
            raise TargetUnavailable(name, info) from exc

    def source_of(self, target: Any) -> str | None:
        """The recipe target `target` is, or was produced from (following `produced_by` = 'i:module@name')."""
        recipe_targets = self.recipe.targets
        if target.name in recipe_targets:
            return target.name
        current, seen = target, set()
        while True:
            pb = getattr(current, "produced_by", None) or ""
            if "@" not in pb:
                return None
            src = pb.rsplit("@", 1)[1]
            if src in recipe_targets:
                return src
            if src in seen or src not in self.targets:
                return None
            seen.add(src)
            current = self.targets[src]

    def _build_target(self, name: str, phase: list[str]):
        from fmaudit.provenance import Provenance
        from fmaudit.training import TrainConfig, finetune_cached

        spec = self.recipe.targets[name]
        ft = spec.finetune
        data = self.dataset(ft.data) if ft is not None else None
        target = self.base_target(name, as_name=name)
        phase[0] = "check"
        if ft is not None and data is not None:
            if data.labels is None and "classifier" in target.capabilities:
                raise PreparationError(f"targets.{name}.finetune: dataset {ft.data!r} has no labels to train on")
            if data.num_labels is not None and target.num_labels is not None and data.num_labels > target.num_labels:
                raise PreparationError(
                    f"targets.{name}: the model has {target.num_labels} outputs but dataset "
                    f"{ft.data!r} has {data.num_labels} labels; set num_labels"
                )
            split = self._split(name, ft, data)
            config = TrainConfig.from_spec(ft, seed=self.recipe.seed)
            base_sha = target.weights_sha256()
            phase[0] = "finetune"
            if self.notify is not None:
                self.notify("finetune_started", target=name, data=ft.data)
            # Two runs sharing the cache wait for each other on the same fine-tune instead of both training
            # it (and one replacing the entry the other is reading): the second one finds the entry and loads it.
            with entry_lock(Path(self.cache_dir) / "locks", _finetune_lock_name(base_sha, split, config, target.task)):
                stats, hit, key = finetune_cached(
                    target, split, config, cache_dir=self.cache_dir, progress=self.progress, label=f"fine-tuning {name}"
                )
            target.split = split
            target.cache_hit = hit
            target.provenance = Provenance(
                data=ft.data,
                train=config,
                seed=self.recipe.seed,
                base_weights_sha256=base_sha,
                cache_key=key,
                steps=stats.steps,
                epoch_losses=tuple(stats.epoch_losses),
                train_seconds=round(stats.duration_s, 3),
            )
        self.targets[name] = target
        self.target_data[name] = ft.data if ft is not None else None
        return target


def _finetune_lock_name(base_sha: str, split: Split, config: Any, task: str) -> str:
    """One name per fine-tune (base weights, data, members, settings): what the cache entry depends on."""
    import dataclasses
    import json

    payload = json.dumps(
        [base_sha, split.dataset.fingerprint, [int(i) for i in split.member_idx], dataclasses.asdict(config), task],
        sort_keys=True,
        default=str,
    )
    return "finetune-" + hashlib.sha256(payload.encode()).hexdigest()[:32]
