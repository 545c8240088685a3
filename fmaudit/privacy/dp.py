"""Differential-privacy fine-tuning (DP-SGD with Opacus) on fmaudit targets.

`dp_finetune(...)` trains a copy of a target with DP-SGD through the core training loop
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

Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

ACCOUNTANTS = ("prv", "rdp", "gdp")
TRAINABLE = ("all", "last_n_layers", "head", "lora")
CLIPPING = ("auto", "ghost", "hooks")
PRV_EPS_ERROR = 0.01  # Opacus' default for the PRV accountant; also what get_noise_multiplier uses
LEDGER_POINTS = {"prv": 16, "rdp": 60, "gdp": 16}  # PRV costs ~0.3 s per point on a CPU (GDP is paired with PRV)

# Attributes Opacus may leave on modules / parameters; swept after training so the model is plain.
_OPACUS_MODULE_ATTRS = ("autograd_grad_sample_hooks", "ft_compute_sample_grad", "activations", "max_batch_len",
                        "_forward_counter")
_OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "summed_grad", "_norm_sample",
                       "_processed")


class DPConfigError(ValueError):
    """Invalid DP settings or a model / dataset that DP-SGD cannot train; lists every problem found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"DP fine-tuning cannot start ({len(self.problems)} problem"
                         f"{'s' if len(self.problems) != 1 else ''}):\n{lines}")


class DPPrivacyWarning(UserWarning):
    """A setting that weakens the privacy guarantee (e.g. delta >= 1/N)."""


@dataclass
class DPSettings:
    """Everything that determines a DP run (and its cache key)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    max_physical_batch_size: int
    delta: float
    accountant: str
    clipping: str
    trainable: str
    n_layers: int
    lora: dict[str, Any] | None
    lr: float
    weight_decay: float
    seed: int
    target_epsilon: float | None


@dataclass
class DPResult:
    """What `dp_finetune` returns. `model` is a plain `nn.Module` (no Opacus hooks, adapters merged);
    `target` wraps it like the input target (same tokenizer / preprocessing)."""

    model: Any
    target: Any
    epsilon: float
    epsilon_per_epoch: list[float]
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    epochs: int
    accountant: str
    clipping: str
    max_grad_norm: float
    batch_size: int
    max_physical_batch_size: int
    trainable: str
    num_trainable_parameters: int
    num_train_examples: int
    target_epsilon: float | None
    ledger_steps: list[int]
    ledger_epsilon: list[float]
    train_utility: dict[str, float]
    validation_utility: dict[str, float] | None
    train_seconds: float
    epoch_losses: list[float] = field(default_factory=list)
    cache_hit: bool = False
    cache_key: str | None = None
    notes: list[str] = field(default_factory=list)
    # Everything else needed to re-run exactly this procedure (the canary audit does).
    lr: float = 0.0
    weight_decay: float = 0.0
    n_layers: int = 2
    lora: dict[str, Any] | None = None
    steps_per_epoch: int = 0
    seed: int = 0
    # Accounting detail: each accountant's number ("gdp", "prv", "rdp"), which one `epsilon` is, and the GDP
    # number when GDP was asked for (GDP can understate epsilon: the claimed epsilon is max(GDP, PRV)).
    epsilon_by_accountant: dict[str, float] = field(default_factory=dict)
    epsilon_accountant: str = ""
    epsilon_gdp: float | None = None
    empty_batches: int = 0
    # DP defaults taken because the caller gave none (dp_defaults), and what the inputs were seen as.
    picked_defaults: dict[str, Any] = field(default_factory=dict)
    inputs: str = ""
    # Findings for the report: dicts with severity ("info" ... "critical"), title, detail.
    findings: list[dict[str, str]] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        """The DP parameters as a JSON-ready dict (for reports, and for re-running the same procedure:
        `finetune_info["dp"]` of a produced target). The noise seed is not among them: see `seed_statement`."""
        keys = ("epsilon", "epsilon_accountant", "epsilon_gdp", "epsilon_by_accountant", "epsilon_per_epoch", "delta",
                "target_epsilon", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "steps_per_epoch",
                "epochs", "batch_size", "max_physical_batch_size", "accountant", "clipping", "trainable", "n_layers",
                "lora", "lr", "weight_decay", "num_trainable_parameters", "num_train_examples", "empty_batches")
        out = {k: getattr(self, k) for k in keys}
        out["lora"] = dict(self.lora) if self.lora is not None else None
        out["epsilon_by_accountant"] = dict(self.epsilon_by_accountant)
        return out


SEED_STATEMENT = ("The DP noise and Poisson sampling come from a seeded PRNG whose seed is derived from the run's "
                  "seed (fmaudit.seeds streams DP_NOISE, DP_SAMPLER; the noise seed itself is not stored). The "
                  "guarantee holds only if that seed stays secret: anyone who knows the recipe's seed can reproduce "
                  "the noise and remove it. This keeps audits re-runnable; for a real release, train with a secret "
                  "seed (or Opacus' secure_mode / CSPRNG) and do not publish it.")


def seed_statement(seed: int) -> dict[str, str]:
    """The finding that goes beside epsilon (severity info)."""
    return {"severity": "info", "title": "The DP guarantee needs the run seed to stay secret",
            "detail": f"Run seed {seed}. " + SEED_STATEMENT + " (Opacus warns: \"Secure RNG turned off\".)"}


# ---------------------------------------------------------------------------------------------------
# Accounting


def default_delta(n: int) -> float:
    """min(1e-5, 1/(10 N)): always well below 1/N."""
    return min(1e-5, 1.0 / (10.0 * n))


def default_physical_batch(batch_size: int) -> int:
    """Expected batch + 3 standard deviations of the Poisson batch size: logical batches are rarely split
    (each split costs a forward/backward), and memory stays bounded."""
    return int(batch_size + math.ceil(3 * math.sqrt(batch_size)))


def make_accountant(kind: str):
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=kind)


@dataclass
class Accounting:
    """Epsilon of a run, as claimed, with every number behind it.

    `epsilon` is the number the guarantee rests on: the configured accountant's, except that
    - GDP (a central-limit approximation that can understate epsilon) is always paired with PRV, and the
      larger of the two is claimed;
    - an accountant that raises or returns a non-finite or negative epsilon is replaced by RDP (valid, looser).
    `by_accountant` holds each number computed ("gdp", "prv", "rdp"); `used` names the one claimed;
    `notes` are findings for the report: dicts with severity, title and detail."""

    epsilon: float
    by_accountant: dict[str, float]
    used: str
    notes: list[dict[str, str]] = field(default_factory=list)


class AccountantFailure(RuntimeError):
    """An accountant raised, or returned a non-finite or negative epsilon."""


def _raw_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                 accountant: str) -> tuple[float, list[dict[str, str]]]:
    """One accountant's epsilon, exactly as Opacus computes it; raises AccountantFailure when it fails."""
    notes: list[dict[str, str]] = []
    try:
        if accountant == "rdp":
            # RDP composes linearly in steps: Opacus computes compute_rdp(q, sigma, steps) = steps * rdp(one step);
            # caching the one-step vector gives the identical floats without recomputing the orders every point.
            orders, one = _rdp_one_step(float(noise_multiplier), float(sample_rate))
            eps, best, edge = _rdp_spent(orders, one * int(steps), delta)
            if eps < 0:
                # RDP's conversion can go below 0 for a large delta: (eps', delta)-DP with eps' < 0 implies
                # (0, delta)-DP, so 0 is a valid (and the tightest meaningful) answer.
                notes.append({"severity": "info", "title": "RDP's epsilon bound was negative; 0 is reported",
                              "detail": f"the RDP conversion gave {eps:.4g} at delta {delta:g} (possible for a large "
                                        "delta); a negative epsilon implies (0, delta)-DP, so epsilon 0 is claimed."})
                eps = 0.0
            if edge:
                # Opacus warns "Optimal order is the largest/smallest alpha": valid but loose. A note, not a warning.
                notes.append({"severity": "low", "title": "RDP bound is loose (optimal order at the grid edge)",
                              "detail": f"the RDP accountant's best order is the {edge} of its grid ({best:g}): the "
                                        "epsilon is a valid upper bound but larger than RDP could give with a wider "
                                        "grid (the PRV accountant is tighter)."})
        else:
            acc = make_accountant(accountant)  # GDP: Opacus warns "GDP accounting is experimental" (not silenced)
            acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
            kw = {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}
            eps = acc.get_epsilon(delta=delta, **kw)
        eps = float(eps)
    except Exception as exc:
        raise AccountantFailure(f"raised {type(exc).__name__}: {str(exc)[:200]}") from exc
    if math.isnan(eps) or eps < 0 or (eps == math.inf and accountant != "rdp"):
        # RDP's infinity is an answer (no finite guarantee at this noise); anyone else's is a failure.
        raise AccountantFailure(f"returned epsilon {eps!r}")
    return eps, notes


def account(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str) -> Accounting:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps, with fallbacks and the GDP pairing (see
    `Accounting`). Each number is Opacus' accountant's for (noise, rate, steps, delta)."""
    if steps <= 0:
        return Accounting(0.0, {accountant: 0.0}, accountant)
    args = dict(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    wanted = [accountant] + (["prv"] if accountant == "gdp" else [])
    by: dict[str, float] = {}
    notes: list[dict[str, str]] = []
    for kind in wanted:
        try:
            eps, more = _raw_epsilon(accountant=kind, **args)
            by[kind] = eps
            notes += more
        except AccountantFailure as exc:
            if kind == "rdp":
                raise AccountantFailure(f"the RDP accountant {exc} for noise {noise_multiplier:g}, sample rate "
                                        f"{sample_rate:g}, {steps} steps, delta {delta:g}; no epsilon can be "
                                        "claimed") from exc
            notes.append({"severity": "medium", "title": f"The {kind.upper()} accountant failed; RDP was used",
                          "detail": f"Opacus' {kind.upper()} accountant {exc} for noise {noise_multiplier:g}, sample "
                                    f"rate {sample_rate:g}, {steps} steps, delta {delta:g} (Opacus' accountants are "
                                    "known to fail for large epsilon or tiny delta, and to return negative epsilons). "
                                    "The RDP accountant's epsilon was used instead: a valid upper bound, but looser."})
            if "rdp" not in by:
                eps, more = _raw_epsilon(accountant="rdp", **args)
                by["rdp"] = eps
                notes += more
    # Claim the largest number computed for the wanted accountants (for GDP: max(GDP, PRV or RDP)).
    used = max(by, key=lambda k: by[k])
    epsilon = by[used]
    if accountant == "gdp":
        other = "prv" if "prv" in by else "rdp"
        gdp = "nothing (it failed)" if "gdp" not in by else f"{by['gdp']:.4g}"
        notes.append({"severity": "low", "title": "GDP is an approximation; the larger epsilon is reported",
                      "detail": "Gaussian DP accounting is a central-limit approximation that can understate epsilon "
                                f"(Opacus marks it experimental). GDP says {gdp}, "
                                f"{other.upper()} says {by[other]:.4g}; the reported epsilon is the larger, "
                                f"{epsilon:.4g} ({used.upper()})."})
    return Accounting(float(epsilon), by, used, notes)


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The epsilon claimed for `steps` Poisson-subsampled Gaussian steps with `accountant` (see `account`:
    GDP is paired with PRV and the larger is returned; a failed accountant falls back to RDP)."""
    return account(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta,
                   accountant=accountant).epsilon


def _rdp_spent(orders, rdp, delta: float) -> tuple[float, float, str | None]:
    """opacus.accountants.analysis.rdp.get_privacy_spent, the same float operations, returning (epsilon, best
    order, "smallest"/"largest" when the best order is at the grid's edge else None) instead of warning."""
    orders_vec = np.atleast_1d(orders)
    rdp_vec = np.atleast_1d(rdp)
    eps = rdp_vec - (np.log(delta) + np.log(orders_vec)) / (orders_vec - 1) + np.log((orders_vec - 1) / orders_vec)
    if np.isnan(eps).all():
        return float("inf"), float("nan"), None
    idx = int(np.nanargmin(eps))
    edge = "smallest" if idx == 0 else "largest" if idx == len(eps) - 1 else None
    return float(eps[idx]), float(orders_vec[idx]), edge


@functools.lru_cache(maxsize=256)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    return orders, compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)


def _search_noise(*, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Opacus' `get_noise_multiplier` search (same brackets, same bisection, same tolerance 0.01), over
    `_raw_epsilon`, so that an accountant that raises or returns NaN / a negative number stops the search with
    AccountantFailure (Opacus' own loop never ends on a negative epsilon, and ends at its bracket on NaN)."""
    from opacus.accountants.utils import MAX_SIGMA

    def eps(sigma: float) -> float:
        return _raw_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                            accountant=accountant)[0]

    eps_high, sigma_low, sigma_high = float("inf"), 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise AccountantFailure(f"found no noise multiplier up to {MAX_SIGMA:g} for epsilon {target_epsilon}")
    for _ in range(200):
        if target_epsilon - eps_high <= 0.01:
            break
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high


def noise_for(*, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The smallest noise multiplier (to Opacus' search tolerance) whose CLAIMED epsilon (`epsilon_for`: for
    GDP the larger of GDP and PRV) stays within `target_epsilon`."""
    sigma = 0.0
    for kind in [accountant] + (["prv"] if accountant == "gdp" else []):
        try:
            sigma = max(sigma, _search_noise(target_epsilon=target_epsilon, sample_rate=sample_rate, steps=steps,
                                             delta=delta, accountant=kind))
        except AccountantFailure:
            # The search failed somewhere on its way (e.g. PRV at a tiny sigma): RDP's noise is valid (its epsilon
            # bounds PRV's), and the check below uses the same fallbacks as the claimed epsilon.
            sigma = max(sigma, _search_noise(target_epsilon=target_epsilon, sample_rate=sample_rate, steps=steps,
                                             delta=delta, accountant="rdp"))
    # Opacus' search ends on the noisy side; make sure, and nudge up if float noise says otherwise.
    for _ in range(100):
        if epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                       accountant=accountant) <= target_epsilon:
            return sigma
        sigma *= 1.01
    raise AccountantFailure(f"no noise multiplier up to {sigma:.4g} meets target epsilon {target_epsilon} "
                            f"({accountant} accountant)")


def ledger_points(steps: int, steps_per_epoch: int, points: int = 60) -> list[int]:
    xs = set(np.unique(np.linspace(1, steps, min(points, steps)).round().astype(int)).tolist()) if steps else set()
    xs |= {e * steps_per_epoch for e in range(1, steps // max(steps_per_epoch, 1) + 1)}
    return sorted(x for x in xs if 1 <= x <= steps)


# ---------------------------------------------------------------------------------------------------
# Pre-flight


def _validate_settings(*, n: int | None, target_epsilon, noise_multiplier, delta, max_grad_norm, epochs, batch_size,
                       lr, accountant, trainable, clipping, max_physical_batch_size, n_layers) -> list[str]:
    p: list[str] = []
    if target_epsilon is None and noise_multiplier is None:
        p.append("give target_epsilon (the budget; the accountant picks the noise) or noise_multiplier")
    if target_epsilon is not None and noise_multiplier is not None:
        p.append("give target_epsilon or noise_multiplier, not both")
    if target_epsilon is not None and not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0
                                           and math.isfinite(target_epsilon)):
        p.append(f"target_epsilon must be a positive finite number, got {target_epsilon!r} "
                 "(epsilon <= 0 would mean perfect privacy, which no training can give)")
    if noise_multiplier is not None and not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        p.append(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if delta is not None and not (0 < delta < 1):
        p.append(f"delta must be in (0, 1), got {delta!r}" + (" (delta >= 1 gives no guarantee at all)"
                                                            if delta >= 1 else ""))
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        p.append(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        p.append(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        p.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not lr > 0:
        p.append(f"lr must be > 0, got {lr!r}")
    if accountant not in ACCOUNTANTS:
        p.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if trainable not in TRAINABLE:
        p.append(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if clipping not in CLIPPING:
        p.append(f"clipping must be one of {', '.join(CLIPPING)}, got {clipping!r}")
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        p.append(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size!r}")
    if n_layers < 1:
        p.append(f"n_layers must be >= 1, got {n_layers!r}")
    if n is not None and isinstance(batch_size, int):
        if n == 0:
            p.append("the training set is empty")
        elif n < batch_size:
            p.append(f"the training set has {n} examples, fewer than batch_size {batch_size}: Poisson sampling "
                     f"would sample every example in every step (sample rate >= 1) and give no privacy "
                     f"amplification; use more data or a batch_size of at most {max(1, n // 4)}")
        elif n < 2 * batch_size:
            p.append(f"the training set has {n} examples for batch_size {batch_size}: at least 2 batches per epoch "
                     "are needed for subsampling to mean anything; lower batch_size")
    return p


def _apply_trainable(target: Any, trainable: str, n_layers: int, lora: dict[str, Any] | None) -> None:
    """Set requires_grad on target.model (for LoRA: replace target.model with a PEFT model)."""
    if trainable == "lora":
        target.model = _lora_wrap(target, lora or {})
    else:
        target.set_trainable(trainable, n_layers)


def _lora_wrap(target: Any, lora: dict[str, Any]):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise DPConfigError(["trainable='lora' needs the peft package: pip install peft"]) from exc
    from torch import nn

    model = target.model
    modules = lora.get("target_modules")
    if not modules:
        modules = _default_lora_modules(model)
    if not modules:
        raise DPConfigError([f"trainable='lora': found no linear layers to adapt in {type(model).__name__}; "
                             "name them with lora_target_modules"])
    cfg = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                     lora_dropout=float(lora.get("dropout", 0.0)), target_modules=list(modules), bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, cfg)
    # Classifier heads are new: train them too (full, small).
    if target.task != "causal-lm":
        for m in target.head_modules():
            for p in m.parameters():
                p.requires_grad_(True)
    assert isinstance(peft_model, nn.Module)
    return peft_model


def _default_lora_modules(model) -> list[str]:
    """Attention projections by name (q/k/v/o, query/key/value, c_attn...), else every Linear in blocks."""
    from torch import nn

    def linear(m) -> bool:
        return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"

    names = set()
    for name, m in model.named_modules():
        if linear(m):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn", "qkv", "q", "k",
                        "v", "out_proj", "q_lin", "k_lin", "v_lin", "out_lin"):  # q_lin ...: DistilBERT
                names.add(leaf)
    if not names:  # unknown naming: every linear layer inside the repeated blocks (the largest ModuleList),
        # by full name (a short leaf name like "0" would also match unrelated modules)
        blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
        inside = {id(m) for m in blocks.modules()} if blocks is not None else set()
        names = {name for name, m in model.named_modules() if id(m) in inside and linear(m)}
    return sorted(names)


def _tied_trainable(model) -> list[str]:
    ids: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None and p.requires_grad:
                ids.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return [" = ".join(v) for v in ids.values() if len(v) > 1]


def preflight(target: Any, *, trainable: str = "all", n_layers: int = 2, lora: dict[str, Any] | None = None,
              clipping: str = "auto") -> tuple[list[str], list[str], str]:
    """Check that DP-SGD can train `target` as asked, without changing it.

    Returns (problems, notes, clipping_mode): problems block training; notes are informational;
    clipping_mode is "ghost" or "hooks" (what `clipping="auto"` resolves to).
    """
    import inspect

    from opacus.validators import ModuleValidator

    problems: list[str] = []
    notes: list[str] = []
    work = target.copy()
    try:
        _apply_trainable(work, trainable, n_layers, lora)
    except DPConfigError as exc:
        return list(exc.problems), notes, "hooks"
    except Exception as exc:  # TargetError (e.g. no trainable parameter), peft errors
        return [f"trainable={trainable!r}: {exc}"], notes, "hooks"
    model = work.model
    if not any(p.requires_grad for p in model.parameters()):
        problems.append(f"trainable={trainable!r} leaves no trainable parameter")

    # Opacus' validators (BatchNorm, InstanceNorm with running stats, LSTM...), run per module so the message
    # can name the layers. BatchNorm is reported even when frozen: in training mode it still mixes the examples
    # of a batch, so one example's clipped gradient depends on the others.
    from torch import nn

    by_kind: dict[str, list[str]] = {}
    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    for name, m in model.named_modules():
        trainable_here = any(p.requires_grad for p in m.parameters(recurse=False))
        errs = []
        if isinstance(m, batchnorms):
            errs = ["BatchNorm"]
        elif trainable_here and type(m) in ModuleValidator.VALIDATORS:
            errs = ModuleValidator.VALIDATORS[type(m)](m)
        if errs:
            by_kind.setdefault(type(m).__name__, []).append(name or "<root>")
    for kind, where in by_kind.items():
        if "BatchNorm" in kind:
            fix = ("replace them with GroupNorm (opacus.validators.ModuleValidator.fix(model) does this) or "
                   "LayerNorm, and train the non-private baseline the same way")
        else:
            fix = ("replace them with Opacus' DP layers (opacus.validators.ModuleValidator.fix(model)), or freeze "
                   "them (trainable='last_n_layers' / 'lora')")
        problems.append(f"unsupported layers for DP-SGD: {len(where)} {kind} "
                        f"({', '.join(where[:6])}{', ...' if len(where) > 6 else ''}): {fix}")
    # Trainable layers holding buffers (GradSampleModule.validate: buffers are not private).
    reported = {n for where in by_kind.values() for n in where}
    for name, m in model.named_modules():
        if name in reported or not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        bufs = [b for b, _ in m.named_buffers(recurse=False)]
        if bufs and not isinstance(m, nn.Embedding):
            problems.append(f"trainable layer {name} ({type(m).__name__}) holds buffers {bufs[:3]} that DP-SGD "
                            "does not protect: freeze it (trainable='last_n_layers' / 'lora') or remove the buffers")

    # BERT-style position embeddings need explicit position_ids (ENVIRONMENT.md).
    fwd = inspect.signature(getattr(model, "forward")).parameters
    if "position_ids" in fwd and hasattr(work, "_pass_position_ids") and not work._pass_position_ids:
        problems.append("the model takes position_ids but the target does not pass them; per-sample gradients of "
                        "position embeddings need them (built with arange().repeat())")

    mode = "ghost" if clipping == "auto" else clipping
    tied = _tied_trainable(model)
    if tied:
        msg = (f"trainable parameters shared between modules ({'; '.join(tied[:3])}): ghost clipping computes "
               "per-module norms and would clip them wrongly")
        if clipping == "ghost":
            problems.append(msg + "; use clipping='hooks' or freeze them (trainable='lora')")
        else:
            notes.append(msg + "; using per-sample gradient hooks")
            mode = "hooks"
    if clipping == "auto" and mode == "ghost":
        notes.append("ghost clipping (two backward passes, no per-sample gradients stored)")
    return problems, notes, mode


# ---------------------------------------------------------------------------------------------------
# Inputs: what users have -> what the DP loop trains
#
# The DP loop (`_make_train_fn`, `_run`) trains a Target (torch_dataset, collate, loss(reduction="none"),
# set_trainable, copy) on data that target understands. `adapt_inputs` builds both from what a user has:
#   model:      an fmaudit Target, any nn.Module, a Hugging Face PreTrainedModel (or a PEFT model around one);
#   train_data: an fmaudit Dataset, a map-style torch Dataset ((x, y) tuples or dicts), a DataLoader, or a
#               Hugging Face datasets.Dataset with tokenized columns;
#   loss_fn:    optional per-example loss (model, batch) -> tensor[B].
# fmaudit Target + fmaudit Dataset keeps the target's own tokenization / preprocessing; everything else goes
# through `ModuleTarget`, which batches items the way the user's data gives them and calls the model on them.

LossFunction = Callable[[Any, Any], Any]
_LABEL_KEYS = ("labels", "label")
_TUPLE_PREFIX = "__item"  # internal dict keys of a tuple batch: __item0, __item1, ... (the loop moves dicts)


@dataclass
class DPInputs:
    """The adapted inputs. `target` is what the loop trains (never the caller's object: `_run` copies it);
    `train` / `validation` are data `target` understands; `release(work)` turns the trained work target into
    (model handed back, target handed back); `utility(target, data, seed)` measures a model on data."""

    target: Any
    train: Any
    validation: Any
    described: str
    batch_size: int | None = None  # from a DataLoader
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cacheable: bool = True
    release: Callable[[Any], tuple[Any, Any]] = lambda work: (work.model, work)
    utility: Callable[..., dict[str, float]] | None = None  # None: `_utility` (fmaudit targets)

    def __post_init__(self) -> None:
        if self.utility is None:
            self.utility = _utility


class TorchData:
    """A map-style torch Dataset seen the way the DP loop sees data (len, name, subset)."""

    labels = None
    label_names = None

    def __init__(self, dataset: Any, name: str):
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TorchData":
        import torch

        return TorchData(torch.utils.data.Subset(self.dataset, [int(i) for i in indices]), self.name)


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def _is_fmaudit_dataset(obj: Any) -> bool:
    from fmaudit.data import Dataset

    return isinstance(obj, Dataset)


def _as_torch_data(obj: Any, role: str, problems: list[str], notes: list[str]) -> tuple[Any, int | None, Any]:
    """(TorchData or None, the DataLoader's batch size or None, the DataLoader's collate or None)."""
    import torch

    if obj is None:
        return None, None, None
    if isinstance(obj, torch.utils.data.DataLoader):
        loader = obj
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):
            problems.append(f"{role}: the DataLoader's dataset is an IterableDataset; DP-SGD's Poisson sampling "
                            "needs a map-style dataset (len and indexing)")
            return None, None, None
        collate = loader.collate_fn
        if collate is torch.utils.data.default_collate or getattr(collate, "__name__", "") == "default_collate":
            collate = None
        if role == "train_data":
            notes.append("train_data is a DataLoader: its dataset is used"
                         + (f" with its batch size {loader.batch_size} as the expected (Poisson) batch size"
                            if loader.batch_size else "") + (" and its collate_fn" if collate else "")
                         + "; Poisson sampling (each example in each step independently with probability q) "
                           "replaces its sampler / shuffling, as the DP accountant assumes")
        data, _, _ = _as_torch_data(loader.dataset, role, problems, notes)
        return data, loader.batch_size, collate
    if _is_hf_dataset(obj):
        keep = [c for c in obj.column_names if _hf_column_is_numeric(obj, c)]
        dropped = [c for c in obj.column_names if c not in keep]
        if not keep:
            problems.append(f"{role}: the datasets.Dataset has no numeric columns (columns: {obj.column_names}); "
                            "tokenize it first (input_ids, attention_mask, labels)")
            return None, None, None
        if dropped and role == "train_data":
            notes.append(f"datasets.Dataset columns not passed to the model (not numeric): {', '.join(dropped)}")
        return TorchData(obj.with_format("torch", columns=keep), f"datasets.Dataset[{len(obj)}]"), None, None
    if isinstance(obj, torch.utils.data.IterableDataset):
        problems.append(f"{role}: an IterableDataset cannot be Poisson-sampled; give a map-style dataset "
                        "(len and indexing)")
        return None, None, None
    if isinstance(obj, torch.utils.data.Dataset) or (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        return TorchData(obj, type(obj).__name__), None, None
    problems.append(f"{role} must be an fmaudit Dataset, a map-style torch Dataset, a DataLoader or a "
                    f"datasets.Dataset, got {type(obj).__name__}")
    return None, None, None


def _hf_column_is_numeric(ds: Any, column: str) -> bool:
    feat = ds.features.get(column)
    while feat is not None and hasattr(feat, "feature"):  # Sequence / List features
        feat = feat.feature
    if isinstance(feat, list):  # old-style list features
        feat = feat[0] if feat else None
    dtype = getattr(feat, "dtype", None)
    # numbers and lists of numbers; not strings, and not PIL images (they need the model's image processor)
    return dtype is not None and not str(dtype).startswith(("string", "large_string", "PIL"))


def _hf_task(model: Any) -> str:
    """causal-lm, image-classification or classification, from the Hugging Face class (PEFT: its base)."""
    inner = model
    if hasattr(inner, "peft_config") and hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    name = type(inner).__name__
    try:
        from transformers.models.auto import modeling_auto as ma

        def names(mapping: dict) -> set[str]:
            out: set[str] = set()
            for v in mapping.values():
                out.update(v if isinstance(v, (tuple, list)) else [v])
            return out

        if name in names(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            return "causal-lm"
        if name in names(ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
            return "image-classification"
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return "causal-lm" if name.endswith("ForCausalLM") or name.endswith("LMHeadModel") else "classification"


def _pad_value(key: str, pad_id: int) -> int:
    return {"input_ids": pad_id, "labels": -100, "label": -100}.get(key, 0)


def _collate_items(items: Sequence[Any], pad_id: int) -> Any:
    """torch's default_collate, with 1-D sequences of different lengths in dict items (tokenized text) padded
    on the right (input_ids with the pad id, labels with -100, the rest with 0) and an attention mask added."""
    import torch

    first = items[0]
    if not isinstance(first, dict):
        return torch.utils.data.default_collate(list(items))
    out: dict[str, Any] = {}
    for key in first:
        vals = [it[key] for it in items]
        if isinstance(vals[0], str):
            continue
        ts = [torch.as_tensor(v) for v in vals]
        if all(t.shape == ts[0].shape for t in ts):
            out[key] = torch.stack(ts)
            continue
        if not all(t.dim() == 1 for t in ts):
            raise ValueError(f"column {key!r} has items of different shapes {[tuple(t.shape) for t in ts[:3]]}")
        length = max(len(t) for t in ts)
        batch = torch.full((len(ts), length), _pad_value(key, pad_id), dtype=ts[0].dtype)
        for i, t in enumerate(ts):
            batch[i, : len(t)] = t
        out[key] = batch
        if key == "input_ids" and "attention_mask" not in first:
            mask = torch.zeros((len(ts), length), dtype=torch.long)
            for i, t in enumerate(ts):
                mask[i, : len(t)] = 1
            out["attention_mask"] = mask
    return out


def _to_internal(batch: Any) -> dict[str, Any]:
    """A collated batch as the loop moves it: a dict of tensors (tuples under __item0, __item1, ...)."""
    import torch

    if isinstance(batch, (tuple, list)):
        return {f"{_TUPLE_PREFIX}{i}": torch.as_tensor(v) for i, v in enumerate(batch)}
    if hasattr(batch, "items"):  # dict, transformers' BatchEncoding
        out = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        if "label" in out and "labels" not in out:
            out["labels"] = out.pop("label")
        return out
    return {f"{_TUPLE_PREFIX}0": torch.as_tensor(batch)}


def _to_user(batch: dict[str, Any]) -> Any:
    """The batch in the user's form: a tuple for tuple items, else the dict."""
    keys = list(batch)
    if keys and all(k.startswith(_TUPLE_PREFIX) for k in keys):
        return tuple(batch[f"{_TUPLE_PREFIX}{i}"] for i in range(len(keys)))
    return batch


def _output_logits(out: Any) -> Any:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def module_target(model: Any, *, task: str, loss_fn: LossFunction | None = None, collate: Any = None,
                  name: str | None = None, pad_id: int = 0) -> Any:
    """Any nn.Module (plain, Hugging Face, PEFT) behind the Target interface the DP loop trains.

    Batches keep the user's form: `(x, y)` tuples call `model(x)` (all but the last element) with labels the
    last element; dicts call `model(**inputs)` with the keys the forward accepts (labels / label excluded).
    The default loss is per-example cross-entropy on the logits (classifiers) or the per-sequence mean
    next-token loss (causal LMs); `loss_fn(model, batch) -> tensor[B]` replaces it, and gets the batch in the
    user's form (a tuple of tensors, or the dict). `collate` replaces the default batching (torch's
    default_collate, with tokenized sequences padded on the right)."""
    return _module_target_class()(model, task=task, loss_fn=loss_fn, collate=collate,
                                  name=name or type(model).__name__, pad_id=pad_id)


@functools.lru_cache(maxsize=1)
def _module_target_class() -> type:
    """The Target subclass behind `module_target` (built on first use: torch is imported late)."""
    import inspect

    import torch
    from torch import nn

    from fmaudit.targets.base import Target

    class ModuleTarget(Target):
        kind = "torch-module"

        def __init__(self, model: nn.Module, *, task: str, loss_fn: LossFunction | None, collate: Any,
                     name: str, pad_id: int):
            params = list(model.parameters())
            device = str(params[0].device) if params else "cpu"
            was_training = model.training
            super().__init__(name=name, model=model, source="python", device=device)
            model.train(was_training)  # Target.__init__ sets eval(); the caller's module is left as it was
            self.task = task
            self.user_loss = loss_fn
            self.user_collate = collate
            self.pad_id = pad_id
            fwd = inspect.signature(model.forward).parameters
            self._var_kw = any(p.kind is p.VAR_KEYWORD for p in fwd.values())
            self._accepts = set(fwd)
            # Explicit position / token type ids, built with repeat (per-example rows for per-sample gradients)
            from fmaudit.targets.text import position_offset, uses_token_types

            self._pass_position_ids = "position_ids" in fwd
            self._position_offset = position_offset(model)  # RoBERTa-style: positions start at padding_idx + 1
            self._pass_token_type_ids = "token_type_ids" in fwd and uses_token_types(model)
            # accuracy needs the default forward and labels; `_dry_run` says whether they work with a custom loss
            self.accuracy_from_forward = task != "causal-lm" and loss_fn is None

        @property
        def capabilities(self) -> frozenset[str]:
            kind = "causal_lm" if self.task == "causal-lm" else "classifier"
            return frozenset({kind, "per_example_loss", "trainable"})

        @property
        def is_peft(self) -> bool:
            return hasattr(self.model, "peft_config") and hasattr(self.model, "get_base_model")

        # -- data -------------------------------------------------------------------------------------
        def torch_dataset(self, data: TorchData) -> Any:
            return data.dataset

        def collate(self, items: Sequence[Any]) -> dict[str, Any]:
            batch = _to_internal(self.user_collate(list(items)) if self.user_collate is not None
                                 else _collate_items(items, self.pad_id))
            ids = batch.get("input_ids")
            if ids is not None and ids.dim() == 2:
                n, length = ids.shape
                if self._pass_position_ids and "position_ids" not in batch:
                    off = self._position_offset
                    batch["position_ids"] = torch.arange(off, off + length, dtype=torch.long).repeat(n, 1)
                if self._pass_token_type_ids and "token_type_ids" not in batch:
                    batch["token_type_ids"] = torch.zeros((n, length), dtype=torch.long)
            return batch

        def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(self.device) for k, v in batch.items()}

        # -- model ------------------------------------------------------------------------------------
        def forward(self, model: nn.Module, batch: dict[str, Any]) -> Any:
            user = _to_user(batch)
            if isinstance(user, tuple):
                if len(user) < 2:
                    raise ValueError("tuple items need inputs and a label, (x, y); or give loss_fn")
                return model(*user[:-1])
            inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS and (self._var_kw or k in self._accepts)}
            return model(**inputs)

        def labels(self, batch: dict[str, Any]) -> Any:
            user = _to_user(batch)
            if isinstance(user, tuple):
                return user[-1] if len(user) >= 2 else None
            return batch.get("labels")

        def token_nll(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Any, Any]:
            logits = _output_logits(self.forward(model, batch))[:, :-1, :].float()
            labels = batch.get("labels")
            if labels is None:
                labels = batch["input_ids"].clone()
                if "attention_mask" in batch:
                    labels[batch["attention_mask"] == 0] = -100
            targets = labels[:, 1:]
            mask = targets != -100
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.clamp_min(0).reshape(-1),
                                              reduction="none").view_as(targets)
            return nll * mask, mask

        def loss(self, model: nn.Module, batch: dict[str, Any], reduction: str = "mean") -> Any:
            if self.user_loss is not None:
                per = self.user_loss(model, _to_user(batch))
            elif self.task == "causal-lm":
                nll, mask = self.token_nll(model, batch)
                per = nll.sum(1) / mask.sum(1).clamp_min(1)  # the privacy unit is one sequence
            else:
                labels = self.labels(batch)
                if labels is None:
                    raise ValueError("the batch has no labels (give (x, y) tuples, a 'labels' / 'label' column, "
                                     "or loss_fn)")
                logits = _output_logits(self.forward(model, batch))
                per = nn.functional.cross_entropy(logits.float(), labels.long(), reduction="none")
            if reduction == "none":
                return per
            return per.sum() if reduction == "sum" else per.mean()

        def set_trainable(self, mode: str = "all", n_layers: int = 2) -> None:
            if mode == "all" and self.is_peft:
                return  # a PEFT model given as is: its adapters (and modules_to_save) are what trains
            super().set_trainable(mode, n_layers)

        # -- evaluation -------------------------------------------------------------------------------
        @torch.no_grad()
        def evaluate(self, data: TorchData | None, max_examples: int = 1000, seed: int = 0,
                     batch_size: int = 64) -> dict[str, float]:
            """Mean per-example loss (the training loss); accuracy (classifiers whose output is (B, C) logits
            and whose batch has labels); perplexity (causal LMs, token-weighted)."""
            if data is None or len(data) == 0:
                return {}
            idx = np.arange(len(data))
            if len(data) > max_examples:
                from fmaudit.seeds import Stream, rng

                idx = np.sort(rng(seed, Stream.EXAMPLE_SAMPLE).choice(len(data), max_examples, replace=False))
            ds = data.dataset
            self.model.eval()
            total, correct, counted, tok_nll, toks = 0.0, 0, 0, 0.0, 0
            for start in range(0, len(idx), batch_size):
                batch = self.to_device(self.collate([ds[int(i)] for i in idx[start: start + batch_size]]))
                total += float(self.loss(self.model, batch, reduction="sum"))
                if self.task == "causal-lm":
                    nll, mask = self.token_nll(self.model, batch)
                    tok_nll += float(nll.sum())
                    toks += int(mask.sum())
                    continue
                if not self.accuracy_from_forward:
                    continue
                labels = self.labels(batch)
                logits = _output_logits(self.forward(self.model, batch))
                if logits.dim() == 2 and labels.dim() == 1 and logits.shape[0] == len(labels):
                    correct += int((logits.argmax(1) == labels).sum())
                    counted += len(labels)
            out = {"num_examples": float(len(idx)), "loss": total / len(idx)}
            if counted == len(idx):
                out["accuracy"] = correct / counted
            if toks:
                out["perplexity"] = float(math.exp(min(tok_nll / toks, 700)))
            return out

    return ModuleTarget


def _dry_run(target: Any, data: TorchData, custom_loss: bool) -> list[str]:
    """Collate two training examples and compute their losses (eval mode, no gradients): catches a batch the
    model cannot take and a loss_fn that returns a batch mean instead of one loss per example."""
    import torch

    k = min(2, len(data))
    if k == 0:
        return []
    try:
        batch = target.to_device(target.collate([data.dataset[i] for i in range(k)]))
        was = target.model.training
        target.model.eval()
        try:
            with torch.no_grad():
                per = target.loss(target.model, batch, reduction="none")
        finally:
            target.model.train(was)
    except Exception as exc:
        what = "loss_fn" if custom_loss else "the default loss (cross-entropy on logits / labels, or the LM loss)"
        return [f"{what} failed on two training examples: {type(exc).__name__}: {str(exc)[:300]}"
                + ("" if custom_loss else "; give loss_fn(model, batch) -> per-example losses")]
    if not torch.is_tensor(per) or tuple(per.shape) != (k,):
        shape = tuple(per.shape) if torch.is_tensor(per) else type(per).__name__
        return [f"loss_fn must return one loss per example (a tensor of shape [{k}] for {k} examples), got {shape}: "
                "DP-SGD clips each example's gradient, which a batch mean hides (use reduction='none')"]
    if custom_loss and target.task != "causal-lm":
        # Accuracy beside a custom loss: only when the default forward gives (B, C) logits for the batch's labels.
        labels = target.labels(batch)
        if labels is not None and labels.dim() == 1:
            try:
                with torch.no_grad():
                    logits = _output_logits(target.forward(target.model.eval(), batch))
                target.accuracy_from_forward = logits.dim() == 2 and logits.shape[0] == k
            except Exception:  # the model takes its inputs another way: the custom loss is the utility
                target.accuracy_from_forward = False
            finally:
                target.model.train(was)
    return []


def adapt_inputs(model: Any, train_data: Any, validation_data: Any = None,
                 loss_fn: LossFunction | None = None) -> DPInputs:
    """Turn (model, train_data, validation_data, loss_fn) into what the DP loop trains (see the section
    comment). Problems are collected, not raised: `dp_finetune` lists them with the others."""
    from torch import nn

    from fmaudit.targets.base import Target

    problems: list[str] = []
    notes: list[str] = []
    if not isinstance(model, (Target, nn.Module)):
        return DPInputs(target=None, train=None, validation=None, described="?", problems=[
            f"model must be an fmaudit Target, a torch nn.Module or a Hugging Face PreTrainedModel, got "
            f"{type(model).__name__}"])
    if train_data is None:
        problems.append("train_data is missing")
    native = _is_fmaudit_dataset(train_data)

    # fmaudit Target + fmaudit Dataset: the target's own preprocessing (tokenizer, pixels).
    if isinstance(model, Target) and (native or train_data is None):
        if loss_fn is not None:
            problems.append("loss_fn works with torch / Hugging Face data; an fmaudit Target on an fmaudit Dataset "
                            "trains with the target's own loss")
        if validation_data is not None and not _is_fmaudit_dataset(validation_data):
            problems.append("validation_data must be an fmaudit Dataset like train_data")
        if native and len(train_data) and "classifier" in model.capabilities and train_data.labels is None:
            problems.append(f"dataset {train_data.name!r} has no labels; a classifier needs them")
        return DPInputs(target=model, train=train_data, validation=validation_data,
                        described=f"fmaudit target {model.name!r} ({model.task})", problems=problems, notes=notes)

    # A plain nn.Module on an fmaudit image Dataset: an image classifier over [0, 1] pixels (as before).
    if native and not isinstance(model, Target):
        if train_data.modality != "image" or _hf_task(model) not in ("classification", "image-classification"):
            problems.append("an nn.Module on an fmaudit text Dataset needs its tokenizer: load it with "
                            "fmaudit.load_target(...), or give tokenized data (a datasets.Dataset with input_ids, "
                            "attention_mask, labels, or a torch Dataset)")
            return DPInputs(target=None, train=None, validation=None, described="?", problems=problems)
        from fmaudit.targets.vision import ImageClassifier, PixelClassifier

        params = list(model.parameters())
        hf = hasattr(model, "config") and _hf_task(model) == "image-classification"
        t = ImageClassifier(name=type(model).__name__, model=PixelClassifier(model, hf=hf), source="python",
                            kind="torch-module", device=str(params[0].device) if params else "cpu",
                            label_names=train_data.label_names, num_classes=train_data.num_labels)
        if train_data.labels is None:
            problems.append(f"dataset {train_data.name!r} has no labels; a classifier needs them")
        if loss_fn is not None:
            problems.append("loss_fn works with torch / Hugging Face data, not with an fmaudit Dataset")
        return DPInputs(target=t, train=train_data, validation=validation_data, problems=problems, notes=notes,
                        described=f"{type(model).__name__} as an image classifier ([0, 1] pixels -> logits)",
                        release=lambda work: (work.model.inner, work))

    # Everything else: the module as it is, on the data as it is.
    train, loader_batch, collate = _as_torch_data(train_data, "train_data", problems, notes)
    if _is_fmaudit_dataset(validation_data):
        problems.append("validation_data must be the same kind of data as train_data (torch / datasets), not an "
                        "fmaudit Dataset")
        validation = None
    else:
        validation, _, _ = _as_torch_data(validation_data, "validation_data", problems, [])
    inner = model.model if isinstance(model, Target) else model
    task = _hf_task(inner) if not isinstance(model, Target) or model.task != "causal-lm" else "causal-lm"
    cfg = getattr(inner, "config", None)
    pad_id = getattr(cfg, "pad_token_id", None)
    if pad_id is None and isinstance(model, Target) and getattr(model, "tokenizer", None) is not None:
        pad_id = model.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if isinstance(pad_id, (list, tuple)):
        pad_id = pad_id[0] if pad_id else None
    t = module_target(inner, task=task, loss_fn=loss_fn, collate=collate,
                     name=model.name if isinstance(model, Target) else type(inner).__name__,
                     pad_id=int(pad_id or 0))
    flags = {name: p.requires_grad for name, p in inner.named_parameters()} if t.is_peft else {}
    if t.is_peft:
        notes.append("a PEFT model: its own trainable parameters (adapters, modules_to_save) are trained with "
                     "trainable='all'; the PEFT model comes back unmerged, with its requires_grad flags as given")
    if train is not None and not problems:
        problems += _dry_run(t, train, loss_fn is not None)
    kind = {"causal-lm": "causal LM", "image-classification": "image classifier"}.get(task, "classifier")

    def release(work: Any) -> tuple[Any, Any]:
        for name, p in work.model.named_parameters():  # the loop leaves every flag on; a PEFT model keeps its own
            if name in flags:
                p.requires_grad_(flags[name])
        if isinstance(model, Target):  # a target like the caller's (tokenizer, preprocessing) around the model
            out = copy.copy(model)
            out.model = work.model
            out.weights_changed()
            return work.model, out
        return work.model, work

    return DPInputs(target=t, train=train, validation=validation, batch_size=loader_batch, problems=problems,
                    notes=notes, cacheable=False, release=release,
                    described=f"{type(inner).__name__} ({kind}) on {type(train_data).__name__}",
                    utility=lambda target, data, max_examples=1000, seed=0: target.evaluate(data, max_examples,
                                                                                              seed))


# ---------------------------------------------------------------------------------------------------
# Training


class _CollateOrEmpty:
    """The target's collate; an empty Poisson batch becomes `{}` (the loop then takes a noise-only step).
    Opacus' own empty-batch collate cannot build a batch of dict items before it has seen one."""

    def __init__(self, collate: Callable[[Sequence[Any]], dict]):
        self.collate = collate

    def __call__(self, items: Sequence[Any]) -> dict:
        return self.collate(items) if len(items) else {}


def _poisson_loader(target: Any, data: Any, s: "DPSettings", generator: Any):
    """Opacus' Poisson sampler (each example in each logical batch with probability `sample_rate`) with
    exactly `steps_per_epoch` logical batches per epoch: the plan and the accountant count the same steps.
    (Opacus' DPDataLoader runs int(1 / q) batches, which float rounding makes one short for some N, B.)"""
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    ds = target.torch_dataset(data)
    sampler = UniformWithReplacementSampler(num_samples=len(ds), sample_rate=s.sample_rate, generator=generator,
                                            steps=s.steps_per_epoch)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=_CollateOrEmpty(target.collate))


def _noise_only_step(optimizer: Any, ghost: bool) -> None:
    """One DP-SGD step on an empty Poisson batch: the update is noise only, and the accountant counts it
    (Opacus' optimizer does both, from an empty set of per-example gradients)."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()  # pops the sampler's end-of-logical-batch signal, adds noise, steps the accountant


def _repeat_broadcast_ids(model: Any) -> list[Any]:
    """Hooks that give every example its own row of position ids.

    DistilBERT-style embeddings look up ONE (1, L) row of position ids and broadcast it over the batch, so the
    position table's per-example gradients cannot be formed (Opacus: "stack expects each tensor to be equal
    size, but got [B] ... and [1]"). While DP training, a trainable nn.Embedding that receives a (1, L) index
    tensor inside a batch of B > 1 sequences of length L gets the row repeated B times: the same forward values,
    per-example gradients. Returns the hook handles (remove them after training)."""
    import torch
    from torch import nn

    state: dict[str, int | None] = {"batch": None, "length": None}

    def on_model(_module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.dim() >= 1), None)
        state["batch"] = int(x.shape[0]) if x is not None else None
        state["length"] = int(x.shape[1]) if x is not None and x.dim() >= 2 else None

    def on_embedding(_module, args):
        ids = args[0] if args else None
        b, length = state["batch"], state["length"]
        if (torch.is_tensor(ids) and ids.dim() == 2 and ids.shape[0] == 1 and b is not None and b > 1
                and length is not None and ids.shape[1] == length):
            return (ids.repeat(b, 1), *args[1:])  # repeat, not expand: ghost clipping needs real rows
        return None

    handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight.requires_grad:
            handles.append(m.register_forward_pre_hook(on_embedding))
    return handles


def _dedupe(notes: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for n in notes:
        seen.setdefault((n["severity"], n["title"]), n)
    return list(seen.values())


def _cleanup(hooks_obj, model) -> None:
    """Remove everything Opacus attached (hooks, per-sample attributes)."""
    if hooks_obj is not None:
        try:
            hooks_obj.cleanup()
        except Exception:  # pragma: no cover - best effort, the sweep below still runs
            pass
    for m in model.modules():
        for a in _OPACUS_MODULE_ATTRS:
            if a in m.__dict__:
                del m.__dict__[a]
        for p in m.parameters(recurse=False):
            for a in _OPACUS_PARAM_ATTRS:
                if hasattr(p, a):
                    try:
                        delattr(p, a)
                    except AttributeError:
                        pass


class DPTrainingError(RuntimeError):
    """DP training ran but did not train what it was asked to: trainable tensors that did not move."""

    def __init__(self, stuck: Sequence[str], steps: int):
        self.tensors = list(stuck)
        shown = "; ".join(self.tensors[:8]) + (f"; ... ({len(self.tensors)} in all)" if len(self.tensors) > 8 else "")
        super().__init__(
            f"DP training took {steps} noisy steps, but {len(self.tensors)} trainable tensor"
            f"{'s' if len(self.tensors) != 1 else ''} did not move: {shown}. Every trainable tensor gets clipped "
            "gradient plus noise at each step, so an unchanged one means its updates went to another tensor: "
            "typically the model's parameters were replaced after the optimizer and Opacus' hooks captured them "
            "(lazy device placement; PEFT + Opacus, opacus#820: move the model to its device before "
            "get_peft_model). The trained model would be the starting model while epsilon was spent; nothing is "
            "returned.")


def _fingerprints(model: Any) -> dict[str, tuple[float, float, float]]:
    """Three float64 functionals (sum, sum of squares, sum of |x|) of every trainable tensor, by name: a cheap
    "did it move" record (no copy of the weights). An unchanged tensor gives the same three numbers bit for bit;
    a tensor that moved under DP noise (every coordinate changes) keeps all three only by coincidence."""
    import torch

    with torch.no_grad():
        return {name: _fingerprint(p) for name, p in model.named_parameters() if p.requires_grad}


def _fingerprint(p: Any) -> tuple[float, float, float]:
    x = p.detach().double()
    return float(x.sum()), float((x * x).sum()), float(x.abs().sum())


def _unmoved(model: Any, before: dict[str, tuple[float, float, float]], optimizer: Any) -> list[str]:
    """Trainable tensors (named when training started) that did not move, or that the optimizer does not hold."""
    import torch

    held = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else None
    live = dict(model.named_parameters())
    out = []
    with torch.no_grad():
        for name, fp in before.items():
            p = live.get(name)
            if p is None:
                out.append(f"{name} (no longer in the model)")
            elif _fingerprint(p) == fp:
                why = " (not the tensor the optimizer updates)" if held is not None and id(p) not in held else ""
                out.append(name + why)
    return out


def _make_train_fn(s: DPSettings, record: dict[str, Any]):
    """The `train_fn` for finetune_cached: the core loop with Opacus wrapped in."""

    def train_fn(t, data, config, progress=None, label="DP fine-tuning"):
        import torch
        from opacus import PrivacyEngine
        from opacus.utils.batch_memory_manager import wrap_data_loader
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        from fmaudit.seeds import Stream, derive
        from fmaudit.training import train

        base_model = t.model
        if s.trainable == "lora":
            t.model = _lora_wrap(t, s.lora or {})
        else:
            t.set_trainable(s.trainable, s.n_layers)
        n_trainable = int(sum(p.numel() for p in t.model.parameters() if p.requires_grad))
        before = _fingerprints(t.model)
        n = len(data)
        cfg = type(config)(**{**asdict(config), "trainable": "keep"})
        # secure_mode=False: Opacus warns "Secure RNG turned off" here; that warning is NOT silenced (it says the
        # guarantee needs the PRNG's seed to stay secret), and the result carries it as a finding.
        engine = PrivacyEngine(accountant=s.accountant)
        held: dict[str, Any] = {}
        ghost = s.clipping == "ghost"
        empty = [0]
        handles: list[Any] = []

        def wrap(model, optimizer, _shuffled_loader):
            model.train()  # Opacus validates in training mode (the loop sets it too, right after)
            handles.extend(_repeat_broadcast_ids(model))
            sampler_gen = torch.Generator().manual_seed(derive(s.seed, Stream.DP_SAMPLER))
            noise_gen = torch.Generator(device=t.device).manual_seed(derive(s.seed, Stream.DP_NOISE))
            loader = _poisson_loader(t, data, s, sampler_gen)
            # poisson_sampling=False: the loader above already is Opacus' Poisson sampler (with the planned number
            # of steps); Opacus then takes sample rate 1 / len(loader) = the planned rate for its accountant.
            kw = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=s.noise_multiplier,
                      max_grad_norm=s.max_grad_norm, poisson_sampling=False, noise_generator=noise_gen,
                      grad_sample_mode="ghost" if ghost else "hooks", loss_reduction="mean")
            if ghost:
                gsm, opt, _criterion, dl = engine.make_private(criterion=torch.nn.CrossEntropyLoss(), **kw)
            else:
                gsm, opt, dl = engine.make_private(**kw)
            if len(dl) != s.steps_per_epoch or 1.0 / len(dl) != s.sample_rate:
                raise RuntimeError(f"internal error: the DP loader has {len(dl)} batches per epoch, the plan "
                                   f"{s.steps_per_epoch} (sample rate {s.sample_rate})")
            gsm.forbid_grad_accumulation()  # as Opacus does under Poisson sampling
            opt.expected_batch_size = n / s.steps_per_epoch  # the mean's denominator: E|batch| = N q, unrounded
            held.update(gsm=gsm, opt=opt)
            dl = wrap_data_loader(data_loader=dl, max_batch_size=s.max_physical_batch_size, optimizer=opt)
            return gsm, opt, dl

        def loss_fn(model, batch):
            per_example = t.loss(model, batch, reduction="none")  # the privacy unit: one example / sequence
            if ghost:
                return DPTensorFastGradientClipping(held["gsm"], held["opt"], per_example, "mean")
            return per_example.mean()

        def on_empty() -> None:
            _noise_only_step(held["opt"], ghost)
            empty[0] += 1

        try:
            stats = train(t, data, cfg, progress=progress, label=label, wrap=wrap, loss_fn=loss_fn,
                          on_empty=on_empty, torch_stream=Stream.DP_TRAIN)
            history = [(float(h[0]), float(h[1]), int(h[2])) for h in engine.accountant.history]
            stuck = _unmoved(t.model, before, held.get("opt"))
            if stuck:
                raise DPTrainingError(stuck, steps=int(sum(h[2] for h in history)))
        finally:
            for h in handles:
                h.remove()
            _cleanup(held.get("gsm"), t.model)
            if s.trainable == "lora":
                merged = t.model.merge_and_unload()
                t.model = merged if merged is not None else base_model
                _cleanup(None, t.model)
            t.model.eval()
            for p in t.model.parameters():
                p.requires_grad_(True)
            t.weights_changed()
        # The steps actually taken, as the training engine's accountant counted them (one per logical batch,
        # empty ones included); every one must have the planned noise and sample rate.
        odd = [h for h in history if (h[0], h[1]) != (s.noise_multiplier, s.sample_rate)]
        if odd:
            raise RuntimeError(f"accounting mismatch: steps with (noise, rate) {odd[:3]} instead of "
                               f"({s.noise_multiplier}, {s.sample_rate})")
        steps = int(sum(h[2] for h in history))
        notes: list[dict[str, str]] = []
        if steps != s.steps:
            notes.append({"severity": "medium", "title": "DP training took a different number of steps than planned",
                          "detail": f"{steps} logical steps taken, {s.steps} planned; epsilon counts the {steps} "
                                    "taken."})
        kw = dict(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate, delta=s.delta,
                  accountant=s.accountant)
        total = account(steps=steps, **kw)
        notes += total.notes
        xs = ledger_points(steps, s.steps_per_epoch, LEDGER_POINTS[s.accountant])
        ys = []
        for x in xs:
            a = account(steps=x, **kw)
            ys.append(a.epsilon)
            notes += a.notes
        per_epoch = []
        for e in range(1, s.epochs + 1):
            a = account(steps=min(e * s.steps_per_epoch, steps), **kw)
            per_epoch.append(a.epsilon)
            notes += a.notes
        if steps:
            per_epoch[-1] = total.epsilon
        stats.extra = {"dp": {"epsilon": total.epsilon, "epsilon_by_accountant": total.by_accountant,
                              "epsilon_accountant": total.used, "steps": steps, "accountant_history": history,
                              "ledger_steps": xs, "ledger_epsilon": ys, "epsilon_per_epoch": per_epoch,
                              "empty_batches": empty[0], "physical_steps": stats.steps, "settings": asdict(s),
                              "num_trainable_parameters": n_trainable, "accounting_notes": _dedupe(notes)}}
        record["stats"] = stats
        return stats

    return train_fn


def _utility(target: Any, data: Any, max_examples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Accuracy + mean loss for classifiers; mean loss + perplexity for causal LMs."""
    if data is None or len(data) == 0:
        return {}
    if len(data) > max_examples:
        from fmaudit.seeds import Stream, rng

        pick = rng(seed, Stream.EXAMPLE_SAMPLE).choice(len(data), max_examples, replace=False)
        data = data.subset(np.sort(pick))
    out: dict[str, float] = {"num_examples": float(len(data))}
    if "classifier" in target.capabilities and data.labels is not None:
        from fmaudit.stats import softmax

        logits = target.logits(data)
        probs = softmax(logits)
        out["accuracy"] = float((probs.argmax(1) == data.labels).mean())
        out["loss"] = float(-np.log(np.clip(probs[np.arange(len(data)), data.labels], 1e-12, 1)).mean())
    elif "token_logprobs" in target.capabilities:
        lps = target.token_logprobs(data)
        tok = sum(len(x) for x in lps)
        nll = -sum(float(x.sum()) for x in lps) / max(tok, 1)
        out["loss"] = nll
        out["perplexity"] = float(math.exp(min(nll, 700)))
    return out


# Li et al. (ICLR 2022), "Large Language Models Can Be Strong Differentially Private Learners": DP-Adam, large
# logical batches, a learning rate well above non-private fine-tuning's, few epochs.
DP_DEFAULT_EPOCHS = 3
DP_DEFAULT_LR = {"all": 5e-4, "other": 1e-3}  # full fine-tuning; few trainable parameters (head, last layers, LoRA)
DP_MAX_DEFAULT_BATCH = 1024


def dp_defaults(n: int, *, epochs: int | None, batch_size: int | None, lr: float | None,
                trainable: str) -> tuple[int | None, int | None, float | None, dict[str, Any]]:
    """Fill the training settings the caller left out with DP-specific defaults (Li et al., ICLR 2022: large
    logical batches, a higher learning rate, few epochs; the loop's optimizer is Adam(W), i.e. DP-Adam).
    Returns (epochs, batch_size, lr, picked): `picked` names each default taken and why."""
    picked: dict[str, Any] = {}
    if batch_size is None and n > 0:
        # about N/10 (a sample rate near 0.1), capped at 1024 and at N/4 (at least four steps per epoch)
        batch_size = int(max(1, min(DP_MAX_DEFAULT_BATCH, max(n // 10, min(16, n // 4)))))
        picked["batch_size"] = batch_size
    if lr is None:
        lr = DP_DEFAULT_LR["all" if trainable == "all" else "other"]
        picked["lr"] = lr
    if epochs is None:
        epochs = DP_DEFAULT_EPOCHS
        picked["epochs"] = epochs
    return epochs, batch_size, lr, picked


def _defaults_note(picked: dict[str, Any], n: int) -> str:
    why = {"batch_size": f"about N/10 of N = {n} (capped at {DP_MAX_DEFAULT_BATCH}): large logical batches shrink "
                         "the noise on the averaged gradient",
           "lr": "DP-Adam with a learning rate above non-private fine-tuning's",
           "epochs": "few epochs: each one spends privacy"}
    parts = [f"{k}={v:g} ({why[k]})" for k, v in picked.items()]
    return ("DP training defaults picked because none were given (Li et al., ICLR 2022): " + "; ".join(parts)
            + ". Tuning them on the private data spends privacy the ledger does not count.")


def dp_finetune(*, model: Any, train_data: Any, epochs: int | None = None, batch_size: int | None = None,
                lr: float | None = None, target_epsilon: float | None = None, noise_multiplier: float | None = None,
                delta: float | None = None, max_grad_norm: float = 1.0,
                accountant: Literal["prv", "rdp", "gdp"] = "prv",
                trainable: Literal["all", "last_n_layers", "head", "lora"] = "all", n_layers: int = 2,
                lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                lora_target_modules: Sequence[str] | None = None,
                clipping: Literal["auto", "ghost", "hooks"] = "auto", max_physical_batch_size: int | None = None,
                weight_decay: float = 0.0, validation_data: Any = None, loss_fn: LossFunction | None = None,
                seed: int = 0, cache_dir: str | Path | None = None, split: Any = None,
                progress: Callable[[str, int], Any] | None = None) -> DPResult:
    """Fine-tune a copy of `model` with DP-SGD (Opacus) and return the private model and its ledger.

    Args:
        model: an fmaudit Target (`fmaudit.load_target(...)`), any `nn.Module`, or a Hugging Face
            `PreTrainedModel` instance (sequence classification, causal LM, image classification; a PEFT model
            trains its own adapters). Never changed in place.
        train_data: an `fmaudit.data.Dataset`; a map-style `torch.utils.data.Dataset` of `(x, y)` tuples or
            dicts; a `DataLoader` (its dataset, batch size and collate_fn are used; Poisson sampling replaces
            its sampler, which `notes` says); or a Hugging Face `datasets.Dataset` with tokenized columns
            (`input_ids`, `attention_mask`, `labels` / `label`; non-numeric columns are dropped). Every
            example is one privacy unit (a sequence for causal LMs).
        epochs, batch_size, lr: training length, EXPECTED logical batch size (Poisson sampling: sample rate
            1/ceil(N / batch_size)), Adam(W) learning rate. Left out: DP defaults (`dp_defaults`, Li et al.
            2022: batch about N/10 up to 1024, lr 5e-4 full / 1e-3 partial, 3 epochs), named in `notes` and
            `picked_defaults`.
        target_epsilon: the budget; the accountant picks the smallest noise multiplier that stays within it.
            Or give `noise_multiplier` instead (one of the two).
        delta: default min(1e-5, 1/(10 N)); a value >= 1/N warns (it allows leaking one example outright).
        max_grad_norm: per-example clipping bound C.
        accountant: "prv" (tight, Opacus default here), "rdp" or "gdp" (an approximation: PRV is computed too
            and the larger epsilon is claimed; `epsilon_gdp` keeps GDP's). A failing accountant falls back to RDP.
        trainable: "all", "last_n_layers" (+ head; `n_layers`), "head", or "lora" (peft adapters on attention
            projections, merged back at the end; mainly for causal LMs).
        clipping: "auto" (ghost clipping unless trainable parameters are tied), "ghost" or "hooks".
        max_physical_batch_size: BatchMemoryManager's limit per forward/backward (default: batch_size +
            3 sqrt(batch_size), so a Poisson batch is rarely split).
        validation_data: held-out data for utility, of the same kind as `train_data`.
        loss_fn: `loss_fn(model, batch) -> tensor[B]`, one loss per example (torch / datasets data only);
            `batch` is what the data gives, collated: a tuple of tensors for tuple items, else a dict. Default:
            cross-entropy on the logits and labels, or the per-sequence next-token loss for causal LMs.
        cache_dir, split: cache the trained weights like fine-tunes (fmaudit data only; needs the member
            `split` of which `train_data` is `split.members`).

    Returns:
        DPResult with the plain trained model, epsilon (total and per epoch), delta, noise multiplier, sample
        rate, steps, accountant, clipping mode, ledger and train / validation utility; `params()` holds every
        setting needed to re-run the procedure; `findings` (severity, title, detail) say which accountant's
        epsilon is claimed and why, and that the guarantee needs the run seed to stay secret.

    Raises:
        DPConfigError listing every problem found before training (inputs, settings, unsupported layers, data
        size, a loss that is not per example).
        DPTrainingError when a trainable tensor did not move during DP training (its update was lost).
    """
    inputs = adapt_inputs(model, train_data, validation_data, loss_fn)
    problems = list(inputs.problems)
    notes: list[str] = list(inputs.notes)
    data = inputs.train
    n = len(data) if data is not None else 0
    if inputs.batch_size is not None:
        if batch_size is None:
            batch_size = int(inputs.batch_size)
        elif batch_size != inputs.batch_size:
            notes.append(f"batch_size={batch_size} given: the DataLoader's batch size {inputs.batch_size} is not used")
    epochs, batch_size, lr, picked = dp_defaults(n, epochs=epochs, batch_size=batch_size, lr=lr, trainable=trainable)
    if picked:
        notes.append(_defaults_note(picked, n))
    problems += _validate_settings(n=n if data is not None else None, target_epsilon=target_epsilon,
                                   noise_multiplier=noise_multiplier, delta=delta, max_grad_norm=max_grad_norm,
                                   epochs=epochs, batch_size=batch_size, lr=lr, accountant=accountant,
                                   trainable=trainable, clipping=clipping,
                                   max_physical_batch_size=max_physical_batch_size, n_layers=n_layers)
    if cache_dir is not None and not inputs.cacheable:
        problems.append("cache_dir works with fmaudit Datasets (the cache is keyed by their example ids); leave it "
                        "out for torch / datasets data")
    lora = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout,
            "target_modules": list(lora_target_modules) if lora_target_modules else None} \
        if trainable == "lora" else None
    mode = "hooks"
    if inputs.target is not None and trainable in TRAINABLE and clipping in CLIPPING:
        more, more_notes, mode = preflight(inputs.target, trainable=trainable, n_layers=n_layers, lora=lora,
                                           clipping=clipping)
        problems += more
        notes += more_notes
    if problems:
        raise DPConfigError(problems)

    if delta is None:
        delta = default_delta(n)
    elif delta >= 1.0 / n:
        msg = (f"delta={delta:g} is not below 1/N = {1.0 / n:.3g}: a mechanism that publishes one random training "
               f"example outright satisfies it; use delta <= {default_delta(n):.2g}")
        warnings.warn(msg, DPPrivacyWarning, stacklevel=2)
        notes.append(msg)
    with _quiet_opacus():
        return _run(inputs=inputs, n=n, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                    target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, delta=delta,
                    max_grad_norm=max_grad_norm, accountant=accountant, trainable=trainable, n_layers=n_layers,
                    lora=lora, mode=mode, notes=notes, max_physical_batch_size=max_physical_batch_size, seed=seed,
                    cache_dir=cache_dir, split=split, progress=progress, picked=picked)


@contextlib.contextmanager
def _quiet_opacus():
    """Silences only PyTorch's note that a full backward hook fires on a module whose inputs need no gradient
    (frozen embeddings under Opacus' hooks): harmless, and not about the guarantee. Warnings that say the
    guarantee may not hold are never silenced: Opacus' "Secure RNG turned off" and "GDP accounting is
    experimental" reach the caller (and are findings in the result); RDP's "Optimal order is the largest /
    smallest alpha" (a valid but loose bound) is caught where it arises and becomes a note."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen embeddings
        yield


def _run(*, inputs, n, epochs, batch_size, lr, weight_decay, target_epsilon, noise_multiplier, delta, max_grad_norm,
         accountant, trainable, n_layers, lora, mode, notes, max_physical_batch_size, seed, cache_dir, split, progress,
         picked) -> DPResult:
    from fmaudit.training import TrainConfig, finetune_cached

    target, train_data, validation_data = inputs.target, inputs.train, inputs.validation

    steps_per_epoch = math.ceil(n / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps = epochs * steps_per_epoch
    if noise_multiplier is None:
        noise_multiplier = noise_for(target_epsilon=float(target_epsilon), sample_rate=sample_rate, steps=steps,
                                     delta=delta, accountant=accountant)
    notes = list(notes)
    settings = DPSettings(noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
                          sample_rate=sample_rate, steps=steps, steps_per_epoch=steps_per_epoch, epochs=epochs,
                          batch_size=batch_size,
                          max_physical_batch_size=int(max_physical_batch_size or default_physical_batch(batch_size)),
                          delta=float(delta), accountant=accountant, clipping=mode, trainable=trainable,
                          n_layers=n_layers, lora=lora, lr=float(lr), weight_decay=float(weight_decay), seed=seed,
                          target_epsilon=None if target_epsilon is None else float(target_epsilon))
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         trainable=trainable if trainable != "lora" else "keep", n_layers=n_layers, seed=seed)
    work = target.copy()
    record: dict[str, Any] = {}
    train_fn = _make_train_fn(settings, record)
    t0 = time.perf_counter()
    key = None
    hit = False
    if cache_dir is not None:
        if split is None:
            raise DPConfigError(["cache_dir needs the member split (split=...) that train_data comes from"])
        key_extra = {"dp": asdict(settings), "v": "dp-2"}  # 2: own Poisson loader, noise-only empty steps
        stats, hit, key = finetune_cached(work, split, config, cache_dir=Path(cache_dir), progress=progress,
                                          label="DP fine-tuning", kind="dp-finetune", key_extra=key_extra,
                                          train_fn=train_fn)
    else:
        stats = train_fn(work, train_data, config, progress=progress)
    dp = stats.extra["dp"]
    if target_epsilon is not None and dp["epsilon"] > target_epsilon + 1e-9:
        raise RuntimeError(f"spent epsilon {dp['epsilon']:.4f} exceeds target {target_epsilon} (accounting bug)")
    trainable_count = int(dp.get("num_trainable_parameters", 0))
    by = {k: float(v) for k, v in (dp.get("epsilon_by_accountant") or {}).items()}
    findings = [dict(f) for f in dp.get("accounting_notes", [])] + [seed_statement(seed)]
    notes += [f"{f['title']}: {f['detail']}" for f in findings]
    model_out, target_out = inputs.release(work)
    return DPResult(
        model=model_out, target=target_out, epsilon=float(dp["epsilon"]),
        epsilon_per_epoch=list(dp["epsilon_per_epoch"]),
        delta=settings.delta, noise_multiplier=settings.noise_multiplier, sample_rate=sample_rate,
        steps=int(dp["steps"]), epochs=epochs, accountant=accountant, clipping=mode, max_grad_norm=max_grad_norm,
        batch_size=batch_size, max_physical_batch_size=settings.max_physical_batch_size, trainable=trainable,
        num_trainable_parameters=trainable_count, num_train_examples=n, target_epsilon=settings.target_epsilon,
        ledger_steps=list(dp["ledger_steps"]), ledger_epsilon=list(dp["ledger_epsilon"]),
        train_utility=inputs.utility(work, train_data, seed=seed),
        validation_utility=inputs.utility(work, validation_data, seed=seed) if validation_data is not None else None,
        train_seconds=float(stats.duration_s) if not hit else time.perf_counter() - t0,
        epoch_losses=list(stats.epoch_losses), cache_hit=hit, cache_key=key, notes=notes,
        lr=float(lr), weight_decay=float(weight_decay), n_layers=int(n_layers),
        lora=dict(lora) if lora is not None else None, steps_per_epoch=steps_per_epoch, seed=seed,
        epsilon_by_accountant=by, epsilon_accountant=str(dp.get("epsilon_accountant", accountant)),
        epsilon_gdp=by.get("gdp") if accountant == "gdp" else None, empty_batches=int(dp.get("empty_batches", 0)),
        findings=findings, picked_defaults=dict(picked), inputs=inputs.described)
