"""Epsilon accounting for DP-SGD: Opacus' accountants behind one registry, with two safeguards.

- GDP, a central-limit approximation that can understate epsilon, is always paired with PRV and the larger
  is claimed;
- an accountant that raises or returns a non-finite or negative epsilon is replaced by RDP (valid, looser).
Both are reported as notes (findings), never silenced. `noise_for` turns a target epsilon into a noise
multiplier with the same fallbacks; `epsilon_ledger` gives epsilon against steps for a run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmaudit.hints import did_you_mean

PRV_EPS_ERROR = 0.01  # Opacus' default for the PRV accountant; also what get_noise_multiplier uses

Note = dict[str, str]  # a finding for the report: severity, title, detail


def make_accountant(kind: str) -> Any:
    """A fresh Opacus accountant of `kind` ("prv", "rdp", "gdp")."""
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=kind)


def _opacus_epsilon(
    kind: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float, **kw: Any
) -> tuple[float, list[Note]]:
    """Opacus' accountant `kind` asked for one run of `steps` steps (GDP: Opacus warns "GDP accounting is
    experimental"; not silenced)."""
    acc = make_accountant(kind)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return acc.get_epsilon(delta=delta, **kw), []


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[float, list[Note]]:
    """RDP's epsilon, exactly as Opacus computes it, with a loose bound (optimal order at the grid's edge) and a
    negative bound turned into notes instead of warnings."""
    notes: list[Note] = []
    # RDP composes linearly in steps: Opacus computes compute_rdp(q, sigma, steps) = steps * rdp(one step);
    # caching the one-step vector gives the identical floats without recomputing the orders every point.
    orders, one = _rdp_one_step(float(noise_multiplier), float(sample_rate))
    eps, best, edge = _rdp_spent(orders, one * int(steps), delta)
    if eps < 0:
        # RDP's conversion can go below 0 for a large delta: (eps', delta)-DP with eps' < 0 implies
        # (0, delta)-DP, so 0 is a valid (and the tightest meaningful) answer.
        notes.append(
            {
                "severity": "info",
                "title": "RDP's epsilon bound was negative; 0 is reported",
                "detail": f"the RDP conversion gave {eps:.4g} at delta {delta:g} (possible for a large "
                "delta); a negative epsilon implies (0, delta)-DP, so epsilon 0 is claimed.",
            }
        )
        eps = 0.0
    if edge:
        # Opacus warns "Optimal order is the largest/smallest alpha": valid but loose. A note, not a warning.
        notes.append(
            {
                "severity": "low",
                "title": "RDP bound is loose (optimal order at the grid edge)",
                "detail": f"the RDP accountant's best order is the {edge} of its grid ({best:g}): the "
                "epsilon is a valid upper bound but larger than RDP could give with a wider "
                "grid (the PRV accountant is tighter).",
            }
        )
    return eps, notes


def _rdp_spent(orders: Any, rdp: Any, delta: float) -> tuple[float, float, str | None]:
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
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple[list[float], Any]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    return orders, compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)


@dataclass(frozen=True)
class AccountantKind:
    """One accountant: how its raw epsilon is computed, how many ledger points it affords, which accountant is
    computed beside it (the larger epsilon is claimed), and whether an infinite epsilon is an answer."""

    epsilon: Callable[[float, float, int, float], tuple[float, list[Note]]]
    ledger_points: int  # PRV costs ~0.3 s per point on a CPU (GDP is paired with PRV)
    paired_with: str | None = None
    infinity_is_an_answer: bool = False  # RDP's: no finite guarantee at this noise; anyone else's is a failure


ACCOUNTANT_KINDS: dict[str, AccountantKind] = {
    "prv": AccountantKind(functools.partial(_opacus_epsilon, "prv", eps_error=PRV_EPS_ERROR), ledger_points=16),
    "rdp": AccountantKind(_rdp_epsilon, ledger_points=60, infinity_is_an_answer=True),
    "gdp": AccountantKind(functools.partial(_opacus_epsilon, "gdp"), ledger_points=16, paired_with="prv"),
}
ACCOUNTANTS = tuple(ACCOUNTANT_KINDS)


def _kind(accountant: str) -> AccountantKind:
    try:
        return ACCOUNTANT_KINDS[accountant]
    except KeyError:
        raise ValueError(
            f"unknown accountant {accountant!r} (one of {', '.join(ACCOUNTANTS)})"
            + did_you_mean(accountant, ACCOUNTANTS)
        ) from None


def _claimed(accountant: str) -> list[str]:
    """The accountants whose larger epsilon is claimed for `accountant` (itself, and its pair)."""
    paired = _kind(accountant).paired_with
    return [accountant] + ([paired] if paired else [])


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
    notes: list[Note] = field(default_factory=list)


class AccountantFailure(RuntimeError):
    """An accountant raised, or returned a non-finite or negative epsilon."""


def _raw_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> tuple[float, list[Note]]:
    """One accountant's epsilon, exactly as Opacus computes it; raises AccountantFailure when it fails."""
    kind = _kind(accountant)
    try:
        eps, notes = kind.epsilon(noise_multiplier, sample_rate, steps, delta)
        eps = float(eps)
    except Exception as exc:
        raise AccountantFailure(f"raised {type(exc).__name__}: {str(exc)[:200]}") from exc
    if math.isnan(eps) or eps < 0 or (eps == math.inf and not kind.infinity_is_an_answer):
        raise AccountantFailure(f"returned epsilon {eps!r}")
    return eps, notes


def account(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> Accounting:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps, with fallbacks and the GDP pairing (see
    `Accounting`). Each number is Opacus' accountant's for (noise, rate, steps, delta)."""
    if steps <= 0:
        return Accounting(0.0, {accountant: 0.0}, accountant)
    args: dict[str, Any] = dict(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    by: dict[str, float] = {}
    notes: list[Note] = []
    for kind in _claimed(accountant):
        try:
            eps, more = _raw_epsilon(accountant=kind, **args)
            by[kind] = eps
            notes += more
        except AccountantFailure as exc:
            if kind == "rdp":
                raise AccountantFailure(
                    f"the RDP accountant {exc} for noise {noise_multiplier:g}, sample rate "
                    f"{sample_rate:g}, {steps} steps, delta {delta:g}; no epsilon can be "
                    "claimed"
                ) from exc
            notes.append(
                {
                    "severity": "medium",
                    "title": f"The {kind.upper()} accountant failed; RDP was used",
                    "detail": f"Opacus' {kind.upper()} accountant {exc} for noise {noise_multiplier:g}, sample "
                    f"rate {sample_rate:g}, {steps} steps, delta {delta:g} (Opacus' accountants are "
                    "known to fail for large epsilon or tiny delta, and to return negative epsilons). "
                    "The RDP accountant's epsilon was used instead: a valid upper bound, but looser.",
                }
            )
            if "rdp" not in by:
                eps, more = _raw_epsilon(accountant="rdp", **args)
                by["rdp"] = eps
                notes += more
    # Claim the largest number computed for the wanted accountants (for GDP: max(GDP, PRV or RDP)).
    used = max(by, key=lambda k: by[k])
    epsilon = by[used]
    paired = _kind(accountant).paired_with
    if paired is not None:
        notes.append(_pairing_note(accountant, paired if paired in by else "rdp", by, used))
    return Accounting(float(epsilon), by, used, notes)


def _pairing_note(accountant: str, other: str, by: dict[str, float], used: str) -> Note:
    """The note beside an approximate accountant (GDP, the only one) claimed together with `other`."""
    gdp = "nothing (it failed)" if accountant not in by else f"{by[accountant]:.4g}"
    return {
        "severity": "low",
        "title": "GDP is an approximation; the larger epsilon is reported",
        "detail": "Gaussian DP accounting is a central-limit approximation that can understate epsilon "
        f"(Opacus marks it experimental). GDP says {gdp}, "
        f"{other.upper()} says {by[other]:.4g}; the reported epsilon is the larger, "
        f"{by[used]:.4g} ({used.upper()}).",
    }


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The epsilon claimed for `steps` Poisson-subsampled Gaussian steps with `accountant` (see `account`:
    GDP is paired with PRV and the larger is returned; a failed accountant falls back to RDP)."""
    return account(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
    ).epsilon


def _search_noise(*, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Opacus' `get_noise_multiplier` search (same brackets, same bisection, same tolerance 0.01), over
    `_raw_epsilon`, so that an accountant that raises or returns NaN / a negative number stops the search with
    AccountantFailure (Opacus' own loop never ends on a negative epsilon, and ends at its bracket on NaN)."""
    from opacus.accountants.utils import MAX_SIGMA

    def eps(sigma: float) -> float:
        return _raw_epsilon(
            noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
        )[0]

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
    for kind in _claimed(accountant):
        try:
            sigma = max(
                sigma,
                _search_noise(
                    target_epsilon=target_epsilon, sample_rate=sample_rate, steps=steps, delta=delta, accountant=kind
                ),
            )
        except AccountantFailure:
            # The search failed somewhere on its way (e.g. PRV at a tiny sigma): RDP's noise is valid (its epsilon
            # bounds PRV's), and the check below uses the same fallbacks as the claimed epsilon.
            sigma = max(
                sigma,
                _search_noise(
                    target_epsilon=target_epsilon, sample_rate=sample_rate, steps=steps, delta=delta, accountant="rdp"
                ),
            )
    # Opacus' search ends on the noisy side; make sure, and nudge up if float noise says otherwise.
    for _ in range(100):
        if (
            epsilon_for(
                noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
            )
            <= target_epsilon
        ):
            return sigma
        sigma *= 1.01
    raise AccountantFailure(
        f"no noise multiplier up to {sigma:.4g} meets target epsilon {target_epsilon} ({accountant} accountant)"
    )


def ledger_points(steps: int, steps_per_epoch: int, points: int = 60) -> list[int]:
    """The steps at which the ledger shows epsilon: up to `points` evenly spread, plus every epoch's end."""
    xs = set(np.unique(np.linspace(1, steps, min(points, steps)).round().astype(int)).tolist()) if steps else set()
    xs |= {e * steps_per_epoch for e in range(1, steps // max(steps_per_epoch, 1) + 1)}
    return sorted(x for x in xs if 1 <= x <= steps)


@dataclass
class Ledger:
    """Epsilon of a run after all its steps (`total`), at the ledger's steps, and after each epoch; `notes` are
    every accounting note met on the way (not deduplicated)."""

    total: Accounting
    steps: list[int]
    epsilon: list[float]
    per_epoch: list[float]
    notes: list[Note]


def epsilon_ledger(
    *,
    steps: int,
    steps_per_epoch: int,
    epochs: int,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    accountant: str,
) -> Ledger:
    """The ledger of a run that took `steps` steps of a plan of `epochs` x `steps_per_epoch` (an epoch past the
    steps taken counts the steps taken)."""
    kw: dict[str, Any] = dict(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, delta=delta, accountant=accountant
    )
    total = account(steps=steps, **kw)
    notes = list(total.notes)
    xs = ledger_points(steps, steps_per_epoch, _kind(accountant).ledger_points)
    ys = []
    for x in xs:
        a = account(steps=x, **kw)
        ys.append(a.epsilon)
        notes += a.notes
    per_epoch = []
    for e in range(1, epochs + 1):
        a = account(steps=min(e * steps_per_epoch, steps), **kw)
        per_epoch.append(a.epsilon)
        notes += a.notes
    if steps:
        per_epoch[-1] = total.epsilon
    return Ledger(total, xs, ys, per_epoch, notes)
