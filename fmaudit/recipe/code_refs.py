"""Where the code of `python:package.module:factory` targets comes from, resolved without importing it.

Such targets import (run) code named in the recipe. That code is allowed only from the recipe's folder,
installed packages (site-packages, the standard library, editable installs of an installed distribution) or a
folder the *person running fmaudit* names with `--allow-code-from` (never the recipe itself: a recipe from
someone else must not be able to widen what it may run).
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MODULE_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"


@dataclass(frozen=True)
class CodeRef:
    """Where the code of a `python:` target comes from (resolved without importing it)."""

    ref: str  # python:pkg.module:factory
    module: str
    factory: str
    file: Path  # the module's file (resolved, symlinks followed)
    files: tuple[Path, ...]  # every file importing it runs first: parent packages' __init__.py, then the module
    allowed_by: str | None  # "recipe folder (DIR)" | "installed package" | "--allow-code-from DIR"; None: refused
    from_recipe_folder: bool = False  # found only in the recipe's folder (imported with it appended to sys.path)
    refused: Path | None = None  # the first file outside the allowed places

    def sha256(self) -> str:
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "module": self.module,
            "factory": self.factory,
            "file": str(self.file),
            "sha256": self.sha256(),
            "allowed_by": self.allowed_by,
        }


class CodeRefError(ValueError):
    """A `python:` reference that cannot be resolved, or resolves outside the allowed places."""


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _installed_roots() -> list[Path]:
    import site
    import sysconfig

    roots = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # old virtualenv's site module
        pass
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    return [Path(r).resolve() for r in roots if r]


def _editable_root_for(top: str, file: Path) -> str | None:
    """The installed distribution that provides top-level package `top` as an editable install
    (`pip install -e`) whose source folder holds `file`, or None."""
    import importlib.metadata as md
    from urllib.parse import unquote, urlparse

    for dist in md.distributions():
        try:
            raw = dist.read_text("direct_url.json")
            info = json.loads(raw) if raw else {}
        except (OSError, ValueError):
            continue
        url = info.get("url", "") if isinstance(info, dict) else ""
        if not (isinstance(info.get("dir_info"), dict) and info["dir_info"].get("editable")) or not url.startswith(
            "file:"
        ):
            continue
        root = Path(unquote(urlparse(url).path)).resolve()
        if not _under(file, root):
            continue
        tops = set((dist.read_text("top_level.txt") or "").split())
        if not tops:
            tops = {k for k, v in md.packages_distributions().items() if dist.metadata["Name"] in v}
        if top in tops:
            return dist.metadata["Name"]
    return None


def resolve_code_ref(ref: str, *, base_dir: Path, allow_code_from: typing.Sequence[str | Path] = ()) -> CodeRef:
    """Find the file `python:pkg.module:factory` would import, without importing (running) anything, and
    say whether it may run. Raises CodeRefError when the reference is malformed or the module is not found."""
    import importlib.machinery
    import importlib.util
    import re
    import sys

    body = ref.split(":", 1)[1] if ref.startswith("python:") else ref
    mod_name, _, fn_name = body.partition(":")
    if not re.fullmatch(_MODULE_NAME, mod_name) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", fn_name):
        raise CodeRefError("write python models as python:package.module:factory_function")
    parts = mod_name.split(".")
    base_dir = Path(base_dir).resolve()
    files: list[Path] = []
    from_recipe_folder = False
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__spec__", None) is not None:
            spec = loaded.__spec__
        elif i == 0:
            try:
                spec = importlib.util.find_spec(name)  # a top-level name: finds, imports nothing
            except (ImportError, ValueError):
                spec = None
            if spec is None:  # not on the Python path: the recipe's folder
                spec = importlib.machinery.PathFinder.find_spec(name, [str(base_dir)])
                from_recipe_folder = spec is not None
        elif spec is not None:
            locations = list(spec.submodule_search_locations or [])
            if not locations:
                raise CodeRefError(f"{'.'.join(parts[:i])} is a module, not a package: cannot find {name}")
            spec = importlib.machinery.PathFinder.find_spec(name, locations)
        if spec is None:
            raise CodeRefError(f"cannot find module {name!r} on the Python path or in the recipe's folder ({base_dir})")
        origin = getattr(loaded, "__file__", None) if loaded is not None else None
        origin = origin or spec.origin
        if origin in ("built-in", "frozen"):
            continue
        if not origin or not Path(origin).is_file():
            raise CodeRefError(f"module {name!r} has no source file (a namespace package?); name a module file")
        files.append(Path(origin).resolve())
    if not files:
        raise CodeRefError(f"module {mod_name!r} is built into Python; name a module that defines the factory")
    module_file = files[-1]

    def allowed(f: Path) -> str | None:
        for a in allow_code_from:
            root = Path(a).expanduser().resolve()
            if f == root or _under(f, root):
                return f"--allow-code-from {root}"
        if _under(f, base_dir):
            return f"recipe folder ({base_dir})"
        if any(_under(f, r) for r in _installed_roots()):
            return "installed package"
        dist = _editable_root_for(parts[0], f)
        return f"installed package ({dist}, editable)" if dist else None

    verdicts = [allowed(f) for f in files]
    refused = next((f for f, v in zip(files, verdicts) if v is None), None)
    return CodeRef(
        ref=f"python:{mod_name}:{fn_name}",
        module=mod_name,
        factory=fn_name,
        file=module_file,
        files=tuple(files),
        allowed_by=None if refused is not None else verdicts[-1],
        from_recipe_folder=from_recipe_folder,
        refused=refused,
    )


def refused_code_message(code: CodeRef, base_dir: Path) -> str:
    bad = code.refused or code.file
    return (
        f"{code.ref} would import (run) {bad}, which is outside the recipe's folder ({Path(base_dir).resolve()}) "
        f"and the installed packages; refused before anything ran. If you trust that code, allow it with "
        f"`--allow-code-from {bad.parent}` (fmaudit validate / run)"
    )
