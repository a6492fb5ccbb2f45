r"""Renyi-DP accounting of the Poisson-subsampled Gaussian mechanism (numpy/scipy only).

Per step, the mechanism adds ``N(0, sigma^2)`` noise (``sigma`` = noise multiplier, sensitivity 1) to
a sum over a Poisson sample of rate ``q``. Its Renyi DP at order ``alpha`` is ``log(A_alpha) /
(alpha - 1)`` with (Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism", arXiv:1908.10530)

.. math::
    A_\alpha = \mathbb{E}_{z \sim \mu_0}\big[((1 - q) + q\,\mu_1(z)/\mu_0(z))^\alpha\big],
    \qquad \mu_0 = N(0, \sigma^2),\ \mu_1 = N(1, \sigma^2).

* integer ``alpha`` (their Sec. 3.2): binomial expansion,
  ``A = sum_{k=0}^{alpha} C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))``. We evaluate
  ``A - 1 = sum_{k>=2} C(alpha, k) (1-q)^(alpha-k) q^k expm1((k^2 - k) / (2 sigma^2))`` (the binomial
  weights sum to one and the ``k = 0, 1`` terms have ``expm1(0) = 0``), all in log space, then
  ``log A = log1p(A - 1)``; this keeps full relative precision when ``A - 1`` is far below ``1e-16``
  (tiny ``q``), where summing ``A`` itself would round to ``1``.
* fractional ``alpha`` (their Sec. 3.3): split the integral at
  ``z0 = sigma^2 log(1/q - 1) + 1/2`` and expand both parts as generalised binomial series,
  ``A = sum_k |C(alpha,k)| q^k (1-q)^(alpha-k) e^{(k^2-k)/(2 sigma^2)} Phi((z0 - k)/sigma)
  + sum_k |C(alpha,k)| q^(alpha-k) (1-q)^k e^{(j^2-j)/(2 sigma^2)} Phi((j - z0)/sigma)``, ``j = alpha - k``.
  The magnitudes of the (eventually sign-alternating) coefficients are summed, as in the reference
  implementations (TF-Privacy, dp-accounting): an upper bound, never optimistic. The series are
  summed until a rigorous bound on their remaining tail is below ``exp(-30)`` of the total, and
  that bound is added (see ``_rdp_frac``).
* ``q = 1``: ``alpha / (2 sigma^2)`` (Gaussian mechanism, Mironov 2017); ``q = 0``: ``0``;
  ``sigma = 0`` (and ``q > 0``): ``inf``.

Composition over steps adds RDP at each order (Mironov 2017, Prop. 1). The conversion to
``(epsilon, delta)``-DP is Proposition 12 of Canonne, Kamath, Steinke 2020 ("The Discrete Gaussian for
Differential Privacy") / Balle et al. 2020 ("Hypothesis Testing Interpretations and Renyi Differential
Privacy"), minimised over the orders:

.. math::
    \varepsilon = \min_\alpha\ \mathrm{rdp}(\alpha) - \frac{\log\delta + \log\alpha}{\alpha - 1}
                  + \log\frac{\alpha - 1}{\alpha},

with ``epsilon = 0`` at any order where ``delta >= sqrt(1 - exp(-rdp))`` (the total-variation bound
``TV <= sqrt(1 - exp(-KL))`` of Bretagnolle-Huber, ``KL <= rdp(alpha)``); never negative.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import special

from lightning_dp.accounting.base import Accountant, HistoryEntry, _check_delta, register_accountant

DEFAULT_RDP_ORDERS: Tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)
"""Default RDP orders: 1.1, 1.2, ..., 10.9, then 11, 12, ..., 63, then 128, 256, 512, 1024 (the same
grid as dp-accounting's ``DEFAULT_RDP_ORDERS``)."""

_TAIL_LOG_RATIO = -30.0  # sum a fractional-order series until its tail bound is < e^-30 of the total
_FRAC_FIRST_TERMS = 64
_FRAC_MAX_TERMS = 1 << 16


# --------------------------------------------------------------------------------------------------
# RDP of one step
# --------------------------------------------------------------------------------------------------
def _log_abs_comb(n: float, k: np.ndarray) -> np.ndarray:
    """``log |C(n, k)|`` for real ``n`` (``gammaln`` is ``log |Gamma|``)."""
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """``log(exp(x) - 1)`` for ``x > 0``, accurate for tiny and huge ``x``."""
    small = np.log(np.expm1(np.minimum(x, 30.0)))
    large = x + np.log1p(-np.exp(-np.maximum(x, 30.0)))
    return np.where(x > 30.0, large, small)


def _rdp_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """RDP at integer orders ``alphas >= 2`` for ``0 < q < 1``, ``sigma > 0`` (binomial expansion)."""
    if alphas.size > 1 and alphas.size * alphas.max() > 4_000_000:  # keep the 2-D arrays small
        return np.concatenate([_rdp_int(q, sigma, alphas[i : i + 1]) for i in range(alphas.size)])
    a = alphas[:, None]
    k = np.arange(2, int(alphas.max()) + 1, dtype=np.float64)[None, :]
    with np.errstate(invalid="ignore"):
        log_terms = (
            _log_abs_comb(a, k)
            + k * math.log(q)
            + (a - k) * math.log1p(-q)
            + _log_expm1((k * k - k) / (2.0 * sigma**2))
        )
    log_terms = np.where(k <= a, log_terms, -np.inf)  # C(alpha, k) = 0 for k > alpha
    log_a_minus_1 = special.logsumexp(log_terms, axis=1)
    return np.logaddexp(0.0, log_a_minus_1) / (alphas - 1)


def _rdp_frac(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """RDP at fractional orders ``alphas > 1`` for ``0 < q < 1``, ``sigma > 0`` (two series).

    Each series' ``k``-th term is ``|C(alpha, k)|`` times a constant times the Gaussian Mills ratio
    ``Phi(-x)/phi(x)`` at ``x = (k - z0)/sigma`` (resp. ``(k + z0 - alpha)/sigma``): the
    ``exp(k^2)`` growth cancels exactly. Mills ratios decrease, and for ``k > alpha``
    ``|C(alpha, k+1)/C(alpha, k)| = (k - alpha)/(k + 1) <= (k/(k + 1))^(alpha + 1)``, so the terms
    after the last computed index ``m > alpha`` are at most ``t_m (m/k)^(alpha+1)`` and sum to at most
    ``t_m m / alpha``. That bound is added to the partial sum (an upper bound, never optimistic); we
    sum until it is below ``exp(-30)`` of the total or ``_FRAC_MAX_TERMS`` terms were used.
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma**2 * (log_1mq - log_q) + 0.5
    two_var = 2.0 * sigma**2
    rdp = np.empty(alphas.shape)
    pending = np.arange(alphas.size)
    num_terms = max(_FRAC_FIRST_TERMS, 1 << math.ceil(math.log2(alphas.max() + 2)))
    while pending.size:
        a = alphas[pending][:, None]
        k = np.arange(num_terms, dtype=np.float64)[None, :]
        j = a - k
        log_coef = _log_abs_comb(a, k)
        # integral over z <= z0, expanded in powers of q/(1-q) * mu1/mu0 (<= 1 there)
        log_s0 = log_coef + k * log_q + j * log_1mq + (k * k - k) / two_var
        log_s0 += special.log_ndtr((z0 - k) / sigma)
        # integral over z > z0, expanded in powers of (1-q)/q * mu0/mu1 (< 1 there)
        log_s1 = log_coef + j * log_q + k * log_1mq + (j * j - j) / two_var
        log_s1 += special.log_ndtr((j - z0) / sigma)
        log_sum = np.logaddexp(special.logsumexp(log_s0, axis=1), special.logsumexp(log_s1, axis=1))
        m = num_terms - 1
        log_tail = np.logaddexp(log_s0[:, -1], log_s1[:, -1]) + np.log(m / a[:, 0])
        done = (log_tail < log_sum + _TAIL_LOG_RATIO) | (num_terms >= _FRAC_MAX_TERMS)
        rdp[pending[done]] = np.logaddexp(log_sum, log_tail)[done] / (alphas[pending[done]] - 1)
        pending = pending[~done]
        num_terms *= 2
    return rdp


@functools.lru_cache(maxsize=4096)
def _rdp_vector(sigma: float, q: float, orders: Tuple[float, ...]) -> np.ndarray:
    """RDP of one step at every order (read-only array, cached per ``(sigma, q, orders)``)."""
    if q == 0.0:
        rdp = np.zeros(len(orders))
    elif sigma == 0.0:
        rdp = np.full(len(orders), np.inf)
    elif q == 1.0:
        rdp = np.asarray(orders, dtype=np.float64) / (2.0 * sigma**2)
    else:
        alphas = np.asarray(orders, dtype=np.float64)
        is_int = alphas == np.round(alphas)
        rdp = np.empty(alphas.shape)
        if is_int.any():
            rdp[is_int] = _rdp_int(q, sigma, alphas[is_int])
        if not is_int.all():
            rdp[~is_int] = _rdp_frac(q, sigma, alphas[~is_int])
    rdp = np.where(np.isnan(rdp), np.inf, np.maximum(rdp, 0.0))  # RDP is >= 0; NaN: unusable order
    rdp.flags.writeable = False
    return rdp


def _epsilon_from_rdp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> Tuple[float, float]:
    """``(epsilon, order)``: Canonne-Kamath-Steinke 2020 Prop. 12 conversion, minimised over orders."""
    with np.errstate(over="ignore", invalid="ignore"):
        eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log1p(-1.0 / orders)
        eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)  # Bretagnolle-Huber via KL <= rdp
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


def _delta_from_rdp(orders: Sequence[float], rdp: Sequence[float], eps: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_epsilon_from_rdp`: at every ``eps``, ``min(1, min_α δ_α)`` with
    ``log δ_α = (α−1)(r(α) − ε + log(1 − 1/α)) − log α`` (the same Prop. 12, solved for δ): the privacy
    profile an RDP curve ``r`` at ``orders`` (> 1) guarantees."""
    a = np.asarray(orders, dtype=np.float64)[None, :]
    r = np.asarray(rdp, dtype=np.float64)[None, :]
    e = np.atleast_1d(np.asarray(eps, dtype=np.float64))[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        log_delta = (a - 1.0) * (r - e + np.log1p(-1.0 / a)) - np.log(a)
    log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    return np.minimum(1.0, np.exp(np.min(log_delta, axis=1)))


# --------------------------------------------------------------------------------------------------
# The accountant
# --------------------------------------------------------------------------------------------------
@register_accountant("rdp")
class RDPAccountant(Accountant):
    """Renyi-DP accountant for the Poisson-subsampled Gaussian mechanism.

    RDP of one step: Mironov, Talwar, Zhang 2019 (exact binomial sum for integer orders, the
    two-series computation for fractional orders; see the module docstring). Composition: RDP adds
    up over steps. Conversion to ``(epsilon, delta)``: Canonne, Kamath, Steinke 2020 Prop. 12 /
    Balle et al. 2020, ``eps = min_alpha rdp(alpha) - (log(delta) + log(alpha)) / (alpha - 1) +
    log((alpha - 1) / alpha)``. Agrees with dp-accounting's ``RdpAccountant`` (same orders) to well
    within ``1e-3`` relative. The per-step RDP vector of each ``(noise_multiplier, sample_rate)`` is
    cached, so asking for epsilon after every training step costs one vector sum per history entry.

    Args:
        orders: the RDP orders to optimise over, all finite and ``> 1``; default
            :data:`DEFAULT_RDP_ORDERS`.

    Example:
        >>> from lightning_dp.accounting import RDPAccountant
        >>> accountant = RDPAccountant()
        >>> accountant.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=14062)
        >>> round(accountant.get_epsilon(delta=1e-5), 3)
        2.597
        >>> accountant.history
        [(1.1, 0.004266666666666667, 14062)]
        >>> round(accountant.get_epsilon(delta=1e-5, additional_steps=1000), 3)  # 1000 more steps?
        2.695
        >>> accountant.total_steps  # the history is unchanged
        14062
    """

    def __init__(self, orders: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if orders is None:
            orders = DEFAULT_RDP_ORDERS
        try:
            values = tuple(float(a) for a in orders)
        except (TypeError, ValueError):
            raise ValueError(f"`orders` must be a sequence of numbers > 1, got {orders!r}.") from None
        if not values or not all(math.isfinite(a) and a > 1 for a in values):
            raise ValueError(f"`orders` must be a non-empty sequence of finite numbers > 1, got {orders!r}.")
        self.orders: Tuple[float, ...] = values
        self._orders_array = np.asarray(values, dtype=np.float64)

    def get_rdp(self, history: Optional[Sequence[HistoryEntry]] = None) -> np.ndarray:
        """The composed RDP at each of ``self.orders`` for ``history`` (default: this accountant's)."""
        history = self.history if history is None else history
        total = np.zeros(len(self.orders))
        for sigma, q, n in history:
            total = total + n * _rdp_vector(float(sigma), float(q), self.orders)
        return total

    def get_epsilon_and_order(
        self,
        delta: float,
        *,
        additional_steps: int = 0,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
    ) -> Tuple[float, float]:
        """Like :meth:`get_epsilon`, and also returns the optimal RDP order (``nan`` when the
        history is empty)."""
        delta = _check_delta(delta)
        history = self._history_with(additional_steps, noise_multiplier, sample_rate)
        if not history:
            return 0.0, math.nan
        return _epsilon_from_rdp(self._orders_array, self.get_rdp(history), delta)

    def _epsilon(self, history: Sequence[HistoryEntry], delta: float) -> float:
        return _epsilon_from_rdp(self._orders_array, self.get_rdp(history), delta)[0]
