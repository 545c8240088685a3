"""The audit module contract.

A module is a class with its metadata as class attributes, a pydantic `Params` model, a `check()` that
lists problems before anything runs, and a `run()` that measures and returns an `Outcome`. Modules never
change a target in place: a module that trains works on a copy and hands it back as `Outcome.produced`.

Module files import heavy libraries (torch, opacus, captum...) inside functions, so listing and
validating recipes stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from fmaudit.report import Curve, Finding, GateResult, Metric, Severity

if TYPE_CHECKING:  # pragma: no cover
    from fmaudit.audits.services import RunServices
    from fmaudit.data import Dataset, Split
    from fmaudit.executor import Executor
    from fmaudit.targets.base import Target

T = TypeVar("T")


class AuditParams(BaseModel):
    """Base for module parameters: unknown keys are errors, every field has a sensible default."""

    model_config = ConfigDict(extra="forbid")


class AuditModule:
    """Base class of every audit module (built-in or plugin)."""

    name: ClassVar[str]
    category: ClassVar[str]  # "privacy" | "robustness" | "explain" | "utility" | anything a plugin needs
    description: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()  # capabilities from fmaudit.tasks.CAPABILITIES
    tasks: ClassVar[tuple[str, ...]] = ()  # model tasks (fmaudit.tasks) it supports; empty: any with the capabilities
    needs_data: ClassVar[bool] = True  # needs a dataset (the audit's `data:` or the target's fine-tune data)
    produces_target: ClassVar[bool] = False
    metric_names: ClassVar[tuple[str, ...]] = ()  # names (fnmatch patterns) usable in `fail_if`; () = any

    class Params(AuditParams):
        pass

    params: AuditParams  # a subclass declares `params: Params` after its own Params

    def __init__(self, params: AuditParams | dict[str, Any] | None = None):
        if params is None or isinstance(params, dict):
            params = self.Params.model_validate(params or {})
        self.params = params

    def check(self, target: Target, data: Dataset | None) -> list[str]:
        """Problems that would make `run` fail, found before it starts. Empty list = go."""
        return []

    def run(self, target: Target, ctx: AuditContext) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError


class AuditCheckError(ValueError):
    """`check()` found problems; the unit is recorded as an error listing them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class Outcome:
    """What a module measured. The runner turns it into an `AuditResult` with ids, timing and gates."""

    metrics: dict[str, Metric] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    curves: dict[str, Curve] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    evidence: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    produced: Target | None = None

    def metric(
        self,
        name: str,
        value: float | None,
        *,
        higher_is_better: bool | None = None,
        ci: tuple[float, float] | None = None,
        ci_level: float | None = None,
        unit: str | None = None,
        description: str | None = None,
    ) -> Metric:
        m = Metric(
            value=None if value is None else float(value),
            higher_is_better=higher_is_better,
            ci_low=None if ci is None else float(ci[0]),
            ci_high=None if ci is None else float(ci[1]),
            ci_level=ci_level if ci is not None else None,
            unit=unit,
            description=description,
        )
        self.metrics[name] = m
        return m

    def finding(
        self,
        severity: Severity,
        title: str,
        detail: str = "",
        *,
        metric: str | None = None,
        gate: GateResult | None = None,
    ) -> None:
        self.findings.append(Finding(severity=severity, title=title, detail=detail, metric=metric, gate=gate))

    def findings_from(self, found: Iterable[Mapping[str, Any]], *, metric: str | None = None) -> None:
        """Findings a library function returned as dicts (severity, title, detail[, metric]); validated like
        `finding()` (an unknown severity is an error). `metric` applies where a dict names none."""
        for f in found:
            self.findings.append(Finding.model_validate({"detail": "", **f, "metric": f.get("metric", metric)}))

    def curve(
        self,
        name: str,
        x: Iterable[float],
        y: Iterable[float],
        *,
        x_label: str = "x",
        y_label: str = "y",
        log_x: bool = False,
        log_y: bool = False,
        description: str | None = None,
    ) -> None:
        self.curves[name] = Curve(
            x=[float(v) for v in x],
            y=[float(v) for v in y],
            x_label=x_label,
            y_label=y_label,
            log_x=log_x,
            log_y=log_y,
            description=description,
        )


@dataclass
class AuditContext:
    """Everything a module may use besides its target. Built by the runner for each unit."""

    unit_id: str
    seed: int
    device: str
    run_dir: Path
    cache_dir: Path
    store_examples: bool
    data: Dataset | None = None
    split: Split | None = None  # the target's member / non-member split, when it was fine-tuned here
    produces: str | None = None
    progress: Callable[[str, int], ProgressHandle] | None = None
    executor: Executor | None = None  # where independent work (reference models) runs; None: in this process
    services: RunServices | None = None  # the run's other targets and base weights (fmaudit.audits.services)
    run_seed: int | None = None  # the recipe's seed (member splits are drawn from it); None: use `seed`

    def require_data(self) -> Dataset:
        """The unit's dataset; a clear error when the recipe gave it none."""
        if self.data is None:
            raise ValueError("no data for this audit: name a dataset with `data:` or fine-tune the target")
        return self.data

    def artifact_dir(self) -> Path:
        d = self.run_dir / "artifacts" / self.unit_id.replace(":", "_").replace("@", "_")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.run_dir))

    @contextlib.contextmanager
    def progress_bar(self, description: str, total: int) -> Iterator[ProgressHandle]:
        """A progress bar for long work: `with ctx.progress_bar("attacking", n) as bar: ... bar.advance()`."""
        handle = self.progress(description, total) if self.progress else ProgressHandle()
        try:
            yield handle
        finally:
            handle.close()

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        items = list(items) if total is None else items
        n = total if total is not None else len(items)  # type: ignore[arg-type]
        with self.progress_bar(description, n) as bar:
            for item in items:
                yield item
                bar.advance()


class ProgressHandle:
    """No-op progress (used when nobody is watching)."""

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def base_target(target: Target, ctx: AuditContext) -> Target:
    """A fresh copy of `target`'s BASE weights (before the recipe fine-tuned it), for modules that train
    from the same start (reference models, DP, canary runs): asked of `ctx.services` for the recipe target
    this one is or was produced from, and checked against the recorded base-weights hash."""
    source = ctx.services.source_of(target) if ctx.services is not None else None
    if ctx.services is None or source is None:
        raise ValueError(
            f"the base (pre-fine-tune) weights of target {target.name!r} are not known: run this module "
            "on a target that the recipe fine-tunes (or one produced from such a target), or give "
            "ctx.services (fmaudit.audits.services.FixedServices) its base"
        )
    base = ctx.services.base_target(source)
    base.name = source
    recorded = target.provenance.base_weights_sha256 if target.provenance is not None else None
    if recorded and base.weights_sha256() != recorded:
        raise ValueError(
            f"the base weights found for {target.name!r} (sha256 {base.weights_sha256()[:12]}) are not "
            f"the ones it was fine-tuned from ({recorded[:12]}); models trained from them would not "
            "match it"
        )
    if "trainable" not in base.capabilities:
        raise ValueError(f"target {target.name!r} cannot be fine-tuned")
    return base


def select_examples(ctx: AuditContext, split: str = "auto", max_examples: int | None = None):
    """The examples a module works on: `split` auto (the target's held-out non-members when it was fine-tuned
    on this data, else all of it) | nonmembers | members | all, then a seeded sample of at most
    `max_examples`. Returns (dataset, the subset chosen)."""
    data, sp = ctx.require_data(), ctx.split
    same = sp is not None and sp.dataset.fingerprint == data.fingerprint
    choice = "nonmembers" if split == "auto" and same else ("all" if split == "auto" else split)
    if choice in ("members", "nonmembers"):
        if sp is None or not same:
            raise ValueError(f"split: {choice} needs a target fine-tuned on dataset {data.name!r}; use split: all")
        data = sp.members if choice == "members" else sp.nonmembers
    if len(data) == 0:
        raise ValueError(f"no examples in the {choice} subset of {data.name!r}")
    if max_examples is not None and len(data) > max_examples:
        from fmaudit.seeds import Stream

        data = data.sample(max_examples, ctx.seed, Stream.EXAMPLE_SAMPLE)
    return data, choice
