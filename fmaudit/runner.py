"""Run a recipe: resolve data and targets (fine-tuning with a cache), run each audit unit in
isolation, apply gates, stream events.jsonl and write report.json atomically."""

from __future__ import annotations

import platform
import shutil
import signal
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fmaudit import __version__
from fmaudit.data import DataError, Dataset
from fmaudit.executor import Executor, NotSendable, local_only
from fmaudit.executor_factory import make_executor
from fmaudit.interrupts import GuardedEventLog, Interrupts
from fmaudit.quiet import library_output_to_log
from fmaudit.recipe import LoadedRecipe, Problem, RecipeError, load_recipe
from fmaudit.registry import registry
from fmaudit.report import AuditResult, ErrorInfo, EventLog, RunReport, load_report, write_json_atomic, write_report
from fmaudit.run_errors import PreparationError, TargetUnavailable, run_error_info
from fmaudit.run_report import EXIT_MODULE_ERROR, assemble_report, host_info
from fmaudit.session import ProgressFactory, Session
from fmaudit.unit_job import Unit, UnitJob, log_path, now_iso, unit_data

SKIPPED_UPSTREAM = "skipped: the audit that produces this target failed"


class Runner:
    def __init__(
        self,
        loaded: LoadedRecipe,
        *,
        output_dir: str | Path | None = None,
        resume: str | Path | None = None,
        progress: ProgressFactory | None = None,
        executor: Executor | None = None,
        log: Callable[[str], None] | None = None,
    ):
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
                raise PreparationError(
                    f"{run_dir} is not an fmaudit run folder (no events.jsonl); give a folder "
                    "made by `fmaudit run`, or drop --resume-from to start a new run"
                )
            events = EventLog(run_dir / "events.jsonl")
            started = [e for e in events.read() if e.get("entry_type") == "run_started"]
            if not started:
                raise PreparationError(f"{run_dir} is not an fmaudit run folder (no run_started event in events.jsonl)")
            if started[0].get("recipe_sha256") != self.recipe.sha256:
                raise PreparationError(
                    f"{run_dir} was made by a different recipe (sha256 {started[0].get('recipe_sha256', '?')[:12]}"
                    f" vs {self.recipe.sha256[:12]}); resume with the same recipe or start a new run"
                )
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
                raise PreparationError(
                    f"cannot create the run folder {run_dir}: {exc}; choose another folder with -o / output_dir"
                ) from exc
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
        created = now_iso()
        # The folder and its first event come together: a signal waits until run_started is on disk, so
        # every run folder can be resumed.
        with interrupts.critical():
            run_dir, run_id, done = self._make_run_dir()
            self.run_dir = run_dir
            events = GuardedEventLog(run_dir / "events.jsonl", interrupts)
            if fresh:
                events.emit(
                    "run_started",
                    run_id=run_id,
                    recipe_sha256=self.recipe.sha256,
                    recipe=self.loaded.raw,
                    fmaudit_version=__version__,
                    executor=self.executor.name,
                )
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
            report = assemble_report(
                self.loaded,
                run_id=run_id,
                created=created,
                device=device,
                units=units,
                results=results,
                session=session,
                failure=failure,
                interrupted=interrupted,
                prep_s=prep_s,
                t0=t0,
            )
            write_report(report, run_dir / "report.json")
            events.emit(
                "run_finished",
                run_id=run_id,
                status=report.status,
                exit_code=report.exit_code,
                **({"error": report.error.model_dump(mode="json")} if report.error else {}),
            )
        if interrupted:
            interrupts.pending = None
            raise KeyboardInterrupt
        if interrupts.pending is not None:  # arrived while the complete report was written: nothing to stop
            self.log(
                f"{signal.Signals(interrupts.pending).name} received after the run finished; the report is complete"
            )
            interrupts.pending = None
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
                events.emit(
                    "run_started",
                    run_id=run_id,
                    recipe_sha256=self.recipe.sha256,
                    recipe=self.loaded.raw,
                    fmaudit_version=__version__,
                    executor=getattr(self.executor, "name", "?"),
                )
            report = RunReport(
                run_id=run_id,
                name=self.recipe.name,
                fmaudit_version=__version__,
                created_at=now_iso(),
                finished_at=now_iso(),
                status="failed",
                exit_code=EXIT_MODULE_ERROR,
                seed=self.recipe.seed,
                recipe=self.loaded.raw,
                recipe_sha256=self.recipe.sha256,
                recipe_path=str(self.loaded.path) if self.loaded.path else None,
                host=host_info(self.recipe.device),
                versions={"python": platform.python_version(), "fmaudit": __version__},
                gates_passed=True,
                error=run_error_info(exc),
            )
            try:  # units completed earlier (a resumed run) stay in the report: nothing is lost
                report.audits = list(events.completed_results().values())
                report.gates_passed = all(g.passed for r in report.audits for g in r.gates)
            except Exception:
                pass
            write_report(report, run_dir / "report.json")
            events.emit(
                "run_finished",
                run_id=run_id,
                status="failed",
                exit_code=EXIT_MODULE_ERROR,
                error=run_error_info(exc).model_dump(mode="json"),
            )
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
                with library_output_to_log(log_path(self.run_dir), f"preparing target {name}"):
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
                msgs = module.check(session.targets[u.target], self.unit_data(u, session))
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
            return AuditResult(**job._base(u, job._cls(u)), status="error", duration_s=0.0, error=info.model_copy())
        if u.target in session.targets:
            return None
        producers = [
            f"{i}:{a.use}@{a.target[0]}"
            for i, a in enumerate(self.recipe.audits)
            if a.produces == u.target and i < u.index
        ]
        job = self._job(session, run_dir, [u])
        return AuditResult(
            **job._base(u, job._cls(u)),
            status="skipped",
            duration_s=0.0,
            error=ErrorInfo(
                type="Skipped",
                message=f"{SKIPPED_UPSTREAM} ({producers[-1] if producers else '?'} did not produce {u.target!r})",
                hint="fix the unit that produces this target, then re-run with --resume",
            ),
        )

    def unit_data(self, u: Unit, session: Session) -> Dataset | None:
        return unit_data(u, session)

    def _job(self, session: Session, run_dir: Path, units: list[Unit]) -> UnitJob:
        return UnitJob(
            recipe=self.recipe,
            session=session,
            run_dir=run_dir,
            cache_dir=self.cache_dir,
            executor=self.executor,
            progress=local_only(self.progress),
            log=local_only(self.log),
            classes={u.spec.use: registry.get(u.spec.use) for u in units},
        )

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
                events.emit(
                    "audit_skipped" if res.status == "skipped" else "audit_started",
                    unit_id=u.unit_id,
                    module=u.spec.use,
                    target=u.target,
                    **({"reason": res.error.message} if res.status == "skipped" and res.error else {}),
                )
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

    def _finish_unit(
        self, u: Unit, session: Session, events: EventLog, result: AuditResult, produced: Any
    ) -> AuditResult:
        if produced is not None and u.spec.produces is not None:
            session.targets[u.spec.produces] = produced
            session.target_data[u.spec.produces] = session.target_data.get(u.target)
        self._recorded[u.unit_id] = result  # before the event: a signal held by emit is raised as it ends
        events.emit("audit_result", unit_id=u.unit_id, result=result.model_dump(mode="json"))
        return result


def run_recipe(
    recipe: str | Path | dict[str, Any],
    *,
    output_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: ProgressFactory | None = None,
    base_dir: str | Path | None = None,
) -> RunReport:
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


__all__ = [
    "run_recipe",
    "Runner",
    "PreparationError",
    "TargetUnavailable",
    "load_report",
    "write_json_atomic",
    "latest_run",
]
