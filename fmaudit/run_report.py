"""The run's report: what the run records about itself (recipe, host, versions, datasets, targets, timings) and
its status and exit code, decided from the units' results, the gates and how the run ended."""

from __future__ import annotations

import os
import platform
import socket
import time
from typing import Any

from fmaudit import __version__
from fmaudit.environment import library_versions
from fmaudit.recipe import LoadedRecipe
from fmaudit.report import AuditResult, HostInfo, RunReport
from fmaudit.run_errors import run_error_info
from fmaudit.session import Session
from fmaudit.unit_job import Unit, now_iso

EXIT_OK, EXIT_GATE_FAILED, EXIT_INVALID, EXIT_MODULE_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def host_info(device: str, *, torch_threads: int | None = None) -> HostInfo:
    """The machine the run ran on."""
    return HostInfo(
        hostname=socket.gethostname(),
        platform=platform.platform(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        torch_threads=torch_threads,
        device=device,
    )


def _describe(target: Any) -> Any:
    """The target's TargetInfo, with the code a `python:` target imported (file, sha256) when it ran any."""
    from fmaudit.report import CodeInfo

    info = target.describe()
    code = getattr(target, "code_info", None)
    if code:
        info.code = CodeInfo(**code)
    return info


def assemble_report(
    loaded: LoadedRecipe,
    *,
    run_id: str,
    created: str,
    device: str,
    units: list[Unit],
    results: dict[str, AuditResult],
    session: Session,
    failure: BaseException | None,
    interrupted: bool,
    prep_s: float,
    t0: float,
) -> RunReport:
    import torch

    report = RunReport(
        run_id=run_id,
        name=loaded.recipe.name,
        fmaudit_version=__version__,
        created_at=created,
        seed=loaded.recipe.seed,
        recipe=loaded.raw,
        recipe_sha256=loaded.recipe.sha256,
        recipe_path=str(loaded.path) if loaded.path else None,
        host=HostInfo(
            hostname=socket.gethostname(),
            platform=platform.platform(),
            python=platform.python_version(),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            device=device,
        ),
        versions=library_versions(),
        status="interrupted",
    )
    report.audits = [results[u.unit_id] for u in units if u.unit_id in results]
    try:
        report.datasets = {n: d.info() for n, d in session.datasets.items()}
        report.targets = {n: _describe(t) for n, t in session.targets.items()}
    except Exception as exc:
        failure = failure or exc
    report.gates_passed = all(g.passed for r in report.audits for g in r.gates)
    report.timings = {"prepare_s": round(prep_s, 3), "total_s": round(time.perf_counter() - t0, 3)}
    report.finished_at = now_iso()
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
