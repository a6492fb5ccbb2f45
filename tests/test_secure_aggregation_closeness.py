"""The DDG step's privacy profile from its closeness to the Gaussian mechanism
(lightning_dp/accounting/_gaussian_closeness.py), checked against exact computations: the pmfs of
sums of discrete Gaussians (by convolution), of rounded Gaussians (by the normal CDF), the exact hockey-stick
curves of a one-dimensional DDG step, and dp-accounting's ε of the subsampled Gaussian."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from lightning_dp.accounting import get_noise_multiplier
from lightning_dp.accounting._gaussian_closeness import (
    closeness_profile,
    gaussian_delta,
    rounding_log_ratio,
    sum_of_shares_log_ratio,
)
from lightning_dp.accounting.ddg import ddg_epsilon, ddg_noise_multiplier, rounded_l2_norm_bound
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


def _log_gap(p, q):
    """max |log p/q| over the points where both are representable."""
    keep = (p > 1e-250) & (q > 1e-250)
    return float(np.max(np.abs(np.log(p[keep] / q[keep]))))


ROUNDOFF = 1e-13
"""Absolute float64 error of a measured log-ratio of two pmfs (exp, sums, convolution of ~10² terms): where
the true gap is far below this, the measured one is still ~5·10⁻¹⁴."""


@pytest.mark.parametrize("share_variance", [0.3, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("shares", [2, 3])
def test_sum_of_shares_is_pointwise_close_to_one_discrete_gaussian(share_variance, shares):
    """The bound of step 1 of _gaussian_closeness's proof holds, and each of its terms is tight.

    The proof adds one share at a time: step k compares N_Z(0, (k−1)σ_s²) * N_Z(0, σ_s²) with N_Z(0, kσ_s²),
    whose ratio is C·(1 + A(c)), c = x(k−1)/k mod 1, A(c) = 2Σ_j e^{−2π²s_k²j²} cos(2πjc), |A| ≤ ε_k, and
    bounds its log by b_k = log((1+ε_k)/(1−ε_k)) ≈ 2ε_k. The oscillation is really there: A(0) = ε_k, and at
    c = ⌊k/2⌋/k, A ≈ ε_k·cos(2π⌊k/2⌋/k) (−ε_k for k = 2, −ε_k/2 for k = 3). Both laws sum to 1, so the log
    ratio changes sign and its largest |value|, the exact gap g_k, is at least half its range:
    g_k ≳ ε_k(1 − cos(2π⌊k/2⌋/k))/2, hence b_k ≤ w_k·g_k with w_k = 4/(1 − cos(2π⌊k/2⌋/k)) = 2 for k = 2
    and 8/3 for k = 3, to first order in ε_k (≤ 0.1 here). Measured b_k/g_k: 1.73–2.0 for k = 2 (2 − 4·10⁻⁸
    at σ_s² = 2: the k = 2 factor is tight, hence the roundoff allowance), 2.0–2.38 for k = 3.

    The h-share bound a_sum = Σ_k b_k is then loose only by the induction: a later convolution smooths the
    earlier steps' oscillations, which the proof carries along undamped. For h = 3 the exact gap is the
    A₂-lattice theta term 6e^{−(4/3)π²σ_s²} while a_sum ≈ 4e^{−π²σ_s²}: a factor (2/3)e^{π²σ_s²/3} (481 at
    σ_s² = 2), which is why the bound is checked against the gap of each step, not of the total."""
    support = int(30 * math.sqrt(shares * share_variance)) + 5
    exact = _sum_of_shares_pmf(share_variance, shares, support)
    gap = _log_gap(exact, discrete_gaussian_pmf(shares * share_variance, support).numpy())
    bound = sum_of_shares_log_ratio(share_variance, shares)
    assert gap <= bound
    assert sum_of_shares_log_ratio(share_variance, 1) == 0.0
    reach = support + int(40 * math.sqrt(shares * share_variance)) + 10
    share = discrete_gaussian_pmf(share_variance, reach).numpy()
    for k in range(2, shares + 1):
        combined = np.convolve(discrete_gaussian_pmf((k - 1) * share_variance, reach).numpy(), share)
        middle = len(combined) // 2
        step_gap = _log_gap(combined[middle - support: middle + support + 1],
                            discrete_gaussian_pmf(k * share_variance, support).numpy())
        step_bound = sum_of_shares_log_ratio(share_variance, k) - sum_of_shares_log_ratio(share_variance, k - 1)
        factor = 4.0 / (1.0 - math.cos(2.0 * math.pi * (k // 2) / k))
        assert step_gap <= step_bound <= factor * (step_gap + ROUNDOFF), (k, step_gap, step_bound, factor)


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
    sensitivity after rounding): never below it (up to the 0.1 % the other tests against dp-accounting allow:
    both are upper bounds of the Gaussian's ε), and within 1 % above it."""
    dim, scale = 9610, 2.0**20
    ours = ddg_epsilon(sigma, q, steps, 1e-5, dim=dim, scale=scale, num_shares=shares)
    reference = poisson_gaussian_epsilon(sigma * scale / rounded_l2_norm_bound(scale, dim), q, steps, 1e-5)
    assert reference * (1 - 1e-3) <= ours <= reference * 1.01


def test_ddg_noise_multiplier_is_the_gaussians():
    """σ for ε = 3 at the demo's rate: the Gaussian's, up to the rounding's 1 + √d/s and the search's 1e-3."""
    q, steps = 256 / 1437, 336
    ddg = ddg_noise_multiplier(3.0, 1e-5, q, steps, dim=9610, scale=2.0**20, num_shares=2)
    assert ddg == pytest.approx(get_noise_multiplier(3.0, 1e-5, q, steps=steps), rel=3e-3)
