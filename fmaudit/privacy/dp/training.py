"""The DP-SGD training run: the core loop (`fmaudit.training.train`) with Opacus wrapped in through its
`wrap=` / `loss_fn=` / `on_empty=` hooks, Poisson sampling with the planned number of steps, noise-only steps on
empty batches, the ledger of the steps actually taken, and a plain model back (hooks removed, adapters merged,
every trainable tensor checked to have moved)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from fmaudit.privacy.dp.accounting import Note, epsilon_ledger
from fmaudit.privacy.dp.clipping import CLIPPING_MODES, noise_only_step
from fmaudit.privacy.dp.errors import DPTrainingError
from fmaudit.privacy.dp.settings import DPSettings
from fmaudit.privacy.dp.trainable import apply_trainable, trainable_scope

# Attributes Opacus may leave on modules / parameters; swept after training so the model is plain.
_OPACUS_MODULE_ATTRS = (
    "autograd_grad_sample_hooks",
    "ft_compute_sample_grad",
    "activations",
    "max_batch_len",
    "_forward_counter",
)
_OPACUS_PARAM_ATTRS = (
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "summed_grad",
    "_norm_sample",
    "_processed",
)

Fingerprints = dict[str, tuple[float, float, float]]


class _CollateOrEmpty:
    """The target's collate; an empty Poisson batch becomes `{}` (the loop then takes a noise-only step).
    Opacus' own empty-batch collate cannot build a batch of dict items before it has seen one."""

    def __init__(self, collate: Callable[[Sequence[Any]], dict]):
        self.collate = collate

    def __call__(self, items: Sequence[Any]) -> dict:
        return self.collate(items) if len(items) else {}


def _poisson_loader(target: Any, data: Any, s: DPSettings, generator: Any) -> Any:
    """Opacus' Poisson sampler (each example in each logical batch with probability `sample_rate`) with
    exactly `steps_per_epoch` logical batches per epoch: the plan and the accountant count the same steps.
    (Opacus' DPDataLoader runs int(1 / q) batches, which float rounding makes one short for some N, B.)"""
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    ds = target.torch_dataset(data)
    sampler = UniformWithReplacementSampler(
        num_samples=len(ds), sample_rate=s.sample_rate, generator=generator, steps=s.steps_per_epoch
    )
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=_CollateOrEmpty(target.collate))


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

    def on_model(_module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.dim() >= 1), None)
        state["batch"] = int(x.shape[0]) if x is not None else None
        state["length"] = int(x.shape[1]) if x is not None and x.dim() >= 2 else None

    def on_embedding(_module: Any, args: tuple) -> tuple | None:
        ids = args[0] if args else None
        b, length = state["batch"], state["length"]
        if (
            torch.is_tensor(ids)
            and ids.dim() == 2
            and ids.shape[0] == 1
            and b is not None
            and b > 1
            and length is not None
            and ids.shape[1] == length
        ):
            return (ids.repeat(b, 1), *args[1:])  # repeat, not expand: ghost clipping needs real rows
        return None

    handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight.requires_grad:
            handles.append(m.register_forward_pre_hook(on_embedding))
    return handles


def _dedupe(notes: list[Note]) -> list[Note]:
    seen: dict[tuple[str, str], Note] = {}
    for n in notes:
        seen.setdefault((n["severity"], n["title"]), n)
    return list(seen.values())


def _cleanup(hooks_obj: Any, model: Any) -> None:
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


def _fingerprints(model: Any) -> Fingerprints:
    """Three float64 functionals (sum, sum of squares, sum of |x|) of every trainable tensor, by name: a cheap
    "did it move" record (no copy of the weights). An unchanged tensor gives the same three numbers bit for bit;
    a tensor that moved under DP noise (every coordinate changes) keeps all three only by coincidence."""
    import torch

    with torch.no_grad():
        return {name: _fingerprint(p) for name, p in model.named_parameters() if p.requires_grad}


def _fingerprint(p: Any) -> tuple[float, float, float]:
    x = p.detach().double()
    return float(x.sum()), float((x * x).sum()), float(x.abs().sum())


def _unmoved(model: Any, before: Fingerprints, optimizer: Any) -> list[str]:
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


def make_train_fn(s: DPSettings, record: dict[str, Any], gradient_canaries: int = 0) -> Callable[..., Any]:
    """The `train_fn` for finetune_cached: the core loop with Opacus wrapped in. It sets `stats.extra["dp"]`
    (epsilon, ledger, steps taken, accounting notes) and `record["stats"]`; with `gradient_canaries` = m > 0, m
    white-box Dirac canaries ride in the DP steps (fmaudit.privacy.gradient_canaries) and
    `stats.extra["gradient_canaries"]` keeps their record."""

    def train_fn(t: Any, data: Any, config: Any, progress: Any = None, label: str = "DP fine-tuning") -> Any:
        import torch
        from opacus import PrivacyEngine
        from opacus.utils.batch_memory_manager import wrap_data_loader

        from fmaudit.privacy.gradient_canaries import Inserter
        from fmaudit.seeds import Stream, derive
        from fmaudit.training import train

        base_model = t.model
        apply_trainable(t, s.trainable, s.n_layers, s.lora)
        n_trainable = int(sum(p.numel() for p in t.model.parameters() if p.requires_grad))
        before = _fingerprints(t.model)
        canaries = (
            Inserter(
                list(t.model.named_parameters()),
                gradient_canaries,
                seed=s.seed,
                sample_rate=s.sample_rate,
                max_grad_norm=s.max_grad_norm,
            )
            if gradient_canaries
            else None
        )
        n = len(data)
        cfg = type(config)(**{**asdict(config), "trainable": "keep"})
        # secure_mode=False: Opacus warns "Secure RNG turned off" here; that warning is NOT silenced (it says the
        # guarantee needs the PRNG's seed to stay secret), and the result carries it as a finding.
        engine = PrivacyEngine(accountant=s.accountant)
        held: dict[str, Any] = {}
        clipping = CLIPPING_MODES[s.clipping]
        empty = [0]
        handles: list[Any] = []

        def wrap(model: Any, optimizer: Any, _shuffled_loader: Any) -> tuple[Any, Any, Any]:
            model.train()  # Opacus validates in training mode (the loop sets it too, right after)
            handles.extend(_repeat_broadcast_ids(model))
            sampler_gen = torch.Generator().manual_seed(derive(s.seed, Stream.DP_SAMPLER))
            noise_gen = torch.Generator(device=t.device).manual_seed(derive(s.seed, Stream.DP_NOISE))
            loader = _poisson_loader(t, data, s, sampler_gen)
            # poisson_sampling=False: the loader above already is Opacus' Poisson sampler (with the planned number
            # of steps); Opacus then takes sample rate 1 / len(loader) = the planned rate for its accountant.
            gsm, opt, dl = clipping.make_private(
                engine,
                dict(
                    module=model,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=s.noise_multiplier,
                    max_grad_norm=s.max_grad_norm,
                    poisson_sampling=False,
                    noise_generator=noise_gen,
                    grad_sample_mode=s.clipping,
                    loss_reduction="mean",
                ),
            )
            if len(dl) != s.steps_per_epoch or 1.0 / len(dl) != s.sample_rate:
                raise RuntimeError(
                    f"internal error: the DP loader has {len(dl)} batches per epoch, the plan "
                    f"{s.steps_per_epoch} (sample rate {s.sample_rate})"
                )
            gsm.forbid_grad_accumulation()  # as Opacus does under Poisson sampling
            opt.expected_batch_size = n / s.steps_per_epoch  # the mean's denominator: E|batch| = N q, unrounded
            held.update(gsm=gsm, opt=opt)
            if canaries is not None:
                canaries.attach(opt)
            dl = wrap_data_loader(data_loader=dl, max_batch_size=s.max_physical_batch_size, optimizer=opt)
            return gsm, opt, dl

        def loss_fn(model: Any, batch: Any) -> Any:
            per_example = t.loss(model, batch, reduction="none")  # the privacy unit: one example / sequence
            return clipping.loss(held["gsm"], held["opt"], per_example)

        def on_empty() -> None:
            noise_only_step(held["opt"], s.clipping)
            empty[0] += 1

        try:
            stats = train(
                t,
                data,
                cfg,
                progress=progress,
                label=label,
                wrap=wrap,
                loss_fn=loss_fn,
                on_empty=on_empty,
                torch_stream=Stream.DP_TRAIN,
            )
            history = [(float(h[0]), float(h[1]), int(h[2])) for h in engine.accountant.history]
            stuck = _unmoved(t.model, before, held.get("opt"))
            if stuck:
                raise DPTrainingError(stuck, steps=int(sum(h[2] for h in history)))
        finally:
            for h in handles:
                h.remove()
            if canaries is not None:
                canaries.detach()
            _cleanup(held.get("gsm"), t.model)
            trainable_scope(s.trainable).finish(t, base_model)
            _cleanup(None, t.model)
            t.model.eval()
            for p in t.model.parameters():
                p.requires_grad_(True)
            t.weights_changed()
        stats.extra = {"dp": _dp_record(s, history, stats.steps, empty[0], n_trainable)}
        if canaries is not None:
            stats.extra["gradient_canaries"] = canaries.record()
        record["stats"] = stats
        return stats

    return train_fn


def _dp_record(
    s: DPSettings, history: list[tuple[float, float, int]], physical_steps: int, empty_batches: int, n_trainable: int
) -> dict[str, Any]:
    """What a DP run records (`stats.extra["dp"]`, cached with the weights): the steps actually taken, as the
    training engine's accountant counted them (one per logical batch, empty ones included; every one must have
    the planned noise and sample rate), and their ledger."""
    odd = [h for h in history if (h[0], h[1]) != (s.noise_multiplier, s.sample_rate)]
    if odd:
        raise RuntimeError(
            f"accounting mismatch: steps with (noise, rate) {odd[:3]} instead of "
            f"({s.noise_multiplier}, {s.sample_rate})"
        )
    steps = int(sum(h[2] for h in history))
    notes: list[Note] = []
    if steps != s.steps:
        notes.append(
            {
                "severity": "medium",
                "title": "DP training took a different number of steps than planned",
                "detail": f"{steps} logical steps taken, {s.steps} planned; epsilon counts the {steps} taken.",
            }
        )
    ledger = epsilon_ledger(
        steps=steps,
        steps_per_epoch=s.steps_per_epoch,
        epochs=s.epochs,
        noise_multiplier=s.noise_multiplier,
        sample_rate=s.sample_rate,
        delta=s.delta,
        accountant=s.accountant,
    )
    notes += ledger.notes
    total = ledger.total
    return {
        "epsilon": total.epsilon,
        "epsilon_by_accountant": total.by_accountant,
        "epsilon_accountant": total.used,
        "steps": steps,
        "accountant_history": history,
        "ledger_steps": ledger.steps,
        "ledger_epsilon": ledger.epsilon,
        "epsilon_per_epoch": ledger.per_epoch,
        "empty_batches": empty_batches,
        "physical_steps": physical_steps,
        "settings": asdict(s),
        "num_trainable_parameters": n_trainable,
        "accounting_notes": _dedupe(notes),
    }
