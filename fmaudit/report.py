"""The run report: a versioned, documented schema and atomic writers.

This module imports only the standard library and pydantic, so the dashboard (and anything else that
only reads reports) never pays for torch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = "1.1"  # 1.1: targets[].code (the code a python: target imported)

Severity = Literal["info", "low", "medium", "high", "critical"]
Status = Literal["ok", "error", "skipped"]
GateOp = Literal["gt", "ge", "lt", "le", "eq", "ne"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metric(_Strict):
    """One number an audit measured."""

    value: float | None = Field(description="The measured value; null when it could not be computed.")
    higher_is_better: bool | None = Field(
        default=None, description="Direction of 'good' for this metric; null when neither is better."
    )
    ci_low: float | None = Field(default=None, description="Lower end of the confidence interval.")
    ci_high: float | None = Field(default=None, description="Upper end of the confidence interval.")
    ci_level: float | None = Field(default=None, description="Confidence level of [ci_low, ci_high], e.g. 0.95.")
    unit: str | None = Field(default=None, description="Unit, e.g. 'fraction', 'nats', 'seconds'.")
    description: str | None = Field(default=None, description="One line: what this number means.")

    @field_validator("value", "ci_low", "ci_high")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        # JSON has no NaN/inf; a non-finite number is recorded as null rather than an invalid file.
        if v is not None and not math.isfinite(v):
            return None
        return v


class GateResult(_Strict):
    """Outcome of one `fail_if` threshold from the recipe."""

    metric: str
    op: GateOp
    threshold: float
    value: float | None
    passed: bool
    message: str


class Finding(_Strict):
    """Something an auditor should read: a risk, a sanity flag, a failed gate."""

    severity: Severity
    title: str
    detail: str = ""
    metric: str | None = None
    gate: GateResult | None = None


class Curve(_Strict):
    """A curve stored as arrays (ROC, epsilon ledger, accuracy vs budget...)."""

    x: list[float | None]
    y: list[float | None]
    x_label: str = "x"
    y_label: str = "y"
    log_x: bool = False
    log_y: bool = False
    description: str | None = None

    @field_validator("x", "y")
    @classmethod
    def _finite_list(cls, v: list[float | None]) -> list[float | None]:
        return [None if a is None or not math.isfinite(a) else float(a) for a in v]


class ErrorInfo(_Strict):
    type: str
    message: str
    hint: str | None = None
    traceback: str | None = None


class AuditResult(_Strict):
    """Result of one audit module on one target."""

    unit_id: str = Field(description="Stable id of this unit of work: '<audit index>:<module>@<target>'.")
    audit_index: int
    module: str
    category: str = ""
    target: str
    status: Status
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    started_at: str | None = None
    duration_s: float | None = None
    metrics: dict[str, Metric] = Field(default_factory=dict)
    findings: list[Finding] = Field(default_factory=list)
    curves: dict[str, Curve] = Field(default_factory=dict)
    tables: dict[str, Any] = Field(
        default_factory=dict, description="Structured module-specific results (confusion matrix, ...)."
    )
    evidence: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Examples backing the findings; raw text/images only when the recipe sets store_examples.",
    )
    artifacts: list[str] = Field(default_factory=list, description="Files in the run folder, relative paths.")
    produces: str | None = Field(default=None, description="Name of the target this unit produced, if any.")
    gates: list[GateResult] = Field(default_factory=list)
    error: ErrorInfo | None = None


class DatasetInfo(_Strict):
    name: str
    source: str
    modality: Literal["text", "image"]
    num_examples: int
    num_labels: int | None = None
    label_names: list[str] | None = None
    fingerprint: str = Field(description="sha256 over the example ids, contents and labels.")


class SplitInfo(_Strict):
    dataset: str
    seed: int
    member_fraction: float
    num_members: int
    num_nonmembers: int
    member_ids: list[str]
    nonmember_ids: list[str]


class CodeInfo(_Strict):
    """Code a `python:package.module:factory` target imported (ran) to build its model."""

    ref: str = Field(description="The recipe's reference, python:package.module:factory.")
    module: str
    factory: str
    file: str = Field(description="The module file that was imported (symlinks resolved).")
    sha256: str = Field(description="sha256 of that file as it was imported.")
    allowed_by: str | None = Field(
        default=None,
        description="Why it was allowed to run: the recipe's folder, an installed package, or --allow-code-from PATH.",
    )


class TargetInfo(_Strict):
    name: str
    kind: str = Field(description="text-classification | causal-lm | image-classification | prompted-lm | torch-module")
    source: str = Field(description="Where the weights came from (bundled name, path, producing audit).")
    architecture: str
    num_parameters: int
    num_trainable_parameters: int | None = None
    weights_sha256: str
    capabilities: list[str]
    num_labels: int | None = None
    finetune: dict[str, Any] | None = None
    split: SplitInfo | None = None
    produced_by: str | None = None
    cache_hit: bool | None = None
    code: CodeInfo | None = Field(default=None, description="python: targets: the code imported to build the model.")


class HostInfo(_Strict):
    hostname: str
    platform: str
    python: str
    cpu_count: int | None
    torch_threads: int | None = None
    device: str


class RunReport(_Strict):
    schema_version: str = SCHEMA_VERSION
    run_id: str
    name: str
    fmaudit_version: str
    created_at: str
    finished_at: str | None = None
    status: Literal["complete", "interrupted", "failed"] = Field(
        default="complete",
        description="complete | interrupted (resume it) | failed (stopped by an error outside "
        "any unit: see `error`; the units before it are kept)",
    )
    exit_code: int | None = None
    error: ErrorInfo | None = Field(default=None, description="Why a `failed` run stopped.")
    seed: int
    recipe: dict[str, Any] = Field(description="The recipe as loaded (echoed for re-runs).")
    recipe_sha256: str
    recipe_path: str | None = None
    host: HostInfo
    versions: dict[str, str | None]
    datasets: dict[str, DatasetInfo] = Field(default_factory=dict)
    targets: dict[str, TargetInfo] = Field(default_factory=dict)
    audits: list[AuditResult] = Field(default_factory=list)
    gates_passed: bool = True
    timings: dict[str, float] = Field(default_factory=dict)

    def result(self, module: str, target: str | None = None) -> AuditResult:
        """The first result of `module` (on `target`, when given)."""
        for r in self.audits:
            if r.module == module and (target is None or r.target == target):
                return r
        raise KeyError(f"no result for module {module!r}" + (f" on target {target!r}" if target else ""))


# ---------------------------------------------------------------------------------------------------
# Writers and readers


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_report(report: RunReport, path: str | os.PathLike[str]) -> None:
    write_json_atomic(path, report.model_dump(mode="json"))


MAX_REPORT_BYTES = 200 * 1024 * 1024  # a report.json larger than this is refused unread (a real one is a few MiB)


class ReportError(ValueError):
    """A file that is not a readable fmaudit report. `kind` says why: "corrupt" (not JSON, cut short, not
    the schema), "too_large", "newer_schema" (written by a newer fmaudit) or "older_schema"."""

    def __init__(self, message: str, kind: str = "corrupt", version: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.version = version


def _version_tuple(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return None


def schema_relation(version: str | None) -> str:
    """How a report's schema_version relates to this fmaudit's: "same" (readable), "newer", "older" or
    "unknown" (missing or not a version)."""
    theirs, ours = _version_tuple(str(version)) if version is not None else None, _version_tuple(SCHEMA_VERSION)
    if theirs is None or ours is None:
        return "unknown"
    if theirs[0] > ours[0] or (theirs[0] == ours[0] and theirs > ours):
        return "newer" if theirs[0] > ours[0] else "same-newer"
    return "older" if theirs[0] < ours[0] else "same"


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def load_report(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> RunReport:
    """Load a report.json (or a run folder holding one) and validate it against the schema. Raises
    FileNotFoundError when there is no report, ReportError (one line, with `kind`) when it cannot be read."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    limit = MAX_REPORT_BYTES if max_bytes is None else max_bytes
    size = path.stat().st_size  # FileNotFoundError when missing
    if size > limit:
        raise ReportError(
            f"{path}: {size / 2**20:.0f} MiB, larger than the {limit / 2**20:.0f} MiB a report may be; not loaded",
            kind="too_large",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        hint = (
            " (cut short: an interrupted copy or write?)"
            if isinstance(exc, json.JSONDecodeError)
            and (exc.pos >= len(exc.doc.rstrip()) - 1 or exc.msg.startswith("Unterminated"))
            else ""
        )
        raise ReportError(f"{path}: not valid JSON{hint}: {_short(str(exc))}") from exc
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: a report is a JSON object")
    version = str(raw.get("schema_version", "?"))
    relation = schema_relation(version)
    if relation == "newer":
        raise ReportError(
            f"{path}: report schema {version} is newer than this fmaudit reads (schema "
            f"{SCHEMA_VERSION}); upgrade fmaudit to open it",
            kind="newer_schema",
            version=version,
        )
    if relation in ("older", "unknown"):
        raise ReportError(
            f"{path}: report schema {version} is not readable by this fmaudit (schema {SCHEMA_VERSION}); "
            "re-run the recipe stored in it, or open it with the fmaudit version that wrote it",
            kind="older_schema",
            version=version,
        )
    try:
        return RunReport.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError
        if relation == "same-newer":  # e.g. 1.3 with fields this version does not know
            raise ReportError(
                f"{path}: report schema {version} is newer than this fmaudit reads (schema "
                f"{SCHEMA_VERSION}) and has fields it does not know; upgrade fmaudit to open it",
                kind="newer_schema",
                version=version,
            ) from exc
        raise ReportError(f"{path}: does not match the report schema: {_short(str(exc))}") from exc


def report_json_schema() -> dict[str, Any]:
    schema = RunReport.model_json_schema()
    schema["$id"] = f"https://fmaudit.dev/schema/report-{SCHEMA_VERSION}.json"
    schema["title"] = "fmaudit run report"
    return schema


class EventLog:
    """Append-only `events.jsonl`: one JSON object per line, flushed as it happens.

    Survives a crash: every completed unit's full result is on disk before the next one starts.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, entry_type: str, **payload: Any) -> None:
        from datetime import datetime, timezone

        line = {"entry_type": entry_type, "time": datetime.now(timezone.utc).isoformat(), **payload}
        data = (json.dumps(line, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "a+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end:  # a line cut short by a kill stays one bad line: the next event starts on its own line
                fh.seek(end - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        # A line cut short by a kill (possibly inside a multi-byte character) is skipped; the lines before
        # and after it, written by this run and by a resumed one, are still good.
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(ev, dict):
                out.append(ev)
        return out

    def completed_results(self) -> dict[str, AuditResult]:
        done: dict[str, AuditResult] = {}
        for ev in self.read():
            if ev.get("entry_type") == "audit_result":
                try:
                    res = AuditResult.model_validate(ev["result"])
                except Exception:  # not a result this version can read: that unit runs again
                    continue
                if res.status == "ok":
                    done[res.unit_id] = res
        return done
