"""Report schema: round trip, atomic writes, readers that refuse what they cannot trust."""

from __future__ import annotations

import json
import math

import pytest

from fmaudit.report import (
    SCHEMA_VERSION,
    AuditResult,
    EventLog,
    HostInfo,
    Metric,
    ReportError,
    RunReport,
    load_report,
    report_json_schema,
    write_json_atomic,
    write_report,
)


def make_report(**kw) -> RunReport:
    base = dict(
        run_id="r1",
        name="t",
        fmaudit_version="0.1.0",
        created_at="2026-01-01T00:00:00+00:00",
        seed=0,
        recipe={"version": 1},
        recipe_sha256="0" * 64,
        host=HostInfo(hostname="h", platform="p", python="3.11", cpu_count=2, device="cpu"),
        versions={"torch": "2.13.0"},
    )
    base.update(kw)
    return RunReport(**base)


def test_round_trip(tmp_path):
    res = AuditResult(
        unit_id="0:utility@m",
        audit_index=0,
        module="utility",
        target="m",
        status="ok",
        metrics={"accuracy": Metric(value=0.9, higher_is_better=True, ci_low=0.8, ci_high=0.95, ci_level=0.95)},
    )
    rep = make_report(audits=[res])
    write_report(rep, tmp_path / "report.json")
    back = load_report(tmp_path)
    assert back == rep
    assert back.result("utility").metrics["accuracy"].ci_high == 0.95
    with pytest.raises(KeyError):
        back.result("nope")


def test_non_finite_numbers_become_null(tmp_path):
    m = Metric(value=float("nan"), ci_low=float("inf"))
    assert m.value is None and m.ci_low is None
    from fmaudit.report import Curve

    c = Curve(x=[0.0, float("inf")], y=[1.0, float("nan")])
    assert c.x[1] is None and c.y[1] is None
    write_json_atomic(tmp_path / "x.json", Metric(value=math.nan).model_dump())
    assert json.loads((tmp_path / "x.json").read_text())["value"] is None


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": Boom()})  # not serializable: fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_corrupt_and_old_schema_reports_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_report(tmp_path / "a")
    rep = make_report().model_dump(mode="json")
    rep["schema_version"] = "0.3"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "report.json").write_text(json.dumps(rep))
    with pytest.raises(ReportError, match="schema 0.3"):
        load_report(tmp_path / "b")
    rep["schema_version"] = SCHEMA_VERSION
    rep["surprise"] = 1
    (tmp_path / "b" / "report.json").write_text(json.dumps(rep))
    with pytest.raises(ReportError, match="does not match"):
        load_report(tmp_path / "b")


def test_report_json_schema_validates_a_real_report(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = report_json_schema()
    jsonschema.validate(make_report().model_dump(mode="json"), schema)
    bad = make_report().model_dump(mode="json")
    bad["audits"] = [{"module": "x"}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_event_log_survives_a_torn_last_line(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    res = AuditResult(unit_id="0:u@t", audit_index=0, module="u", target="t", status="ok")
    log.emit("audit_result", unit_id=res.unit_id, result=res.model_dump(mode="json"))
    with open(log.path, "a") as fh:
        fh.write('{"entry_type": "audit_res')  # the process died mid-line
    assert list(log.completed_results()) == ["0:u@t"]
