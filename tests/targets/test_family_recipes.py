"""The shipped family recipes (recipes/llm.yaml, recipes/vit.yaml) at tiny sizes: each recipe is read from its
file and keeps its targets and its list of audits (module, target, produces); only the models (a tiny GPT-2 built
from GPT2Config with a byte-level BPE tokenizer, a tiny ViT), the data and the modules' sizes shrink. Each runs
through the real runner in a fresh interpreter and every unit must end ok, so a recipe whose modules do not fit
its model family fails here, not on a user's machine."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_families import _run_in_subprocess, build_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# Tiny sizes per module (merged over the recipe's own params).
TINY: dict[str, dict[str, Any]] = {
    "utility": {"bootstrap": 0, "max_examples": 16},
    "privacy.dp_finetune": {"epochs": 1, "batch_size": 8, "accountant": "rdp", "eval_examples": 16},
    "privacy.membership": {
        "reference_models": 2,
        "bootstrap": 0,
        "null_permutations": 0,
        "evidence": 2,
        "max_examples": 16,
    },
    "privacy.canary_audit": {"num_canaries": 16, "max_members": 24},
    "robustness.text_attack": {"num_examples": 2, "max_evidence": 1},
    "robustness.image_attack": {
        "attacks": ["fgsm", {"name": "pgd", "steps": 3}, {"name": "autoattack", "version": "fast", "epsilons": [0.2]}],
        "epsilons": [0.1, 0.2],
        "num_examples": 4,
        "large_budget": None,
    },
    "robustness.certify": {
        "n0": 10,
        "n": 50,
        "predict_n": 20,
        "batch_size": 50,
        "num_examples": 2,
        "attack_steps": 2,
        "attack_noise_samples": 2,
    },
    "explain.attribution": {
        "num_examples": 1,
        "quality": ["deletion", "randomization"],
        "bootstrap": 0,
        "curve_steps": 3,
        "random_orderings": 1,
        "sensitivity_examples": 0,
        "n_steps": 4,
        "internal_batch_size": 8,
        "randomization_examples": 1,
    },
}
CANARY_LM = {"secret_digits": 4, "exposure_candidates": 50}


def tiny_recipe(
    name: str,
    model_dir: Path,
    task: str,
    data: dict[str, dict[str, Any]],
    out: Path,
    prompt_words: dict[str, str] | None = None,
) -> tuple[dict[str, Any], set[tuple[str, str]]]:
    """recipes/<name>.yaml with its models replaced by `model_dir`, its datasets by `data`, tiny fine-tunes and
    tiny module sizes; and the (module, target) units the full recipe runs."""
    full = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    recipe = copy.deepcopy(full)
    recipe.update(name=f"tiny-{name}", output_dir=str(out), data=data)
    for spec in recipe["targets"].values():
        spec.update(model=str(model_dir), task=task)
        if "max_length" in spec:
            spec["max_length"] = 24
        if "finetune" in spec:
            spec["finetune"].update(epochs=1, batch_size=16)
        if "prompt" in spec and prompt_words is not None:
            spec["prompt"]["label_words"] = prompt_words
    for audit in recipe["audits"]:
        audit["params"] = {**audit.get("params", {}), **TINY[audit["use"]]}
        if audit["use"] == "privacy.canary_audit" and task == "causal-lm":
            audit["params"].update(CANARY_LM)
        audit.pop("fail_if", None)
    units = {
        (a["use"], t) for a in full["audits"] for t in ([a["target"]] if isinstance(a["target"], str) else a["target"])
    }
    return recipe, units


def assert_every_unit_ok(report: Any, units: set[tuple[str, str]]) -> None:
    assert report.error is None, f"{report.error.type}: {report.error.message}"
    assert {(r.module, r.target) for r in report.audits} == units
    bad = [
        f"{r.module} on {r.target}: {r.status}: {r.error.type}: {r.error.message}\n{r.error.traceback or ''}"
        for r in report.audits
        if r.status != "ok"
    ]
    assert not bad, "\n\n".join(bad)


def test_llm_recipe_on_a_tiny_gpt2(tmp_path, minilm_tokenizer_dir, sentiment_csv):
    """llm.yaml's modules on a tiny GPT-2: utility, the DP LoRA twin, the LM membership attacks on both, the
    canary audit with secrets, and the prompted classifier (same template; the tiny BPE's words as its verbalizer)
    under utility and DeepWordBug; attribution of the LM's continuation."""
    model_dir = build_checkpoint("gpt2", tmp_path / "models", minilm_tokenizer_dir)
    # all 200 rows: the recipe trains on a sixth of its data (member_fraction 0.1667), here 33 members
    data = {"tweets": {"source": str(sentiment_csv), "id_column": "id"}}
    recipe, units = tiny_recipe(
        "llm", model_dir, "causal-lm", data, tmp_path / "reports", prompt_words={"0": " bad", "1": " good"}
    )
    report = _run_in_subprocess(recipe, tmp_path)
    assert_every_unit_ok(report, units)
    prompted = next(n for n, s in recipe["targets"].items() if "prompt" in s)
    assert report.targets[prompted].kind == "prompted-lm"
    assert report.targets[prompted].architecture == "PromptedLM(GPT2LMHeadModel)"
    attack = next(r for r in report.audits if r.module == "robustness.text_attack")
    assert "clean_accuracy" in attack.metrics


def test_vit_recipe_on_a_tiny_vit(tmp_path, minilm_tokenizer_dir):
    """vit.yaml's modules on a tiny ViT: utility, DP fine-tuning, membership with and without DP, FGSM / PGD /
    AutoAttack, certification and patch attributions."""
    model_dir = build_checkpoint("vit", tmp_path / "models", minilm_tokenizer_dir)
    data = {"digits": {"source": "bundled:digits", "limit": 96}}
    recipe, units = tiny_recipe("vit", model_dir, "image-classification", data, tmp_path / "reports")
    report = _run_in_subprocess(recipe, tmp_path)
    assert_every_unit_ok(report, units)
    attribution = next(r for r in report.audits if r.module == "explain.attribution")
    assert "patch" in str(attribution.tables).lower()
