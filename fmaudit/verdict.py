"""One verdict per area (privacy, robustness, explainability, utility), derived from a `RunReport`.

Every rule that turns findings, gates and metrics into "what should a reviewer conclude" lives here, as pure
functions over the report (standard library and `fmaudit.report` only: the dashboard, the HTML export and
the terminal summary all call it and none of them pays for torch).

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
    ``epsilon_lb``, ``epsilon_lb_ceiling`` and ``accountant_epsilon``.
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
  (a plugin) counts through its worst non-info finding.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field, replace
from typing import Iterable

from fmaudit.report import AuditResult, Finding, Metric, RunReport

AREAS = ("privacy", "robustness", "explainability", "utility")
AREA_OF_CATEGORY = {"privacy": "privacy", "robustness": "robustness", "explain": "explainability",
                    "explainability": "explainability", "utility": "utility"}

# Levels, worst first. critical..low are the report's severities; ok = assessed and nothing found;
# error = every unit of the area errored; none = no module covered the area.
LEVELS = ("critical", "high", "medium", "low", "error", "ok", "none")
LEVEL_RANK = {lvl: i for i, lvl in enumerate(LEVELS)}
COLOURS = {"critical": "#8b0000", "high": "#d62728", "medium": "#ff7f0e", "low": "#c9a227", "error": "#6b21a8",
           "ok": "#2ca02c", "none": "#8c8c8c"}
# Colour of the level in a terminal (rich markup styles).
TERMINAL_STYLES = {"critical": "bold white on red", "high": "bold red", "medium": "dark_orange", "low": "yellow",
                   "error": "magenta", "ok": "green", "none": "dim"}
LEVEL_WORDS = {"critical": "CRITICAL", "high": "HIGH", "medium": "MEDIUM", "low": "LOW", "error": "ERROR", "ok": "OK",
               "none": "—"}

FLIP_HIGH, FLIP_MEDIUM = 0.5, 0.2  # share of correct predictions flipped (as robustness.text_attack's findings)

CHARACTER_ATTACKS = {"deepwordbug", "pruthi", "hotflip"}
WORD_ATTACKS = {"embedding-swap", "textfooler", "pwws", "bae", "bert-attack", "alzantot", "faster-alzantot", "iga",
                "pso", "clare", "kuleshov", "checklist", "a2t", "textbugger"}


@dataclass(frozen=True)
class Part:
    """What one unit (or a group of units on one target) says."""

    level: str
    text: str
    headline: str | None = None  # the phrase that leads the area's line when this part is its worst
    units: tuple[str, ...] = ()
    weight: float = 0.0  # among parts of one level and key, the largest is the worst (e.g. TPR, share flipped)
    key: tuple[str, ...] = ()  # parts with the same key (module, target[, attack]) are merged: the worst is shown


@dataclass(frozen=True)
class Verdict:
    area: str
    level: str
    headline: str
    text: str  # one line: the headline, then the numbers behind it
    parts: tuple[Part, ...] = field(default_factory=tuple)

    @property
    def colour(self) -> str:
        return COLOURS[self.level]

    @property
    def line(self) -> str:
        return f"{self.area}: {self.text}"


# ---------------------------------------------------------------------------------------------------
# Small helpers


def worse(*levels: str) -> str:
    """The worst of some levels (critical first)."""
    return min(levels, key=lambda lvl: LEVEL_RANK.get(lvl, len(LEVELS)))


def _val(r: AuditResult, name: str) -> float | None:
    m = r.metrics.get(name)
    return None if m is None or m.value is None or not math.isfinite(m.value) else m.value


def _pct(v: float | None) -> str:
    if v is None:
        return "?"
    p = 100 * v
    return f"{p:.0f}%" if abs(p) >= 10 or p == 0 else f"{p:.1f}%"


def _pct_ci(m: Metric | None) -> str:
    """' [8, 16]' in percent, or ''."""
    if m is None or m.ci_low is None or m.ci_high is None:
        return ""
    lo, hi = 100 * m.ci_low, 100 * m.ci_high
    f = (lambda v: f"{v:.0f}") if max(abs(lo), abs(hi)) >= 10 else (lambda v: f"{v:.1f}")
    return f" [{f(lo)}, {f(hi)}]"


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "?"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def _area(r: AuditResult) -> str | None:
    cat = r.category or r.module.split(".")[0]
    return AREA_OF_CATEGORY.get(cat) or AREA_OF_CATEGORY.get(r.module.split(".")[0])


def _worst_finding(findings: Iterable[Finding], *, metric: str | None = None) -> Finding | None:
    fs = [f for f in findings if metric is None or f.metric == metric]
    return min(fs, key=lambda f: LEVEL_RANK[f.severity] if f.severity in LEVEL_RANK else 99, default=None)


def _sev(f: Finding | None) -> str:
    """A finding's severity as a level (info = ok)."""
    return "ok" if f is None or f.severity == "info" else f.severity


def dp_twins(report: RunReport) -> dict[str, str]:
    """Targets produced by differentially private fine-tuning in this run -> the target they were tuned from."""
    out: dict[str, str] = {}
    for r in report.audits:
        if r.produces and r.module.split(".")[0] == "privacy" and "dp" in r.module.split(".")[-1]:
            out[r.produces] = r.target
    return out


def _dp_epsilon(report: RunReport, target: str) -> float | None:
    for r in report.audits:
        if r.produces == target and r.status == "ok" and "dp" in r.module.split(".")[-1]:
            return _val(r, "epsilon")
    return None


def target_name(report: RunReport, target: str) -> str:
    """'bert', or 'DP twin bert-dp (ε=8)' for a target DP fine-tuning produced; '' when the run audits a single
    target (naming it on every line says nothing)."""
    twins = dp_twins(report)
    if target in twins:
        eps = _dp_epsilon(report, target)
        return f"DP twin {target}" + (f" (ε={_num(eps, 2)})" if eps is not None else "")
    audited = {r.target for r in report.audits}
    return "" if len(audited) <= 1 else target


def _pre(who: str) -> str:
    return f"{who}: " if who else ""


# ---------------------------------------------------------------------------------------------------
# Privacy


def membership_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    auc, null, p = _val(r, "auc"), _val(r, "auc_null"), _val(r, "auc_p_value")
    tpr_m = r.metrics.get("tpr_at_1pct_fpr")
    tpr = _val(r, "tpr_at_1pct_fpr")
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
    strongest = r.tables.get("strongest_attack") if isinstance(r.tables.get("strongest_attack"), dict) else {}
    if strongest.get("auc"):
        attack = f" ({strongest['auc']})"
    vs_null = f" vs chance {_num(null)}" if null is not None else ""
    ptxt = f", p={_num(p, 2)}" if p is not None else ""
    caveats = []
    level: str
    if leak is None:
        return Part("low", f"{_pre(who)}membership attack has no usable headline (no AUC with a null or an interval)",
                    units=(r.unit_id,))
    if leak:
        confident = tpr_m is not None and tpr_m.ci_low is not None and tpr_m.ci_low > 0.01
        level = "high" if confident else "medium"
        text = (f"{_pre(who)}best attack TPR {_pct(tpr)} at 1% FPR{_pct_ci(tpr_m)}, AUC {_num(auc)}{vs_null}{ptxt}"
                + attack)
        headline = "Leaks membership"
    else:
        level = "ok"
        text = f"{who + ' ' if who else ''}indistinguishable from chance (AUC {_num(auc)}{vs_null}{ptxt})"
        headline = "No membership leak detected"
    for f in r.findings:
        low = f.title.lower()
        if low.startswith("members and non-members differ"):
            caveats.append("member/non-member split is shifted (" + f.title.split(" in ", 1)[-1]
                           + f", blind AUC {_num(_val(r, 'blind_baseline_auc'))}): part of the signal may be the shift")
        if low.startswith("reference models are correlated"):
            level = worse(level, "high")
            caveats.append("reference models know the answer: LiRA / RMIA numbers not valid")
    if caveats:
        text += "; " + "; ".join(caveats)
    return Part(level, text, headline, (r.unit_id,), weight=tpr if tpr is not None else (auc or 0.0))


def canary_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    lb, top, acc = _val(r, "epsilon_lb"), _val(r, "epsilon_lb_ceiling"), _val(r, "accountant_epsilon")
    ref = acc if acc is not None else _dp_epsilon(report, r.target)
    f = _worst_finding(r.findings, metric="epsilon_lb")
    level = _sev(f)
    ceiling = f", ceiling {_num(top)}" if top is not None else ""
    if level == "critical":
        return Part(level, f"{_pre(who)}canary audit proves ε ≥ {_num(lb)} > ε {_num(ref)} claimed"
                           f" — the DP guarantee does not hold", "DP guarantee broken", (r.unit_id,))
    if level == "medium":
        return Part(level, f"{_pre(who)}canary audit proves ε ≥ {_num(lb)}{ceiling} (memorizes single examples)",
                    "Memorizes training examples", (r.unit_id,))
    if level == "low" and ref is not None and top is not None and ref > top:
        return Part(level, f"{_pre(who)}canary audit cannot test ε = {_num(ref)} (its ceiling is {_num(top)}; "
                           f"shows ε ≥ {_num(lb)})", "Privacy claim untested", (r.unit_id,))
    if level not in ("ok",):
        return Part(level, f"{_pre(who)}canary audit: {f.title}" if f else f"{_pre(who)}canary audit", f.title if f else None,
                    (r.unit_id,))
    if ref is not None:
        return Part("ok", f"{_pre(who)}canary audit consistent with ε ≤ {_num(ref)} (shows ε ≥ {_num(lb)}{ceiling})",
                    None, (r.unit_id,))
    return Part("ok", f"{_pre(who)}canary audit found no privacy loss (ε ≥ {_num(lb)}{ceiling})", None, (r.unit_id,))


def dp_part(report: RunReport, r: AuditResult) -> Part:
    eps, delta = _val(r, "epsilon"), _val(r, "delta")
    acc, base = _val(r, "accuracy"), _val(r, "baseline_accuracy")
    ppl, base_ppl = _val(r, "perplexity"), _val(r, "baseline_perplexity")
    bad = [f for f in r.findings if f.severity != "info"]
    level = worse("ok", *[f.severity for f in bad]) if bad else "ok"
    twin = r.produces or r.target
    text = f"DP twin {twin} trained at ε={_num(eps, 2)}" + (f", δ={delta:.0e}" if delta else "")
    if acc is not None:
        text += f": accuracy {_pct(acc)}" + (f" vs {_pct(base)} without DP" if base is not None else "")
    elif ppl is not None:
        text += f": perplexity {_num(ppl)}" + (f" vs {_num(base_ppl)} without DP" if base_ppl is not None else "")
    if bad:
        text += "; " + "; ".join(f.title for f in sorted(bad, key=lambda f: LEVEL_RANK[f.severity]))
    headline = bad[0].title if bad and level in ("critical", "high") else None
    return Part(level, text, headline, (r.unit_id,))


# ---------------------------------------------------------------------------------------------------
# Robustness


def _attack_kind(attack: str) -> str:
    a = attack.lower()
    if a in CHARACTER_ATTACKS:
        return "character edits"
    if a in WORD_ATTACKS:
        return "word substitutions"
    return f"{attack} edits"


def text_attack_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    attack = str(r.params.get("attack") or (r.tables.get("attack") or {}).get("name") or "attack")
    rate = _val(r, "attack_success_rate")
    clean, under = _val(r, "clean_accuracy"), _val(r, "accuracy_under_attack")
    n = _val(r, "num_attacked")
    if attack == "input-reduction":
        words = _val(r, "avg_perturbed_word_pct")
        return Part("ok", f"{_pre(who)}input reduction keeps {_pct(rate)} of correct predictions after removing "
                          f"{_num(words, 2)}% of words on average", None, (r.unit_id,))
    if rate is None:
        return Part("medium", f"{_pre(who)}nothing to attack with {attack} (no correctly classified example)", None,
                    (r.unit_id,))
    level = ("high" if rate >= FLIP_HIGH else "medium" if rate >= FLIP_MEDIUM else "low" if rate > 0 else "ok")
    kind = _attack_kind(attack)
    text = f"{_pre(who)}{_pct(rate)} of correct predictions flipped by {attack}"
    if n is not None:
        text += f" (of {n:.0f})"
    if clean is not None and under is not None:
        text += f", accuracy {_pct(clean)} → {_pct(under)}"
    unverified = _val(r, "num_unverified")
    if unverified:
        level = worse(level, "high")
        text += f"; {unverified:.0f} reported successes did not hold when re-run"
    degenerate = any(f.title.startswith("Degenerate target") for f in r.findings)
    if degenerate and level == "ok":
        # a near-constant classifier cannot be flipped: 0% success says nothing about robustness
        share = _val(r, "top_predicted_class_share")
        text += (f"; but the target is degenerate (one class takes {_pct(share)} of predictions, or accuracy is "
                 "at the majority rate), so this says nothing about robustness" if share is not None else
                 "; but the target is degenerate, so this says nothing about robustness")
        return Part("medium", text, f"Not assessed by {attack} (degenerate target)", (r.unit_id,), weight=0.0,
                    key=(r.module, r.target, attack))
    headline = f"Fooled by {kind}" if level in ("high", "medium", "low") else f"Resists {kind}"
    return Part(level, text, headline, (r.unit_id,), weight=rate, key=(r.module, r.target, attack))


def _norm_points(r: AuditResult) -> dict[str, list[tuple[float, float, Metric, str]]]:
    """norm -> [(epsilon, robust accuracy, metric, name)], the worst over attacks at each budget."""
    from collections import defaultdict

    attacks = r.tables.get("attacks") if isinstance(r.tables.get("attacks"), list) else []
    norm_of = {str(a.get("label")): str(a.get("norm")) for a in attacks if isinstance(a, dict)}
    per: dict[tuple[str, float], tuple[float, Metric, str]] = {}
    for n, m in r.metrics.items():
        if m.value is None or "@" not in n:
            continue
        if n.startswith("robust_accuracy.") and "large_budget" not in n:
            lab, eps_s = n[len("robust_accuracy."):].rsplit("@", 1)
            norm = norm_of.get(lab, "?")
        elif n.startswith("worst_robust_accuracy."):
            norm_s, eps_s = n[len("worst_robust_accuracy."):].rsplit("@", 1)
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
    clean = _val(r, "clean_accuracy")
    pieces, level, headline = [], "ok", None
    if clean:
        for norm, pts in _norm_points(r).items():
            chosen = next((p for p in pts if 1 - p[1] / clean >= FLIP_HIGH), pts[-1])
            eps, acc, m, _ = chosen
            flipped = max(0.0, 1 - acc / clean)
            lvl = ("high" if flipped >= FLIP_HIGH else "medium" if flipped >= FLIP_MEDIUM else "low" if flipped > 0
                   else "ok")
            if LEVEL_RANK[lvl] < LEVEL_RANK[level]:
                level, headline = lvl, f"Fooled by {norm} perturbations"
            pieces.append(f"{_pct(flipped)} of correct predictions flipped at {norm} ε={eps:g} "
                          f"(robust accuracy {_pct(acc)}{_pct_ci(m)} vs {_pct(clean)} clean)")
    if not pieces:
        pieces.append("no robust accuracy to compare with clean accuracy")
        level = "low"
    if headline is None:
        headline = "Resists the image attacks"
    text = f"{_pre(who)}" + "; ".join(pieces)
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
    rand = r.tables.get("randomization") if isinstance(r.tables.get("randomization"), dict) else {}
    failing = [str(m) for m in (rand.get("failing_methods") or [])]
    if not failing:
        failing = [f.title.split(" fails ", 1)[0] for f in r.findings if "randomization check" in f.title
                   and f.severity in ("high", "critical")]
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
        pieces.append(f"{', '.join(failing)} fail{'s' if len(failing) == 1 else ''} the randomization check "
                      "(attributions barely depend on the weights)")
    elif rand:
        pieces.append(f"all {len(methods)} method(s) pass the randomization check")
    if rnd is not None and methods:
        pieces.append(f"{len(faithful)} of {len(methods)} beat a random ordering on deletion"
                      + (f" ({', '.join(faithful)})" if faithful and len(faithful) < len(methods) else ""))
    others = [f.title for f in bad if "randomization check" not in f.title]
    if others:
        pieces.append(others[0] + (f" (+{len(others) - 1} more)" if len(others) > 1 else ""))
    if level in ("critical", "high"):
        headline = "Attributions unreliable"
    elif level in ("medium", "low"):
        headline = "Attributions partly reliable"
    else:
        headline = "Attributions track the model"
    return Part(level, _pre(who) + ("; ".join(pieces) or "attributions computed"), headline, (r.unit_id,))


# ---------------------------------------------------------------------------------------------------
# Utility


def utility_part(report: RunReport, r: AuditResult) -> Part:
    who = target_name(report, r.target)
    acc_m = r.metrics.get("accuracy")
    ppl = _val(r, "perplexity")
    pieces, level = [], "ok"
    if acc_m is not None and acc_m.value is not None:
        pieces.append(f"accuracy {_pct(acc_m.value)}{_pct_ci(acc_m)}")
        t = report.targets.get(r.target)
        k = t.num_labels if t is not None else None
        if k:
            chance = 1.0 / k
            top = acc_m.ci_low if acc_m.ci_low is not None else acc_m.value
            if top <= chance:
                level = "high"
                pieces[-1] += f", not above chance ({_pct(chance)})"
    if ppl is not None:
        pieces.append(f"perplexity {_num(ppl)}")
    ece = _val(r, "ece")
    if ece is not None:
        pieces.append(f"ECE {_num(ece, 2)}")
    if not pieces:
        pieces.append("no headline metric")
    return Part(level, f"{_pre(who)}" + ", ".join(pieces), "No better than chance" if level == "high" else None,
                (r.unit_id,))


def generic_part(report: RunReport, r: AuditResult) -> Part:
    f = _worst_finding(r.findings)
    level = _sev(f)
    who = target_name(report, r.target)
    if f is None or level == "ok":
        return Part("ok", f"{_pre(who)}{r.module} found nothing above info", None, (r.unit_id,))
    return Part(level, f"{_pre(who)}{r.module}: {f.title}", f.title, (r.unit_id,))


RULES = {
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


# ---------------------------------------------------------------------------------------------------
# The verdicts


def _order_key(report: RunReport, r: AuditResult) -> tuple[int, int, str]:
    # DP twins after their source; modules in RULES order.
    mods = list(RULES)
    return (mods.index(r.module) if r.module in mods else len(mods), 1 if r.target in dp_twins(report) else 0,
            r.target)


def _merge(parts: list[Part]) -> list[Part]:
    """One part per key (module, target[, attack]): the worst (level, then weight), saying how many it stands for."""
    groups: dict[tuple[str, ...], list[Part]] = {}
    for p in parts:
        groups.setdefault(p.key, []).append(p)
    out = []
    for key, ps in groups.items():
        if len(ps) == 1 or not key:
            out.extend(ps)
            continue
        w = min(ps, key=lambda p: (LEVEL_RANK[p.level], -p.weight))
        out.append(replace(w, text=f"{w.text} (worst of {len(ps)} units)",
                           units=tuple(u for p in ps for u in p.units)))
    return out


def area_verdict(report: RunReport, area: str) -> Verdict:
    units = [r for r in report.audits if _area(r) == area]
    if not units:
        name = {"explainability": "explain"}.get(area, area)
        mod = "utility module" if area == "utility" else f"{name}.* module"
        return Verdict(area, "none", "Not assessed", f"Not assessed: no {mod} in this run")
    ok = sorted((r for r in units if r.status == "ok"), key=lambda r: _order_key(report, r))
    errored = [r for r in units if r.status == "error"]
    parts = []
    for r in ok:
        p = RULES.get(r.module, generic_part)(report, r)
        parts.append(p if p.key else replace(p, key=(r.module, r.target)))
    parts = _merge(parts)
    # Failed gates, named.
    for r in units:
        for g in r.gates:
            if not g.passed:
                parts.append(Part("high", f"gate failed: {r.module}@{r.target} {g.message}", "Gate failed",
                                  (r.unit_id,)))
    if errored:
        names = ", ".join(f"{r.module}@{r.target}" + (f" ({r.error.type})" if r.error else "") for r in errored)
        parts.append(Part("error", f"incomplete: {names} errored", "Not assessed", tuple(r.unit_id for r in errored)))
    if not ok:
        level = worse("error", *[p.level for p in parts])
        head = next((p.headline for p in parts if p.level == level and p.headline), "Not assessed")
        return Verdict(area, level, head, f"{head}: " + "; ".join(p.text for p in parts), tuple(parts))
    assessed = [p for p in parts if p.level != "error"]
    level = worse("ok", *[p.level for p in assessed])
    worst = [p for p in assessed if p.level == level and p.headline]
    headline = worst[0].headline if worst else DEFAULT_HEADLINES[area]
    if area == "privacy" and level == "ok" and all(r.module == "privacy.dp_finetune" for r in ok):
        headline = "No privacy attack run"  # DP training alone tests nothing
    if level == "ok" and errored:
        level, headline = "low", DEFAULT_HEADLINES[area] + " (incomplete)"  # "ok" would hide the errored units
    # The worst parts first (module order within a level), the errored units last.
    ordered = sorted(parts, key=lambda p: LEVEL_RANK[p.level] if p.level != "error" else len(LEVELS))
    return Verdict(area, level, headline, f"{headline}: " + "; ".join(p.text for p in ordered), tuple(ordered))


def verdicts(report: RunReport) -> list[Verdict]:
    """One verdict per area, in AREAS order."""
    return [area_verdict(report, a) for a in AREAS]


@dataclass
class _Results:
    """What the rules read from a report, for a run that has only results (an interrupted run's events)."""

    audits: list[AuditResult]
    targets: dict = field(default_factory=dict)


def verdicts_from_results(results: Iterable[AuditResult], targets: dict | None = None) -> list[Verdict]:
    """The verdicts of the results that exist (a run without report.json: the units that finished)."""
    view = _Results(list(results), dict(targets or {}))
    return [area_verdict(view, a) for a in AREAS]  # type: ignore[arg-type]


def verdict_lines(report: RunReport, width: int | None = None, *, markup: bool = False) -> list[str]:
    """The verdicts as text for the terminal summary: '<LEVEL> <area>: <headline>: <numbers>'.

    One line per area; with `width`, each is wrapped to that many columns (continuation lines indented).
    With `markup`, the level word carries rich markup for its colour (print with rich, not plain print)."""
    lines: list[str] = []
    for v in verdicts(report):
        word = LEVEL_WORDS[v.level]
        prefix = f"{word:<8} {v.area:<14} "
        body = prefix + v.text
        if width:
            # An interval "[8, 16]" is never cut in two: its space is held while wrapping.
            held = re.sub(r"\[[^\]\s]*, [^\]\s]*\]", lambda m: m.group(0).replace(" ", "\x00"), body)
            wrapped = [w.replace("\x00", " ") for w in
                       textwrap.wrap(held, width=width, subsequent_indent=" " * 9, break_on_hyphens=False)]
        else:
            wrapped = [body]
        if markup:
            from rich.markup import escape

            style = TERMINAL_STYLES[v.level]
            wrapped = [escape(w) for w in wrapped]
            wrapped[0] = f"[{style}]{escape(word)}[/]" + wrapped[0][len(word):]
        lines.extend(wrapped)
    return lines
