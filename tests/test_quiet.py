"""Issue 20 item 5: library output (tqdm bars, prints, library loggers, warnings) goes to run.log, not the
terminal, while a unit runs or a target is prepared; warnings that say a guarantee may not hold still reach
the terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import yaml
from pydantic import Field

from fmaudit.audits.base import AuditModule, AuditParams, Outcome
from fmaudit.quiet import is_guarantee_text, library_output_to_log

REPO = Path(__file__).resolve().parent.parent


class Noisy(AuditModule):
    """Makes the noise libraries make: a tqdm bar, TextAttack-style logger chatter, a print, a harmless
    warning, and a guarantee warning."""

    name = "test.noisy"
    category = "utility"
    description = "Prints like a third-party library (test)."

    class Params(AuditParams):
        guarantee: bool = Field(default=True)

    def run(self, target, ctx):
        from tqdm.auto import tqdm

        for _ in tqdm(range(3), desc="NOISY-BAR"):
            pass
        logging.getLogger("textattack").info("TEXTATTACK-CHATTER")
        print("PRINTED-NOISE")
        warnings.warn("HARMLESS-LIBRARY-WARNING", FutureWarning, stacklevel=1)
        if self.params.guarantee:
            from fmaudit.privacy.dp import DPPrivacyWarning

            warnings.warn("Secure RNG turned off. (test)", UserWarning, stacklevel=1)
            warnings.warn("noise below the target (test)", DPPrivacyWarning, stacklevel=1)
        out = Outcome()
        out.metric("one", 1.0)
        return out


def _show_like_python(message, category, filename, lineno, file=None, line=None):
    """Python's own display (outside pytest's recorder): format, then write to sys.stderr as it is now."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def test_unit_noise_goes_to_run_log_guarantee_warnings_to_the_terminal(tmp_path, capsys):
    from fmaudit.recipe import load_recipe
    from fmaudit.registry import registry
    from fmaudit.runner import Runner

    ta = logging.getLogger("textattack")  # as TextAttack sets itself up: INFO, its own terminal handler
    handler = logging.StreamHandler(sys.stderr)
    old_level, old_propagate = ta.level, ta.propagate
    ta.addHandler(handler)
    ta.setLevel(logging.INFO)
    ta.propagate = False
    registry.unregister(Noisy.name)
    registry.register(Noisy)
    recipe = {
        "version": 1,
        "name": "quiet",
        "output_dir": str(tmp_path / "reports"),
        "data": {"digits": {"source": "bundled:digits", "limit": 40}},
        "targets": {
            "cnn": {
                "model": "python:fmaudit.targets.vision:digits_cnn",
                "task": "image-classification",
                "num_labels": 10,
            }
        },
        "audits": [{"use": "test.noisy", "target": "cnn", "data": "digits"}],
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_like_python
            report = Runner(load_recipe(recipe)).run()
    finally:
        registry.unregister(Noisy.name)
        ta.removeHandler(handler)
        ta.setLevel(old_level)
        ta.propagate = old_propagate
    assert report.audits[0].status == "ok", report.audits[0].error
    captured = capsys.readouterr()
    terminal = captured.out + captured.err
    for noise in ("NOISY-BAR", "TEXTATTACK-CHATTER", "PRINTED-NOISE", "HARMLESS-LIBRARY-WARNING"):
        assert noise not in terminal, noise
    assert "Secure RNG turned off" in captured.err and "DPPrivacyWarning" in captured.err
    (run_dir,) = (tmp_path / "reports").iterdir()
    log = (run_dir / "run.log").read_text()
    for text in (
        "NOISY-BAR",
        "TEXTATTACK-CHATTER",
        "PRINTED-NOISE",
        "HARMLESS-LIBRARY-WARNING",
        "Secure RNG turned off",
        "DPPrivacyWarning",
        "unit 0:test.noisy@cnn",
    ):
        assert text in log, text
    assert handler.stream is sys.stderr  # the library's handler is back on its own stream


NOISY_MODEL = """
import logging
import sys
import warnings

from torch import nn
from tqdm import tqdm

logger = logging.getLogger("textattack.shared.utils.install")
logger.addHandler(logging.StreamHandler())
logger.setLevel(logging.INFO)
logger.propagate = False


def make(num_labels=10):
    for _ in tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
        pass
    logger.info("TEXTATTACK-CHATTER")
    print("PRINTED-NOISE")
    warnings.warn("Secure RNG turned off. (test)")
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_labels))
"""


def test_real_process_target_preparation_noise_in_run_log(tmp_path):
    """`fmaudit run` as a user runs it: the loading noise of a target (a GGUF-style tqdm bar, logger chatter,
    a print) is in run.log only; the Secure-RNG warning reaches stderr (and the log)."""
    (tmp_path / "fm_noisy_model.py").write_text(NOISY_MODEL)
    recipe = {
        "version": 1,
        "name": "quiet",
        "output_dir": str(tmp_path / "reports"),
        "data": {"digits": {"source": "bundled:digits", "limit": 40}},
        "targets": {"net": {"model": "python:fm_noisy_model:make", "task": "image-classification", "num_labels": 10}},
        "audits": [{"use": "utility", "target": "net", "data": "digits"}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80")
    res = subprocess.run(
        [str(REPO / ".venv" / "bin" / "fmaudit"), "run", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    terminal = res.stdout + res.stderr
    for noise in ("de-quantizing", "TEXTATTACK-CHATTER", "PRINTED-NOISE"):
        assert noise not in terminal, (noise, terminal)
    assert "Secure RNG turned off" in res.stderr
    (run_dir,) = (tmp_path / "reports").iterdir()
    log = (run_dir / "run.log").read_text()
    for text in (
        "de-quantizing",
        "TEXTATTACK-CHATTER",
        "PRINTED-NOISE",
        "Secure RNG turned off",
        "preparing target net",
    ):
        assert text in log, text


def test_capture_is_reentrant_and_restores_streams(tmp_path):
    out, err = sys.stdout, sys.stderr
    with library_output_to_log(tmp_path / "run.log", "outer"):
        inner_err = sys.stderr
        with library_output_to_log(tmp_path / "run.log", "inner"):
            assert sys.stderr is inner_err  # a nested block changes nothing
            print("INSIDE")
    assert sys.stdout is out and sys.stderr is err
    text = (tmp_path / "run.log").read_text()
    assert "INSIDE" in text and "outer" in text and "inner" not in text


def test_guarantee_patterns():
    assert is_guarantee_text("UserWarning: Secure RNG turned off. This is perfectly fine")
    assert is_guarantee_text("UserWarning: GDP accounting is experimental and can underestimate")
    assert is_guarantee_text("x.py:3: DPPrivacyWarning: sample rate")
    assert not is_guarantee_text("Converting and de-quantizing GGUF tensors...: 100%")
