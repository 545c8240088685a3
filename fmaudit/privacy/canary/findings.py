"""The findings of a canary audit: what its epsilon lower bound says about the claimed (or accountant's)
epsilon, given how high the audit could have reached (its ceiling)."""

from __future__ import annotations

import math

from fmaudit.privacy.canary.audit import CanaryAuditResult


def canary_findings(res: CanaryAuditResult) -> list[dict[str, str]]:
    """The findings for a canary audit result, as dicts with severity, title, detail and metric.

    - critical when epsilon_lb exceeds the epsilon it is compared with (the claimed one, else the canary
      run's accountant): the DP implementation or its accounting is broken; high instead when only the f-DP
      bound (Gaussian trade-off curve assumed) exceeds it and the assumption-free SNJ bound does not;
    - when that epsilon is above the audit's ceiling, the audit says it cannot confirm or refute it (not
      "consistent with the DP guarantee": no attack, however strong, could have contradicted it);
    - non-private runs: memorization when epsilon_lb > 0, else "nothing detected" (not a guarantee)."""
    conf = f"{res.confidence:.0%}"
    lb, top, m = res.epsilon_lb, res.epsilon_lb_ceiling, res.num_canaries
    rec = res.record or {}
    if rec.get("guess_selection") == "holdout":
        how = (
            f"{len(rec.get('held_out_ids', []))} held out to choose r, the bound on the other {rec.get('m')} "
            f"with r = {res.guesses}"
        )
    else:
        how = f"r in {res.guess_grid or [res.guesses]}"
    where = f"m={m} canaries ({res.num_included} included), {how}, delta={res.delta:.3g}, {conf} confidence"
    by_fdp = ""
    if res.bound == "fdp" and math.isfinite(res.epsilon_lb_sjn):
        by_fdp = (
            f" (f-DP analysis, which assumes a Gaussian trade-off curve, as DP-SGD's approximately is; the "
            f"assumption-free Steinke-Nasr-Jagielski bound on the same guesses is {res.epsilon_lb_sjn:.3f})"
        )
    ref = res.reference_epsilon
    out: list[dict[str, str]] = []

    def add(severity: str, title: str, detail: str) -> None:
        out.append({"severity": severity, "title": title, "detail": detail, "metric": "epsilon_lb"})

    if ref is not None:
        who = "the claimed" if res.claimed_epsilon is not None else "the accountant's"
        also = ""
        if res.claimed_epsilon is not None and res.accountant_epsilon is not None:
            also = f" (the canary run's own accountant says epsilon <= {res.accountant_epsilon:.3f})"
        sjn = res.epsilon_lb_sjn if math.isfinite(res.epsilon_lb_sjn) else lb
        fdp = res.epsilon_lb_fdp if math.isfinite(res.epsilon_lb_fdp) else -math.inf
        if lb > ref + 1e-9 and (res.bound != "fdp" or sjn > ref + 1e-9):
            add(
                "critical",
                f"Empirical epsilon exceeds {who} epsilon",
                f"The canary audit proves epsilon >= {lb:.3f} at {conf} confidence{by_fdp}, but {who} epsilon is "
                f"{ref:.3f}{also}. The DP implementation or its accounting is broken: do not rely on this "
                "model's privacy guarantee.",
            )
        elif max(lb, fdp) > ref + 1e-9:  # only the f-DP bound (Gaussian trade-off curve assumed) exceeds it
            add(
                "high",
                f"Empirical epsilon exceeds {who} epsilon if the trade-off curve is Gaussian",
                f"The f-DP analysis shows the training is not mu-GDP for mu <= {res.mu_lb:.3f}, i.e. epsilon >= "
                f"{max(lb, fdp):.3f} at delta={res.delta:.3g} ({conf} confidence) for a mechanism with a Gaussian "
                f"trade-off curve, above {who} epsilon {ref:.3f}{also}. The assumption-free Steinke-Nasr-Jagielski "
                f"bound on the same guesses is {sjn:.3f}, within the claim. DP-SGD's curve is close to Gaussian, so the "
                "guarantee is in doubt; a mechanism with another curve shape (randomized response, say) can be "
                "(epsilon, delta)-DP below the f-DP number. A larger audit would settle it.",
            )
        elif not math.isfinite(top):  # a result built without a ceiling: say nothing about reach
            add(
                "info",
                "Audit did not contradict the DP guarantee",
                f"{who[0].upper()}{who[1:]} epsilon is {ref:.3f}{also}; the audit shows epsilon >= {lb:.3f} "
                f"({conf} confidence, {m} canaries). Its ceiling is unknown, so whether it could have contradicted "
                "the claim is not known.",
            )
        elif ref > top:
            add(
                "low",
                f"Audit cannot test epsilon = {ref:.3g}: its ceiling is {top:.3f}",
                f"This audit can prove at most epsilon >= {top:.3f} (its ceiling at {where}: the bound a perfect "
                f"attack would reach), so it could only have detected a broken guarantee for an epsilon below "
                f"{top:.3f}; it cannot confirm or refute epsilon = {ref:.3f}. It shows "
                f"epsilon >= {lb:.3f}{also}. No attack could have contradicted {who} epsilon here, so this is not "
                "evidence that the guarantee holds. The ceiling grows only slowly with m (for a balanced draw at "
                "m = 1000, delta 1e-5: about 5.4 by Steinke-Nasr-Jagielski, 11.7 by the f-DP analysis, default "
                "holdout selection); testing a claim this large needs a much larger audit.",
            )
        else:
            add(
                "info",
                "Audit consistent with the DP guarantee",
                f"{who[0].upper()}{who[1:]} epsilon is {ref:.3f}{also}; the audit shows epsilon >= {lb:.3f} "
                f"({conf} confidence, {m} canaries). A perfect attack would have reached {top:.3f} >= {ref:.3f}, "
                "so the audit could have contradicted the claim; it did not (a weak membership score also gives a "
                "low bound, so this is evidence, not proof).",
            )
    elif lb > 0:
        sat = (
            " The bound is at the audit's ceiling: the true epsilon may be much larger (more canaries would show more)."
            if lb >= top - 1e-9
            else ""
        )
        add(
            "medium",
            "Training memorizes individual examples",
            f"Without DP, the canary audit proves epsilon >= {lb:.3f} ({conf} confidence; ceiling {top:.3f} at "
            f"{where}): single training examples measurably change the model. Consider DP fine-tuning.{sat}",
        )
    else:
        add(
            "info",
            "No privacy loss detected at this canary count",
            f"epsilon_lb = 0 with {m} canaries (ceiling {top:.3f} at {where}); this is NOT a privacy guarantee "
            "(more canaries or a stronger score may still find leakage).",
        )
    return out
