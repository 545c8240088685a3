"""Interrupted and resumed runs, for real: `fmaudit run` in a subprocess, stopped by SIGINT, SIGTERM and
SIGKILL at chosen points (each signal is sent when events.jsonl, or the report's temporary file, shows the
run got there; never after a blind sleep), then `--resume`d until complete. Every stop leaves a valid
report (or the previous one, never a truncated file) and events.jsonl; the resumed run's metrics equal an
uninterrupted run's with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmaudit.report import EventLog, load_report
from fmaudit.testing import tiny_text_recipe

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

REPO = Path(__file__).resolve().parent.parent

# `fmaudit` as the console script runs it; with SLOW_DUMP set, report.json's JSON is written in two halves
# with a pause between them, so a signal can be sent while the write is in progress (the temporary file
# `.report.json.*.tmp` exists). With SLOW_AFTER ("kind,kind:seconds") the run pauses after writing an event
# of those kinds (outside the write's critical section), so a signal sent on seeing that event lands before
# the run can finish, however loaded the machine (without it a tiny run could complete first: a race that
# failed CI once). Everything else is the real code.
CLI = r"""
import os, sys, time
if os.environ.get("SLOW_AFTER"):
    from fmaudit.interrupts import GuardedEventLog

    kinds, pause = os.environ["SLOW_AFTER"].split(":")
    emit = GuardedEventLog.emit

    def slow_emit(self, entry_type, **payload):
        emit(self, entry_type, **payload)
        if entry_type in kinds.split(","):
            time.sleep(float(pause))

    GuardedEventLog.emit = slow_emit
if os.environ.get("SLOW_DUMP"):
    import json, types
    import fmaudit.report as rep

    def slow_dump(obj, fh, **kw):
        text = json.dumps(obj, **kw)
        fh.write(text[: len(text) // 2])
        fh.flush()
        time.sleep(float(os.environ["SLOW_DUMP"]))
        fh.write(text[len(text) // 2:])

    rep.json = types.SimpleNamespace(dump=slow_dump, dumps=json.dumps, loads=json.loads,
                                     JSONDecodeError=json.JSONDecodeError)
sys.argv = ["fmaudit", *sys.argv[1:]]
from fmaudit.cli import main
main()
"""


def _recipe(tiny_bert_dir, sentiment_csv, tmp_path):
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    # Three epochs so the fine-tune lasts long enough to be interrupted in the middle of it.
    recipe["targets"]["bert"]["finetune"]["epochs"] = 3
    recipe["audits"] = [
        {"use": "utility", "target": "bert", "params": {"bootstrap": 50}},
        {
            "use": "privacy.membership",
            "target": "bert",
            "params": {"attacks": ["loss"], "bootstrap": 50, "null_permutations": 20, "evidence": 2},
        },
        {"use": "utility", "target": "bert", "params": {"split": "members", "bootstrap": 0}},
    ]
    return recipe


class Run:
    """One `fmaudit run` subprocess."""

    def __init__(
        self, recipe: Path, cache: Path, *extra: str, slow_dump: float | None = None, slow_after: str | None = None
    ):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            FMAUDIT_CACHE_DIR=str(cache),
            PYTHONPATH=str(REPO),
            COLUMNS="200",
        )
        env.pop("SLOW_DUMP", None)
        env.pop("SLOW_AFTER", None)
        if slow_dump is not None:
            env["SLOW_DUMP"] = str(slow_dump)
        if slow_after is not None:
            env["SLOW_AFTER"] = slow_after
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "run", str(recipe), "-q", *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=recipe.parent,
        )

    def wait_for(self, what, timeout: float = 240.0):
        """Poll until what() is true; fail (with the output) if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = what()
            if found:
                return found
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before the awaited point:\n{out}\n{err}")
            time.sleep(0.01)
        self.proc.kill()
        pytest.fail("timed out waiting for the run")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 240.0) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out + err


def _events(run_dir: Path) -> list[dict]:
    return EventLog(run_dir / "events.jsonl").read()


def _has_event(reports: Path, kind: str, n: int = 1):
    def check():
        for d in reports.glob("*/"):
            if sum(e.get("entry_type") == kind for e in _events(d)) >= n:
                return d
        return None

    return check


def _temp_report(run_dir: Path, stale: Path | None = None, *, written: bool = False):
    """The report's temporary file once it exists (with `written`: once its first half is on disk; the file is
    created before that, and a kill in between would find it empty)."""

    def ready(p: Path) -> bool:
        try:
            return p != stale and (not written or p.stat().st_size > 0)
        except FileNotFoundError:  # renamed into place meanwhile
            return False

    return lambda: next((p for p in run_dir.glob(".report.json.*.tmp") if ready(p)), None)


def _metrics(report) -> dict[str, dict[str, float | None]]:
    return {r.unit_id: {k: m.value for k, m in r.metrics.items() if m.unit != "seconds"} for r in report.audits}


def test_runs_stopped_by_signals_at_every_point_resume_to_the_uninterrupted_metrics(
    tiny_bert_dir, sentiment_csv, tmp_path, write_recipe
):
    import yaml

    recipe = _recipe(tiny_bert_dir, sentiment_csv, tmp_path)
    path = write_recipe(recipe)
    reports = tmp_path / "reports"
    cache = tmp_path / "cache"

    # 1. SIGINT while the target is fine-tuning: exit 130, the run folder stays with a valid report
    #    (status interrupted, nothing finished) and events.jsonl.
    run = Run(path, cache, slow_after="finetune_started:30")
    run_dir = run.wait_for(_has_event(reports, "finetune_started"))
    run.signal(signal.SIGINT)
    rc, out = run.finish()
    assert rc == 130, out
    assert "Traceback" not in out and "--resume" in out and "report.json" in out
    rep = load_report(run_dir)
    assert rep.status == "interrupted" and rep.exit_code == 130
    assert rep.audits == [] and rep.targets == {}  # stopped inside the fine-tune: nothing was prepared
    kinds = [e["entry_type"] for e in _events(run_dir)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished" and "target_failed" not in kinds
    assert _events(run_dir)[-1]["status"] == "interrupted"

    # 2. --resume, then SIGTERM once the first unit's result is recorded (the second unit is running):
    #    handled like SIGINT. The report keeps the finished unit.
    run = Run(path, cache, "--resume", slow_after="audit_result:30")
    run.wait_for(_has_event(reports, "audit_result"))
    run.signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 130, out
    assert "Traceback" not in out
    rep = load_report(run_dir)
    assert rep.status == "interrupted" and [r.unit_id for r in rep.audits][:1] == ["0:utility@bert"]
    assert len(rep.audits) < 3 and all(r.status == "ok" for r in rep.audits)
    assert len(list(reports.iterdir())) == 1  # resumed into the same folder
    interrupted = rep

    # 3. --resume, then SIGKILL while report.json is being written (its temporary file is half full):
    #    report.json is still the previous, complete file (the write is atomic); the results are in events.
    run = Run(path, cache, "--resume", slow_dump=30)
    tmp = run.wait_for(_temp_report(run_dir, written=True))
    run.signal(signal.SIGKILL)
    run.finish()
    assert tmp.exists() and tmp.stat().st_size > 0
    assert load_report(run_dir) == interrupted
    assert sum(e.get("entry_type") == "audit_result" for e in _events(run_dir)) >= 3

    # 4. --resume, then SIGTERM during the final write of the complete report: the write finishes (signals
    #    wait while a report or an event line is written), the run is complete, and exit says so.
    run = Run(path, cache, "--resume", slow_dump=3)
    run.wait_for(_temp_report(run_dir, stale=tmp))
    run.signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 0, out
    final = load_report(run_dir)
    assert final.status == "complete" and [r.status for r in final.audits] == ["ok"] * 3
    assert not list(run_dir.glob(".report.json.*.tmp"))  # the stale temporary file of step 3 is gone
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every event line whole
    assert [e["entry_type"] for e in _events(run_dir)].count("run_finished") == 3  # steps 1, 2 and 4

    # The same recipe, uninterrupted, with its own cache: the same metrics and the same fine-tuned weights.
    ref_recipe = dict(recipe, output_dir=str(tmp_path / "ref-reports"))
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump(ref_recipe, sort_keys=False))
    rc, out = Run(ref_path, tmp_path / "ref-cache").finish()
    assert rc == 0, out
    ref = load_report(next((tmp_path / "ref-reports").iterdir()))
    assert _metrics(final) == _metrics(ref)
    assert final.targets["bert"].weights_sha256 == ref.targets["bert"].weights_sha256


def test_event_log_keeps_the_lines_after_a_torn_one(tmp_path):
    """A kill mid-line leaves one bad line; a resumed run's events after it are still read."""
    from fmaudit.report import AuditResult

    log = EventLog(tmp_path / "events.jsonl")
    a = AuditResult(unit_id="0:u@t", audit_index=0, module="u", target="t", status="ok")
    b = AuditResult(unit_id="1:u@t", audit_index=1, module="u", target="t", status="ok")
    log.emit("audit_result", unit_id=a.unit_id, result=a.model_dump(mode="json"))
    with open(log.path, "ab") as fh:
        fh.write('{"entry_type": "audit_result", "note": "caf\u00e9'.encode()[:-1])  # cut inside a character
    log.emit("run_resumed", run_id="r")
    log.emit("audit_result", unit_id=b.unit_id, result=b.model_dump(mode="json"))
    assert [e["entry_type"] for e in log.read()] == ["audit_result", "run_resumed", "audit_result"]
    assert list(log.completed_results()) == ["0:u@t", "1:u@t"]


def test_interrupts_hold_signals_inside_critical_sections():
    import threading

    from fmaudit.interrupts import Interrupts

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    guard = Interrupts().install()
    try:
        inside_done = False
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with guard.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now: the signal is held, not raised
                inside_done = True
        assert inside_done
        with guard.critical(honour=False):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert guard.pending == signal.SIGINT  # left to the caller
        guard.pending = None
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGTERM) != guard._handle  # restored
