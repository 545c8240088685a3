"""Hostile and oversized recipes: refused quickly (exit 2), with the problem named, leaving no run folder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmaudit.recipe import MAX_RECIPE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, RecipeError, load_recipe

TAIL = "targets: {t: {model: bundled:minilm}}\naudits: [{use: utility, target: t}]\n"


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "version: 1\nname: laughs\nx:\n" + "".join(f"  {ln}\n" for ln in lines) + TAIL


def _cli(*args: str, cwd: Path, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "fmaudit.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    return res, time.perf_counter() - t0


def _load_problem(tmp_path: Path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert time.perf_counter() - t0 < 1.0
    return str(ei.value)


def test_billion_laughs_refused_by_validate_and_run_quickly(tmp_path):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(billion_laughs())
    for cmd in (["validate", str(recipe)], ["run", str(recipe), "-q", "-o", str(tmp_path / "reports")]):
        res, took = _cli(*cmd, cwd=tmp_path)
        assert res.returncode == 2, res.stderr + res.stdout
        assert "billion laughs" in " ".join(res.stderr.split())
        assert "Traceback" not in res.stderr
        assert took < 15  # interpreter start included; the refusal itself is timed below
    assert not (tmp_path / "reports").exists()
    msg = _load_problem(tmp_path, billion_laughs())
    assert f"{MAX_YAML_NODES:,} YAML nodes" in msg


def test_small_anchors_and_merge_keys_still_work(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "version: 1\nname: anchors\ndata: {d: {source: bundled:tweets, limit: 50}}\n"
        "targets:\n  a: {model: bundled:minilm, finetune: &ft {data: d, epochs: 1}}\n"
        "  b: {model: bundled:minilm, finetune: {<<: *ft, epochs: 2}}\n"
        "audits: [{use: utility, target: [a, b]}]\n"
    )
    loaded = load_recipe(p)
    assert loaded.recipe.targets["b"].finetune.epochs == 2 and loaded.recipe.targets["b"].finetune.data == "d"


def test_deep_nesting_refused(tmp_path):
    deep_flow = "version: 1\nname: deep\nx: " + "[" * 5000 + "]" * 5000 + "\n" + TAIL
    assert "malformed YAML" in _load_problem(tmp_path, deep_flow) or "nests deeper" in _load_problem(
        tmp_path, deep_flow
    )
    block = (
        "version: 1\nname: deep\n"
        + "".join("  " * i + f"k{i}:\n" for i in range(MAX_YAML_DEPTH + 5))
        + "  " * (MAX_YAML_DEPTH + 5)
        + "leaf: 1\n"
        + TAIL
    )
    assert f"deeper than {MAX_YAML_DEPTH} levels" in _load_problem(tmp_path, block)
    inner = "version: 1\nname: deep\nx: " + "[" * 40 + "]" * 40 + "\n" + TAIL
    assert "nests deeper" in _load_problem(tmp_path, inner)


def test_oversized_recipe_refused_before_reading(tmp_path):
    big = "version: 1\nname: big\n" + TAIL + "# " + "x" * MAX_RECIPE_BYTES + "\n"
    msg = _load_problem(tmp_path, big)
    assert "limited to 1,048,576 bytes" in msg
    many = "version: 1\nname: many\nx:\n" + "".join(f"  k{i}: {i}\n" for i in range(MAX_YAML_NODES + 10)) + TAIL
    assert len(many) < MAX_RECIPE_BYTES
    assert "YAML nodes" in _load_problem(tmp_path, many)
