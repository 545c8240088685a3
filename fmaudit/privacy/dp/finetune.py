"""`dp_finetune`: the public entry point. It adapts the caller's inputs, picks DP defaults, validates every
setting and the model at once (one DPConfigError listing every problem), builds the run's `DPSettings`, trains
(optionally through the fine-tune cache) and returns a `DPResult`."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fmaudit.privacy import gradient_canaries as gc
from fmaudit.privacy.dp.clipping import CLIPPING
from fmaudit.privacy.dp.errors import DPConfigError, DPPrivacyWarning
from fmaudit.privacy.dp.inputs import DPInputs, adapt_inputs
from fmaudit.privacy.dp.module_target import LossFunction
from fmaudit.privacy.dp.preflight import preflight
from fmaudit.privacy.dp.settings import (
    DPSettings,
    default_delta,
    defaults_note,
    dp_defaults,
    lora_config,
    validate_settings,
)
from fmaudit.privacy.dp.trainable import TRAINABLE, trainable_scope
from fmaudit.privacy.dp.training import make_train_fn

SEED_STATEMENT = (
    "The DP noise and Poisson sampling come from a seeded PRNG whose seed is derived from the run's "
    "seed (fmaudit.seeds streams DP_NOISE, DP_SAMPLER; the noise seed itself is not stored). The "
    "guarantee holds only if that seed stays secret: anyone who knows the recipe's seed can reproduce "
    "the noise and remove it. This keeps audits re-runnable; for a real release, train with a secret "
    "seed (or Opacus' secure_mode / CSPRNG) and do not publish it."
)


def seed_statement(seed: int) -> dict[str, str]:
    """The finding that goes beside epsilon (severity info)."""
    return {
        "severity": "info",
        "title": "The DP guarantee needs the run seed to stay secret",
        "detail": f"Run seed {seed}. " + SEED_STATEMENT + ' (Opacus warns: "Secure RNG turned off".)',
    }


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
    # White-box gradient canaries (dp_finetune(gradient_canaries=m)): fmaudit.privacy.gradient_canaries.audit's
    # result, its `findings` and the run's `record`; None when off.
    gradient_canaries: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        """The DP parameters as a JSON-ready dict (for reports, and for re-running the same procedure:
        `finetune_info["dp"]` of a produced target). The noise seed is not among them: see `seed_statement`."""
        keys = (
            "epsilon",
            "epsilon_accountant",
            "epsilon_gdp",
            "epsilon_by_accountant",
            "epsilon_per_epoch",
            "delta",
            "target_epsilon",
            "noise_multiplier",
            "max_grad_norm",
            "sample_rate",
            "steps",
            "steps_per_epoch",
            "epochs",
            "batch_size",
            "max_physical_batch_size",
            "accountant",
            "clipping",
            "trainable",
            "n_layers",
            "lora",
            "lr",
            "weight_decay",
            "num_trainable_parameters",
            "num_train_examples",
            "empty_batches",
        )
        out = {k: getattr(self, k) for k in keys}
        out["lora"] = dict(self.lora) if self.lora is not None else None
        out["epsilon_by_accountant"] = dict(self.epsilon_by_accountant)
        return out


def dp_finetune(
    *,
    model: Any,
    train_data: Any,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    max_grad_norm: float = 1.0,
    accountant: Literal["prv", "rdp", "gdp"] = "prv",
    trainable: Literal["all", "last_n_layers", "head", "lora"] = "all",
    n_layers: int = 2,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: Sequence[str] | None = None,
    clipping: Literal["auto", "ghost", "bookkeeping", "hooks"] = "auto",
    max_physical_batch_size: int | None = None,
    weight_decay: float = 0.0,
    validation_data: Any = None,
    loss_fn: LossFunction | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    split: Any = None,
    progress: Callable[[str, int], Any] | None = None,
    gradient_canaries: int = 0,
) -> DPResult:
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
        clipping: "auto" (book-keeping clipping when it covers every trainable layer, else ghost clipping, else
            hooks for tied trainable weights; `notes` says which), "ghost", "bookkeeping" (book-keeping clipping,
            Bu et al. 2023: one backward pass; models with layers it does not cover use "hooks", and `notes` says
            so) or "hooks".
        max_physical_batch_size: BatchMemoryManager's limit per forward/backward (default: batch_size +
            3 sqrt(batch_size), so a Poisson batch is rarely split).
        validation_data: held-out data for utility, of the same kind as `train_data`.
        loss_fn: `loss_fn(model, batch) -> tensor[B]`, one loss per example (torch / datasets data only);
            `batch` is what the data gives, collated: a tuple of tensors for tuple items, else a dict. Default:
            cross-entropy on the logits and labels, or the per-sequence next-token loss for causal LMs.
        cache_dir, split: cache the trained weights like fine-tunes (fmaudit data only; needs the member
            `split` of which `train_data` is `split.members`).
        gradient_canaries: m > 0 audits the run itself with m white-box Dirac gradient canaries
            (fmaudit.privacy.gradient_canaries; at least 10): `result.gradient_canaries` holds epsilon_lb, its
            ceiling and epsilon_lb / epsilon. The m canary coordinates stay at their initial values.

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
        notes.append(defaults_note(picked, n))
    problems += validate_settings(
        n=n if data is not None else None,
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
        delta=delta,
        max_grad_norm=max_grad_norm,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        accountant=accountant,
        trainable=trainable,
        clipping=clipping,
        max_physical_batch_size=max_physical_batch_size,
        n_layers=n_layers,
    )
    if cache_dir is not None and not inputs.cacheable:
        problems.append(
            "cache_dir works with fmaudit Datasets (the cache is keyed by their example ids); leave it "
            "out for torch / datasets data"
        )
    lora = lora_config(trainable, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules)
    mode = "hooks"
    if inputs.target is not None and trainable in TRAINABLE and clipping in CLIPPING:
        more, more_notes, mode = preflight(
            inputs.target, trainable=trainable, n_layers=n_layers, lora=lora, clipping=clipping
        )
        problems += more
        notes += more_notes
    if gradient_canaries and not gradient_canaries >= gc.MIN_CANARIES:
        problems.append(f"gradient_canaries must be 0 (off) or at least {gc.MIN_CANARIES}, got {gradient_canaries}")
    if problems:
        raise DPConfigError(problems)

    if delta is None:
        delta = default_delta(n)
    elif delta >= 1.0 / n:
        msg = (
            f"delta={delta:g} is not below 1/N = {1.0 / n:.3g}: a mechanism that publishes one random training "
            f"example outright satisfies it; use delta <= {default_delta(n):.2g}"
        )
        warnings.warn(msg, DPPrivacyWarning, stacklevel=2)
        notes.append(msg)
    assert epochs is not None and batch_size is not None and lr is not None  # dp_defaults filled them (n > 0)
    with _quiet_opacus():
        settings = DPSettings.plan(
            n=n,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            delta=delta,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            clipping=mode,
            trainable=trainable,
            n_layers=n_layers,
            lora=lora,
            max_physical_batch_size=max_physical_batch_size,
            seed=seed,
        )
        return _run(
            inputs,
            settings,
            notes=notes,
            picked=picked,
            cache_dir=cache_dir,
            split=split,
            progress=progress,
            gradient_canaries=int(gradient_canaries),
        )


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silences only PyTorch's note that a full backward hook fires on a module whose inputs need no gradient
    (frozen embeddings under Opacus' hooks): harmless, and not about the guarantee. Warnings that say the
    guarantee may not hold are never silenced: Opacus' "Secure RNG turned off" and "GDP accounting is
    experimental" reach the caller (and are findings in the result); RDP's "Optimal order is the largest /
    smallest alpha" (a valid but loose bound) is caught where it arises and becomes a note."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen embeddings
        yield


def _run(
    inputs: DPInputs,
    s: DPSettings,
    *,
    notes: list[str],
    picked: dict[str, Any],
    cache_dir: str | Path | None,
    split: Any,
    progress: Callable[[str, int], Any] | None,
    gradient_canaries: int = 0,
) -> DPResult:
    """Train a copy of `inputs.target` as `s` says (through the fine-tune cache when `cache_dir` is given) and
    collect the result."""
    from fmaudit.training import TrainConfig, finetune_cached

    train_data, validation_data = inputs.train, inputs.validation
    config = TrainConfig(
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        weight_decay=s.weight_decay,
        trainable=trainable_scope(s.trainable).config_mode or s.trainable,
        n_layers=s.n_layers,
        seed=s.seed,
    )
    work = inputs.target.copy()
    record: dict[str, Any] = {}
    train_fn = make_train_fn(s, record, gradient_canaries)
    t0 = time.perf_counter()
    key = None
    hit = False
    if cache_dir is not None:
        if split is None:
            raise DPConfigError(["cache_dir needs the member split (split=...) that train_data comes from"])
        key_extra: dict[str, Any] = {"dp": asdict(s), "v": "dp-2"}  # 2: own Poisson loader, noise-only empty steps
        if gradient_canaries:  # frozen canary coordinates change the weights; off: the key is unchanged
            key_extra["gradient_canaries"] = gradient_canaries
        stats, hit, key = finetune_cached(
            work,
            split,
            config,
            cache_dir=Path(cache_dir),
            progress=progress,
            label="DP fine-tuning",
            kind="dp-finetune",
            key_extra=key_extra,
            train_fn=train_fn,
        )
    else:
        stats = train_fn(work, train_data, config, progress=progress)
    dp = stats.extra["dp"]
    if s.target_epsilon is not None and dp["epsilon"] > s.target_epsilon + 1e-9:
        raise RuntimeError(f"spent epsilon {dp['epsilon']:.4f} exceeds target {s.target_epsilon} (accounting bug)")
    by = {k: float(v) for k, v in (dp.get("epsilon_by_accountant") or {}).items()}
    findings = [dict(f) for f in dp.get("accounting_notes", [])] + [seed_statement(s.seed)]
    model_out, target_out = inputs.release(work)
    canaries = None
    if gradient_canaries:
        canaries = gc.audit(stats.extra["gradient_canaries"], delta=s.delta, epsilon=float(dp["epsilon"]))
        canaries.update(findings=gc.findings(canaries), record=stats.extra["gradient_canaries"])
    return DPResult(
        model=model_out,
        target=target_out,
        epsilon=float(dp["epsilon"]),
        epsilon_per_epoch=list(dp["epsilon_per_epoch"]),
        delta=s.delta,
        noise_multiplier=s.noise_multiplier,
        sample_rate=s.sample_rate,
        steps=int(dp["steps"]),
        epochs=s.epochs,
        accountant=s.accountant,
        clipping=s.clipping,
        max_grad_norm=s.max_grad_norm,
        batch_size=s.batch_size,
        max_physical_batch_size=s.max_physical_batch_size,
        trainable=s.trainable,
        num_trainable_parameters=int(dp.get("num_trainable_parameters", 0)),
        num_train_examples=len(train_data),
        target_epsilon=s.target_epsilon,
        ledger_steps=list(dp["ledger_steps"]),
        ledger_epsilon=list(dp["ledger_epsilon"]),
        train_utility=inputs.utility(work, train_data, seed=s.seed),
        validation_utility=inputs.utility(work, validation_data, seed=s.seed) if validation_data is not None else None,
        train_seconds=float(stats.duration_s) if not hit else time.perf_counter() - t0,
        epoch_losses=list(stats.epoch_losses),
        cache_hit=hit,
        cache_key=key,
        notes=notes + [f"{f['title']}: {f['detail']}" for f in findings],
        lr=s.lr,
        weight_decay=s.weight_decay,
        n_layers=int(s.n_layers),
        lora=dict(s.lora) if s.lora is not None else None,
        steps_per_epoch=s.steps_per_epoch,
        seed=s.seed,
        epsilon_by_accountant=by,
        epsilon_accountant=str(dp.get("epsilon_accountant", s.accountant)),
        epsilon_gdp=by.get("gdp") if s.accountant == "gdp" else None,
        empty_batches=int(dp.get("empty_batches", 0)),
        findings=findings,
        picked_defaults=dict(picked),
        inputs=inputs.described,
        gradient_canaries=canaries,
    )
