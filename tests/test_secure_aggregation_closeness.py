"""The DDG step's privacy profile from its closeness to the Gaussian mechanism
(lightning_dp/secure_aggregation/_gaussian_closeness.py), checked against exact computations: the pmfs of
sums of discrete Gaussians (by convolution), of rounded Gaussians (by the normal CDF), the exact hockey-stick
curves of a one-dimensional DDG step, and dp-accounting's ε of the subsampled Gaussian."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from lightning_dp.accounting import get_noise_multiplier
from lightning_dp.secure_aggregation._gaussian_closeness import (
    closeness_profile,
    gaussian_delta,
    rounding_log_ratio,
    sum_of_shares_log_ratio,
)
from lightning_dp.secure_aggregation.accounting import ddg_epsilon, ddg_noise_multiplier, rounded_l2_norm_bound
from lightning_dp.secure_aggregation.discrete_gaussian import discrete_gaussian_pmf
from tests.dp_accounting_reference import poisson_gaussian_epsilon


def _sum_of_shares_pmf(share_variance, shares, support):
    """The exact pmf of the sum of ``shares`` i.i.d. N_Z(0, share_variance) on -support .. support."""
    reach = support + int(40 * math.sqrt(share_variance)) + 10
    one = discrete_gaussian_pmf(share_variance, reach).numpy()
    total = one
    for _ in range(shares - 1):
        total = np.convolve(total, one)
    middle = len(total) // 2
    return total[middle - support: middle + support + 1]


@pytest.mark.parametrize("share_variance", [0.3, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("shares", [2, 3])
def test_sum_of_shares_is_pointwise_close_to_one_discrete_gaussian(share_variance, shares):
    support = int(30 * math.sqrt(shares * share_variance)) + 5
    exact = _sum_of_shares_pmf(share_variance, shares, support)
    one = discrete_gaussian_pmf(shares * share_variance, support).numpy()
    keep = (exact > 1e-250) & (one > 1e-250)
    gap = np.max(np.abs(np.log(exact[keep] / one[keep])))
    bound = sum_of_shares_log_ratio(share_variance, shares)
    assert gap <= bound
    assert bound <= 500 * gap  # and not vacuous: within a small factor where the gap is visible
    assert sum_of_shares_log_ratio(share_variance, 1) == 0.0


@pytest.mark.parametrize("variance", [1.0, 4.0, 25.0])
def test_discrete_gaussian_is_pointwise_close_to_a_rounded_gaussian(variance):
    sigma = math.sqrt(variance)
    reach = int(6 * sigma)
    xs = np.arange(-reach, reach + 1)
    rounded = special.ndtr((xs + 0.5) / sigma) - special.ndtr((xs - 0.5) / sigma)
    gap = np.max(np.abs(np.log(rounded / discrete_gaussian_pmf(variance, reach).numpy())))
    bound = rounding_log_ratio(variance, reach)
    assert gap <= bound <= 1.1 * gap


def _hockey_stick(p, q, eps):
    return float(np.maximum(0.0, p - math.exp(eps) * q).sum())


@pytest.mark.parametrize("scale,sigma,shares", [(20.0, 1.5, 2), (16.0, 2.0, 3), (40.0, 1.0, 1)])
def test_closeness_profile_bounds_the_exact_one_dimensional_step(scale, sigma, shares):
    """d = 1: the step releases y + N, N the sum of the honest shares (variance (σs)²/h each), y an integer
    that one example moves by at most Δ₂ = s + 1. Every integer shift up to Δ₂, both orders: the exact
    profile is below the bound at every ε, and the bound is close to it at the largest shift."""
    sensitivity = rounded_l2_norm_bound(scale, 1)
    profile = closeness_profile(sigma, 1, scale, shares, sensitivity)
    assert profile is not None
    variance = (sigma * scale) ** 2
    support = int(40 * math.sqrt(variance)) + 20
    noise = _sum_of_shares_pmf(variance / shares, shares, support)
    eps_grid = np.linspace(0.0, 4.0, 41)
    bound = profile(eps_grid)
    for shift in range(1, int(sensitivity) + 1):
        shifted = np.concatenate([np.zeros(shift), noise[:-shift]])
        for eps, b in zip(eps_grid, bound):
            assert _hockey_stick(shifted, noise, eps) <= b + 1e-15
            assert _hockey_stick(noise, shifted, eps) <= b + 1e-15
    # at the largest shift the exact curve is close to the bound (the Gaussian's at Δ₂ = its continuous shift)
    largest = int(sensitivity)
    shifted = np.concatenate([np.zeros(largest), noise[:-largest]])
    exact_at_1 = _hockey_stick(shifted, noise, 1.0)
    assert exact_at_1 >= 0.5 * float(profile(np.array([1.0]))[0])


def test_closeness_profile_is_the_gaussians_at_the_aggregators_scale():
    """At s = 2^20 the slack is negligible: the bound is the Gaussian mechanism's profile at sensitivity
    s + √d over σs, up to a relative 1e-3, and it declines (returns None) when the noise is a few integers."""
    dim, scale, sigma = 670_000, 2.0**20, 1.0
    sensitivity = rounded_l2_norm_bound(scale, dim)
    profile = closeness_profile(sigma, dim, scale, 2, sensitivity)
    eps = np.linspace(0.0, 8.0, 33)
    gaussian = gaussian_delta(eps, sensitivity / (sigma * scale))
    assert np.all(profile(eps) >= gaussian)
    assert np.all(profile(eps) <= gaussian * 1.001 + 1e-50)
    assert closeness_profile(0.5, dim, 4.0, 2, rounded_l2_norm_bound(4.0, dim)) is None
    assert closeness_profile(1e-6, dim, 4.0, 3, rounded_l2_norm_bound(4.0, dim)) is None  # no overflow either


@pytest.mark.parametrize("sigma,q,steps,shares", [(4.66, 256 / 1437, 336, 2), (2.55, 0.05, 1200, 1),
                                                   (1.0, 0.01, 1000, 3)])
def test_ddg_epsilon_is_the_subsampled_gaussians_at_the_rounded_sensitivity(sigma, q, steps, shares):
    """The accountant's ε is dp-accounting's ε of the subsampled Gaussian at σ_eff = σs/(s + √d) (the
    sensitivity after rounding): never below it, and within 1 % above it."""
    dim, scale = 9610, 2.0**20
    ours = ddg_epsilon(sigma, q, steps, 1e-5, dim=dim, scale=scale, num_shares=shares)
    reference = poisson_gaussian_epsilon(sigma * scale / rounded_l2_norm_bound(scale, dim), q, steps, 1e-5)
    assert reference * 0.998 <= ours <= reference * 1.01


def test_ddg_noise_multiplier_is_the_gaussians():
    """σ for ε = 3 at the demo's rate: the Gaussian's, up to the rounding's 1 + √d/s and the search's 1e-3."""
    q, steps = 256 / 1437, 336
    ddg = ddg_noise_multiplier(3.0, 1e-5, q, steps, dim=9610, scale=2.0**20, num_shares=2)
    assert ddg == pytest.approx(get_noise_multiplier(3.0, 1e-5, q, steps=steps), rel=3e-3)
