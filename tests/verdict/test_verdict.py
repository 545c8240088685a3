"""The verdict rules (fmaudit.verdict) on constructed reports (tests/report_fixtures.py): leaky, safe, mixed,
errored units, missing modules."""

from __future__ import annotations

import pytest
from report_fixtures import (
    attribution,
    by_area,
    dp_finetune,
    image_attack,
    leaky_report,
    membership,
    metric,
    report,
    target,
    text_attack,
    unit,
)

from fmaudit.report import ErrorInfo, Finding, GateResult
from fmaudit.verdict import AREAS, COLOURS, verdict_lines


def test_leaky_target_and_its_dp_twin():
    v = by_area(leaky_report())["privacy"]
    assert v.level == "high"  # TPR at 1% FPR clearly above 1%: members singled out
    assert v.text.startswith("Leaks membership: ")
    assert "bert: best attack TPR 12% at 1% FPR [8, 16]" in v.text
    assert "AUC 0.78 vs chance 0.56" in v.text
    assert "DP twin bert-dp (ε=8) indistinguishable from chance (AUC 0.51 vs chance 0.56" in v.text
    assert "DP twin bert-dp trained at ε=8" in v.text and "accuracy 81% vs 90% without DP" in v.text
    # The leak is named before the safe parts.
    assert v.text.index("best attack TPR") < v.text.index("indistinguishable")
    assert v.colour == COLOURS["high"]


def test_auc_above_chance_without_low_fpr_power_is_medium():
    rep = report([membership("bert", auc=0.62, auc_null=0.56, p=0.01, tpr=0.02, tpr_ci=(0.0, 0.05))])
    v = by_area(rep)["privacy"]
    assert v.level == "medium" and v.headline == "Leaks membership"
    assert "TPR 2.0% at 1% FPR [0.0, 5.0]" in v.text and not v.text.startswith("Leaks membership: bert")


def test_the_modules_chance_finding_wins_over_the_raw_numbers():
    # AUC a hair above the null quantile but p > 0.05: the module calls it chance, and so does the verdict.
    rep = report([membership("bert", auc=0.565, auc_null=0.56, p=0.07, tpr=0.02, tpr_ci=(0.0, 0.05), chance=True)])
    v = by_area(rep)["privacy"]
    assert v.level == "ok" and v.headline == "No membership leak detected"
    assert "indistinguishable from chance" in v.text


def test_safe_run_is_ok_and_says_so():
    rep = report(
        [
            membership("bert", auc=0.5, auc_null=0.56, p=0.5, tpr=0.01, tpr_ci=(0.0, 0.03)),
            unit(
                "privacy.canary_audit",
                "bert",
                {
                    "epsilon_lb": metric(0.0, unit="epsilon", better=False),
                    "epsilon_lb_ceiling": metric(3.1, unit="epsilon", better=True),
                },
                [Finding(severity="info", title="No privacy loss detected at this canary count", metric="epsilon_lb")],
                index=1,
            ),
        ]
    )
    v = by_area(rep)["privacy"]
    assert v.level == "ok" and v.colour == COLOURS["ok"]
    assert "canary audit found no privacy loss (ε ≥ 0, ceiling 3.1)" in v.text


def test_canary_proving_more_than_the_accountant_is_critical():
    rep = report(
        [
            dp_finetune("bert", "bert-dp", eps=1.0),
            unit(
                "privacy.canary_audit",
                "bert-dp",
                {
                    "epsilon_lb": metric(2.4, unit="epsilon", better=False),
                    "epsilon_lb_ceiling": metric(5.3, unit="epsilon", better=True),
                    "accountant_epsilon": metric(1.0, unit="epsilon", better=False),
                },
                [
                    Finding(
                        severity="critical",
                        title="Empirical epsilon exceeds the accountant's epsilon",
                        metric="epsilon_lb",
                    )
                ],
                index=1,
            ),
        ],
        [target("bert"), target("bert-dp", produced_by="0:privacy.dp_finetune@bert")],
    )
    v = by_area(rep)["privacy"]
    assert v.level == "critical" and v.headline == "DP guarantee broken"
    assert "canary audit proves ε ≥ 2.4 > ε 1 claimed" in v.text


def test_canary_out_of_reach_and_memorization():
    out_of_reach = unit(
        "privacy.canary_audit",
        "a",
        {
            "epsilon_lb": metric(0.3, unit="epsilon"),
            "epsilon_lb_ceiling": metric(2.0, unit="epsilon"),
            "accountant_epsilon": metric(8.0, unit="epsilon"),
        },
        [Finding(severity="low", title="Audit cannot test epsilon = 8: its ceiling is 2.000", metric="epsilon_lb")],
    )
    memorizes = unit(
        "privacy.canary_audit",
        "b",
        {"epsilon_lb": metric(1.7, unit="epsilon"), "epsilon_lb_ceiling": metric(2.0, unit="epsilon")},
        [Finding(severity="medium", title="Training memorizes individual examples", metric="epsilon_lb")],
        index=1,
    )
    v = by_area(report([out_of_reach, memorizes]))["privacy"]
    assert v.level == "medium" and v.headline == "Memorizes training examples"
    assert "b: canary audit proves ε ≥ 1.7, ceiling 2" in v.text
    assert "a: canary audit cannot test ε = 8 (its ceiling is 2; shows ε ≥ 0.3)" in v.text


def test_shift_and_correlated_references_are_caveats():
    rep = report(
        [
            membership(
                "bert",
                auc=0.7,
                auc_null=0.56,
                p=0.002,
                tpr=0.02,
                tpr_ci=(0.0, 0.05),
                extra_findings=[
                    Finding(
                        severity="medium", title="Members and non-members differ in length", metric="blind_baseline_auc"
                    ),
                    Finding(severity="high", title="Reference models are correlated with the target's membership"),
                ],
            )
        ]
    )
    v = by_area(rep)["privacy"]
    assert v.level == "high"  # medium leak, raised by the invalid references
    assert "split is shifted (length" in v.text and "LiRA / RMIA numbers not valid" in v.text


def test_several_units_on_one_target_show_the_worst():
    rep = report(
        [
            membership("m", auc=0.70, auc_null=0.56, p=0.005, tpr=0.04, tpr_ci=(0.02, 0.12), index=0),
            membership("m", auc=0.80, auc_null=0.56, p=0.005, tpr=0.30, tpr_ci=(0.11, 0.43), index=1),
            membership("m", auc=0.52, auc_null=0.56, p=0.4, tpr=0.01, tpr_ci=(0.0, 0.03), index=2),
        ]
    )
    v = by_area(rep)["privacy"]
    assert v.level == "high" and "TPR 30% at 1% FPR [11, 43]" in v.text and "(worst of 3 units)" in v.text
    assert v.text.count("TPR") == 1


# ---------------------------------------------------------------------------------------------------
# Robustness


def test_character_edits_fool_the_model():
    rep = report([text_attack("bert", "deepwordbug", 0.54), text_attack("bert", "embedding-swap", 0.1, index=1)])
    v = by_area(rep)["robustness"]
    assert v.level == "high"
    assert v.text.startswith("Fooled by character edits: 54% of correct predictions flipped by deepwordbug (of 20)")
    assert "10% of correct predictions flipped by embedding-swap" in v.text  # a second attack, not merged


def test_unverified_successes_and_no_flips():
    v = by_area(report([text_attack("bert", "pruthi", 0.0)]))["robustness"]
    assert v.level == "ok" and v.headline == "Resists character edits" and "0% of correct predictions" in v.text
    v = by_area(report([text_attack("bert", "pruthi", 0.1, unverified=2)]))["robustness"]
    assert v.level == "high" and "2 reported successes did not hold" in v.text


def test_image_attack_reports_the_smallest_budget_that_flips_half():
    v = by_area(report([image_attack()]))["robustness"]
    # at 0.03 the worst attack (fgsm, 0.30) leaves 0.30 / 0.95: 68% flipped
    assert v.level == "high" and v.headline == "Fooled by Linf perturbations"
    assert "68% of correct predictions flipped at Linf ε=0.03 (robust accuracy 30% [25, 35] vs 95% clean)" in v.text


def test_image_attack_sanity_findings_make_it_untrustworthy():
    v = by_area(
        report([image_attack([Finding(severity="high", title="Zero input gradients (possible gradient masking)")])])
    )["robustness"]
    assert v.level == "high" and "not trustworthy: Zero input gradients" in v.text


# ---------------------------------------------------------------------------------------------------
# Explainability and utility


def test_attribution_verdicts():
    v = by_area(report([attribution([])]))["explainability"]
    assert v.level == "ok" and v.headline == "Attributions track the model"
    assert "all 2 method(s) pass the randomization check" in v.text
    assert "1 of 2 beat a random ordering on deletion (integrated_gradients)" in v.text
    v = by_area(report([attribution(["saliency"])]))["explainability"]
    assert v.level == "high" and v.headline == "Attributions unreliable"
    assert "saliency fails the randomization check" in v.text


def test_utility_at_chance_is_flagged():
    rep = report([unit("utility", "bert", {"accuracy": metric(0.52, ci=(0.45, 0.59), better=True)})])
    v = by_area(rep)["utility"]
    assert v.level == "high" and "accuracy 52% [45, 59], not above chance (50%)" in v.text


# ---------------------------------------------------------------------------------------------------
# Errored units, missing modules, gates, mixed runs


def test_missing_modules_are_not_assessed_not_ok():
    vs = by_area(report([unit("utility", "bert", {"accuracy": metric(0.9, ci=(0.85, 0.93))})]))
    assert [v for v in vs] == list(AREAS)
    for area in ("privacy", "robustness", "explainability"):
        assert vs[area].level == "none" and vs[area].text.startswith("Not assessed: no ")
    assert vs["utility"].level == "ok"


def test_errored_units_never_read_as_ok():
    err = ErrorInfo(type="ValueError", message="boom")
    only_error = report([unit("privacy.membership", "bert", status="error", error=err)])
    v = by_area(only_error)["privacy"]
    assert v.level == "error" and "privacy.membership@bert (ValueError) errored" in v.text
    mixed = report(
        [
            membership("bert", auc=0.5, auc_null=0.56, p=0.5, tpr=0.01, tpr_ci=(0.0, 0.03)),
            unit("privacy.canary_audit", "bert", status="error", error=err, index=1),
        ]
    )
    v = by_area(mixed)["privacy"]
    assert v.level == "low" and v.headline.endswith("(incomplete)")
    assert v.text.endswith("incomplete: privacy.canary_audit@bert (ValueError) errored")


def test_failed_gate_raises_the_area():
    gate = GateResult(metric="auc", op="gt", threshold=0.55, value=0.58, passed=False, message="auc 0.58 > 0.55")
    m = membership("bert", auc=0.58, auc_null=0.60, p=0.2, tpr=0.01, tpr_ci=(0.0, 0.03))
    rep = report([m.model_copy(update={"gates": [gate]})])
    v = by_area(rep)["privacy"]
    assert (
        v.level == "high" and v.headline == "Gate failed" and "gate failed: privacy.membership@bert auc 0.58" in v.text
    )


def test_plugin_module_counts_through_its_findings():
    rep = report(
        [
            unit(
                "privacy.my_probe",
                "bert",
                {"score": metric(0.9)},
                [Finding(severity="medium", title="Probe separates members")],
            )
        ]
    )
    v = by_area(rep)["privacy"]
    assert v.level == "medium" and "privacy.my_probe: Probe separates members" in v.text


def test_mixed_run_has_one_line_per_area_with_colours():
    rep = leaky_report()
    rep = rep.model_copy(update={"audits": rep.audits + [text_attack("bert", "deepwordbug", 0.3, index=3)]})
    lines = verdict_lines(rep)
    assert len(lines) == 4
    assert lines[0].startswith("HIGH     privacy        Leaks membership")
    assert lines[1].startswith("MEDIUM   robustness     Fooled by character edits: bert: 30%")
    assert lines[2].startswith("—        explainability Not assessed")
    assert lines[3].startswith(
        "OK       utility        Clean performance: bert: accuracy 90% [86, 93], ECE 0.03; DP twin"
    )
    wrapped = verdict_lines(rep, width=80)
    assert len(wrapped) > 4 and all(len(line) <= 80 for line in wrapped)
    assert all(line.startswith(" " * 9) for line in wrapped if not line.split(" ")[0])
    assert not any(line.rstrip().endswith("[8,") for line in wrapped)  # intervals are not cut in two
    marked = verdict_lines(rep, markup=True)
    assert marked[0].startswith("[bold red]HIGH[/]")


@pytest.mark.parametrize("area", AREAS)
def test_every_area_of_an_empty_run_is_none(area):
    assert by_area(report([]))[area].level == "none"


def test_marked_up_lines_print_within_80_columns_with_rich():
    import io

    from rich.console import Console

    rep = leaky_report()
    rep = rep.model_copy(update={"audits": rep.audits + [text_attack("bert", "[bold]evil[/]", 0.6, index=3)]})
    con = Console(width=80, record=True, color_system="truecolor", force_terminal=True, file=io.StringIO())
    for line in verdict_lines(rep, width=80, markup=True):
        con.print(line, soft_wrap=True, highlight=False)
    text = con.export_text(clear=False)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "[bold]evil[/]" in text  # report text is not markup
    assert text.splitlines()[0].startswith("HIGH     privacy        Leaks membership")
    assert "\x1b[1;31mHIGH" in con.export_text(styles=True)  # the level word in its colour


def test_dp_training_alone_is_not_a_privacy_test():
    v = by_area(report([dp_finetune("bert", "bert-dp")], [target("bert"), target("bert-dp")]))["privacy"]
    assert v.level == "ok" and v.headline == "No privacy attack run"
    assert "DP twin bert-dp trained at ε=8" in v.text


def test_zero_flips_on_a_degenerate_target_is_not_resistance():
    """robustness.text_attack flags a near-constant classifier; its 0% success must not read 'Resists'."""
    u = text_attack("bert", "deepwordbug", 0.0)
    u = u.model_copy(
        update={
            "metrics": u.metrics | {"top_predicted_class_share": metric(0.97)},
            "findings": [
                Finding(
                    severity="high",
                    title="Degenerate target: this attack result says nothing about robustness",
                    detail="one class takes 97% of predictions",
                )
            ],
        }
    )
    v = by_area(report([u]))["robustness"]
    assert v.level == "medium" and v.headline.startswith("Not assessed by deepwordbug")
    assert "97%" in v.text and "says nothing about robustness" in v.text
