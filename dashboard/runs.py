"""Find and load run folders inside ONE reports folder, turning every problem into a notice.

Nothing here raises on a bad report: an old schema, a corrupt file or a run that never finished becomes a
`RunEntry` with a `state` and a human-readable `notice`. Nothing here reads outside the reports folder it
was given: symlinks that lead out of it are ignored and every path handed in is checked with `inside()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from fmaudit.report import MAX_REPORT_BYTES, SCHEMA_VERSION, AuditResult, EventLog, ReportError, RunReport, load_report

# ok: a readable report; partial: events.jsonl only (interrupted or running); the rest cannot be shown:
# old_schema / new_schema (written by another fmaudit), corrupt (cut short, not the schema), too_large,
# empty (a folder in the reports folder with neither report.json nor events.jsonl).
State = Literal["ok", "old_schema", "new_schema", "corrupt", "too_large", "partial", "empty"]
STATE_LABELS = {
    "ok": "ok",
    "old_schema": "old schema",
    "new_schema": "newer schema",
    "corrupt": "corrupt",
    "too_large": "too large",
    "partial": "partial",
    "empty": "empty",
}

SEVERITIES = ("critical", "high", "medium", "low", "info")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass
class RunEntry:
    """One run folder and what could be read from it."""

    name: str  # folder path relative to the reports folder ("." when the folder itself is a run)
    path: Path
    state: State
    report: RunReport | None = None
    notice: str | None = None
    partial_results: list[AuditResult] = field(default_factory=list)  # from events.jsonl when no report
    run_id: str | None = None
    recipe_name: str | None = None
    created_at: str | None = None
    schema_version: str | None = None
    mtime: float = 0.0

    @property
    def ok(self) -> bool:
        return self.report is not None

    @property
    def results(self) -> list[AuditResult]:
        return list(self.report.audits) if self.report is not None else list(self.partial_results)

    @property
    def label(self) -> str:
        return self.name if self.name != "." else (self.run_id or self.path.name)


def inside(root: Path, candidate: Path) -> bool:
    """True when `candidate` (after resolving symlinks and '..') lies inside `root`."""
    try:
        candidate.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def safe_child(root: Path, relative: str) -> Path | None:
    """`root / relative` when that stays inside `root` and exists as a file, else None."""
    if not relative or "\x00" in relative:
        return None
    rel = Path(relative)
    if rel.is_absolute():
        return None
    p = root / rel
    if not inside(root, p) or not p.is_file():
        return None
    return p.resolve()


def load_entry(root: Path, run_dir: Path, *, empty_ok: bool = False) -> RunEntry | None:
    """Read one run folder. One with neither report.json nor events.jsonl is None, or, with `empty_ok` (a
    folder inside the reports folder), an entry in state "empty" that says so."""
    report_path, events_path = run_dir / "report.json", run_dir / "events.jsonl"
    name = "." if run_dir.resolve() == root.resolve() else str(run_dir.relative_to(root))
    has_report = report_path.is_file() and inside(root, report_path)
    has_events = events_path.is_file() and inside(root, events_path)
    if not has_report and not has_events:
        if not empty_ok:
            return None
        try:
            mtime = run_dir.stat().st_mtime
        except OSError:
            mtime = 0.0
        what = "empty" if not _any_child(run_dir) else "holds neither report.json nor events.jsonl"
        return RunEntry(
            name=name,
            path=run_dir,
            state="empty",
            mtime=mtime,
            notice=f"This folder is {what}: not a run, or a run that was stopped before it started "
            "(nothing to show or resume).",
        )
    mtime = max((p.stat().st_mtime for p in (report_path, events_path) if p.is_file()), default=0.0)
    entry = RunEntry(name=name, path=run_dir, state="ok", mtime=mtime)
    if has_report:
        try:
            entry.report = load_report(report_path, max_bytes=MAX_REPORT_BYTES)
        except ReportError as exc:
            entry.schema_version = exc.version
            if exc.kind == "older_schema":
                entry.state = "old_schema"
                entry.notice = (
                    f"This report uses schema {exc.version}; this dashboard reads schema "
                    f"{SCHEMA_VERSION}. Re-run the recipe stored in it, or open it with the fmaudit "
                    "version that wrote it."
                )
            elif exc.kind == "newer_schema":
                entry.state = "new_schema"
                entry.notice = (
                    f"This report uses schema {exc.version}, newer than this dashboard reads "
                    f"({SCHEMA_VERSION}): it was written by a newer fmaudit; upgrade fmaudit to open it."
                )
            elif exc.kind == "too_large":
                entry.state = "too_large"
                entry.notice = (
                    f"report.json is larger than {MAX_REPORT_BYTES // 2**20} MiB; not loaded (a report this size "
                    "usually stores too many examples: re-run with fewer evidence items)."
                )
            else:
                entry.state = "corrupt"
                entry.notice = f"report.json could not be read: {_short(_relative(str(exc), run_dir))}"
        except OSError as exc:
            entry.state = "corrupt"
            entry.notice = f"report.json could not be read: {exc}"
    if entry.report is not None:
        r = entry.report
        entry.run_id, entry.recipe_name, entry.created_at = r.run_id, r.name, r.created_at
        entry.schema_version = r.schema_version
        return entry
    if has_events:
        _fill_from_events(entry, events_path, has_report)
    return entry


def _fill_from_events(entry: RunEntry, events_path: Path, has_report: bool) -> None:
    try:
        events = EventLog(events_path).read()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        events = []
        entry.notice = (entry.notice + "; " if entry.notice else "") + f"events.jsonl unreadable: {exc}"
    for ev in events:
        if not isinstance(ev, dict):
            continue
        if ev.get("entry_type") == "run_started":
            entry.run_id = entry.run_id or ev.get("run_id")
            recipe = ev.get("recipe")
            if isinstance(recipe, dict):
                entry.recipe_name = entry.recipe_name or recipe.get("name")
            entry.created_at = entry.created_at or ev.get("time")
        elif ev.get("entry_type") == "audit_result":
            try:
                entry.partial_results.append(AuditResult.model_validate(ev.get("result")))
            except Exception:  # an event from another schema: skip it, keep the rest
                continue
    if not has_report:
        entry.state = "partial"
        entry.notice = (
            f"No report.json: this run was interrupted or is still running. "
            f"{len(entry.partial_results)} completed unit(s) recovered from events.jsonl; "
            "`fmaudit run RECIPE --resume` finishes it."
        )


def _any_child(folder: Path) -> bool:
    try:
        return next(folder.iterdir(), None) is not None
    except OSError:
        return False


def _relative(message: str, run_dir: Path) -> str:
    """A report error without the absolute path in front (the entry already names the run)."""
    prefix = f"{run_dir / 'report.json'}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _short(text: str, n: int = 600) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def scan_runs(root: str | Path) -> list[RunEntry]:
    """Every run folder directly inside `root` (or `root` itself when it is a run folder), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries: list[RunEntry] = []
    own = load_entry(root, root)
    if own is not None:
        entries.append(own)
    try:
        children = sorted(root.iterdir())
    except OSError:
        children = []
    for child in children:
        if child.name.startswith(".") or not child.is_dir() or not inside(root, child):
            continue
        e = load_entry(root, child, empty_ok=True)
        if e is not None:
            entries.append(e)
    entries.sort(key=lambda e: (e.created_at or "", e.mtime), reverse=True)
    return entries


# ---------------------------------------------------------------------------------------------------
# Summaries used by several views


def gate_verdict(entry: RunEntry) -> str:
    """'pass', 'FAIL', 'no gates' or 'unknown' (no report)."""
    if entry.report is None:
        gates = [g for r in entry.partial_results for g in r.gates]
        if not gates:
            return "unknown"
        return "FAIL" if any(not g.passed for g in gates) else "pass (partial)"
    gates = [g for r in entry.report.audits for g in r.gates]
    if not gates:
        return "no gates"
    return "pass" if entry.report.gates_passed else "FAIL"


def module_statuses(results: list[AuditResult]) -> str:
    return "; ".join(f"{r.module}@{r.target}: {r.status}" for r in results)


def format_date(iso: str | None) -> str:
    if not iso:
        return "—"
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return iso


def run_rows(entries: list[RunEntry]) -> list[dict]:
    """One row per run for the Runs table."""
    rows = []
    for e in entries:
        results = e.results
        sev = {s: 0 for s in SEVERITIES}
        for r in results:
            for f in r.findings:
                sev[f.severity] += 1
        rows.append(
            {
                "run": e.label,
                "date": format_date(e.created_at),
                "recipe": e.recipe_name or "—",
                "targets": ", ".join(e.report.targets) if e.report else ", ".join(sorted({r.target for r in results})),
                "gates": gate_verdict(e),
                "state": e.report.status if e.state == "ok" and e.report else STATE_LABELS.get(e.state, e.state),
                "modules ok": sum(r.status == "ok" for r in results),
                "modules errored": sum(r.status == "error" for r in results),
                "critical/high findings": sev["critical"] + sev["high"],
                "module statuses": module_statuses(results) or "—",
                "notice": e.notice or "",
            }
        )
    return rows
