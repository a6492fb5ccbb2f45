r"""The privacy-loss distribution of a Poisson-subsampled mechanism known only by its privacy profile.

Used by the secure-aggregation accountant (:mod:`lightning_dp.accounting.ddg`), whose
base mechanism, the distributed discrete Gaussian, is known by upper bounds on its privacy profile (from
its RDP curve, or from its closeness to the Gaussian mechanism). Private module.

The route, each step an upper bound:

1. **Base profile** (any upper bound holding in both orders will do; for example:) from the base mechanism's RDP ``r(α)`` at integer orders, its privacy profile
   ``δ_b(ε) = min_α exp((α−1)(r(α) − ε)) / (α−1) · (1 − 1/α)^α`` (Canonne, Kamath & Steinke 2020,
   Prop. 12, :func:`lightning_dp.accounting.rdp._delta_from_rdp`), capped at 1. An RDP bound that holds for every neighbouring pair in both orders gives a
   profile that holds in both orders too.
2. **Subsampling** (Poisson sampling under add/remove; the amplification argument of Balle, Barthe &
   Gaboardi 2018, kept exact per order). With ``M = (1−q)P + qQ`` (``P`` without the example, ``Q``
   with it), ``ε' ≥ 0``, ``e^ε = 1 + (e^ε' − 1)/q`` and ``c = 1 − (1−q)(e^ε − 1)``:

   * remove, ``M − e^ε' P = q(Q − e^ε P)``, so ``H_{e^ε'}(M‖P) = q H_{e^ε}(Q‖P) ≤ q δ_b(ε)``;
   * add, ``P − e^ε' M = q c (P − (e^ε'/c) Q)``, so ``H_{e^ε'}(P‖M) ≤ q c δ_b(ε' − log c)`` when
     ``c > 0``, and 0 otherwise.

   For ``ε' < 0`` every pair has ``H_{e^ε'}(A‖B) = 1 − e^ε' + e^ε' H_{e^−ε'}(B‖A)``: each order's bound
   there is the other order's at ``−ε'``. Call the bound of one order ``D(ε')``, for every real ``ε'``.
3. **A dominating pair per order.** The true profile is convex in ``t = e^ε'`` and below ``D``, so below
   the greatest convex minorant of ``D`` (with ``D(t=0) = 1``); we take it on the grid ``ε'_j = j h``
   and interpolate linearly in ``t`` between grid points (above a convex function: pessimistic). A
   convex, decreasing, piecewise-linear profile is exactly the profile of a discrete privacy-loss
   distribution: mass ``t_j(s_{j−1} − s_j)`` at loss ``ε'_j`` (``s`` the slopes of ``−δ(t)``) and the
   value at the top of the grid at ``+∞``. That pair dominates the order's pair of every step, and
   dominating pairs compose, adaptively, into one for the run (Zhu, Dong & Wang 2022, *Optimal
   Accounting of Differential Privacy via Characteristic Function*), so
   :class:`~lightning_dp.accounting._pld.Plan` composes it like the Gaussian's, each order on its own;
   ε is the larger of the two.

With the exact Gaussian profile in step 1 the route gives the subsampled Gaussian's ε (the test suite
checks it against the PRV accountant); with an RDP curve it pays only for step 1's conversion, where
the general RDP subsampling bound (Zhu & Wang 2019, Theorem 6) pays a factor that does not vanish with
the noise at large sampling rates.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import numpy as np

__all__ = ["SubsampledProfileStep"]

_MAX_LOSS = 60.0
"""The grid never reaches beyond ``|ε'| = 60``: what the profile leaves above goes to ``+inf``."""


def _lower_convex_hull(t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Indices of the points ``(t_i, d_i)`` (``t`` ascending) on their lower convex hull."""
    hull = []
    for i in range(len(t)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the chord from a to i
            if (d[b] - d[a]) * (t[i] - t[a]) >= (d[i] - d[a]) * (t[b] - t[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return np.asarray(hull)


class SubsampledProfileStep:
    """One Poisson-subsampled step at rate ``q`` of a mechanism whose privacy profile (both orders of
    every neighbouring pair) is at most ``base_delta(ε)`` for ``ε ≥ 0``, in one ``direction``
    (``"remove"``: the pair ``(M, P)``; ``"add"``: ``(P, M)``): the :class:`~._pld.StepPLD` of a pair that
    dominates it (module docstring)."""

    def __init__(self, base_delta: Callable[[np.ndarray], np.ndarray], q: float, direction: str) -> None:
        if direction not in ("remove", "add"):
            raise ValueError(f"`direction` must be 'remove' or 'add', got {direction!r}.")
        self.base_delta, self.q, self.direction = base_delta, q, direction
        self._moments: Optional[Tuple[float, float]] = None

    def _positive(self, eps: np.ndarray, direction: str) -> np.ndarray:
        """The bound of step 2 at ``ε' >= 0`` for ``direction``."""
        q = self.q
        base_eps = np.log1p(np.expm1(eps) / q)  # e^ε = 1 + (e^ε' − 1)/q
        if direction == "remove":
            return np.minimum(1.0, q * self.base_delta(base_eps))
        c = 1.0 - (1.0 - q) * np.expm1(base_eps)
        positive = c > 0
        c_safe = np.where(positive, c, 1.0)
        value = q * c_safe * self.base_delta(np.where(positive, eps - np.log(c_safe), 0.0))
        return np.where(positive, np.minimum(1.0, value), 0.0)

    def profile(self, eps: np.ndarray) -> np.ndarray:
        """``D(ε')``: the bound of step 2 of the module docstring for this direction, at every real ``ε'``."""
        eps = np.asarray(eps, dtype=np.float64)
        other = "add" if self.direction == "remove" else "remove"
        mag = np.abs(eps)
        return np.where(eps >= 0, self._positive(mag, self.direction),
                        -np.expm1(eps) + np.exp(eps) * self._positive(mag, other))

    def _top(self, h: float, tail: float) -> int:
        """The smallest grid index ``J`` (a power of two times a start) where both orders' bounds are at
        most ``tail``, capped."""
        j = max(1, int(math.ceil(1e-3 / h)))
        cap = int(math.ceil(_MAX_LOSS / h))
        while j < cap and max(float(self._positive(np.array([j * h]), d)[0]) for d in ("remove", "add")) > tail:
            j *= 2
        return min(j, cap)

    def discretise(self, h: float, tail_top: float, tail_bottom: float) -> Tuple[int, np.ndarray, float]:
        """``(j_low, pmf, mass_inf)`` on the grid ``j h``, ``j`` in ``[−J, J]``: the lower tail of one order
        is the other order's upper tail, so ``J`` is set by both."""
        top = self._top(h, min(tail_top, tail_bottom))
        eps = np.arange(-top, top + 1) * h
        t = np.concatenate([[0.0], np.exp(eps)])
        d = np.concatenate([[1.0], self.profile(eps)])
        hull = _lower_convex_hull(t, d)  # vertices of the convex minorant; index 0 is t = 0
        slopes = -np.diff(d[hull]) / np.diff(t[hull])  # −δ'(t) between vertices; non-increasing
        right = np.append(slopes[1:], 0.0)  # beyond the top the profile stays at its last value
        pmf = np.zeros(len(eps))
        pmf[hull[1:] - 1] = np.maximum(t[hull[1:]] * (slopes - right), 0.0)  # kinks only at vertices
        return -top, pmf, float(d[hull[-1]])

    def moments(self) -> Tuple[float, float]:
        """Mean and variance of the discrete loss's finite part at a grid fine enough for them (computed once)."""
        if self._moments is None:
            self._moments = self._compute_moments()
        return self._moments

    def _compute_moments(self) -> Tuple[float, float]:
        h = 1e-3
        for _ in range(4):
            j_low, pmf, _ = self.discretise(h, 1e-12, 1e-12)
            loss = (j_low + np.arange(len(pmf))) * h
            total = pmf.sum()
            mean = float(np.dot(pmf, loss) / total)
            var = float(np.dot(pmf, (loss - mean) ** 2) / total)
            if math.sqrt(var) >= 50.0 * h:
                break
            h = max(math.sqrt(var) / 50.0, 1e-7)
        return mean, var
