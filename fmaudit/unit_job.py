"""One audit unit (a module on a target) and the picklable job that runs it in isolation: check, run,
gates, and an error result instead of an exception, so one module failing never loses the others'."""

from __future__ import annotations

import hashlib
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fmaudit.audits.base import AuditCheckError, AuditContext, AuditModule, Outcome
from fmaudit.data import Dataset
from fmaudit.executor import Executor, TaskFailed
from fmaudit.quiet import library_output_to_log
from fmaudit.recipe import AuditSpec
from fmaudit.registry import registry
from fmaudit.report import AuditResult, ErrorInfo, GateOp, GateResult
from fmaudit.run_errors import TargetUnavailable
from fmaudit.session import Session

RUN_LOG = "run.log"  # library output (progress bars, warnings, logging) captured during a run


@dataclass
class Unit:
    index: int
    spec: AuditSpec
    target: str

    @property
    def unit_id(self) -> str:
        return f"{self.index}:{self.spec.use}@{self.target}"


def log_path(run_dir: Path | None) -> Path | None:
    """The run's log of library output (`run.log`), or None when there is no run folder (yet)."""
    return Path(run_dir) / RUN_LOG if run_dir is not None and Path(run_dir).is_dir() else None


def _unit_seed(run_seed: int, unit_id: str) -> int:
    return int(hashlib.sha256(f"{run_seed}:{unit_id}".encode()).hexdigest()[:8], 16)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def evaluate_gates(fail_if: dict[str, dict[GateOp, float]], outcome: Outcome) -> list[GateResult]:
    ops: dict[GateOp, tuple[Callable[[float, float], bool], str]] = {
        "gt": (lambda a, b: a > b, ">"),
        "ge": (lambda a, b: a >= b, ">="),
        "lt": (lambda a, b: a < b, "<"),
        "le": (lambda a, b: a <= b, "<="),
        "eq": (lambda a, b: a == b, "=="),
        "ne": (lambda a, b: a != b, "!="),
    }
    results = []
    for metric, conds in fail_if.items():
        m = outcome.metrics.get(metric)
        value = None if m is None else m.value
        for op, threshold in conds.items():
            fn, sym = ops[op]
            if value is None:
                passed = False
                msg = f"gate on {metric!r} could not be evaluated: the module reported no value for it"
            else:
                hit = fn(value, threshold)
                passed = not hit
                msg = f"{metric} = {value:.6g} {'(fails: ' if hit else '(passes: not '}{sym} {threshold:g})"
            results.append(
                GateResult(metric=metric, op=op, threshold=threshold, value=value, passed=passed, message=msg)
            )
    return results


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def unit_data(u: Unit, session: Session) -> Dataset | None:
    if u.spec.data is not None:
        return session.dataset(u.spec.data)
    name = session.target_data.get(u.target)
    if name is None:
        target = session.targets.get(u.target)
        split = getattr(target, "split", None)
        return split.dataset if split is not None else None
    return session.dataset(name)


@dataclass
class UnitJob:
    """Runs one audit unit and returns (result, produced target or None). Everything it needs is here and
    picklable, so a remote executor can run it in another process: module classes are resolved by the
    caller (plugins registered at run time travel too), progress and log are `LocalOnly`."""

    recipe: Any
    session: Session
    run_dir: Path
    cache_dir: Path
    executor: Executor
    progress: Any
    log: Callable[[str], None] | None
    classes: dict[str, type[AuditModule]]

    def _cls(self, u: Unit) -> type[AuditModule]:
        return self.classes.get(u.spec.use) or registry.get(u.spec.use)

    def _base(self, u: Unit, cls: type[AuditModule]) -> dict[str, Any]:
        return dict(
            unit_id=u.unit_id,
            audit_index=u.index,
            module=u.spec.use,
            category=cls.category,
            target=u.target,
            params={},
            seed=_unit_seed(self.recipe.seed, u.unit_id),
            started_at=now_iso(),
        )

    def __call__(self, u: Unit) -> tuple[AuditResult, Any]:
        # Library progress bars, prints and logging go to run.log; guarantee warnings still reach the terminal.
        with library_output_to_log(log_path(self.run_dir), f"unit {u.unit_id}"):
            return self._call(u)

    def _call(self, u: Unit) -> tuple[AuditResult, Any]:
        cls = self._cls(u)
        base = self._base(u, cls)
        seed = base["seed"]
        session = self.session
        t = time.perf_counter()
        produced = None
        try:
            module: AuditModule = cls(u.spec.params)
            base["params"] = module.params.model_dump(mode="json")
            target = session.target(u.target) if u.target in self.recipe.targets else session.targets[u.target]
            data = unit_data(u, session)
            problems = module.check(target, data)
            if problems:
                raise AuditCheckError(problems)
            ctx = AuditContext(
                unit_id=u.unit_id,
                seed=seed,
                device=session.device,
                run_dir=self.run_dir,
                cache_dir=self.cache_dir,
                store_examples=self.recipe.store_examples,
                data=data,
                split=getattr(target, "split", None),
                produces=u.spec.produces,
                progress=self.progress,
                executor=self.executor,
                services=session,
                run_seed=self.recipe.seed,
            )
            _seed_everything(seed)
            if self.log is not None:
                self.log(f"running {u.unit_id}")
            outcome = module.run(target, ctx)
            gates = evaluate_gates(u.spec.fail_if, outcome)
            for g in gates:
                if not g.passed:
                    outcome.finding(
                        "high", f"Gate failed: {g.metric} {g.op} {g.threshold:g}", g.message, metric=g.metric, gate=g
                    )
            if u.spec.produces:
                if outcome.produced is None:
                    raise RuntimeError(f"module {u.spec.use!r} did not produce a target")
                outcome.produced.name = u.spec.produces
                outcome.produced.produced_by = u.unit_id
            result = AuditResult(
                **base,
                status="ok",
                duration_s=round(time.perf_counter() - t, 4),
                metrics=outcome.metrics,
                findings=outcome.findings,
                curves=outcome.curves,
                tables=outcome.tables,
                evidence=outcome.evidence,
                artifacts=outcome.artifacts,
                produces=u.spec.produces,
                gates=gates,
            )
            produced = outcome.produced if u.spec.produces else None
        except KeyboardInterrupt:
            raise
        except TargetUnavailable as exc:
            result = AuditResult(
                **base, status="error", duration_s=round(time.perf_counter() - t, 4), error=exc.info.model_copy()
            )
        except Exception as exc:  # one module failing never loses the others' results
            hint = None
            if isinstance(exc, AuditCheckError):
                hint = "fix the recipe or the target so the module's pre-flight check passes"
            result = AuditResult(
                **base,
                status="error",
                duration_s=round(time.perf_counter() - t, 4),
                error=ErrorInfo(
                    type=type(exc).__name__,
                    message=str(exc) or type(exc).__name__,
                    hint=hint,
                    traceback=traceback.format_exc(limit=20),
                ),
            )
        return result, produced

    def failed(self, u: Unit, exc: TaskFailed) -> AuditResult:
        """The result of a unit whose task never returned (its worker died on every attempt)."""
        base = self._base(u, self._cls(u))
        hint = None
        if exc.crashed:
            hint = (
                "the process running this unit died (killed, out of memory, or its node was lost) on every "
                "attempt; check memory per task, or raise the executor's max_retries"
            )
        return AuditResult(
            **base,
            status="error",
            duration_s=0.0,
            error=ErrorInfo(type=exc.error_type, message=str(exc), hint=hint, traceback=exc.remote_traceback),
        )
