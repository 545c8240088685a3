"""Constructed reports for the tests of report readers (verdicts, compare, dashboard, CLI summary).

The metric names, units and finding titles are those the real modules write (privacy.membership's
calibrated headline, privacy.canary_audit's canary_findings, privacy.dp_finetune, robustness.*,
explain.attribution, utility)."""

from __future__ import annotations

from typing import Any

from fmaudit.report import AuditResult, ErrorInfo, Finding, GateResult, HostInfo, Metric, RunReport, TargetInfo
from fmaudit.verdict import verdicts


def metric(
    value: float | None,
    *,
    ci: tuple[float, float] | None = None,
    unit: str | None = "fraction",
    better: bool | None = None,
    description: str | None = None,
) -> Metric:
    return Metric(
        value=value,
        higher_is_better=better,
        ci_low=ci[0] if ci else None,
        ci_high=ci[1] if ci else None,
        ci_level=0.95 if ci else None,
        unit=unit,
        description=description,
    )


def unit(
    module: str,
    target: str,
    metrics: dict[str, Metric] | None = None,
    findings: list[Finding] | None = None,
    *,
    index: int = 0,
    status: str = "ok",
    error: ErrorInfo | None = None,
    produces: str | None = None,
    params: dict[str, Any] | None = None,
    tables: dict[str, Any] | None = None,
    gates: list[GateResult] | None = None,
) -> AuditResult:
    return AuditResult(
        unit_id=f"{index}:{module}@{target}",
        audit_index=index,
        module=module,
        category=module.split(".")[0],
        target=target,
        status=status,
        metrics=metrics or {},
        findings=findings or [],
        error=error,
        produces=produces,
        params=params or {},
        tables=tables or {},
        gates=gates or [],
    )


def target(name: str, num_labels: int = 2, produced_by: str | None = None) -> TargetInfo:
    return TargetInfo(
        name=name,
        kind="text-classification",
        source="bundled",
        architecture="bert",
        num_parameters=1000,
        weights_sha256="0" * 64,
        capabilities=["logits"],
        num_labels=num_labels,
        produced_by=produced_by,
    )


def report(audits: list[AuditResult], targets: list[TargetInfo] | None = None, **kw: Any) -> RunReport:
    names = {a.target for a in audits} | {a.produces for a in audits if a.produces}
    tg = {t.name: t for t in (targets or [target(n) for n in sorted(names)])}
    return RunReport(
        run_id="run-1",
        name="constructed",
        fmaudit_version="0",
        created_at="2026-12-01T00:00:00Z",
        seed=0,
        recipe={},
        recipe_sha256="0" * 64,
        host=HostInfo(hostname="h", platform="p", python="3.11", cpu_count=2, device="cpu"),
        versions={},
        targets=tg,
        audits=audits,
        **kw,
    )


def membership(
    target_name: str,
    *,
    auc: float,
    auc_null: float,
    p: float,
    tpr: float,
    tpr_ci: tuple[float, float],
    index: int = 0,
    chance: bool | None = None,
    extra_findings: list[Finding] | None = None,
) -> AuditResult:
    """A privacy.membership result as the module writes it (headline metrics and its headline finding)."""
    chance = auc <= auc_null if chance is None else chance
    title = (
        f"Indistinguishable from chance: strongest attack rmia AUC {auc:.3f} [0.45, 0.56]"
        if chance
        else f"Strongest attack: rmia with AUC {auc:.3f} [0.70, 0.80]"
    )
    return unit(
        "privacy.membership",
        target_name,
        {
            "rmia.auc": metric(auc, ci=(auc - 0.05, auc + 0.05), better=False),
            "auc": metric(auc, ci=(auc - 0.05, auc + 0.05), better=False),
            "tpr_at_1pct_fpr": metric(tpr, ci=tpr_ci, better=False),
            "tpr_at_0.1pct_fpr": metric(tpr / 2, better=False),
            "auc_null": metric(auc_null, better=False),
            "auc_p_value": metric(p, unit="probability", better=True),
            "tpr_at_1pct_fpr_null": metric(0.03, better=False),
            "reference_cost_ratio": metric(0.3, unit="ratio", better=False),
            "num_members": metric(200, unit="examples"),
            "num_nonmembers": metric(200, unit="examples"),
        },
        [Finding(severity="info", title=title, metric="auc"), *(extra_findings or [])],
        index=index,
        tables={"strongest_attack": {"auc": "rmia", "tpr_at_1pct_fpr": "rmia"}},
    )


def dp_finetune(
    source: str,
    twin: str,
    *,
    eps: float = 8.0,
    acc: float = 0.81,
    base: float = 0.90,
    findings: list[Finding] | None = None,
    index: int = 0,
) -> AuditResult:
    return unit(
        "privacy.dp_finetune",
        source,
        {
            "epsilon": metric(eps, unit="epsilon", better=False),
            "delta": metric(1e-5, unit=None, better=False),
            "accuracy": metric(acc, better=True),
            "baseline_accuracy": metric(base, better=True),
            "train_seconds": metric(12.3, unit="seconds"),
        },
        [
            Finding(severity="info", title=f"DP fine-tuned: epsilon {eps:.2f} at delta 1e-05", metric="epsilon"),
            *(findings or []),
        ],
        produces=twin,
        index=index,
    )


def leaky_report() -> RunReport:
    """bert leaks membership (TPR 12% [8, 16] at 1% FPR, far above its null); its DP twin does not."""
    return report(
        [
            dp_finetune("bert", "bert-dp", index=0),
            membership("bert", auc=0.78, auc_null=0.56, p=0.002, tpr=0.12, tpr_ci=(0.08, 0.16), index=1),
            membership("bert-dp", auc=0.51, auc_null=0.56, p=0.41, tpr=0.012, tpr_ci=(0.0, 0.04), index=1),
            unit(
                "utility",
                "bert",
                {
                    "accuracy": metric(0.9, ci=(0.86, 0.93), better=True),
                    "ece": metric(0.03, better=False),
                    "nll": metric(0.31, unit="nats", better=False),
                },
                index=2,
            ),
            unit("utility", "bert-dp", {"accuracy": metric(0.81, ci=(0.76, 0.85), better=True)}, index=2),
        ],
        [target("bert"), target("bert-dp", produced_by="0:privacy.dp_finetune@bert")],
    )


def by_area(rep: RunReport):
    return {v.area: v for v in verdicts(rep)}


# ---------------------------------------------------------------------------------------------------
# Privacy


def text_attack(target_name: str, attack: str, rate: float | None, *, clean=0.9, n=20, index=0, unverified=0):
    under = None if rate is None else clean * (1 - rate)
    return unit(
        "robustness.text_attack",
        target_name,
        {
            "clean_accuracy": metric(clean, better=True),
            "accuracy_under_attack": metric(under, better=True),
            "attack_success_rate": metric(rate, better=False),
            "num_attacked": metric(n, unit="examples"),
            "num_unverified": metric(unverified, unit="examples"),
            "wall_time_per_example_s": metric(0.4, unit="seconds", better=False),
        },
        params={"attack": attack},
        index=index,
    )


def image_attack(findings: list[Finding] | None = None) -> AuditResult:
    ms = {"clean_accuracy": metric(0.95, ci=(0.9, 0.98), better=True)}
    for eps, a, b in ((0.01, 0.80, 0.85), (0.03, 0.40, 0.30), (0.1, 0.02, 0.0)):
        ms[f"robust_accuracy.pgd@{eps:g}"] = metric(a, ci=(a - 0.05, a + 0.05), better=True)
        ms[f"robust_accuracy.fgsm@{eps:g}"] = metric(b, ci=(max(0, b - 0.05), b + 0.05), better=True)
    ms["robust_accuracy.large_budget_pgd_linf@0.5"] = metric(0.0)
    ms["attack_seconds.pgd"] = metric(3.2, unit="seconds")
    return unit(
        "robustness.image_attack",
        "cnn",
        ms,
        findings,
        tables={"attacks": [{"label": "pgd", "norm": "Linf"}, {"label": "fgsm", "norm": "Linf"}]},
    )


def attribution(failing: list[str]) -> AuditResult:
    ms = {
        "random.deletion_aopc": metric(0.01, ci=(0.0, 0.02), unit="probability", better=True),
        "integrated_gradients.deletion_aopc": metric(0.2, ci=(0.15, 0.25), unit="probability", better=True),
        "saliency.deletion_aopc": metric(0.015, unit="probability", better=True),
        "integrated_gradients.seconds_per_example": metric(0.5, unit="seconds"),
    }
    fs = [Finding(severity="high", title=f"{m} fails the model-parameter randomization check") for m in failing]
    return unit(
        "explain.attribution", "bert", ms, fs, tables={"randomization": {"threshold": 0.5, "failing_methods": failing}}
    )
