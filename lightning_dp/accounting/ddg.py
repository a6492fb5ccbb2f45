"""Privacy accounting of the distributed discrete Gaussian (DDG) with Poisson subsampling.

The route of Kairouz, Liu & Steinke (ICML 2021), *The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation* (arXiv:2102.06387), and of their reference code
(google-research/federated, ``distributed_dp/accounting_utils.py``):

1. **Sensitivity after rounding.** One example changes a rank's scaled clipped sum by a vector ``x`` of
   L2 norm at most ``s`` (the scale: integers per unit ``C/B``). Both sums are rounded with the same
   uniforms (``⌊v + U⌋``), so the rounded sums differ by at most ``⌈|x_i|⌉`` per coordinate:
   ``Δ₂ ≤ s + √d`` (the paper's bound with β = 0, which needs no conditional resampling) and, for integer
   vectors, ``Δ₁ ≤ Δ₂ · min(√d, Δ₂)``. The paper's conditional rounding (β > 0) bounds the norm of one
   *client's* rounded vector; here the unit of privacy is one example inside a rank's sum, whose rounding
   difference is bounded by the coupling above, deterministically (so β = 0).
2. **One step, no sampling** (their Proposition 14 / Theorem 1 with Eq. 17): the sum of ``n`` discrete
   Gaussian shares of variance ``σ_s²`` each has RDP at order α at most
   ``min(α·a²/2 + τd, α/2·(a² + 2bτ + τ²d), α/2·(a + τ√d)²)`` where ``a = Δ₂/(√n σ_s)``,
   ``b = Δ₁/(√n σ_s)`` and ``τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ_s² k/(k+1))``. Here ``n`` is the number of
   *honest* ranks (``min_honest_ranks``): only their shares are counted.
3. **Poisson subsampling**, two routes, each an upper bound; ε is the smaller:

   a. the general RDP bound of Zhu & Wang (ICML 2019), *Poisson Subsampled Rényi Differential Privacy*
      (Theorem 6; the reference code's ``_compute_rdp_subsampled(upper_bound=True)``), at integer
      orders and never above the unsampled RDP; composition over the steps (RDP adds up) and conversion
      to (ε, δ) with Canonne, Kamath & Steinke (2020) Prop. 12, as
      :class:`~lightning_dp.accounting.RDPAccountant` does. Tight at small sampling rates; at large
      ones its ``3·Σ_{l≥3}`` terms do not vanish however large the noise;
   b. the unsampled step's privacy profile, the amplification of a privacy profile by Poisson sampling
      in each order (add and remove), one dominating pair per order and the composition of its
      privacy-loss distribution (:mod:`lightning_dp.accounting._profile`, the numerics of the PRV
      accountant). The unsampled profile is the smaller of two bounds: the one converted from the RDP
      of step 2 (CKS Prop. 12), and the Gaussian mechanism's profile at sensitivity ``Δ₂`` over the
      honest noise's std, widened by the step's pointwise closeness to a (rounded) Gaussian mechanism
      (:mod:`._gaussian_closeness`: the sum of shares is a discrete Gaussian up to a factor
      ``e^{±a}``, a discrete Gaussian a rounded Gaussian on a box holding all but ``10⁻⁶⁰`` of the
      noise). At the aggregator's scale the second is the Gaussian's to a relative ``10⁻⁵``: the run
      costs what DP-SGD with the continuous Gaussian at sensitivity ``s + √d`` costs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import special

from .._checks import check_int, check_non_negative, check_open_unit, check_positive, check_rate
from lightning_dp.accounting import _gaussian_closeness, _pld, _profile
from lightning_dp.accounting.base import Accountant, HistoryEntry
from lightning_dp.accounting.prv import PRVAccountant
from lightning_dp.accounting.rdp import _delta_from_rdp, _epsilon_from_rdp

__all__ = [
    "DDG_ORDERS",
    "DistributedDiscreteGaussianAccountant",
    "ddg_epsilon",
    "ddg_noise_multiplier",
    "ddg_rdp",
    "ddg_tau",
    "rounded_l1_norm_bound",
    "rounded_l2_norm_bound",
    "subsampled_rdp",
]

DDG_ORDERS: Tuple[int, ...] = tuple(range(2, 129)) + (256,)
"""Integer RDP orders (the reference code's ``RDP_ORDERS``); the subsampling bound needs integers."""


def rounded_l2_norm_bound(l2_norm_bound: float, dim: int, beta: float = 0.0) -> float:
    """L2 norm bound of a vector of norm ``l2_norm_bound`` after stochastic rounding to integers: ``c + √d``
    (always), or with conditional rounding at ``beta`` in (0, 1) also ``sqrt(c² + d/4 + √(2 ln(1/β))·(c + √d/2))``
    (the paper's Theorem 1 bound; the smaller of the two). We use ``beta = 0`` (see the module docstring)."""
    c = check_positive("l2_norm_bound", l2_norm_bound)
    dim = check_int("dim", dim, 1)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"`beta` must be in [0, 1), got {beta!r}.")
    bound = c + math.sqrt(dim)
    if beta > 0:
        squared = c * c + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + 0.5 * math.sqrt(dim))
        bound = min(bound, math.sqrt(squared))
    return bound


def rounded_l1_norm_bound(rounded_l2: float, dim: int) -> float:
    """L1 bound of an integer vector of L2 norm ``rounded_l2`` in dimension ``dim``: ``Δ₂·min(√d, Δ₂)``."""
    return rounded_l2 * min(math.sqrt(dim), rounded_l2)


def ddg_tau(share_stddev: float, num_shares: int) -> float:
    """``τ = 10 Σ_{k=1}^{n-1} exp(-2π² σ_s² k/(k+1))``: how far the sum of ``n`` discrete Gaussian shares of
    parameter ``σ_s`` is from one discrete Gaussian (Kairouz et al. 2021, Theorem 1). 0 for one share."""
    var = check_non_negative("share_stddev", share_stddev) ** 2
    n = check_int("num_shares", num_shares, 1)
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * var * k / (k + 1)) for k in range(1, n))


def ddg_rdp(orders: Sequence[float], l2_scale: float, l1_scale: float, tau: float, dim: int) -> np.ndarray:
    """RDP of one unsampled DDG step at ``orders`` (Proposition 14 of the paper): the minimum of its three
    bounds. ``l2_scale``/``l1_scale`` are the sensitivities over the total std of the counted shares."""
    a = np.asarray(orders, dtype=np.float64)
    term_1 = a / 2.0 * l2_scale**2 + tau * dim
    term_2 = a / 2.0 * (l2_scale**2 + 2.0 * l1_scale * tau + tau**2 * dim)
    term_3 = a / 2.0 * (l2_scale + math.sqrt(dim) * tau) ** 2
    return np.minimum(np.minimum(term_1, term_2), term_3)


def subsampled_rdp(orders: Sequence[int], sample_rate: float, base_rdp: np.ndarray) -> np.ndarray:
    """Zhu & Wang (2019), Theorem 6: RDP at integer ``orders`` of a mechanism with RDP ``base_rdp[l - 2]`` at
    order ``l`` (``l = 2 .. max(orders)``) run on a Poisson sample at ``sample_rate``; never above the
    unsampled RDP at that order::

        1/(α-1) · log[(1-q)^(α-1)(αq - q + 1) + C(α,2) q²(1-q)^(α-2) e^{ε(2)}
                      + 3 Σ_{l=3}^{α} C(α,l) (1-q)^(α-l) q^l e^{(l-1)ε(l)}]
    """
    q = check_rate("sample_rate", sample_rate, allow_zero=True)
    alphas = [int(a) for a in orders]
    if any(a != o or a < 2 for a, o in zip(alphas, orders)):
        raise ValueError(f"`orders` must be integers >= 2 for the subsampling bound, got {list(orders)!r}.")
    base = np.asarray(base_rdp, dtype=np.float64)
    if base.size < max(alphas) - 1:
        raise ValueError(f"`base_rdp` must hold orders 2 .. {max(alphas)}, got {base.size} values.")
    if q == 0.0:
        return np.zeros(len(alphas))
    unsampled = np.array([base[a - 2] for a in alphas])
    if q == 1.0:
        return unsampled
    log_q, log_1mq = math.log(q), math.log1p(-q)
    out = np.empty(len(alphas))
    for i, alpha in enumerate(alphas):
        ls = np.arange(2, alpha + 1, dtype=np.float64)
        log_terms = (special.gammaln(alpha + 1) - special.gammaln(ls + 1) - special.gammaln(alpha - ls + 1)
                     + (alpha - ls) * log_1mq + ls * log_q + (ls - 1) * base[: alpha - 1])
        weights = np.where(ls == 2, 1.0, 3.0)
        first = (alpha - 1) * log_1mq + math.log(alpha * q - q + 1)
        total = special.logsumexp(np.concatenate([[first], log_terms]), b=np.concatenate([[1.0], weights]))
        out[i] = min(total / (alpha - 1), unsampled[i])
    return out


def _unsampled_rdp(noise_multiplier: float, dim: int, scale: float, num_shares: int, max_order: int) -> np.ndarray:
    """RDP at orders ``2 .. max_order`` of one unsampled DDG step at noise multiplier σ (total std σC of
    the honest shares)."""
    total_std = noise_multiplier * scale  # in integer units: a sample's clipped contribution is s
    l2 = rounded_l2_norm_bound(scale, dim)
    l1 = rounded_l1_norm_bound(l2, dim)
    tau = ddg_tau(total_std / math.sqrt(num_shares), num_shares)
    return ddg_rdp(range(2, max_order + 1), l2 / total_std, l1 / total_std, tau, dim)


def _step_rdp(noise_multiplier: float, sample_rate: float, dim: int, scale: float, num_shares: int,
              orders: Sequence[int]) -> np.ndarray:
    """RDP at ``orders`` of one Poisson-subsampled DDG step (route 3a of the module docstring)."""
    if sample_rate == 0.0:
        return np.zeros(len(orders))
    if noise_multiplier == 0.0:
        return np.full(len(orders), np.inf)
    base = _unsampled_rdp(noise_multiplier, dim, scale, num_shares, max(orders))
    return subsampled_rdp(orders, sample_rate, base)


def _epsilon_by_rdp(history: Sequence[HistoryEntry], delta: float, dim: int, scale: float, num_shares: int,
                    orders: Sequence[int], cache: Optional[Dict[Tuple[float, float], np.ndarray]] = None) -> float:
    """Route 3a: subsampled RDP (Zhu & Wang, Theorem 6), composed, converted. ``cache`` keeps each
    ``(σ, q)``'s per-step RDP for later calls with the same parameters."""
    cache = {} if cache is None else cache
    rdp = np.zeros(len(orders))
    for sigma, q, n in history:
        if (sigma, q) not in cache:
            cache[(sigma, q)] = _step_rdp(sigma, q, dim, scale, num_shares, orders)
        rdp = rdp + n * cache[(sigma, q)]
    eps, _ = _epsilon_from_rdp(np.asarray(orders, dtype=np.float64), rdp, delta)
    return eps


class _ProfileComposer(PRVAccountant):
    """Route 3b: the unsampled DDG step's profile from its RDP, subsampled per order, one dominating pair per
    order, composed as a privacy-loss distribution (:mod:`lightning_dp.accounting._profile`) with the PRV
    accountant's plans and caches (the per-step ε of a run costs one inverse FFT, not a new plan)."""

    def __init__(self, dim: int, scale: float, num_shares: int, orders: Sequence[int]) -> None:
        super().__init__()
        self.dim, self.scale, self.num_shares, self.max_order = dim, scale, num_shares, max(orders)
        self._steps: Dict[Tuple[float, float, str], _profile.SubsampledProfileStep] = {}

    def _step_pld(self, sigma: float, q: float, direction: str) -> "_pld.StepPLD":
        key = (sigma, q, direction)
        if key not in self._steps:  # one object per kind of step: its moments are computed once
            self._steps[key] = _profile.SubsampledProfileStep(self._unsampled_profile(sigma), q, direction)
        return self._steps[key]

    def _unsampled_profile(self, sigma: float) -> Callable[[np.ndarray], np.ndarray]:
        """The unsampled step's profile: the smaller of the bound converted from its RDP and the bound from
        its closeness to the Gaussian mechanism (:mod:`._gaussian_closeness`), both upper bounds."""
        base = _unsampled_rdp(sigma, self.dim, self.scale, self.num_shares, self.max_order)
        ints = np.arange(2, self.max_order + 1, dtype=np.float64)
        close = _gaussian_closeness.closeness_profile(sigma, self.dim, self.scale, self.num_shares,
                                                      rounded_l2_norm_bound(self.scale, self.dim))
        if close is None:
            return lambda eps: _delta_from_rdp(ints, base, eps)
        return lambda eps: np.minimum(_delta_from_rdp(ints, base, eps), close(eps))


def _epsilon_by_profile(history: Sequence[HistoryEntry], delta: float, dim: int, scale: float, num_shares: int,
                        orders: Sequence[int]) -> float:
    """Route 3b for one history (a fresh composer: no caches kept)."""
    return _ProfileComposer(dim, scale, num_shares, orders)._epsilon(list(history), delta)


def ddg_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *, dim: int,
                scale: float, num_shares: int, orders: Sequence[int] = DDG_ORDERS) -> float:
    """ε at ``delta`` of ``steps`` DDG steps at noise multiplier σ and Poisson rate ``sample_rate`` for a
    model of ``dim`` parameters, quantisation ``scale`` and ``num_shares`` honest noise shares.

    Example::

        >>> eps = ddg_epsilon(1.0, 0.01, 1000, 1e-5, dim=10_000, scale=2**20, num_shares=2)
        >>> 0 < eps < 10
        True
    """
    acc = DistributedDiscreteGaussianAccountant(scale=scale, dim=dim, num_shares=num_shares, orders=orders)
    if steps:
        acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
    return acc.get_epsilon(delta)


def ddg_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, *, dim: int,
                         scale: float, num_shares: int, tolerance: float = 1e-3) -> float:
    """The smallest σ (within ``tolerance`` relative) whose :func:`ddg_epsilon` is at most ``target_epsilon``:
    use it as ``noise_multiplier`` of a secure-aggregation run (``target_epsilon`` is not calibrated there)."""
    target = check_positive("target_epsilon", target_epsilon)

    def eps(sigma: float) -> float:
        return ddg_epsilon(sigma, sample_rate, steps, delta, dim=dim, scale=scale, num_shares=num_shares)

    lo, hi = 0.0, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ValueError(f"target_epsilon={target_epsilon!r} is not reachable with noise_multiplier <= 1e6.")
    while hi - lo > tolerance * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


class DistributedDiscreteGaussianAccountant(Accountant):
    """Accountant of DP-SGD steps whose noise is the distributed discrete Gaussian of secure aggregation.

    The history is the usual ``(noise_multiplier, sample_rate, num_steps)``; ε is computed by the route of
    the module docstring for the mechanism's parameters: the model's ``dim``, the quantisation ``scale`` and
    ``num_shares`` = ``min_honest_ranks``. ``dim`` and ``num_shares`` may be given later with
    :meth:`configure` (the strategy knows them once the model and processes are set up).
    """

    mechanism = "ddg"
    description = (
        "sum of discrete Gaussian shares at sensitivity scale + sqrt(d): its RDP (Kairouz, Liu & Steinke 2021, "
        "Prop. 14) and its closeness to the Gaussian mechanism; Poisson subsampling and composition: the "
        "smaller ε of Zhu & Wang 2019 Thm. 6 (RDP) and the step's privacy profile amplified per order and "
        "composed as a privacy-loss distribution"
    )
    """How ε is computed, in one line (the privacy report's "Accounting" row)."""

    def __init__(self, *, scale: float, dim: Optional[int] = None, num_shares: Optional[int] = None,
                 orders: Sequence[int] = DDG_ORDERS) -> None:
        super().__init__()
        self.scale = check_positive("scale", scale)
        self.orders = tuple(int(o) for o in orders)
        self.dim: Optional[int] = None
        self.num_shares: Optional[int] = None
        self._composer: Optional[_ProfileComposer] = None  # route 3b's plans and results, for (dim, num_shares)
        self._composer_key: Optional[Tuple[int, int]] = None
        self._step_rdps: Dict[Tuple[float, float], np.ndarray] = {}  # route 3a's per-step RDP, per (σ, q)
        if dim is not None or num_shares is not None:
            self.configure(dim=dim, num_shares=num_shares)

    def configure(self, *, dim: Optional[int], num_shares: Optional[int]) -> None:
        """Set the model's dimension and the number of honest noise shares."""
        self.dim = check_int("dim", dim, 1)
        self.num_shares = check_int("num_shares", num_shares, 1)

    def _epsilon(self, history: Sequence[HistoryEntry], delta: float) -> float:
        if self.dim is None or self.num_shares is None:
            raise RuntimeError(
                "The distributed discrete Gaussian accountant is not configured yet (dim, num_shares): it is, "
                "when the secure-aggregation strategy sets up its optimizer."
            )
        delta = check_open_unit("delta", delta)
        key = (self.dim, self.num_shares)
        if self._composer is None or self._composer_key != key:
            self._composer = _ProfileComposer(self.dim, self.scale, self.num_shares, self.orders)
            self._composer_key, self._step_rdps = key, {}
        by_rdp = _epsilon_by_rdp(history, delta, self.dim, self.scale, self.num_shares, self.orders, self._step_rdps)
        return min(by_rdp, self._composer._epsilon(list(history), delta))  # two upper bounds: the smaller holds

    def __getstate__(self) -> Dict[str, Any]:
        # the caches hold closures (not picklable) and are rebuilt on demand
        state = self.__dict__.copy()
        state.update(_composer=None, _composer_key=None, _step_rdps={})
        return state

    def fresh(self) -> "DistributedDiscreteGaussianAccountant":
        """An empty accountant with this one's parameters (scale, dim, shares, orders): for calibration."""
        copy = DistributedDiscreteGaussianAccountant(scale=self.scale, orders=self.orders)
        copy.dim, copy.num_shares = self.dim, self.num_shares
        return copy

    def state_dict(self) -> Dict[str, Any]:
        """The base state plus the mechanism's parameters (for the record; loading keeps this object's)."""
        state = super().state_dict()
        state["parameters"] = {"scale": self.scale, "dim": self.dim, "num_shares": self.num_shares}
        return state
