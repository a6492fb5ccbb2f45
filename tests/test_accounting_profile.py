"""The profile route of the secure-aggregation accountant (lightning_dp/accounting/_profile.py): a mechanism
known by its privacy profile, Poisson-subsampled, one dominating pair for both orders, composed.

Checked against independent computations: with the exact Gaussian profile the route must give the
subsampled Gaussian's ε (dp-accounting's PLD accountant), and one step's discrete pair must dominate the
exact hockey-stick curves of *both* orders of the subsampled Gaussian (closed forms below)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lightning_dp.accounting import PRVAccountant, _pld
from lightning_dp.accounting._profile import SubsampledProfileStep
from lightning_dp.accounting.rdp import _delta_from_rdp as delta_from_rdp
from lightning_dp.accounting.ddg import (
    _epsilon_by_profile,
    _epsilon_by_rdp,
    DDG_ORDERS,
    ddg_epsilon,
    ddg_noise_multiplier,
)
from tests.dp_accounting_reference import poisson_gaussian_epsilon


def _gaussian_profile(sigma):
    """Exact hockey-stick curve of N(1, σ²) against N(0, σ²) at ε ≥ 0 (symmetric in the two orders)."""
    mu = 1.0 / sigma

    def delta(eps):
        eps = np.asarray(eps, dtype=float)
        return stats.norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    return delta


def _subsampled_gaussian_delta(sigma, q, eps, order):
    """Exact H_{e^ε} of the subsampled Gaussian: remove = (mixture ‖ N(0)), add = (N(0) ‖ mixture)."""
    t = math.exp(eps)
    # loss of the remove order, log(1 − q + q e^{(2x−1)/(2σ²)}), is increasing in x
    if order == "remove":
        if t <= 1 - q:
            return 1 - t
        x = sigma**2 * math.log((t - (1 - q)) / q) + 0.5
        mix = (1 - q) * stats.norm.sf(x / sigma) + q * stats.norm.sf((x - 1) / sigma)
        return mix - t * stats.norm.sf(x / sigma)
    # add: P = N(0), M = mixture; P − tM > 0 where (1 − t(1−q)) > tq e^{(2x−1)/(2σ²)}
    if 1 - t * (1 - q) <= 0:
        return 0.0
    x = sigma**2 * math.log((1 - t * (1 - q)) / (t * q)) + 0.5
    return stats.norm.cdf(x / sigma) - t * ((1 - q) * stats.norm.cdf(x / sigma) + q * stats.norm.cdf((x - 1) / sigma))


@pytest.mark.parametrize("sigma,q,steps", [(4.82, 256 / 1437, 336), (1.0, 0.01, 1000), (2.0, 0.5, 40)])
def test_with_the_gaussian_profile_the_route_is_the_subsampled_gaussian(sigma, q, steps):
    ours = max(_pld.Plan([SubsampledProfileStep(_gaussian_profile(sigma), q, d)], [steps], [steps], 1e-5)
               .epsilon([steps], 1e-5) for d in ("remove", "add"))
    reference = poisson_gaussian_epsilon(sigma, q, steps, 1e-5)
    assert reference * (1 - 1e-3) <= ours <= reference * 1.01  # measured 0.06-0.09 % above
    prv = PRVAccountant()
    prv.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert ours == pytest.approx(prv.get_epsilon(1e-5), rel=1e-2)


@pytest.mark.parametrize("sigma,q", [(1.0, 0.2), (3.0, 0.05), (0.7, 0.6)])
@pytest.mark.parametrize("order", ["remove", "add"])
def test_one_steps_pair_dominates_the_subsampled_gaussian_and_is_tight(sigma, q, order):
    step = SubsampledProfileStep(_gaussian_profile(sigma), q, order)
    h = 1e-3
    j_low, pmf, mass_inf = step.discretise(h, 1e-12, 1e-12)
    losses = (j_low + np.arange(len(pmf))) * h
    assert pmf.sum() + mass_inf == pytest.approx(1.0, abs=1e-9)
    # A pair: the other distribution has mass <= 1. Its atoms are pmf·e^{-loss}; one unit of float64
    # rounding in an atom's pmf is multiplied by e^{-loss}, up to e^{16} here (numpy 1.x rounds the sum to
    # 1 + 1.2e-9, numpy 2.x to 1 + 7e-10): the tolerance is 16 ulps at the largest such factor.
    tolerance = 1e-9 + 16 * np.finfo(float).eps * float(np.exp(-losses).max())
    assert np.dot(pmf, np.exp(-losses)) <= 1.0 + tolerance
    for eps in np.linspace(-2.0, 2.0, 81):
        ours = mass_inf + float(np.dot(pmf, np.maximum(0.0, 1.0 - np.exp(eps - losses))))
        exact = _subsampled_gaussian_delta(sigma, q, eps, order)
        assert exact - 1e-12 <= ours <= exact + 1e-4, eps  # the exact base profile: tight up to the grid


def test_delta_from_rdp_bounds_the_exact_profile_and_is_the_conversion():
    sigma = 2.0
    orders = np.arange(2, 257, dtype=float)
    eps = np.linspace(0.0, 3.0, 31)
    converted = delta_from_rdp(orders, orders / (2 * sigma**2), eps)
    assert np.all(converted >= _gaussian_profile(sigma)(eps) - 1e-15)
    assert np.all(converted <= 1.0)
    a, r = 3.0, 0.4  # one order: Canonne, Kamath & Steinke's Prop. 12 as printed
    assert delta_from_rdp([a], [r], np.array([1.0]))[0] == pytest.approx(
        math.exp((a - 1) * (r - 1.0)) / (a - 1) * (1 - 1 / a) ** a, rel=1e-12)


def test_ddg_accounting_takes_the_tighter_of_the_two_routes():
    kwargs = dict(dim=9610, scale=2.0**20, num_shares=2)
    big_q, big_steps = 256 / 1437, 336
    history = [(6.4, big_q, big_steps)]
    by_rdp = _epsilon_by_rdp(history, 1e-5, orders=DDG_ORDERS, **kwargs)
    by_profile = _epsilon_by_profile(history, 1e-5, orders=DDG_ORDERS, **kwargs)
    assert by_profile < 0.5 * by_rdp  # Zhu & Wang's general bound does not vanish with the noise at large q
    assert ddg_epsilon(6.4, big_q, big_steps, 1e-5, **kwargs) == min(by_rdp, by_profile)
    # never below the Gaussian at the rounded sensitivity, whose RDP curve the step has (τ ≈ 0 here)
    sigma_eff = 6.4 * 2.0**20 / (2.0**20 + math.sqrt(9610))
    assert by_profile >= (1 - 1e-3) * poisson_gaussian_epsilon(sigma_eff, big_q, big_steps, 1e-5)  # +0.09 %
    # σ for ε = 3 at the demo's rate: within 1.4x of the Gaussian's (was 5.9x with the RDP route alone)
    from lightning_dp.accounting import get_noise_multiplier
    gaussian = get_noise_multiplier(3.0, 1e-5, big_q, steps=big_steps)
    assert ddg_noise_multiplier(3.0, 1e-5, big_q, big_steps, **kwargs) <= 1.4 * gaussian
    # at a small rate the RDP route is the tighter one and is kept
    small = [(1.2, 0.01, 2000)]
    assert ddg_epsilon(1.2, 0.01, 2000, 1e-5, **kwargs) == pytest.approx(
        min(_epsilon_by_rdp(small, 1e-5, orders=DDG_ORDERS, **kwargs),
            _epsilon_by_profile(small, 1e-5, orders=DDG_ORDERS, **kwargs)))


def test_ddg_accountant_reuses_its_plans_and_pickles_without_them():
    """Per-step ε of a run reuses plans (PRV's caches) and gives what a fresh computation gives; the caches
    are not pickled (they hold closures) and are rebuilt."""
    import pickle

    from lightning_dp.secure_aggregation import DistributedDiscreteGaussianAccountant

    acc = DistributedDiscreteGaussianAccountant(scale=2.0**20, dim=9610, num_shares=1)
    for _ in range(40):
        acc.step(noise_multiplier=6.36, sample_rate=0.178, num_steps=1)
        live = acc.get_epsilon(1e-5)
    assert len(acc._composer._steps) == 2  # one step object per direction, reused by every plan
    fresh = ddg_epsilon(6.36, 0.178, 40, 1e-5, dim=9610, scale=2.0**20, num_shares=1)
    assert live == pytest.approx(fresh, rel=1e-12)
    copy = pickle.loads(pickle.dumps(acc))
    assert copy._composer is None and copy.get_epsilon(1e-5) == pytest.approx(live, rel=1e-12)
