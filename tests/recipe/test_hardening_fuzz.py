"""Property-based fuzzing of `fmaudit validate` (and `run`'s refusal) with mutated shipped recipes.

Each example takes one of recipes/*.yaml and applies one to three random mutations to its document tree
(delete a key or item, replace a value with a random scalar / list / mapping, insert an unknown key, change
a value's type, nest it deeply, share one node in two places so the YAML has anchors and aliases, plant an
alias bomb), then sometimes damages the YAML text itself (cut short, random characters, a Latin-1 byte, a
Python tag). Properties: exit 0 or 2 only, never a traceback, a bounded time per case, nothing written
(no run folder, no reports folder), and an invalid recipe given to `run` is refused the same way, also with
no run folder. A few cases go through the real console script in a subprocess, which must not import torch.
Hypothesis is derandomized, so CI sees the same examples every time."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fmaudit.cli import app

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
BASES = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in RECIPES}
MAX_SECONDS = 2.0

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(
        [
            "bundled:minilm",
            "bundled:digits",
            "bundled:nope",
            "bundled:",
            "auto",
            "cuda",
            "cuda:7",
            "cpu",
            "mps",
            "loss",
            "rmia",
            "utility",
            "privacy.membership",
            "robustness.image_attack",
            "<<",
            "~",
            "null",
            "1e309",
            "-1",
            "0x10",
            "True",
            "",
            " ",
            "\x00",
            "é" * 5,
            "../../nope",
            "data/missing.csv",
            "*",
            "&a",
            "{",
            "[",
            "%",
            "@",
            "!!python/object",
        ]
    ),
)
KEYS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "use",
            "target",
            "params",
            "fail_if",
            "produces",
            "data",
            "finetune",
            "model",
            "source",
            "limit",
            "seed",
            "lt",
            "gt",
            "attacks",
            "<<",
            "version",
        ]
    ),
    st.integers(min_value=-5, max_value=5),
)
VALUES = st.recursive(
    SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(KEYS, kids, max_size=4)), max_leaves=10
)
TREE_OPS = ["delete", "replace", "insert_key", "wrap_list", "wrap_dict", "stringify", "deep_nest", "alias", "bomb"]
TEXT_OPS = [None, None, None, "truncate", "insert", "latin1", "tag", "tab_indent"]


def _paths(node, prefix=(), seen=None):
    """Paths to every node; a node reached again through an alias is not walked twice (alias bombs)."""
    seen = set() if seen is None else seen
    yield prefix
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            return
        seen.add(id(node))
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for k, v in items:
            yield from _paths(v, prefix + (k,), seen)


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _set(doc, path, value):
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _cyclic(node, open_=None, done=None) -> bool:
    """Whether the document contains itself (depth-first, each shared node visited once)."""
    open_, done = (set() if open_ is None else open_), (set() if done is None else done)
    if not isinstance(node, (dict, list)) or id(node) in done:
        return False
    if id(node) in open_:
        return True
    open_.add(id(node))
    kids = node.values() if isinstance(node, dict) else node
    found = any(_cyclic(k, open_, done) for k in kids)
    open_.discard(id(node))
    done.add(id(node))
    return found


def _mutate(data, doc):
    paths = list(_paths(doc))
    op = data.draw(st.sampled_from(TREE_OPS), label="op")
    event(f"tree op {op}")
    path = data.draw(st.sampled_from(paths), label="path")
    node = _get(doc, path)
    if op == "delete" and path:
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
    elif op == "replace":
        doc = _set(doc, path, data.draw(VALUES, label="value"))
    elif op == "insert_key" and isinstance(node, dict):
        node[data.draw(KEYS, label="key")] = data.draw(VALUES, label="value")
    elif op == "wrap_list":
        doc = _set(doc, path, [node])
    elif op == "wrap_dict":
        doc = _set(doc, path, {data.draw(KEYS, label="key"): node})
    elif op == "stringify":
        doc = _set(doc, path, str(node))
    elif op == "deep_nest":  # around the 32-level limit, on both sides of it
        depth = data.draw(st.integers(min_value=1, max_value=60), label="depth")
        nested = node
        for _ in range(depth):
            nested = [nested] if data.draw(st.booleans(), label="list?") else {"k": nested}
        doc = _set(doc, path, nested)
    elif op == "alias":  # the same node in two places: safe_dump writes an anchor and an alias
        other = data.draw(st.sampled_from(paths), label="other")
        if other:
            # When `other` contains `path`, the document now contains itself (a recursive alias).
            doc = _set(doc, path, _get(doc, other))
    elif op == "bomb":  # billion laughs: `width` aliases per level, `levels` levels
        levels = data.draw(st.integers(min_value=2, max_value=9), label="levels")
        width = data.draw(st.integers(min_value=2, max_value=9), label="width")
        lol = ["lol"]
        for _ in range(levels):
            lol = [lol] * width
        doc = _set(doc, path, lol)
    return doc


def _damage(data, text: str) -> bytes:
    op = data.draw(st.sampled_from(TEXT_OPS), label="text_op")
    event(f"text op {op}")
    if op is None:
        return text.encode("utf-8")
    i = data.draw(st.integers(min_value=0, max_value=max(0, len(text))), label="at")
    if op == "truncate":
        return text[:i].encode("utf-8")
    if op == "insert":
        return (text[:i] + data.draw(st.text(max_size=8), label="junk") + text[i:]).encode("utf-8")
    if op == "latin1":
        return text[:i].encode("utf-8") + b"\xe9" + text[i:].encode("utf-8")
    if op == "tag":
        return (text[:i] + " !!python/object/apply:os.system ['true'] " + text[i:]).encode("utf-8")
    return text.replace("\n  ", "\n\t", 1).encode("utf-8")


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check(res, what: str, elapsed: float, case: str) -> None:
    assert res.exit_code in (0, 2), f"{what}: exit {res.exit_code}\n{case}\n{res.output}"
    assert res.exception is None or isinstance(res.exception, SystemExit), (what, repr(res.exception), case)
    assert "Traceback" not in res.output, (what, res.output, case)
    assert elapsed < MAX_SECONDS, f"{what} took {elapsed:.2f} s\n{case}"


def test_shipped_recipes_are_valid():
    runner = CliRunner()
    for p in RECIPES:
        res = runner.invoke(app, ["validate", str(p)])
        assert res.exit_code == 0, res.output


@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=st.data())
def test_mutated_recipes_validate_exits_0_or_2_and_writes_nothing(data):
    name = data.draw(st.sampled_from(sorted(BASES)), label="recipe")
    doc = copy.deepcopy(BASES[name])
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        doc = _mutate(data, doc)
        if _cyclic(doc):  # a recursive alias: no further mutation can walk it
            event("recursive alias")
            break
    try:
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, RecursionError, ValueError):  # e.g. a key yaml cannot write: nothing to try
        event("not writable as YAML")
        return
    raw = _damage(data, text)
    case = f"{name}: {raw[:1500]!r}"
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipe = folder / "recipe.yaml"
        recipe.write_bytes(raw)
        before = _listing(folder)
        old_cwd = os.getcwd()
        os.chdir(folder)  # a relative output_dir or reports/ would appear here
        try:
            t = time.perf_counter()
            res = runner.invoke(app, ["validate", str(recipe)])
            _check(res, "validate", time.perf_counter() - t, case)
            event(f"validate exit {res.exit_code}")
            assert _listing(folder) == before, ("validate wrote files", _listing(folder) - before, case)
            if res.exit_code == 2:
                assert "Invalid recipe" in res.output or "problem" in res.output, (res.output, case)
                # `run` refuses it the same way, before any model loads, and leaves no run folder.
                t = time.perf_counter()
                ran = runner.invoke(app, ["run", str(recipe), "-q"])
                _check(ran, "run", time.perf_counter() - t, case)
                assert ran.exit_code == 2, (ran.output, case)
                assert _listing(folder) == before, ("run wrote files", _listing(folder) - before, case)
        finally:
            os.chdir(old_cwd)


# A few cases through the installed console script: exit code, stderr and the imports of a real process.
SUBPROCESS_CLI = r"""
import atexit, sys
atexit.register(lambda: sys.stderr.write("\nLOADED:" + ",".join(m for m in ("torch", "transformers") if m in sys.modules) + "\n"))
sys.argv = ["fmaudit", *sys.argv[1:]]
from fmaudit.cli import main
main()
"""


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


SUBPROCESS_CASES = {
    "valid": (RECIPES[0].read_bytes(), 0),
    "bomb": (RECIPES[0].read_bytes() + _bomb().encode(), 2),
    "truncated": (RECIPES[0].read_bytes()[: len(RECIPES[0].read_bytes()) // 2] + b"\n  - use: [", 2),
    "latin1": (RECIPES[0].read_bytes().replace(b"\nname: ", b"\nname: caf\xe9-", 1), 2),
    "unknown-key-and-type": (yaml.safe_dump({**BASES[RECIPES[0].name], "seed": "zero", "tragets": {}}).encode(), 2),
    "python-tag": (b"!!python/object/apply:os.system ['echo pwned']\n", 2),
    # A collection that contains itself through its own alias: every walk of it would recurse forever.
    "recursive-alias": (RECIPES[0].read_bytes() + b"\nloop: &loop {name: x, again: *loop}\n", 2),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_validate_in_a_subprocess(case, tmp_path):
    raw, expected = SUBPROCESS_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(raw)
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CLI, "validate", str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    elapsed = time.perf_counter() - t
    assert res.returncode == expected, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.rstrip().endswith("LOADED:"), res.stderr  # validate never imports torch or transformers
    assert elapsed < 20, elapsed  # interpreter start included; the check itself is bounded in-process above
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    if case == "python-tag":
        assert "pwned" not in res.stdout
