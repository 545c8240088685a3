"""docs/writing-a-module.md stays true: its module file and its known-answer test run as written."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "writing-a-module.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture()
def loss_gap_module(monkeypatch):
    """The doc's module file, imported as a module and registered under its name."""
    from fmaudit.registry import registry

    source = next(b for b in _python_blocks() if "class LossGapAudit" in b)
    mod = types.ModuleType("loss_gap_from_docs")
    exec(compile(source, str(DOC), "exec"), mod.__dict__)
    registry.register(mod.LossGapAudit)
    yield mod
    registry.unregister(mod.LossGapAudit.name)


def test_the_docs_module_meets_the_contract(loss_gap_module):
    from fmaudit.registry import registry

    cls = registry.get("privacy.loss_gap")
    assert cls is loss_gap_module.LossGapAudit
    cls.Params()  # every param has a default


def test_the_docs_known_answer_test_passes(loss_gap_module, tmp_path):
    source = next(b for b in _python_blocks() if "def test_loss_gap_known_answers" in b)
    scope = {"LossGapAudit": loss_gap_module.LossGapAudit}
    exec(compile(source, str(DOC), "exec"), scope)
    scope["test_loss_gap_known_answers"](tmp_path)


def test_the_registry_line_in_the_docs_names_the_class():
    block = next(b for b in _python_blocks() if "BUILTIN_AUDITS" in b)
    assert '"privacy.loss_gap": "fmaudit.audits.privacy.loss_gap:LossGapAudit"' in block
