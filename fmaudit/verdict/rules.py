"""The verdict rules: one function per module turning a unit's findings, gates and metrics into a `Part`,
registered in `RULES` by module name (a module without a rule counts through `generic_part`).

The rules, per area (the worst part decides the area's level):

- **privacy**
  - ``privacy.membership`` (one part per target). The module calibrates its headline: ``auc`` is measured
    on a held-out half, ``auc_null`` is the 95% quantile of label-permuted AUCs, and the module adds a
    finding titled "Indistinguishable from chance: ..." when the headline does not exceed its null. That
    finding (or, in reports without it, ``auc <= auc_null``) means *no leak detected* (ok). Otherwise the
    target leaks membership: **high** when the lower end of ``tpr_at_1pct_fpr``'s interval is above 1% (the
    attack singles out members at a rate clearly above its false-positive rate), **medium** when only the
    AUC is above chance. Without a null (older reports) the AUC interval decides (lower end above 0.5 =
    leak). A "Members and non-members differ in ..." finding adds a caveat (the leak may be a distribution
    shift); "Reference models are correlated ..." makes the part **high** with "numbers not valid".
  - ``privacy.canary_audit``: the level is the worst of the module's own findings on ``epsilon_lb`` (critical
    = the audit proves more privacy loss than the accountant / the claim allows, medium = a non-private
    model memorizes, low = the audit cannot reach the claimed epsilon, info = ok); the numbers come from
    ``epsilon_lb``, ``epsilon_lb_ceiling`` and ``accountant_epsilon``. Secret canaries (causal LMs) add
    exposure: at least **medium** when the module's "Planted secrets are exposed" finding is there (included
    secrets rank significantly higher than excluded ones), else the numbers say they are not.
  - ``privacy.dp_finetune``: ``epsilon`` and ``accuracy`` vs ``baseline_accuracy``; its non-info findings
    (budget exceeded, delta too large, accuracy below threshold) set the level.
- **robustness**
  - ``robustness.text_attack``: share of correct predictions flipped (``attack_success_rate``), levels as
    the module's: high >= 50%, medium >= 20%, low > 0, ok = 0; unverified successes (a high finding) are
    carried over. ``input-reduction`` is not a flip attack: it is reported, at level ok.
  - ``robustness.image_attack``: per norm, the share of correct predictions flipped =
    1 - worst robust accuracy / clean accuracy, at the *smallest* budget that flips at least half of them
    (if any), else at the largest budget; same thresholds. Any high finding (gradient masking, invalid
    adversarials, non-monotone curves...) makes the part high: its robust accuracies are not trustworthy.
- **explainability** (``explain.attribution``): methods failing the model-parameter randomization check
  (high finding) or incomplete integrated gradients (medium) set the level; the line also says which
  methods remove the output faster than a random ordering (``<method>.deletion_aopc`` vs
  ``random.deletion_aopc``, beyond the random ordering's interval).
- **utility** (``utility``): accuracy with its interval per target (a DP twin next to its source),
  perplexity for language models, ECE. **high** when the accuracy interval does not clear chance
  (1 / number of labels); otherwise ok.
- **Everywhere**: a failed recipe gate on a unit of the area raises it to at least **high** and is named;
  an errored unit is named ("incomplete"), and an area whose units all errored is at level **error** (not
  assessed, never "ok"); an area no module covered is at level **none**. A module without a rule here
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fmaudit.report import AuditResult, Metric, RunReport
from fmaudit.verdict.levels import LEVEL_RANK, Part, worse
from fmaudit.verdict.reading import (
    dp_epsilon,
    fmt_num,
    fmt_pct,
    fmt_pct_ci,
    level_of,
    metric_value,
    target_name,
    who_prefix,
    worst_finding,
)

FLIP_HIGH, FLIP_MEDIUM = 0.5, 0.2  # share of correct predictions flipped (as robustness.text_attack's findings)

CHARACTER_ATTACKS = {"deepwordbug", "pruthi", "hotflip"}
WORD_ATTACKS = {
    "embedding-swap",
    "textfooler",
    "pwws",
    "bae",
    "bert-attack",
    "alzantot",
    "faster-alzantot",
    "iga",
    "pso",
    "clare",
    "kuleshov",
    "checklist",
    "a2t",
    "textbugger",
}
# What each text attack changes, as the headline names it ("Fooled by word substitutions").
ATTACK_KINDS = {**{a: "character edits" for a in CHARACTER_ATTACKS}, **{a: "word substitutions" for a in WORD_ATTACKS}}


# ---------------------------------------------------------------------------------------------------
# Privacy


def _dict(value: Any) -> dict[str, Any]:
    """A report table that should be a mapping, or {} (older or hand-edited reports)."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    """A report table that should be a list, or []."""
    return value if isinstance(value, list) else []


def membership_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    auc, null, p = metric_value(r, "auc"), metric_value(r, "auc_null"), metric_value(r, "auc_p_value")
    tpr_m = r.metrics.get("tpr_at_1pct_fpr")
    tpr = metric_value(r, "tpr_at_1pct_fpr")
    titles = [f.title for f in r.findings]
    chance_finding = any(t.lower().startswith("indistinguishable from chance") for t in titles)
    auc_m = r.metrics.get("auc")
    if chance_finding:
        leak = False
    elif null is not None and auc is not None:
        leak = auc > null
    elif auc_m is not None and auc_m.ci_low is not None:
        leak = auc_m.ci_low > 0.5
    else:
        leak = None
    attack = ""
    strongest = _dict(r.tables.get("strongest_attack"))
    if strongest.get("auc"):
        attack = f" ({strongest['auc']})"
    vs_null = f" vs chance {fmt_num(null)}" if null is not None else ""
    ptxt = f", p={fmt_num(p, 2)}" if p is not None else ""
    caveats = []
    level: str
    if leak is None:
        return Part(
            "low",
            f"{who_prefix(who)}membership attack has no usable headline (no AUC with a null or an interval)",
            units=(r.unit_id,),
        )
    if leak:
        confident = tpr_m is not None and tpr_m.ci_low is not None and tpr_m.ci_low > 0.01
        level = "high" if confident else "medium"
        text = (
            f"{who_prefix(who)}best attack TPR {fmt_pct(tpr)} at 1% FPR{fmt_pct_ci(tpr_m)}, AUC {fmt_num(auc)}{vs_null}{ptxt}"
            + attack
        )
        headline = "Leaks membership"
    else:
        level = "ok"
        text = f"{who + ' ' if who else ''}indistinguishable from chance (AUC {fmt_num(auc)}{vs_null}{ptxt})"
        headline = "No membership leak detected"
    for f in r.findings:
        low = f.title.lower()
        if low.startswith("members and non-members differ"):
            caveats.append(
                "member/non-member split is shifted ("
                + f.title.split(" in ", 1)[-1]
                + f", blind AUC {fmt_num(metric_value(r, 'blind_baseline_auc'))}): part of the signal may be the shift"
            )
        if low.startswith("reference models are correlated"):
            level = worse(level, "high")
            caveats.append("reference models know the answer: LiRA / RMIA numbers not valid")
    if caveats:
        text += "; " + "; ".join(caveats)
    return Part(level, text, headline, (r.unit_id,), weight=tpr if tpr is not None else (auc or 0.0))


def canary_part(report: RunReport, r: AuditResult) -> Part:
    """The epsilon bound's part, and for secret canaries whether the secrets trained on are exposed."""
    part = _canary_bound_part(report, r)
    inc, exc, pv = (
        metric_value(r, "exposure_mean_included"),
        metric_value(r, "exposure_mean_excluded"),
        metric_value(r, "exposure_p_value"),
    )
    if inc is None or exc is None or pv is None:
        return part
    numbers = f"mean exposure {fmt_num(inc)} vs {fmt_num(exc)} bits for the secrets left out, p={fmt_num(pv)}"
    if worst_finding(r.findings, metric="exposure_p_value") is not None:
        level = worse(part.level, "medium")
        return replace(
            part,
            level=level,
            text=f"{part.text}; planted secrets exposed ({numbers})",
            headline=part.headline if level == part.level and part.headline else "Exposes planted secrets",
        )
    return replace(part, text=f"{part.text}; planted secrets not exposed beyond chance ({numbers})")


def _canary_bound_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    lb, top, acc = (
        metric_value(r, "epsilon_lb"),
        metric_value(r, "epsilon_lb_ceiling"),
        metric_value(r, "accountant_epsilon"),
    )
    ref = acc if acc is not None else dp_epsilon(report, r.target)
    f = worst_finding(r.findings, metric="epsilon_lb")
    level = level_of(f)
    ceiling = f", ceiling {fmt_num(top)}" if top is not None else ""
    if level == "critical":
        return Part(
            level,
            f"{who_prefix(who)}canary audit proves ε ≥ {fmt_num(lb)} > ε {fmt_num(ref)} claimed"
            f" — the DP guarantee does not hold",
            "DP guarantee broken",
            (r.unit_id,),
        )
    if level == "medium":
        return Part(
            level,
            f"{who_prefix(who)}canary audit proves ε ≥ {fmt_num(lb)}{ceiling} (memorizes single examples)",
            "Memorizes training examples",
            (r.unit_id,),
        )
    if level == "low" and ref is not None and top is not None and ref > top:
        return Part(
            level,
            f"{who_prefix(who)}canary audit cannot test ε = {fmt_num(ref)} (its ceiling is {fmt_num(top)}; "
            f"shows ε ≥ {fmt_num(lb)})",
            "Privacy claim untested",
            (r.unit_id,),
        )
    if level not in ("ok",):
        return Part(
            level,
            f"{who_prefix(who)}canary audit: {f.title}" if f else f"{who_prefix(who)}canary audit",
            f.title if f else None,
            (r.unit_id,),
        )
    if ref is not None:
        return Part(
            "ok",
            f"{who_prefix(who)}canary audit consistent with ε ≤ {fmt_num(ref)} (shows ε ≥ {fmt_num(lb)}{ceiling})",
            None,
            (r.unit_id,),
        )
    return Part(
        "ok", f"{who_prefix(who)}canary audit found no privacy loss (ε ≥ {fmt_num(lb)}{ceiling})", None, (r.unit_id,)
    )


def dp_part(report: RunReport, r: AuditResult) -> Part:
    eps, delta = metric_value(r, "epsilon"), metric_value(r, "delta")
    acc, base = metric_value(r, "accuracy"), metric_value(r, "baseline_accuracy")
    ppl, base_ppl = metric_value(r, "perplexity"), metric_value(r, "baseline_perplexity")
    bad = [f for f in r.findings if f.severity != "info"]
    level = worse("ok", *[f.severity for f in bad]) if bad else "ok"
    twin = r.produces or r.target
    text = f"DP twin {twin} trained at ε={fmt_num(eps, 2)}" + (f", δ={delta:.0e}" if delta else "")
    if acc is not None:
        text += f": accuracy {fmt_pct(acc)}" + (f" vs {fmt_pct(base)} without DP" if base is not None else "")
    elif ppl is not None:
        text += f": perplexity {fmt_num(ppl)}" + (f" vs {fmt_num(base_ppl)} without DP" if base_ppl is not None else "")
    if bad:
        text += "; " + "; ".join(f.title for f in sorted(bad, key=lambda f: LEVEL_RANK[f.severity]))
    headline = bad[0].title if bad and level in ("critical", "high") else None
    return Part(level, text, headline, (r.unit_id,))


# ---------------------------------------------------------------------------------------------------
# Robustness


def _attack_kind(attack: str) -> str:
    return ATTACK_KINDS.get(attack.lower(), f"{attack} edits")


def text_attack_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    attack = str(r.params.get("attack") or (r.tables.get("attack") or {}).get("name") or "attack")
    rate = metric_value(r, "attack_success_rate")
    clean, under = metric_value(r, "clean_accuracy"), metric_value(r, "accuracy_under_attack")
    n = metric_value(r, "num_attacked")
    if attack == "input-reduction":
        words = metric_value(r, "avg_perturbed_word_pct")
        return Part(
            "ok",
            f"{who_prefix(who)}input reduction keeps {fmt_pct(rate)} of correct predictions after removing "
            f"{fmt_num(words, 2)}% of words on average",
            None,
            (r.unit_id,),
        )
    if rate is None:
        return Part(
            "medium",
            f"{who_prefix(who)}nothing to attack with {attack} (no correctly classified example)",
            None,
            (r.unit_id,),
        )
    level = "high" if rate >= FLIP_HIGH else "medium" if rate >= FLIP_MEDIUM else "low" if rate > 0 else "ok"
    kind = _attack_kind(attack)
    text = f"{who_prefix(who)}{fmt_pct(rate)} of correct predictions flipped by {attack}"
    if n is not None:
        text += f" (of {n:.0f})"
    if clean is not None and under is not None:
        text += f", accuracy {fmt_pct(clean)} → {fmt_pct(under)}"
    unverified = metric_value(r, "num_unverified")
    if unverified:
        level = worse(level, "high")
        text += f"; {unverified:.0f} reported successes did not hold when re-run"
    degenerate = any(f.title.startswith("Degenerate target") for f in r.findings)
    if degenerate and level == "ok":
        # a near-constant classifier cannot be flipped: 0% success says nothing about robustness
        share = metric_value(r, "top_predicted_class_share")
        text += (
            f"; but the target is degenerate (one class takes {fmt_pct(share)} of predictions, or accuracy is "
            "at the majority rate), so this says nothing about robustness"
            if share is not None
            else "; but the target is degenerate, so this says nothing about robustness"
        )
        return Part(
            "medium",
            text,
            f"Not assessed by {attack} (degenerate target)",
            (r.unit_id,),
            weight=0.0,
            key=(r.module, r.target, attack),
        )
    headline = f"Fooled by {kind}" if level in ("high", "medium", "low") else f"Resists {kind}"
    return Part(level, text, headline, (r.unit_id,), weight=rate, key=(r.module, r.target, attack))


def _norm_points(r: AuditResult) -> dict[str, list[tuple[float, float, Metric, str]]]:
    """norm -> [(epsilon, robust accuracy, metric, name)], the worst over attacks at each budget."""
    from collections import defaultdict

    attacks = _list(r.tables.get("attacks"))
    norm_of = {str(a.get("label")): str(a.get("norm")) for a in attacks if isinstance(a, dict)}
    per: dict[tuple[str, float], tuple[float, Metric, str]] = {}
    for n, m in r.metrics.items():
        if m.value is None or "@" not in n:
            continue
        if n.startswith("robust_accuracy.") and "large_budget" not in n:
            lab, eps_s = n[len("robust_accuracy.") :].rsplit("@", 1)
            norm = norm_of.get(lab, "?")
        elif n.startswith("worst_robust_accuracy."):
            norm_s, eps_s = n[len("worst_robust_accuracy.") :].rsplit("@", 1)
            norm = next((v for v in norm_of.values() if v.lower() == norm_s), norm_s)
        else:
            continue
        try:
            eps = float(eps_s)
        except ValueError:
            continue
        cur = per.get((norm, eps))
        if cur is None or m.value < cur[0]:
            per[(norm, eps)] = (m.value, m, n)
    out: dict[str, list[tuple[float, float, Metric, str]]] = defaultdict(list)
    for (norm, eps), (v, m, n) in sorted(per.items()):
        out[norm].append((eps, v, m, n))
    return dict(out)


def image_attack_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    clean = metric_value(r, "clean_accuracy")
    pieces, level, headline = [], "ok", None
    if clean:
        for norm, pts in _norm_points(r).items():
            chosen = next((p for p in pts if 1 - p[1] / clean >= FLIP_HIGH), pts[-1])
            eps, acc, m, _ = chosen
            flipped = max(0.0, 1 - acc / clean)
            lvl = (
                "high"
                if flipped >= FLIP_HIGH
                else "medium"
                if flipped >= FLIP_MEDIUM
                else "low"
                if flipped > 0
                else "ok"
            )
            if LEVEL_RANK[lvl] < LEVEL_RANK[level]:
                level, headline = lvl, f"Fooled by {norm} perturbations"
            pieces.append(
                f"{fmt_pct(flipped)} of correct predictions flipped at {norm} ε={eps:g} "
                f"(robust accuracy {fmt_pct(acc)}{fmt_pct_ci(m)} vs {fmt_pct(clean)} clean)"
            )
    if not pieces:
        pieces.append("no robust accuracy to compare with clean accuracy")
        level = "low"
    if headline is None:
        headline = "Resists the image attacks"
    text = f"{who_prefix(who)}" + "; ".join(pieces)
    sanity = [f for f in r.findings if f.severity in ("critical", "high")]
    if sanity:
        level = worse(level, "high")
        text += f"; not trustworthy: {sanity[0].title}" + (f" (+{len(sanity) - 1} more)" if len(sanity) > 1 else "")
    return Part(level, text, headline, (r.unit_id,))


# ---------------------------------------------------------------------------------------------------
# Explainability


def attribution_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    methods = sorted({n.split(".", 1)[0] for n in r.metrics if "." in n and not n.startswith("random.")})
    rand = _dict(r.tables.get("randomization"))
    failing = [str(m) for m in (rand.get("failing_methods") or [])]
    if not failing:
        failing = [
            f.title.split(" fails ", 1)[0]
            for f in r.findings
            if "randomization check" in f.title and f.severity in ("high", "critical")
        ]
    rnd = r.metrics.get("random.deletion_aopc")
    faithful = []
    for m in methods:
        d = r.metrics.get(f"{m}.deletion_aopc")
        if d is None or d.value is None or rnd is None or rnd.value is None:
            continue
        bar = rnd.ci_high if rnd.ci_high is not None else rnd.value
        if d.value > bar:
            faithful.append(m)
    bad = [f for f in r.findings if f.severity not in ("info",)]
    level = worse("ok", *[f.severity for f in bad]) if bad else "ok"
    pieces = []
    if failing:
        level = worse(level, "high")
        pieces.append(
            f"{', '.join(failing)} fail{'s' if len(failing) == 1 else ''} the randomization check "
            "(attributions barely depend on the weights)"
        )
    elif rand:
        pieces.append(f"all {len(methods)} method(s) pass the randomization check")
    if rnd is not None and methods:
        pieces.append(
            f"{len(faithful)} of {len(methods)} beat a random ordering on deletion"
            + (f" ({', '.join(faithful)})" if faithful and len(faithful) < len(methods) else "")
        )
    others = [f.title for f in bad if "randomization check" not in f.title]
    if others:
        pieces.append(others[0] + (f" (+{len(others) - 1} more)" if len(others) > 1 else ""))
    if level in ("critical", "high"):
        headline = "Attributions unreliable"
    elif level in ("medium", "low"):
        headline = "Attributions partly reliable"
    else:
        headline = "Attributions track the model"
    return Part(level, who_prefix(who) + ("; ".join(pieces) or "attributions computed"), headline, (r.unit_id,))


# ---------------------------------------------------------------------------------------------------
# Utility


def utility_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    acc_m = r.metrics.get("accuracy")
    ppl = metric_value(r, "perplexity")
    pieces, level = [], "ok"
    if acc_m is not None and acc_m.value is not None:
        pieces.append(f"accuracy {fmt_pct(acc_m.value)}{fmt_pct_ci(acc_m)}")
        t = report.targets.get(r.target)
        k = t.num_labels if t is not None else None
        if k:
            chance = 1.0 / k
            top = acc_m.ci_low if acc_m.ci_low is not None else acc_m.value
            if top <= chance:
                level = "high"
                pieces[-1] += f", not above chance ({fmt_pct(chance)})"
    if ppl is not None:
        pieces.append(f"perplexity {fmt_num(ppl)}")
    ece = metric_value(r, "ece")
    if ece is not None:
        pieces.append(f"ECE {fmt_num(ece, 2)}")
    if not pieces:
        pieces.append("no headline metric")
    return Part(
        level,
        f"{who_prefix(who)}" + ", ".join(pieces),
        "No better than chance" if level == "high" else None,
        (r.unit_id,),
    )


def generic_part(report: RunReport, r: AuditResult) -> Part:
    f = worst_finding(r.findings)
    level = level_of(f)
    who = target_name(report, r.target)
    if f is None or level == "ok":
        return Part("ok", f"{who_prefix(who)}{r.module} found nothing above info", None, (r.unit_id,))
    return Part(level, f"{who_prefix(who)}{r.module}: {f.title}", f.title, (r.unit_id,))


# The registry: module name -> its rule.
RULES: dict[str, Callable[[RunReport, AuditResult], Part]] = {
    "privacy.membership": membership_part,
    "privacy.canary_audit": canary_part,
    "privacy.dp_finetune": dp_part,
    "robustness.text_attack": text_attack_part,
    "robustness.image_attack": image_attack_part,
    "explain.attribution": attribution_part,
    "utility": utility_part,
}

DEFAULT_HEADLINES = {
    "privacy": "No privacy leak detected",
    "robustness": "Robust to the attacks run",
    "explainability": "Attributions track the model",
    "utility": "Clean performance",
}
