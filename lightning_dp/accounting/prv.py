r"""Tight accounting of the Poisson-subsampled Gaussian by its privacy-loss distribution (numpy/scipy).

The ``(epsilon, delta)`` curve of a composition is a functional of the distribution of the summed
*privacy loss* (the privacy-loss distribution, PLD, or privacy-loss random variable, PRV; Sommer,
Meiser, Mohammadi 2019, "Privacy Loss Classes: The Central Limit Theorem in Differential Privacy";
Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy", NeurIPS):

.. math::
    \delta(\varepsilon) = \mathbb{E}_{L \sim P}\big[(1 - e^{\varepsilon - L})_+\big]
    + P(L = \infty), \qquad L = \sum_{\text{steps}} L_t .

How it is computed (details in ``_pld.py``):

1. each distinct ``(noise_multiplier, sample_rate)`` step is discretised on a grid ``j h`` by
   *connect-the-dots* (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022, PoPETs): a discrete pair
   that dominates the true one, for both the *remove* and the *add* neighbouring pair (Zhu, Dong,
   Wang 2022); the reported epsilon is the larger of the two;
2. the segments of the history are composed by FFT (Koskela, Jälkö, Honkela 2020): characteristic
   functions multiply, ``phi_1^{n_1} ... phi_k^{n_k}``, so heterogeneous histories cost one FFT per
   distinct ``(noise_multiplier, sample_rate)``;
3. mass the FFT wraps around the window only *adds* to the window; the mass above the window is
   bounded by a Chernoff bound from the discrete PLD's moment-generating function and added to
   ``delta``, as are the mass sent to ``+inf`` and an allowance for the FFT's floating-point noise;
4. ``delta(epsilon)`` is linear in ``e^epsilon`` between grid points, so the ``epsilon`` for a
   ``delta`` is solved exactly.

Error bound. *Upper bound:* every step above is pessimistic, so the returned ``epsilon`` satisfies
``delta_true(epsilon) <= delta`` (up to floating-point rounding, for which ``width * |most negative
FFT output|`` is added to ``delta``). *Tightness:* connect-the-dots moves each step's loss by less than
``h`` while preserving its ``P``- and ``Q``-mass, which adds at most ``h^2/4`` to the variance and
``h^2/8`` to the mean of each step's loss. The grid step is ``h = 2 sqrt(rho Var/N)`` (``Var`` the
variance of the composed loss, ``N`` the number of steps, ``rho = 2.5e-3``), so the composed loss's
variance grows by at most ``0.25%`` and its mean by ``rho Var / 2``; the three tail terms together
add at most ``3e-5 delta``. In tests, ``epsilon`` is within ``+0.5%`` of dp-accounting's PLD
accountant at ``value_discretization_interval=1e-4`` (itself a pessimistic bound) over
``q`` in ``[1e-4, 0.5]``, ``sigma`` in ``[0.5, 10]``, up to ``1e5`` steps, ``delta`` in ``[1e-8, 1e-4]``.

Incremental use. The grid and window (a *plan*) depend on the history, with the last segment's step
count rounded *up* to a bucket of relative width ``1/16``; plans are cached. Within a bucket, a new
step count costs one complex exponential and one inverse FFT per direction (no re-discretisation),
and results are cached per ``(history, delta)``, so the per-step pair ``get_epsilon(delta)`` /
``get_epsilon(delta, additional_steps=1)`` costs one such evaluation per step. Fresh and incremental
calls use the same plan for the same history, so they return the same number.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

from lightning_dp.accounting import _pld
from lightning_dp.accounting.base import Accountant, HistoryEntry, register_accountant

_PLAN_CACHE_SIZE = 8
_RESULT_CACHE_SIZE = 256


def _bucket(n: int) -> Tuple[int, int]:
    """``(low, high)``: the step-count bucket that holds ``n``; ``high`` is ``n`` rounded up to 4
    significant bits (relative width ``<= 1/16``), ``low`` the bucket's smallest count."""
    if n <= 32:
        return n, n
    shift = n.bit_length() - 5
    high = -(-n >> shift) << shift  # ceil to a multiple of 2^shift (16..32 multiples)
    low = max(((high >> shift) - 1) << shift, 1) + 1
    return low, high


@register_accountant("prv")
class PRVAccountant(Accountant):
    r"""Privacy-loss-distribution accountant (connect-the-dots discretisation, FFT composition) for
    the Poisson-subsampled Gaussian: the tightest of our accountants and the default.

    ``epsilon`` is a true upper bound (every approximation is pessimistic) and within about
    ``0.5%`` of the exact value; see the module docstring (:mod:`lightning_dp.accounting.prv`) for
    the method, references and error bound. A fresh call at 20k steps takes a few milliseconds, and
    asking again after each new step reuses cached work.

    Example:
        >>> from lightning_dp.accounting import PRVAccountant
        >>> accountant = PRVAccountant()
        >>> accountant.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=14062)
        >>> round(accountant.get_epsilon(1e-5), 3)
        2.384
    """

    def __init__(self) -> None:
        super().__init__()
        self._plans: "OrderedDict[tuple, List[_pld.Plan]]" = OrderedDict()
        self._results: "OrderedDict[tuple, float]" = OrderedDict()

    def _step_pld(self, sigma: float, q: float, direction: str) -> "_pld.StepPLD":
        """One step's privacy-loss distribution in one direction: the subsampled Gaussian's (a subclass
        composes another mechanism's with the same plans and caches)."""
        return _pld.GaussianStep(sigma, q, direction)

    def _epsilon(self, history: Sequence[HistoryEntry], delta: float) -> float:
        key = (tuple(history), delta)
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        value = self._compute(history, delta)
        self._results[key] = value
        if len(self._results) > _RESULT_CACHE_SIZE:
            self._results.popitem(last=False)
        return value

    def _compute(self, history: Sequence[HistoryEntry], delta: float) -> float:
        # Drop steps that cost nothing; any noiseless sampled step is unbounded.
        active = [(s, q, n) for s, q, n in history if q > 0]
        if not active:
            return 0.0
        if any(s == 0 for s, _, _ in active):
            return math.inf
        # Merge all but the last segment by (sigma, q): composition commutes.
        prefix: Dict[Tuple[float, float], int] = {}
        for s, q, n in active[:-1]:
            prefix[(s, q)] = prefix.get((s, q), 0) + n
        last_sigma, last_q, last_n = active[-1]
        low, high = _bucket(last_n)
        merged = sorted(prefix.items())
        segments = [sq for sq, _ in merged] + [(last_sigma, last_q)]
        base = [n for _, n in merged]
        counts = base + [last_n]
        plan_key = (tuple(merged), last_sigma, last_q, high, delta)
        plans = self._plans.get(plan_key)
        if plans is None:
            plans = [
                _pld.Plan([self._step_pld(s, q, direction) for s, q in segments], base + [high], base + [low], delta)
                for direction in _pld.DIRECTIONS
            ]
            self._plans[plan_key] = plans
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(plan_key)
        return max(plan.epsilon(counts, delta) for plan in plans)
