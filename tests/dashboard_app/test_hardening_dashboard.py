"""The dashboard and `fmaudit report` with broken inputs: one reports folder holding a good run, a partial
(interrupted) one, a truncated report.json, reports from a newer schema (major and minor), an empty run
folder and a huge report. The good runs render; each broken one is listed with its reason; nothing raises.
Under Streamlit's AppTest here, and in headless chromium when it is installed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fmaudit.cli import app as cli  # noqa: E402
from fmaudit.report import (  # noqa: E402
    MAX_REPORT_BYTES,
    AuditResult,
    ErrorInfo,
    EventLog,
    HostInfo,
    Metric,
    ReportError,
    RunReport,
    load_report,
    write_report,
)

BROKEN = {
    "truncated": "corrupt",
    "newer-major": "newer schema",
    "newer-minor": "newer schema",
    "empty": "empty",
    "huge": "too large",
}


def _report(run_id: str) -> RunReport:
    ok = AuditResult(
        unit_id="0:utility@bert",
        audit_index=0,
        module="utility",
        category="utility",
        target="bert",
        status="ok",
        metrics={"accuracy": Metric(value=0.8125, higher_is_better=True)},
    )
    skipped = AuditResult(
        unit_id="1:privacy.membership@bert-dp",
        audit_index=1,
        module="privacy.membership",
        category="privacy",
        target="bert-dp",
        status="skipped",
        error=ErrorInfo(
            type="Skipped",
            message="skipped: the audit that produces this target "
            "failed (0:privacy.dp_finetune@bert did not produce 'bert-dp')",
            hint="fix the unit that produces this target, then re-run with --resume",
        ),
    )
    return RunReport(
        run_id=run_id,
        name="hardening",
        fmaudit_version="0.1.0",
        created_at="2026-01-01T00:00:00+00:00",
        seed=0,
        recipe={"version": 1},
        recipe_sha256="0" * 64,
        host=HostInfo(hostname="h", platform="p", python="3.11", cpu_count=2, device="cpu"),
        versions={},
        audits=[ok, skipped],
        exit_code=0,
    )


@pytest.fixture()
def broken_reports(tmp_path) -> Path:
    root = tmp_path / "reports"
    good = _report("good")
    write_report(good, root / "good" / "report.json")
    text = (root / "good" / "report.json").read_text()
    # An interrupted run: events.jsonl only.
    log = EventLog(root / "partial" / "events.jsonl")
    log.emit("run_started", run_id="partial", recipe={"name": "hardening"}, recipe_sha256="0" * 64)
    log.emit("audit_result", unit_id="0:utility@bert", result=good.audits[0].model_dump(mode="json"))
    # A report cut short (a half-copied file), with the events of its run beside it.
    (root / "truncated").mkdir()
    (root / "truncated" / "report.json").write_text(text[: len(text) // 2])
    shutil.copy(root / "partial" / "events.jsonl", root / "truncated" / "events.jsonl")
    # Written by a newer fmaudit: schema 2.0, and 1.9 with a field this version does not know.
    newer = json.loads(text)
    newer["schema_version"] = "2.0"
    (root / "newer-major").mkdir()
    (root / "newer-major" / "report.json").write_text(json.dumps(newer))
    newer["schema_version"] = "1.9"
    newer["attestation"] = {"signed_by": "ci"}
    (root / "newer-minor").mkdir()
    (root / "newer-minor" / "report.json").write_text(json.dumps(newer))
    # A run folder with nothing in it (e.g. a copy that failed).
    (root / "empty").mkdir()
    # A huge report: larger than the limit (sparse: no disk space used, and it is never read).
    (root / "huge").mkdir()
    with open(root / "huge" / "report.json", "wb") as fh:
        fh.write(text[:100].encode())
        fh.truncate(MAX_REPORT_BYTES + 1)
    return root


def test_scan_lists_every_broken_run_with_its_reason(broken_reports):
    from dashboard.runs import run_rows, scan_runs

    t = time.perf_counter()
    entries = {e.label: e for e in scan_runs(broken_reports)}
    assert time.perf_counter() - t < 5  # the huge report is not read
    assert set(entries) == {"good", "partial", *BROKEN}
    assert entries["good"].ok and entries["partial"].state == "partial"
    rows = {r["run"]: r for r in run_rows(list(entries.values()))}
    for name, state in BROKEN.items():
        assert rows[name]["state"] == state, name
        assert rows[name]["notice"], name
    assert "upgrade fmaudit" in rows["newer-major"]["notice"] and "2.0" in rows["newer-major"]["notice"]
    assert "upgrade fmaudit" in rows["newer-minor"]["notice"]
    assert "not valid JSON" in rows["truncated"]["notice"] and "cut short" in rows["truncated"]["notice"]
    assert "empty" in rows["empty"]["notice"] and "MiB" in rows["huge"]["notice"]
    assert str(broken_reports) not in rows["truncated"]["notice"]  # the reason, not an absolute path


def _text(elements) -> str:
    return " ".join(e.value.replace("\\", "") for e in elements)  # markdown escapes (e.g. "\\:") removed


def test_appt_renders_good_runs_and_lists_broken_ones(broken_reports, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FMAUDIT_REPORTS_DIR", str(broken_reports))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(df.value for df in at.dataframe if "state" in df.value.columns)
    states = dict(zip(table["run"], table["state"]))
    assert states["good"] == "complete" and states["partial"] == "partial"
    assert {k: states[k] for k in BROKEN} == BROKEN
    errors = _text(at.error)
    for name in BROKEN:
        assert f"{name}:" in errors, name
    # Every view of every run: no exception; a broken run shows its reason, the good one its results.
    for run in ["good", "partial", *BROKEN]:
        at.selectbox(key="run").set_value(run).run()
        for view in ("Run overview", "Privacy"):
            at.radio(key="view").set_value(view).run()
            assert not at.exception, (run, view, [e.value for e in at.exception])
            shown = _text([*at.error, *at.warning, *at.info])
            if run in BROKEN:
                assert f"{run}:" in shown, (run, view)
    at.selectbox(key="run").set_value("good").run()
    at.radio(key="view").set_value("Run overview").run()
    assert "0.8125" in " ".join(str(df.value.to_dict()) for df in at.dataframe) or "0.8125" in " ".join(
        m.value for m in at.metric
    )
    # A skipped unit shows why it was skipped (not just "was skipped").
    at.radio(key="view").set_value("Privacy").run()
    info = _text(at.info)
    assert "did not produce 'bert-dp'" in info and "re-run with --resume" in info


def test_report_command_on_broken_runs_exits_2_with_one_line(broken_reports):
    runner = CliRunner()
    ok = runner.invoke(cli, ["report", str(broken_reports / "good")])
    assert ok.exit_code == 0, ok.output
    expect = {
        "truncated": "cut short",
        "newer-major": "upgrade fmaudit",
        "newer-minor": "upgrade fmaudit",
        "empty": "no report.json",
        "huge": "larger than",
        "partial": "--resume",
        "does-not-exist": "no such run folder",
    }
    for name, words in expect.items():
        t = time.perf_counter()
        res = runner.invoke(cli, ["report", str(broken_reports / name)], terminal_width=80)
        assert time.perf_counter() - t < 5, name
        assert res.exit_code == 2, (name, res.output)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], (name, res.output)
        assert "Traceback" not in res.output


def test_load_report_kinds(broken_reports):
    with pytest.raises(ReportError) as info:
        load_report(broken_reports / "huge")
    assert info.value.kind == "too_large"
    with pytest.raises(ReportError) as info:
        load_report(broken_reports / "newer-major")
    assert info.value.kind == "newer_schema" and info.value.version == "2.0"
    with pytest.raises(ReportError) as info:
        load_report(broken_reports / "truncated")
    assert info.value.kind == "corrupt"
    with pytest.raises(FileNotFoundError):
        load_report(broken_reports / "empty")


# ---------------------------------------------------------------------------------------------------
# The same folder in a real browser (skipped where Debian's chromium is not installed).

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_broken_runs_listed_in_chromium(broken_reports, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fmaudit = shutil.which("fmaudit", path=str(Path(sys.executable).parent)) or "fmaudit"
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [fmaudit, "dashboard", str(broken_reports), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the dashboard did not start:\n{log.read()[-3000:]}")
                time.sleep(0.2)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{port}/?view=Runs", wait_until="domcontentloaded")
                # Each broken run's notice (st.error) names it and says why.
                page.wait_for_function(
                    "names => names.every(n => [...document.querySelectorAll('[data-testid=stAlert]')]"
                    ".some(e => e.innerText.includes(n + ':')))",
                    arg=list(BROKEN),
                    timeout=90_000,
                )
                body = page.inner_text("body")
                assert "upgrade fmaudit" in body and "not valid JSON" in body
                assert "Traceback" not in body
                assert not errors, errors
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
