"""Reports for the dashboard tests, produced by the real pipeline (`run_recipe`) on the tiny fixtures.

One reports folder per test session, built once and shared by tests/test_dashboard*.py:
- `base` and `other`: the same tiny recipe with different fine-tuning, so Compare has differences. Each
  runs utility (with one gate that fails on purpose), a unit that errors at run time, a small plugin probe
  (a loss-threshold membership attack computed here with scikit-learn, registered as a third-party
  module would be) that exercises the generic views with log-log ROC curves, tables and evidence, and every
  built-in privacy / robustness / explain module that is registered (with small parameters);
- `corrupt` (a real report cut short), `old-schema` (a real report marked with schema 0.x) and `partial`
  (events.jsonl only, as an interrupted run leaves it).

`same_seed_rerun` copies a run as a second run of the same recipe and seed would leave it (timings differ,
audit metrics only by float noise), for Compare's "zero changes" check.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome  # noqa: E402

PROBE = "tests.loss_probe"


class LossProbe(AuditModule):
    """Loss-threshold membership score (Yeom et al.): members have lower loss. A stand-in third-party module."""

    name = PROBE
    category = "privacy"
    description = "Loss-threshold membership probe (test plugin)."
    requires = frozenset({"per_example_loss"})

    class Params(AuditParams):
        batch_size: int = 32

    def run(self, target, ctx: AuditContext) -> Outcome:
        from sklearn.metrics import roc_auc_score, roc_curve

        split = ctx.split
        loss_m = target.per_example_loss(split.members, batch_size=self.params.batch_size)
        loss_n = target.per_example_loss(split.nonmembers, batch_size=self.params.batch_size)
        y = np.r_[np.ones(len(loss_m)), np.zeros(len(loss_n))]
        score = -np.r_[loss_m, loss_n]
        fpr, tpr, _ = roc_curve(y, score)
        out = Outcome()
        out.metric(
            "auc",
            roc_auc_score(y, score),
            higher_is_better=False,
            unit="fraction",
            description="ROC AUC of the loss attack (0.5 = no leak).",
        )
        out.metric("mean_member_loss", float(loss_m.mean()), unit="nats", description="Mean loss on members.")
        out.curve(
            "roc_loss",
            fpr,
            tpr,
            x_label="false positive rate",
            y_label="true positive rate",
            log_x=True,
            log_y=True,
            description="Loss attack ROC.",
        )
        out.tables["counts"] = {"members": int(len(loss_m)), "nonmembers": int(len(loss_n))}
        out.tables["per_example"] = [
            {"id": split.dataset.ids[i], "loss": float(loss)} for i, loss in zip(split.member_idx[:5], loss_m[:5])
        ]
        out.evidence = [{"id": split.dataset.ids[i], "member": True} for i in split.member_idx[:3]]
        # Markup in report text must reach the page as text (a report is data, not HTML).
        out.finding("info", "Loss probe ran <script>alert('probe')</script>", f"{len(y)} examples scored")
        return out


# Small parameters for the built-in modules that exist in this checkout (others are building them; a
# module that is not registered is simply not in the recipe, and its view must then show nothing).
OPTIONAL_AUDITS: list[dict[str, Any]] = [
    {
        "use": "privacy.dp_finetune",
        "target": "bert",
        "produces": "bert-dp",
        "params": {
            "target_epsilon": 8.0,
            "epochs": 1,
            "trainable": "head",
            "accountant": "rdp",
            "lr": 1e-2,
            "eval_examples": 50,
        },
    },
    {"use": "utility", "target": "bert-dp", "params": {"bootstrap": 0}, "needs": "privacy.dp_finetune"},
    {
        "use": "privacy.membership",
        "target": ["bert", "bert-dp"],
        "params": {"attacks": ["loss", "confidence"], "bootstrap": 50, "evidence": 3},
    },
    {"use": "privacy.canary_audit", "target": "bert", "params": {"num_canaries": 20, "max_members": 60}},
    {
        "use": "robustness.text_attack",
        "target": "bert",
        "params": {"attack": "deepwordbug", "num_examples": 3, "max_evidence": 3},
    },
    {
        "use": "explain.attribution",
        "target": "bert",
        "params": {
            "methods": ["gradient_x_input"],
            "num_examples": 2,
            "quality": ["deletion", "randomization"],
            "bootstrap": 0,
            "curve_steps": 4,
            "random_orderings": 1,
            "sensitivity_examples": 0,
            "top_tokens": 5,
        },
    },
]


def _usable(registry, audit: dict[str, Any]) -> bool:
    """Registered, importable, and accepting our small parameters (a module still being written may rename
    one: then it is left out of the fixtures rather than failing every dashboard test)."""
    try:
        registry.get(audit["use"]).Params.model_validate(audit.get("params") or {})
        return True
    except Exception as exc:  # RegistryError, pydantic.ValidationError
        import warnings

        warnings.warn(
            f"dashboard fixtures leave out {audit['use']}: {type(exc).__name__}: {str(exc)[:200]}", stacklevel=2
        )
        return False


def available_optional(registry, candidates: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    names = {n for n in registry.names()}
    audits = [
        dict(a)
        for a in (OPTIONAL_AUDITS if candidates is None else candidates)
        if a["use"] in names and a.get("needs", a["use"]) in names and _usable(registry, a)
    ]
    for a in audits:
        a.pop("needs", None)
    known = {"bert", "cnn"} | {a.get("produces") for a in audits}
    for a in audits:  # a unit on a DP target only when the DP module is there to produce it
        if isinstance(a["target"], list):
            a["target"] = [t for t in a["target"] if t in known]
    return [a for a in audits if a["target"] and (isinstance(a["target"], list) or a["target"] in known)]


def recipe(
    model_dir: Path, csv_path: Path, out: Path, *, name: str, utility: dict[str, Any], extra: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "version": 1,
        "name": name,
        "seed": 0,
        "output_dir": str(out),
        "store_examples": True,
        "data": {
            "sents": {"source": str(csv_path), "id_column": "id"},
            "other": {"source": str(csv_path), "id_column": "id", "limit": 60},
        },
        "targets": {
            "bert": {
                "model": str(model_dir),
                "task": "text-classification",
                "max_length": 32,
                "finetune": {"data": "sents", "epochs": 1, "batch_size": 16, "lr": 1e-3},
            }
        },
        "audits": [
            {
                "use": "utility",
                "target": "bert",
                "params": utility,
                "fail_if": {"accuracy": {"le": 1.0}},
            },  # always fails: a failed gate to show first
            {"use": "utility", "target": "bert", "data": "other", "params": {"split": "members"}},  # errors
            {"use": PROBE, "target": "bert"},
            *extra,
        ],
    }


IMAGE_AUDITS: list[dict[str, Any]] = [
    {
        "use": "robustness.image_attack",
        "target": "cnn",
        "params": {"attacks": ["fgsm"], "epsilons": [0.1, 0.3], "num_examples": 16, "num_images": 2},
    },
    {
        "use": "explain.attribution",
        "target": "cnn",
        "params": {
            "methods": ["saliency"],
            "num_examples": 2,
            "quality": ["deletion"],
            "bootstrap": 0,
            "curve_steps": 3,
            "random_orderings": 1,
            "sensitivity_examples": 0,
        },
    },
]


def image_recipe(out: Path, audits: list[dict[str, Any]]) -> dict[str, Any]:
    """The bundled digits CNN, briefly fine-tuned on 200 digits: image grids and attribution overlays."""
    return {
        "version": 1,
        "name": "dash-images",
        "seed": 0,
        "output_dir": str(out),
        "store_examples": True,
        "data": {"digits": {"source": "bundled:digits", "limit": 200}},
        "targets": {
            "cnn": {
                "model": "bundled:digits-cnn",
                "finetune": {"data": "digits", "epochs": 10, "batch_size": 32, "lr": 3e-3},
            }
        },
        "audits": [{"use": "utility", "target": "cnn", "params": {"bootstrap": 0}}, *audits],
    }


_CACHE: dict[str, Any] = {}


def build(tmp_factory, model_dir: Path, csv_path: Path) -> dict[str, Any]:
    """Run the recipes once per session; returns {'root', 'base', 'other', 'modules', ...}."""
    if "root" in _CACHE:
        return _CACHE
    reuse = os.environ.get("FMAUDIT_TEST_DASHBOARD_REPORTS")  # developer shortcut: a folder an earlier session built
    if reuse:
        return _reuse(Path(reuse))
    from fmaudit.registry import registry
    from fmaudit.runner import run_recipe

    extra = available_optional(registry)
    root = tmp_factory.mktemp("dash-reports")
    registry.register(LossProbe)
    try:  # registered only while our recipes run, so other tests' contract checks never see it
        base = run_recipe(recipe(model_dir, csv_path, root, name="dash-base", utility={"bootstrap": 50}, extra=extra))
        # Same fine-tune (a cache hit), utility on another sample: Compare has differences to show.
        other = run_recipe(
            recipe(
                model_dir, csv_path, root, name="dash-other", utility={"bootstrap": 50, "max_examples": 37}, extra=[]
            )
        )
    finally:
        registry.unregister(PROBE)
    image_audits = available_optional(registry, IMAGE_AUDITS)
    images = run_recipe(image_recipe(root, image_audits)) if image_audits else None
    runs = {r.name: d for d in root.iterdir() for r in [base, other] if d.name == r.run_id}
    base_dir, other_dir = runs["dash-base"], runs["dash-other"]
    # A report cut short (a disk that filled up), one from an older schema, one interrupted run.
    (root / "corrupt").mkdir()
    text = (base_dir / "report.json").read_text()
    (root / "corrupt" / "report.json").write_text(text[: len(text) // 2])
    (root / "old-schema").mkdir()
    raw = json.loads((other_dir / "report.json").read_text())
    raw["schema_version"] = "0.3"
    raw["legacy_field"] = {"from": "fmaudit 0.0.x"}
    (root / "old-schema" / "report.json").write_text(json.dumps(raw))
    (root / "partial").mkdir()
    shutil.copy(base_dir / "events.jsonl", root / "partial" / "events.jsonl")
    _CACHE.update(
        root=root,
        base=base,
        other=other,
        base_dir=base_dir,
        other_dir=other_dir,
        modules=sorted({a["use"] for a in extra}),
        images=images,
        images_dir=root / images.run_id if images else None,
    )
    return _CACHE


def same_seed_rerun(run_dir: Path, dest: Path, *, slower: float = 1.7, noise: float = 1e-9) -> Path:
    """A second run of the same recipe and seed, as a re-run from the cache leaves it (issue 20's case): a copy of
    `run_dir` with its own run id and a later start, every wall-clock and cost figure `slower` times the original
    (another machine load, a cached fine-tune), and every fractional audit metric off by float noise (relative
    `noise`, far below Compare's 1e-6 tolerance). Compare must show zero audit-metric changes between the two."""
    from datetime import datetime, timedelta

    from fmaudit.compare import is_cost_metric
    from fmaudit.report import load_report, write_report

    shutil.copytree(run_dir, dest)
    rep = load_report(dest)
    rep.run_id = dest.name
    rep.created_at = (datetime.fromisoformat(rep.created_at) + timedelta(hours=1)).isoformat()
    rep.timings = {k: v * slower for k, v in rep.timings.items()}
    for r in rep.audits:
        if r.duration_s is not None:
            r.duration_s *= slower
        for name, m in r.metrics.items():
            if m.value is None:
                continue
            if is_cost_metric(name, m):
                m.value *= slower
            elif not float(m.value).is_integer():  # counts stay counts
                m.value *= 1 + noise
    write_report(rep, dest / "report.json")
    return dest


def _reuse(root: Path) -> dict[str, Any]:
    from fmaudit.report import load_report

    runs = {load_report(d).name: d for d in root.iterdir() if d.name.startswith("dash-")}
    base, other = load_report(runs["dash-base"]), load_report(runs["dash-other"])
    images = load_report(runs["dash-images"]) if "dash-images" in runs else None
    _CACHE.update(
        root=root,
        base=base,
        other=other,
        base_dir=runs["dash-base"],
        other_dir=runs["dash-other"],
        modules=sorted({r.module for r in base.audits} - {"utility", PROBE}),
        images=images,
        images_dir=runs.get("dash-images"),
    )
    return _CACHE
