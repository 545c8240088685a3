"""Recipes: YAML (safe_load only) validated in two passes.

Pass 1 checks the recipe's own shape with pydantic (`schema`). Pass 2 (`checks`, one module per recipe
section) checks each audit's params against that module's own `Params` schema, names against the registry,
cross-references (targets, data, produced targets), files and capabilities. Every problem is collected with
its path (`audits[2].params.eps`) and YAML line (`problems`), and nothing heavy (no model, no dataset, no
`python:` code) is loaded. `load_recipe` runs both passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fmaudit.recipe.checks import check_audits_loose, check_recipe
from fmaudit.recipe.code_refs import CodeRef, CodeRefError, refused_code_message, resolve_code_ref
from fmaudit.recipe.files import (
    MAX_SCANNED_TABLE_BYTES,
    TOKENIZER_FILES,
    check_checkpoint_folder,
    check_safetensors_file,
    check_torch_file,
    check_weights_file,
    read_model_config,
    table_summary,
    tokenizer_vocab_size,
)
from fmaudit.recipe.problems import Lines, Problem, RecipeError, dedupe, format_path, pydantic_problems
from fmaudit.recipe.schema import (
    RECIPE_VERSION,
    AuditSpec,
    DataSpec,
    ExecutorSpec,
    FinetuneSpec,
    GateOp,
    Recipe,
    TargetSpec,
    recipe_json_schema,
)
from fmaudit.recipe.yaml_io import (
    MAX_RECIPE_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    check_yaml_limits,
    parse_yaml,
    read_recipe_file,
)


@dataclass
class LoadedRecipe:
    recipe: Recipe
    raw: dict[str, Any]
    path: Path | None
    base_dir: Path
    allow_code_from: tuple[Path, ...] = ()  # folders the person running fmaudit allowed code from
    code: dict[str, CodeRef] = field(default_factory=dict)  # python: targets -> the code they import


def load_recipe(
    source: str | Path | dict[str, Any], *, base_dir: Path | None = None, allow_code_from: Sequence[str | Path] = ()
) -> LoadedRecipe:
    """Read and fully validate a recipe (a YAML path, YAML text via a dict, or a dict).

    Raises RecipeError listing every problem. Loads no model and no dataset, and imports no code: the code
    of `python:` targets is located and must lie under the recipe's folder (`base_dir`; the working
    directory for a dict), in an installed package, or under one of `allow_code_from`.
    """
    lines: Lines = {}
    path: Path | None = None
    if isinstance(source, dict):
        raw, label = source, "<dict>"
    else:
        path = Path(source)
        label = str(path)
        raw, lines = parse_yaml(read_recipe_file(path, label), label)
    if base_dir is None:
        base_dir = path.parent.resolve() if path is not None else Path.cwd()
    if not isinstance(raw, dict):
        raise RecipeError(
            [
                Problem(
                    "",
                    "a recipe is a YAML mapping with version, name, targets and audits "
                    f"(got {type(raw).__name__}); see recipes/quickstart.yaml",
                )
            ],
            label,
        )
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = pydantic_problems(exc, Recipe, (), lines)
        # Still check the audits we can, so one pass reports everything.
        problems += check_audits_loose(raw, lines)
        raise RecipeError(dedupe(problems), label) from None
    allow = tuple(Path(a).expanduser().resolve() for a in allow_code_from)
    code: dict[str, CodeRef] = {}
    problems = check_recipe(recipe, lines=lines, base_dir=base_dir, allow_code_from=allow, code=code)
    if problems:
        raise RecipeError(problems, label)
    return LoadedRecipe(recipe=recipe, raw=raw, path=path, base_dir=base_dir, allow_code_from=allow, code=code)


__all__ = [
    "MAX_RECIPE_BYTES",
    "MAX_SCANNED_TABLE_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "RECIPE_VERSION",
    "TOKENIZER_FILES",
    "AuditSpec",
    "CodeRef",
    "CodeRefError",
    "DataSpec",
    "ExecutorSpec",
    "FinetuneSpec",
    "GateOp",
    "LoadedRecipe",
    "Problem",
    "Recipe",
    "RecipeError",
    "TargetSpec",
    "check_checkpoint_folder",
    "check_recipe",
    "check_safetensors_file",
    "check_torch_file",
    "check_weights_file",
    "check_yaml_limits",
    "format_path",
    "load_recipe",
    "parse_yaml",
    "read_model_config",
    "recipe_json_schema",
    "refused_code_message",
    "resolve_code_ref",
    "table_summary",
    "tokenizer_vocab_size",
]
