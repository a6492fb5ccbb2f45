r"""The unsampled distributed-discrete-Gaussian step's privacy profile from its closeness to the Gaussian
mechanism. Private module of :mod:`lightning_dp.accounting.ddg` (its route 3b takes the
smaller of this profile and the one converted from the step's RDP).

The step releases ``y + N``: ``y`` the integer vector of the ranks' rounded sums (one example moves it by
at most ``Δ₂ = s + √d`` in L2, for fixed rounding uniforms), ``N`` the sum of the ``h`` honest ranks'
shares, i.i.d. per coordinate, each share ``N_Z(0, σ_s²)``, ``σ_s² = σ_N²/h`` (``σ_N = σs``, integers).

1. **The sum of shares is a discrete Gaussian, pointwise.** Let ``Z_k`` be the sum of ``k`` shares. With
   ``s_k² = (k−1)σ_s²/k``, completing the square gives ``Σ_y e^{−y²/(2(k−1)σ_s²) − (x−y)²/(2σ_s²)} =
   e^{−x²/(2kσ_s²)} Σ_y e^{−(y−c)²/(2s_k²)}``, and by Poisson summation ``Σ_y e^{−(y−c)²/(2s²)} =
   √(2π)s Σ_j e^{−2π²s²j²} cos(2πjc)``, within a factor ``1 ± ε_k`` of ``√(2π)s`` for every ``c``
   (``ε_k = 2Σ_{j≥1} e^{−2π²s_k²j²}``). Both sides being probability laws, the pmf of
   ``N_Z(0,(k−1)σ_s²) * N_Z(0,σ_s²)`` is within a factor ``(1+ε_k)/(1−ε_k)`` (either way) of
   ``N_Z(0, kσ_s²)``'s at every integer; convolving keeps pointwise factors, so by induction
   ``|log P_{Z_h}(x)/P_{N_Z(0,σ_N²)}(x)| ≤ a_sum = Σ_{k=2}^{h} log((1+ε_k)/(1−ε_k))`` for every ``x``.
   (Kairouz, Liu & Steinke 2021 bound the same gap, with their ``τ``; this is the bound we use.)
2. **A discrete Gaussian is a rounded Gaussian, pointwise on a box.** With ``R = round(G)``,
   ``G ~ N(0, σ²)``: ``P_R(x)/P_{N_Z(0,σ²)}(x) = Θ/(√(2π)σ) · ∫_{−½}^{½} e^{−(2xt+t²)/(2σ²)} dt`` with
   ``Θ = Σ_y e^{−y²/(2σ²)} = √(2π)σ(1 + 2Σ_{j≥1} e^{−2π²σ²j²})``; the integral lies in
   ``[e^{−1/(8σ²)}, sinh(b)/b]``, ``b = |x|/(2σ²)``. On ``|x| ≤ X₀``:
   ``|log P_R/P_DG| ≤ η = max(1/(8σ²), log(1 + 2Σ_j e^{−2π²σ²j²}) + log(sinh(b₀)/b₀))``, ``b₀ = X₀/(2σ²)``.
3. **Closeness of the two mechanisms.** On the box ``B = {|x_j| ≤ X₀ for all j}`` the d-dimensional laws
   of ``N`` and ``R`` are within ``e^{±a}``, ``a = d(a_sum + η)``; outside it ``N`` has mass
   ``ξ_N ≤ 2d·e^{a_sum}·e^{−X₀²/(2σ²)}`` (the discrete Gaussian is σ²-sub-Gaussian: Canonne, Kamath & Steinke
   2020) and ``R`` at most ``ξ_R ≤ 2d·e^{−(X₀−½)²/(2σ²)}``. For every event ``S``,
   ``P[y+N ∈ S] ≤ e^a P[y+R ∈ S] + ξ_N`` and ``P[y+R ∈ S] ≤ e^a P[y+N ∈ S] + ξ_R``, hence for every pair
   of neighbours and every real ``ε``:
   ``δ(ε) ≤ e^a δ_R(ε − 2a) + ξ_N + e^{ε−a} ξ_R``.
4. **The rounded Gaussian mechanism is the Gaussian mechanism, post-processed.** For integer ``y``,
   ``y + round(G) = round(y + G)``: ``δ_R(ε) ≤ Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`` with ``μ = Δ₂/σ_N``
   (Balle & Wang 2018), in both orders of the pair.

``X₀`` is set so that ``ξ_N, ξ_R ≲ 10⁻⁶⁰``. At the secure aggregator's scale (``σ_N ≈ 2^20 σ``) the
slack ``a`` is of order ``10⁻⁵`` for a million parameters and the profile is the Gaussian mechanism's at
sensitivity ``s + √d``; with few integers per unit of noise it grows, and the accountant's other routes
take over (it uses the smallest bound). Tested against exact pmfs and the exact one-dimensional profile.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
from scipy import special

TAIL = 1e-60
"""Target mass of the noise outside the box ``|x_j| ≤ X₀`` (step 3 of the module docstring)."""


def _poisson_gap(variance: float) -> float:
    """An upper bound on ``2 Σ_{j≥1} e^{−2π² s² j²}`` for ``s² = variance``: the largest relative gap of a
    Gaussian's integer sum from its integral (Poisson summation). ``inf`` once it reaches 1 (no bound
    that uses it applies then)."""
    c = 2.0 * math.pi**2 * variance
    total, j = 0.0, 1
    while True:
        term = math.exp(-c * j * j)
        total += term
        if 2.0 * total >= 1.0:
            return math.inf
        ratio = math.exp(-c * (2 * j + 1))  # term j+1 over term j; later ratios are smaller
        if term < 1e-300 or term < 1e-17 * total:
            return 2.0 * (total + term * ratio / (1.0 - ratio))  # the tail, bounded by a geometric series
        j += 1


def sum_of_shares_log_ratio(share_variance: float, num_shares: int) -> float:
    """``a_sum``: a bound on ``|log P_{Z_h}(x) / P_{N_Z(0, h σ_s²)}(x)|`` over all integers ``x``, ``Z_h``
    the sum of ``h`` i.i.d. ``N_Z(0, σ_s²)`` (step 1). ``inf`` when the bound does not apply."""
    total = 0.0
    for k in range(2, num_shares + 1):
        gap = _poisson_gap((k - 1) * share_variance / k)
        if gap >= 1.0:
            return math.inf
        total += math.log1p(gap) - math.log1p(-gap)
    return total


def rounding_log_ratio(variance: float, reach: float) -> float:
    """``η``: a bound on ``|log P_{round(G)}(x) / P_{N_Z(0, σ²)}(x)|`` for ``|x| ≤ reach``,
    ``G ~ N(0, σ²)`` (step 2)."""
    b = reach / (2.0 * variance)
    if b > 20.0:
        log_sinhc = b - math.log(2.0 * b)  # sinh(b) ≤ e^b/2 (no overflow)
    elif b > 1e-4:
        log_sinhc = math.log(math.sinh(b) / b)
    else:
        log_sinhc = b * b / 6.0  # sinh(b)/b ≤ e^{b²/6}
    return max(1.0 / (8.0 * variance), math.log1p(_poisson_gap(variance)) + log_sinhc)


def gaussian_delta(eps: np.ndarray, mu: float) -> np.ndarray:
    """The Gaussian mechanism's profile at sensitivity over std ``mu``, at every real ``eps``:
    ``Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)``, in [0, 1]."""
    eps = np.asarray(eps, dtype=np.float64)
    value = special.ndtr(-eps / mu + mu / 2.0) - np.exp(eps + special.log_ndtr(-eps / mu - mu / 2.0))
    return np.clip(value, 0.0, 1.0)


def closeness_profile(noise_multiplier: float, dim: int, scale: float, num_shares: int,
                      sensitivity: float) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """``ε ↦`` the bound of step 3 on the unsampled step's privacy profile (both orders of every pair of
    neighbours), for noise of total std ``σs`` (integers) from ``num_shares`` honest shares, ``dim``
    coordinates and L2 sensitivity ``sensitivity`` (integers, ``s + √d``). ``None`` when the bound does not
    apply or is vacuous (too few integers per unit of noise)."""
    variance = (noise_multiplier * scale) ** 2
    if not variance > 0.0 or not math.isfinite(variance):
        return None
    a_sum = sum_of_shares_log_ratio(variance / num_shares, num_shares)
    if not math.isfinite(a_sum):
        return None
    # the box: both tails below TAIL (log-domain, no underflow)
    reach = math.sqrt(2.0 * variance * (math.log(2.0 * dim / TAIL) + a_sum)) + 1.0
    a = dim * (a_sum + rounding_log_ratio(variance, reach))
    if not a < 0.1:
        return None
    xi_noise = math.exp(math.log(2.0 * dim) + a_sum - reach**2 / (2.0 * variance))
    xi_rounded = math.exp(math.log(2.0 * dim) - (reach - 0.5) ** 2 / (2.0 * variance))
    mu = sensitivity / math.sqrt(variance)

    def profile(eps: np.ndarray) -> np.ndarray:
        eps = np.asarray(eps, dtype=np.float64)
        value = (math.exp(a) * gaussian_delta(eps - 2.0 * a, mu) + xi_noise
                 + np.exp(np.minimum(eps - a, 700.0)) * xi_rounded)
        return np.minimum(value, 1.0)

    return profile
