"""White-box Dirac gradient canaries in DP-SGD (fmaudit.privacy.gradient_canaries): coordinates, the null case
(correct DP: epsilon_lb <= epsilon), a broken DP step (noise off: critical), no harm to the model, determinism,
and the privacy.dp_finetune module's metrics and findings."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fmaudit.data import Dataset, member_split
from fmaudit.privacy import dp_finetune
from fmaudit.privacy import gradient_canaries as gc

M = 200


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return Dataset("digits", "sklearn", "image", [f"d{i}" for i in range(len(x))], d.target, images=x)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def split():
    return member_split(_digits(), member_fraction=0.5, seed=0)


def _run(split, *, m=M, epsilon=2.0, epochs=3, seed=0, model=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG warning: covered in test_dp_finetune
        return dp_finetune(
            model=model or _mlp(),
            train_data=split.members,
            validation_data=split.nonmembers,
            target_epsilon=epsilon,
            epochs=epochs,
            batch_size=64,
            lr=2e-3,
            accountant="prv",
            seed=seed,
            gradient_canaries=m,
        )


@pytest.fixture(scope="module")
def null(split):
    return _run(split)


@pytest.fixture()
def noise_off(monkeypatch):
    """Test-only break of the DP step: Opacus adds zero noise while the accountant still counts its noise."""
    import opacus.optimizers.optimizer as plain
    import opacus.optimizers.optimizer_fast_gradient_clipping as ghost

    def zero(std, reference, generator=None, secure_mode=False):
        return torch.zeros_like(reference)

    monkeypatch.setattr(plain, "_generate_noise", zero)
    monkeypatch.setattr(ghost, "_generate_noise", zero)


def test_coordinates_distinct_capped_seeded():
    sizes = [("w1", 64 * 10, 2), ("b1", 10, 1), ("w2", 6, 2), ("scalar", 1, 0)]
    a = gc.choose_coordinates(sizes, 300, seed=3)
    assert a == gc.choose_coordinates(sizes, 300, seed=3) and a != gc.choose_coordinates(sizes, 300, seed=4)
    assert len(set(a)) == 300 and {n for n, _ in a} <= {"w1", "w2"}  # matrices only while there are any
    per = {n: sum(1 for x, _ in a if x == n) for n in ("w1", "w2")}
    assert per["w1"] <= 320 and per["w2"] <= 3  # never more than half a tensor
    assert all(0 <= i < dict((n, k) for n, k, _ in sizes)[n] for n, i in a)
    with pytest.raises(ValueError, match="only 323 available"):
        gc.choose_coordinates(sizes, 324, seed=0)
    assert {n for n, _ in gc.choose_coordinates([("b", 10, 1), ("c", 4, 1)], 6, seed=0)} <= {"b", "c"}


def test_null_correct_dp_stays_below_epsilon(null):
    g = null.gradient_canaries
    assert g["m"] == M and g["audited"] + g["held_out"] == M and g["steps"] == null.steps
    assert 0.0 <= g["epsilon_lb"] <= null.epsilon and g["epsilon_lb_fdp"] <= null.epsilon
    assert g["epsilon_lb_ratio"] == pytest.approx(g["epsilon_lb"] / null.epsilon)
    assert g["epsilon_lb_ceiling"] > null.epsilon  # the audit could have caught a broken step here
    # the excluded canaries saw the claimed noise (chi-square, 60-ish degrees of freedom: within ~30%)
    assert g["noise_p_value"] > gc.NOISE_ALPHA
    assert g["measured_noise_multiplier"] == pytest.approx(null.noise_multiplier, rel=0.3)
    # included canaries were sampled like examples: about q T times each
    assert g["mean_times_sampled"] == pytest.approx(null.sample_rate * null.steps, rel=0.25)
    assert [f["severity"] for f in g["findings"]] == ["info"]


def test_noise_off_is_critical(split, noise_off):
    res = _run(split)
    g = res.gradient_canaries
    assert g["epsilon_lb"] > res.epsilon + 1.0  # far above the accountant's 2
    assert g["measured_noise_multiplier"] == pytest.approx(0.0, abs=1e-6) and g["noise_p_value"] < 1e-12
    titles = {f["title"]: f["severity"] for f in g["findings"]}
    assert titles["Gradient canaries prove more leakage than the accountant's epsilon"] == "critical"
    assert titles["DP-SGD adds less noise than the accountant assumes"] == "critical"


def test_canaries_do_not_change_the_model(split, null, monkeypatch):
    base = _mlp()
    # 1. every canary coordinate keeps its pre-training value; the rest trained
    params, start = dict(null.model.named_parameters()), dict(base.named_parameters())
    coords = null.gradient_canaries["record"]["coordinates"]
    for name, i in coords:  # names as trained: the plain module sits at `inner` of its target wrapper
        name = name.removeprefix("inner.")
        assert params[name].detach().reshape(-1)[i] == start[name].detach().reshape(-1)[i]
    assert all(not torch.equal(params[n], start[n]) for n in params)
    # 2. the trained model does not depend on which canaries were included: bit for bit the same weights
    monkeypatch.setattr(gc, "inclusion", lambda m, seed: np.zeros(m, dtype=bool))
    none_in = _run(split)
    assert not any(none_in.gradient_canaries["record"]["included"])
    for name, p in none_in.model.named_parameters():
        assert torch.equal(p, params[name]), name
    # 3. utility as without canaries (same noise draws; only the m frozen coordinates differ)
    without = _run(split, m=0)
    assert without.gradient_canaries is None
    assert null.validation_utility["accuracy"] == pytest.approx(without.validation_utility["accuracy"], abs=0.03)


def test_deterministic_for_a_seed(split, null):
    again = _run(split)
    assert again.gradient_canaries["record"] == null.gradient_canaries["record"]
    assert again.gradient_canaries["epsilon_lb"] == null.gradient_canaries["epsilon_lb"]


def test_too_few_canaries_or_coordinates(split):
    from fmaudit.privacy import DPConfigError

    with pytest.raises(DPConfigError, match="at least 10"):
        _run(split, m=5)
    with pytest.raises(ValueError, match="distinct coordinates"):
        _run(split, m=10_000)


def test_module_reports_critical_on_broken_step(tiny_bert_dir, sentiment_csv, tmp_path, noise_off):
    from fmaudit.runner import run_recipe
    from fmaudit.testing import tiny_text_recipe

    audits = [
        {
            "use": "privacy.dp_finetune",
            "target": "bert",
            "produces": "bert-dp",
            "params": {"accountant": "rdp", "lr": 1e-2, "target_epsilon": 1.0, "epochs": 3, "gradient_canaries": 200},
        }
    ]
    recipe = tiny_text_recipe(tiny_bert_dir, sentiment_csv, tmp_path, audits=audits)
    report = run_recipe(recipe)
    dp = report.result("privacy.dp_finetune", "bert")
    assert dp.status == "ok", dp.error
    eps = dp.metrics["epsilon"].value
    lb = dp.metrics["gradient_canary_epsilon_lb"].value
    assert lb > eps and dp.metrics["gradient_canary_epsilon_lb_ratio"].value == pytest.approx(lb / eps)
    assert dp.metrics["gradient_canary_epsilon_lb_ceiling"].value >= lb
    assert dp.metrics["gradient_canary_noise_multiplier"].value == pytest.approx(0.0, abs=1e-6)
    critical = [f.title for f in dp.findings if f.severity == "critical"]
    assert "Gradient canaries prove more leakage than the accountant's epsilon" in critical
    table = dp.tables["gradient_canaries"]
    assert table["m"] == 200 and "record" not in table and set(table["epsilon_lb_by_score"]) == set(gc.SCORES)
    # warm run: the DP fine-tune and the canaries' record come from the cache, same numbers
    again = run_recipe(recipe)
    assert again.targets["bert-dp"].cache_hit is True
    assert again.result("privacy.dp_finetune", "bert").tables["gradient_canaries"] == table
