"""One-run canary audits: insert m canaries into a training run (DP or not), each included with
probability 1/2, train once, score every canary, and turn the guesses into an epsilon lower bound
(fmaudit.privacy.audit_bound). For causal LMs, secret-sharer canaries also get the exposure metric of
Carlini et al. 2019.

    from fmaudit.privacy.canary import canary_audit, canary_findings
    res = canary_audit(base=base_target, members=train_data, train={"epochs": 2, "batch_size": 16, "lr": 5e-5},
                       num_canaries=200, seed=0)
    res.epsilon_lb, res.epsilon_lb_ceiling, res.accountant_epsilon
    canary_findings(res)    # the module's findings (critical when epsilon_lb > the epsilon it is compared with)

Every random choice draws from its own stream (fmaudit.seeds): which examples become canaries
(CANARY_MAKE), which canaries are included (CANARY_INCLUDE: independent of the choice), exposure candidates
(CANARY_EXPOSURE), the canary run's training seed (CANARY_TRAIN) and the canaries held out to choose the number
of guesses (CANARY_GUESS_SPLIT, guess_selection="holdout").

The bound: both the Steinke-Nasr-Jagielski and the f-DP (Mahloujifar-Melis-Chaudhuri, Gaussian family) analyses
of the same guesses (the assumption-free SNJ bound is the headline); `result.record` holds what recomputes both
(fmaudit.privacy.audit_bound.bounds).

One idea per module: `kinds` (the canaries of each kind, a KINDS registry, and which model task each fits),
`rerun` (what the canary run re-runs: the recorded fine-tune or DP settings, and the delta rule), `exposure`
(secret-sharer exposure), `audit` (the audit itself and its result) and `findings`.
"""

from __future__ import annotations

from fmaudit.privacy.canary.audit import CanaryAuditResult, canary_audit, concat, holdout_split, inclusion_vector
from fmaudit.privacy.canary.exposure import estimate_exposure, exposure, secret_exposure
from fmaudit.privacy.canary.findings import canary_findings
from fmaudit.privacy.canary.kinds import (
    DEFAULT_KIND,
    KINDS,
    MIN_RANDOM_TOKEN_WORDS,
    SECRET_PREFIX,
    CanaryKind,
    default_kind,
    kinds_for,
    make_canaries,
    random_token_words,
)
from fmaudit.privacy.canary.rerun import (
    DP_DEFAULTS,
    DP_REQUIRED,
    LORA_DEFAULTS,
    TRAIN_DEFAULTS,
    CanaryRun,
    check_delta,
    dp_rerun_settings,
    train_canary_run,
)

__all__ = [
    "DEFAULT_KIND",
    "DP_DEFAULTS",
    "DP_REQUIRED",
    "KINDS",
    "LORA_DEFAULTS",
    "MIN_RANDOM_TOKEN_WORDS",
    "SECRET_PREFIX",
    "TRAIN_DEFAULTS",
    "CanaryAuditResult",
    "CanaryKind",
    "CanaryRun",
    "canary_audit",
    "canary_findings",
    "check_delta",
    "concat",
    "default_kind",
    "dp_rerun_settings",
    "estimate_exposure",
    "exposure",
    "holdout_split",
    "inclusion_vector",
    "kinds_for",
    "make_canaries",
    "random_token_words",
    "secret_exposure",
    "train_canary_run",
]
