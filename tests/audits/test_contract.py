"""One contract test over every registered audit module (built-ins and installed plugins)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from fmaudit.audits.base import AuditModule, AuditParams
from fmaudit.registry import BUILTIN_AUDITS, registry
from fmaudit.tasks import CAPABILITIES, TASKS

ALL_CAPS = set().union(*CAPABILITIES.values())
HEAVY = ("torch", "transformers", "opacus", "captum", "textattack", "torchattacks")


@pytest.mark.parametrize("name", registry.names())
def test_module_contract(name):
    cls = registry.get(name)
    assert issubclass(cls, AuditModule) and cls.name == name
    assert cls.category and cls.description, "modules describe themselves for `fmaudit list`"
    assert set(cls.requires) <= ALL_CAPS, f"unknown capabilities {set(cls.requires) - ALL_CAPS}"
    assert set(cls.tasks) <= set(TASKS)
    assert any(set(cls.requires) <= CAPABILITIES[t] and (not cls.tasks or t in cls.tasks) for t in TASKS), (
        "no target task can satisfy this module"
    )
    assert issubclass(cls.Params, AuditParams)
    params = cls.Params()  # every param has a sensible default
    json.dumps(cls.Params.model_json_schema())
    json.dumps(params.model_dump(mode="json"))
    with pytest.raises(ValidationError):
        cls.Params.model_validate({"surely_not_a_param": 1})  # unknown keys are errors
    module = cls()
    assert callable(module.check) and callable(module.run)


@pytest.mark.parametrize("name", sorted(BUILTIN_AUDITS))
def test_builtin_module_imports_no_heavy_library(name):
    """Listing and validating stay fast: module files import heavy libraries inside functions."""
    module_path = BUILTIN_AUDITS[name].split(":")[0]
    code = (
        f"import sys, importlib\nimportlib.import_module({module_path!r})\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\nassert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
