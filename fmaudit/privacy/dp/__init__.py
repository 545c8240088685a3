"""Differential-privacy fine-tuning (DP-SGD with Opacus) on fmaudit targets, torch modules and HF models.

`dp_finetune(...)` trains a copy of a model with DP-SGD through the core training loop
(`fmaudit.training.train`, via its `wrap=` / `loss_fn=` hooks), with

- Poisson sampling (Opacus' UniformWithReplacementSampler with exactly ceil(N / batch_size) logical steps per
  epoch), as the accountants assume; an empty Poisson batch is a noise-only step that the accountant counts;
- Opacus' BatchMemoryManager splitting logical batches into physical ones of at most
  `max_physical_batch_size` examples (the noise and the accounting are per logical batch);
- ghost clipping where it applies (no trainable parameter shared between modules), else per-sample
  gradient hooks;
- a pre-flight check (Opacus' ModuleValidator plus our own) that lists every problem before training;
- `target_epsilon` turned into a noise multiplier by the chosen accountant for the exact number of steps;
- epsilon from Opacus' accountants with two safeguards (`account`): GDP, a central-limit approximation that can
  understate epsilon, is always paired with PRV and the larger is claimed; an accountant that raises or returns
  a non-finite or negative epsilon is replaced by RDP. Both are reported as findings, never silenced;
- a plain model back (hooks removed, LoRA adapters merged), and an epsilon ledger (epsilon vs step).

One idea per module: `errors`, `accounting` (epsilon, noise, ledger; accountant registry), `settings` (defaults,
validation, the resolved `DPSettings`), `trainable` and `clipping` (registries), `preflight`, `inputs` and
`module_target` (what users have -> what the loop trains), `training` (the DP loop), `utility`, and `finetune`
(the public `dp_finetune` and `DPResult`). Heavy libraries are imported inside functions.
"""

from __future__ import annotations

from fmaudit.privacy.dp.accounting import (
    ACCOUNTANTS,
    AccountantFailure,
    Accounting,
    account,
    epsilon_for,
    ledger_points,
    noise_for,
)
from fmaudit.privacy.dp.clipping import CLIPPING
from fmaudit.privacy.dp.errors import DPConfigError, DPPrivacyWarning, DPTrainingError
from fmaudit.privacy.dp.finetune import SEED_STATEMENT, DPResult, dp_finetune, seed_statement
from fmaudit.privacy.dp.inputs import DPInputs, adapt_inputs
from fmaudit.privacy.dp.module_target import LossFunction, TorchData, module_target
from fmaudit.privacy.dp.preflight import preflight
from fmaudit.privacy.dp.settings import (
    DPSettings,
    default_delta,
    default_physical_batch,
    dp_defaults,
    validate_settings,
)
from fmaudit.privacy.dp.trainable import TRAINABLE, apply_trainable
from fmaudit.privacy.dp.utility import utility_summary

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING",
    "SEED_STATEMENT",
    "TRAINABLE",
    "AccountantFailure",
    "Accounting",
    "DPConfigError",
    "DPInputs",
    "DPPrivacyWarning",
    "DPResult",
    "DPSettings",
    "DPTrainingError",
    "LossFunction",
    "TorchData",
    "account",
    "adapt_inputs",
    "apply_trainable",
    "default_delta",
    "default_physical_batch",
    "dp_defaults",
    "dp_finetune",
    "epsilon_for",
    "ledger_points",
    "module_target",
    "noise_for",
    "preflight",
    "seed_statement",
    "utility_summary",
    "validate_settings",
]
