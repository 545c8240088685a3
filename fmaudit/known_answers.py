"""Known-answer scenarios: planted situations whose right answer is known, run on small models.

An audit number means something only if it lands right where the truth is known: "nothing" when the
model never saw either set, "a lot" when it memorised its training set, never above a DP guarantee that
holds, and the same twice with the same seed. Each scenario here builds its case from scratch (sklearn's
digits, a small MLP, seconds on a CPU), runs the real audit module on it and returns the numbers with a
verdict. The test suite asserts on them (`tests/test_known_answers.py`) and `benchmarks/known_answers.py`
prints them.

    from fmaudit.known_answers import run_all
    for r in run_all(): print(r.line())
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ScenarioResult",
    "membership_null",
    "membership_planted_leak",
    "dp_canary_consistency",
    "seed_independence",
    "same_seed_same_numbers",
    "SCENARIOS",
    "run_all",
]

CLASSIFIER_ATTACKS = ["loss", "confidence", "entropy", "lira_online", "lira_offline", "rmia", "rmia_offline"]


@dataclass
class ScenarioResult:
    name: str
    passed: bool
    numbers: dict[str, Any]
    expectation: str
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items() if not isinstance(v, (dict, list)))
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return f"{self.name:<28} {verdict:<6} {nums}  [{self.seconds:.1f}s]  expected: {self.expectation}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class _Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


# ---------------------------------------------------------------------------------------------------
# Building blocks: digits, a small MLP, the real membership module


def _digits(n: int, seed: int, label_noise: float = 0.0):
    from fmaudit.data import Dataset, load_digits
    from fmaudit.seeds import Stream, rng

    ds = load_digits()
    g = rng(seed, Stream.DATA_LIMIT)
    ds = ds.subset(np.sort(g.choice(len(ds), n, replace=False)))
    assert ds.labels is not None  # digits are labelled
    labels = ds.labels.copy()
    if label_noise:
        flip = g.random(n) < label_noise  # atypical examples: only memorisation fits them
        labels[flip] = (labels[flip] + g.integers(1, 10, int(flip.sum()))) % 10
    return Dataset(ds.name, ds.source, "image", ds.ids, labels, images=ds.images, label_names=ds.label_names)


def _mlp(seed: int, hidden: int = 128):
    import torch
    from torch import nn

    from fmaudit.seeds import Stream, derive
    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    torch.manual_seed(derive(seed, Stream.HEAD_INIT))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return ImageClassifier(
        name="mlp", model=PixelClassifier(net), source="known-answer", kind="torch-module", num_classes=10
    )


def _stratified_split(data, seed: int):
    """Half of every label's examples are members (seeded), so members and non-members share one label mix."""
    from fmaudit.data import Split
    from fmaudit.seeds import Stream, rng

    g = rng(seed, Stream.SPLIT, 2)
    members = []
    for k in np.unique(data.labels):
        idx = np.nonzero(data.labels == k)[0]
        members.extend(g.choice(idx, len(idx) // 2, replace=False).tolist())
    mem = np.sort(np.asarray(members, dtype=np.int64))
    return Split(data, mem, np.setdiff1d(np.arange(len(data)), mem), seed, 0.5)


def _finetune(base, members, *, epochs: int, lr: float, seed: int, batch_size: int = 32):
    from fmaudit.provenance import Provenance
    from fmaudit.training import TrainConfig, train

    target = base.copy("mlp-trained")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, trainable="all", seed=seed)
    stats = train(target, members, config)
    target.provenance = Provenance(
        train=config, train_seconds=stats.duration_s, base_weights_sha256=base.weights_sha256()
    )
    return target


def _ctx(work: Path, data, split, base, seed: int):
    from fmaudit.testing import audit_context

    return audit_context(work, data=data, split=split, base=base, seed=seed, unit_id="known-answer:privacy.membership")


def _membership(target, ctx, *, attacks: list[str], references: int, params: dict[str, Any] | None = None):
    from fmaudit.audits.privacy.membership import MembershipAudit

    mod = MembershipAudit(
        {
            "attacks": attacks,
            "reference_models": references,
            "reference_trainable": "all",
            "bootstrap": 300,
            **(params or {}),
        }
    )
    problems = mod.check(target, ctx.data)
    if problems:
        raise ValueError("; ".join(problems))
    return mod.run(target, ctx)


def _headline(out) -> dict[str, Any]:
    m = out.metrics
    return {
        "auc": m["auc"].value,
        "auc_null": m["auc_null"].value,
        "auc_p": m["auc_p_value"].value,
        "tpr@1%": m["tpr_at_1pct_fpr"].value,
        "tpr@1%_ci_high": m["tpr_at_1pct_fpr"].ci_high,
        "advantage": m["advantage"].value,
        "advantage_null": m["advantage_null"].value,
        "attack": out.tables["headline"]["metrics"]["auc"]["attack"],
    }


# ---------------------------------------------------------------------------------------------------
# Scenarios


def membership_null(seed: int = 0, work: Path | None = None) -> ScenarioResult:
    """A target scored on two sets it never trained on: 'members' and 'non-members' are both unseen.
    Truth: no leak. Every attack's AUC interval must cover 0.5, the calibrated headline must not exceed
    its null reference, and a gate `auc > 0.6` must not fire."""
    t0 = time.perf_counter()
    from fmaudit.data import Split

    work = Path(work or tempfile.mkdtemp(prefix="fmaudit-ka-"))
    data = _digits(900, seed)
    from fmaudit.seeds import Stream, rng

    order = rng(seed, Stream.SPLIT, 1).permutation(len(data))
    trained, fake_members, fake_nonmembers = order[:300], order[300:600], order[600:900]
    base = _mlp(seed)
    target = _finetune(base, data.subset(np.sort(trained)), epochs=30, lr=1e-2, seed=seed)
    # the audit is told that fake_members were trained on; the model never saw them
    split = Split(data, np.sort(fake_members), np.sort(fake_nonmembers), seed, 0.5)
    target.split = split
    out = _membership(target, _ctx(work, data, split, base, seed), attacks=CLASSIFIER_ATTACKS, references=4)
    c = _Checks()
    covers = {a: (out.metrics[f"{a}.auc"].ci_low, out.metrics[f"{a}.auc"].ci_high) for a in CLASSIFIER_ATTACKS}
    for a, (lo, hi) in covers.items():
        c.expect(lo <= 0.5 <= hi, f"{a} AUC interval [{lo:.3f}, {hi:.3f}] excludes 0.5")
    h = _headline(out)
    c.expect(
        h["auc"] <= h["auc_null"] or h["auc_p"] > 0.05,
        f"headline AUC {h['auc']:.3f} exceeds its null reference {h['auc_null']:.3f} (p = {h['auc_p']:.3f})",
    )
    c.expect(h["auc"] <= 0.6, f"gate auc > 0.6 would fire (AUC {h['auc']:.3f})")
    c.expect(
        any("Indistinguishable from chance" in f.title for f in out.findings) or h["auc_p"] > 0.05,
        "no 'indistinguishable from chance' finding",
    )
    worst = max(abs(v.value - 0.5) for k, v in out.metrics.items() if k.endswith(".auc"))
    return ScenarioResult(
        "membership: null",
        not c.failures,
        {**h, "max_attack_auc_deviation": worst},
        "every AUC interval covers 0.5; headline <= null",
        c.failures,
        time.perf_counter() - t0,
    )


def membership_planted_leak(seed: int = 0, work: Path | None = None, dp_epsilon: float | None = 1.0) -> ScenarioResult:
    """A target that memorises (400 digits, 30% of them mislabelled, 60 epochs): the strongest attack
    must reach AUC >= 0.8 and TPR at 1% FPR well above 1%. Its DP twin (DP-SGD at `dp_epsilon` from the
    same base on the same members) must stay within its null reference."""
    t0 = time.perf_counter()

    work = Path(work or tempfile.mkdtemp(prefix="fmaudit-ka-"))
    data = _digits(800, seed, label_noise=0.3)
    # stratified by label: with a plain random split the members' label mix differs from the non-members'
    # by chance, and any model that learns its training set's class balance (a DP one included, since that
    # is an aggregate) then scores members higher; that is a property of the split, not memorisation
    split = _stratified_split(data, seed)
    base = _mlp(seed)
    target = _finetune(base, split.members, epochs=60, lr=1e-2, seed=seed)
    target.split = split
    out = _membership(target, _ctx(work, data, split, base, seed), attacks=CLASSIFIER_ATTACKS, references=4)
    c = _Checks()
    h = _headline(out)
    c.expect(h["auc"] >= 0.8, f"strongest attack AUC {h['auc']:.3f} < 0.8")
    c.expect(h["tpr@1%"] >= 0.05, f"TPR at 1% FPR {h['tpr@1%']:.3f} is not well above 1%")
    c.expect(h["auc"] > h["auc_null"] and h["auc_p"] < 0.01, "headline not above its null reference")
    numbers: dict[str, Any] = dict(h)
    if dp_epsilon is not None:
        import warnings

        from fmaudit.privacy.dp import DPPrivacyWarning, dp_finetune
        from fmaudit.provenance import Provenance
        from fmaudit.training import TrainConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DPPrivacyWarning)
            res = dp_finetune(
                model=base,
                train_data=split.members,
                target_epsilon=dp_epsilon,
                epochs=10,
                batch_size=64,
                lr=5e-3,
                max_grad_norm=1.0,
                seed=seed,
                cache_dir=work / "cache",
                split=split,
            )
        twin = res.target
        twin.split = split
        # reference models train like the non-private target (as the runner does for a DP twin)
        twin.provenance = Provenance(
            train=TrainConfig(epochs=60, batch_size=32, lr=1e-2, trainable="all", seed=seed),
            base_weights_sha256=base.weights_sha256(),
        )
        dp_out = _membership(twin, _ctx(work, data, split, base, seed), attacks=CLASSIFIER_ATTACKS, references=4)
        d = _headline(dp_out)
        c.expect(
            d["auc"] <= d["auc_null"] or d["auc_p"] > 0.05,
            f"DP twin (epsilon {res.epsilon:.2f}) headline AUC {d['auc']:.3f} exceeds its null "
            f"{d['auc_null']:.3f} (p = {d['auc_p']:.3f})",
        )
        c.expect(
            d["tpr@1%_ci_high"] is None or d["tpr@1%_ci_high"] >= 0.01, "DP twin TPR at 1% FPR interval excludes 1%"
        )
        numbers.update(
            {
                "dp_epsilon": res.epsilon,
                "dp_auc": d["auc"],
                "dp_auc_null": d["auc_null"],
                "dp_auc_p": d["auc_p"],
                "dp_tpr@1%": d["tpr@1%"],
            }
        )
    return ScenarioResult(
        "membership: planted leak",
        not c.failures,
        numbers,
        "AUC >= 0.8, TPR@1%FPR >= 5%; DP twin within its null",
        c.failures,
        time.perf_counter() - t0,
    )


def seed_independence(seeds: int = 50, n: int = 1000, references: int = 4) -> ScenarioResult:
    """Reference-model halves and the target's member split drawn with the SAME seed must be independent:
    the fraction of the target's members (and non-members) in each reference half is 0.5 within chance,
    for every seed. (The old code put exactly the members in reference model 0 at seed 0.)"""
    t0 = time.perf_counter()
    from fmaudit.data import Dataset, member_split
    from fmaudit.privacy.membership.reference_models import paired_halves, reference_overlap

    data = Dataset("ids", "ids", "text", [f"x{i}" for i in range(n)], texts=[f"t{i}" for i in range(n)])
    zs = []
    flagged = 0
    for s in range(seeds):
        split = member_split(data, member_fraction=0.5, seed=s)
        is_member = np.zeros(n, bool)
        is_member[split.member_idx] = True
        masks = paired_halves(n, references, seed=s)
        ov = reference_overlap(masks, is_member)
        flagged += bool(ov["correlated"])
        zs += [(m["member_overlap"] - 0.5) / np.sqrt(0.25 / is_member.sum()) for m in ov["models"]]
    zs_arr = np.asarray(zs)
    c = _Checks()
    c.expect(flagged == 0, f"{flagged} seed(s) gave a reference half correlated with the split")
    c.expect(np.max(np.abs(zs_arr)) < 4.5, f"max |z| {np.max(np.abs(zs_arr)):.2f}")
    # under independence z ~ N(0, 1) (hypergeometric, slightly narrower): its spread must look like that
    c.expect(0.6 < np.std(zs_arr) < 1.3, f"z spread {np.std(zs_arr):.2f} is not that of chance")
    return ScenarioResult(
        "seeds: split vs references",
        not c.failures,
        {"seeds": seeds, "max_abs_z": float(np.max(np.abs(zs_arr))), "z_sd": float(np.std(zs_arr))},
        "overlap 0.5 within chance for every seed",
        c.failures,
        time.perf_counter() - t0,
    )


def same_seed_same_numbers(seed: int = 0, work: Path | None = None) -> ScenarioResult:
    """The same audit with the same seed twice gives identical metrics (reference models re-trained,
    not read from a cache: each run has its own cache folder)."""
    t0 = time.perf_counter()
    from fmaudit.data import member_split

    data = _digits(300, seed, label_noise=0.2)
    split = member_split(data, member_fraction=0.5, seed=seed)
    runs = []
    for i in range(2):
        w = Path(work or tempfile.mkdtemp(prefix="fmaudit-ka-")) / f"run{i}"
        base = _mlp(seed)
        target = _finetune(base, split.members, epochs=10, lr=1e-2, seed=seed)
        target.split = split
        out = _membership(
            target, _ctx(w, data, split, base, seed), attacks=["loss", "lira_online", "rmia"], references=2
        )
        runs.append({k: (v.value, v.ci_low, v.ci_high) for k, v in out.metrics.items() if k != "reference_cost_ratio"})
    diff = sorted(k for k in runs[0] if runs[0][k] != runs[1].get(k))
    c = _Checks()
    c.expect(not diff, f"metrics differ between two same-seed runs: {diff[:5]}")
    return ScenarioResult(
        "seeds: same seed twice",
        not c.failures,
        {"metrics": len(runs[0]), "differing": len(diff)},
        "identical metrics",
        c.failures,
        time.perf_counter() - t0,
    )


def dp_canary_consistency(seed: int = 0, work: Path | None = None) -> ScenarioResult:
    """On DP runs the canary audit's epsilon lower bound must never exceed the accountant's epsilon, and
    the audit must be able to say so: an honest DP-SGD run (noise 4) whose accountant epsilon lies below
    the audit's ceiling shows epsilon_lb <= epsilon; a deliberately mis-accounted run (noise effectively
    off, the honest epsilon claimed) must raise the critical finding."""
    t0 = time.perf_counter()
    from fmaudit.privacy.canary import canary_audit, canary_findings

    work = Path(work or tempfile.mkdtemp(prefix="fmaudit-ka-"))
    data = _digits(360, seed)
    members, pool = data.subset(np.arange(60)), data.subset(np.arange(60, 360))
    dp = {
        "epochs": 12,
        "batch_size": 8,
        "delta": 1e-5,
        "max_grad_norm": 1.0,
        "lr": 5e-2,
        "weight_decay": 0.0,
        "accountant": "rdp",
        "trainable": "all",
        "n_layers": 1,
        "clipping": "hooks",
    }
    common = dict(
        members=members,
        pool=pool,
        train={},
        num_canaries=200,
        kind="mislabel",
        score="loss",
        seed=seed,
        cache_dir=work / "cache",
    )
    honest = canary_audit(base=_mlp(seed), dp={**dp, "noise_multiplier": 4.0}, **common)
    broken = canary_audit(
        base=_mlp(seed), dp={**dp, "noise_multiplier": 1e-6}, claimed_epsilon=honest.accountant_epsilon, **common
    )
    assert honest.accountant_epsilon is not None  # a DP run always has the accountant's epsilon
    c = _Checks()
    c.expect(
        honest.epsilon_lb <= honest.accountant_epsilon,
        f"honest run: epsilon_lb {honest.epsilon_lb:.3f} > accountant epsilon {honest.accountant_epsilon:.3f}",
    )
    c.expect(
        honest.accountant_epsilon < honest.epsilon_lb_ceiling,
        f"the audit's ceiling {honest.epsilon_lb_ceiling:.3f} is below the claim: it could not have caught it",
    )
    sev = [f["severity"] for f in canary_findings(broken)]
    c.expect(
        broken.epsilon_lb > honest.accountant_epsilon and "critical" in sev,
        f"mis-accounted run not flagged (epsilon_lb {broken.epsilon_lb:.3f}, findings {sev})",
    )
    c.expect("critical" not in [f["severity"] for f in canary_findings(honest)], "honest run flagged critical")
    return ScenarioResult(
        "dp: canary consistency",
        not c.failures,
        {
            "honest_eps": honest.accountant_epsilon,
            "honest_eps_lb": honest.epsilon_lb,
            "ceiling": honest.epsilon_lb_ceiling,
            "broken_eps_lb": broken.epsilon_lb,
            "broken_canary_auc": broken.canary_auc,
        },
        "honest: eps_lb <= eps < ceiling; noise off with eps claimed: critical",
        c.failures,
        time.perf_counter() - t0,
    )


SCENARIOS: dict[str, Callable[[], ScenarioResult]] = {
    "membership_null": membership_null,
    "membership_planted_leak": membership_planted_leak,
    "dp_canary_consistency": dp_canary_consistency,
    "seed_independence": seed_independence,
    "same_seed_same_numbers": same_seed_same_numbers,
}


def run_all(names: list[str] | None = None) -> list[ScenarioResult]:
    return [SCENARIOS[n]() for n in (names or list(SCENARIOS))]
