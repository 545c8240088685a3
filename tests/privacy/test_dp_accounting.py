"""DP accounting: our epsilon is Opacus' accountant's, and agrees with Google's dp_accounting."""

import math
import warnings

import pytest

from fmaudit.privacy.dp import default_delta, epsilon_for, ledger_points, noise_for

CASES = [(1.0, 0.01, 1000), (0.73, 1 / 7, 14), (2.0, 0.05, 300)]


def _dp_event(sigma, q, steps):
    from dp_accounting import dp_event

    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


@pytest.mark.parametrize("sigma,q,steps", CASES)
def test_rdp_equals_opacus_and_matches_dp_accounting(sigma, q, steps):
    from dp_accounting import rdp
    from opacus.accountants import RDPAccountant

    ours = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="rdp")
    acc = RDPAccountant()
    for _ in range(steps):  # step by step, exactly as the optimizer hook does
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ours == acc.get_epsilon(delta=1e-5)
    google = rdp.RdpAccountant()
    google.compose(_dp_event(sigma, q, steps))
    # Same RDP curve, different grids of orders: agree to well under 1 %.
    assert ours == pytest.approx(google.get_epsilon(1e-5), rel=0.01)


@pytest.mark.parametrize("sigma,q,steps", CASES[1:])
def test_prv_equals_opacus_and_matches_pld(sigma, q, steps):
    from dp_accounting import pld
    from opacus.accountants import PRVAccountant

    ours = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="prv")
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ours == pytest.approx(acc.get_epsilon(delta=1e-5, eps_error=0.01), abs=1e-9)
    google = pld.PLDAccountant(value_discretization_interval=1e-3)
    google.compose(_dp_event(sigma, q, steps))
    # Both are tight numerical accountants: PRV's eps_error is 0.01, PLD's discretization ~1e-3.
    assert ours == pytest.approx(google.get_epsilon(1e-5), abs=0.03, rel=0.02)
    # ... and tighter than (never above) the RDP bound.
    assert ours <= epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="rdp")


@pytest.mark.parametrize("accountant,target", [("rdp", 0.5), ("rdp", 8.0), ("gdp", 2.0)])
def test_noise_for_target_never_exceeds_it(accountant, target):
    q, steps = 1 / 38, 76
    sigma = noise_for(target_epsilon=target, sample_rate=q, steps=steps, delta=1e-5, accountant=accountant)
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant=accountant)
    assert eps <= target
    assert eps > 0.9 * target  # and it is not wastefully noisy


def test_ledger_points_and_default_delta():
    assert ledger_points(10, 5) == list(range(1, 11))
    pts = ledger_points(1000, 100, points=20)
    assert pts[0] == 1 and pts[-1] == 1000 and all(e * 100 in pts for e in range(1, 11))
    for n in (10, 100, 600, 10**6):
        assert default_delta(n) < 1 / n
    assert math.isclose(default_delta(10**6), 1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert epsilon_for(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5, accountant="rdp") == 0.0


def test_accountant_names_come_from_the_registry():
    """Validation, the accountant's epsilon and noise search all read one registry; an unknown name is an error
    that suggests the close one (it never silently falls back to another accountant)."""
    from fmaudit.privacy.dp.accounting import ACCOUNTANT_KINDS, ACCOUNTANTS
    from fmaudit.privacy.dp.settings import validate_settings

    assert ACCOUNTANTS == tuple(ACCOUNTANT_KINDS) == ("prv", "rdp", "gdp")
    assert ACCOUNTANT_KINDS["gdp"].paired_with == "prv"  # GDP is always claimed together with PRV
    for fn in (epsilon_for, noise_for):
        kw = {"noise_multiplier": 1.0} if fn is epsilon_for else {"target_epsilon": 1.0}
        with pytest.raises(ValueError, match="did you mean 'prv'"):
            fn(sample_rate=0.1, steps=10, delta=1e-5, accountant="pvr", **kw)
    problems = validate_settings(
        n=100,
        target_epsilon=1.0,
        noise_multiplier=None,
        delta=None,
        max_grad_norm=1.0,
        epochs=1,
        batch_size=10,
        lr=1e-3,
        accountant="pvr",
        trainable="all",
        clipping="auto",
        max_physical_batch_size=None,
        n_layers=2,
    )
    assert problems == ["accountant must be one of prv, rdp, gdp, got 'pvr'"]
