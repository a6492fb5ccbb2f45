r"""Numerics of the privacy-loss distribution (PLD) of the Poisson-subsampled Gaussian (numpy/scipy).

Used by :class:`~lightning_dp.accounting.prv.PRVAccountant`; see its docstring for the method, the
references and the error bound. Private module: the functions here take validated arguments.

One step with noise multiplier ``sigma`` and sampling rate ``q`` has two dominating pairs
(``x`` is the noisy output, sensitivity 1; Zhu, Dong, Wang 2022, "Optimal Accounting of
Differential Privacy via Characteristic Function", Sec. 5):

* remove: ``P = (1-q) N(0, s^2) + q N(1, s^2)``, ``Q = N(0, s^2)``, loss
  ``L(x) = log(1 - q + q exp((2x - 1) / (2 s^2)))``, increasing in ``x``, ``L >= log(1-q)``;
* add: ``P = N(0, s^2)``, ``Q = (1-q) N(0, s^2) + q N(1, s^2)``, loss ``-L(x)``, decreasing,
  ``<= -log(1-q)``.

Each is discretised on the grid ``eps_j = j h`` by *connect-the-dots* (Doroshenko, Ghazi, Kamath,
Kumar, Manurangsi 2022, "Connect the Dots: Tighter Discrete Approximations of Privacy Loss
Distributions", PoPETs): the ``P``-mass and ``Q``-mass of the loss in each cell ``(eps_j, eps_j+1]``
are moved onto the two end points so that both are preserved. The hockey-stick curve of the result
interpolates the true curve ``delta(e^eps)`` linearly in ``e^eps`` between grid points; the true
curve is convex in ``e^eps``, so the discrete pair dominates the true one (pessimistic). Mass below
the grid is moved up to its lowest point and mass above it to ``+inf`` (both pessimistic).
Composition multiplies characteristic functions (one FFT per segment, Koskela, Jälkö, Honkela 2020,
"Computing Tight Differential Privacy Guarantees Using FFT", AISTATS). The FFT wraps mass from
outside the window ``[i_low, i_low + W)`` around onto it: all such terms are non-negative, so the
window's masses only grow, and the mass that *should* lie above the window is added to delta with a
Chernoff bound computed from the discrete PLD's own moment-generating function.
"""

from __future__ import annotations

import math
from typing import List, Optional, Protocol, Sequence, Tuple

import numpy as np
from scipy import fft as sp_fft
from scipy import special

REMOVE, ADD = "remove", "add"
DIRECTIONS = (REMOVE, ADD)

_RHO = 2.5e-3
"""Grid step ``h = 2 sqrt(RHO * Var / N)``: the discretisation inflates the composed loss's variance
by at most a factor ``1 + RHO`` (each step's split moves mass by less than ``h``: variance
``<= h^2/4``, mean ``<= h^2/8``)."""
_TAIL_FRACTION = 1e-5
"""Each of the three tail terms (mass sent to ``+inf``, the Chernoff bound above the window, the
window's lower tail) gets ``_TAIL_FRACTION * delta``."""
_MAX_WINDOW = 1 << 21
_MAX_H = 0.05
_LAMBDA_RATIO = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------
def _loss(x: np.ndarray, sigma: float, q: float, direction: str) -> np.ndarray:
    """Privacy loss at output ``x``: ``log(1 - q + q exp((2x-1)/(2 sigma^2)))`` (negated for add)."""
    with np.errstate(divide="ignore"):
        log_1mq = math.log1p(-q) if q < 1 else -math.inf
    value = np.logaddexp(log_1mq, math.log(q) + (2.0 * x - 1.0) / (2.0 * sigma**2))
    return value if direction == REMOVE else -value


def _x_of_loss(eps: np.ndarray, sigma: float, q: float, direction: str) -> np.ndarray:
    """Inverse of :func:`_loss` (``-inf``/``+inf`` where the loss cannot reach ``eps``)."""
    e = eps if direction == REMOVE else -eps
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.log(np.maximum(np.expm1(e) + q, 0.0)) - math.log(q)  # log((e^e - 1 + q) / q)
    return sigma**2 * inner + 0.5


def _gauss_interval(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``P(a < Z <= b)`` for a standard normal ``Z`` and ``a <= b``, accurate in both tails."""
    upper = special.ndtr(-a) - special.ndtr(-b)
    lower = special.ndtr(b) - special.ndtr(a)
    return np.maximum(np.where(a > 0, upper, lower), 0.0)


def _gauss_cells(z: np.ndarray) -> np.ndarray:
    """``P(z_k < Z <= z_k+1)`` for ascending points ``z`` (one ``ndtr`` pair per point)."""
    cdf, sf = special.ndtr(z), special.ndtr(-z)
    return np.maximum(np.where(z[:-1] > 0, sf[:-1] - sf[1:], cdf[1:] - cdf[:-1]), 0.0)


def _masses(x_lo: np.ndarray, x_hi: np.ndarray, sigma: float, q: float, direction: str):
    """``(P, Q)`` masses of the outputs ``x`` in ``(x_lo, x_hi]``."""
    g0 = _gauss_interval(x_lo / sigma, x_hi / sigma)
    g1 = _gauss_interval((x_lo - 1.0) / sigma, (x_hi - 1.0) / sigma)
    mix = (1.0 - q) * g0 + q * g1
    return (mix, g0) if direction == REMOVE else (g0, mix)


def _cell_masses(x: np.ndarray, sigma: float, q: float, direction: str):
    """``(P, Q)`` masses of the cells between consecutive ascending points ``x``."""
    g0, g1 = _gauss_cells(x / sigma), _gauss_cells((x - 1.0) / sigma)
    mix = (1.0 - q) * g0 + q * g1
    return (mix, g0) if direction == REMOVE else (g0, mix)


def moments(sigma: float, q: float, direction: str) -> Tuple[float, float]:
    """Mean and variance of one step's privacy loss under ``P`` (a fine Riemann sum over ``x``; only
    used to choose the grid step, never for the bound itself)."""
    x = np.linspace(-12.0 * sigma, 1.0 + 12.0 * sigma, 4001)
    p, _ = _masses(x[:-1], x[1:], sigma, q, direction)
    loss = _loss(0.5 * (x[:-1] + x[1:]), sigma, q, direction)
    p = p / p.sum()
    mean = float(np.dot(p, loss))
    return mean, float(np.dot(p, (loss - mean) ** 2))


def discretise(
    sigma: float, q: float, direction: str, h: float, tail_top: float, tail_bottom: float
) -> Tuple[int, np.ndarray, float]:
    """Connect-the-dots PLD of one step on the grid ``j h``.

    Returns ``(j_low, pmf, mass_inf)``: ``pmf[k]`` is the ``P``-mass at loss ``(j_low + k) h`` and
    ``mass_inf`` the mass at ``+inf`` (``<= tail_top``); the pair dominates the true one.
    """
    z_top, z_bottom = -special.ndtri(tail_top), -special.ndtri(tail_bottom)
    if direction == REMOVE:  # P <= N(1, s^2) above, <= N(0, s^2) below (stochastic order)
        eps_top = float(_loss(np.array(1.0 + sigma * z_top), sigma, q, direction))
        eps_bottom = float(_loss(np.array(-sigma * z_bottom), sigma, q, direction))
    else:  # P = N(0, s^2); the loss decreases in x
        eps_top = float(_loss(np.array(-sigma * z_top), sigma, q, direction))
        eps_bottom = float(_loss(np.array(sigma * z_bottom), sigma, q, direction))
    j_low, j_high = math.floor(eps_bottom / h), max(math.ceil(eps_top / h), math.floor(eps_bottom / h) + 1)
    eps = np.arange(j_low, j_high + 1) * h
    x = _x_of_loss(eps, sigma, q, direction)
    inf = np.array([math.inf])
    if direction == REMOVE:  # loss in (eps_j, eps_j+1]  <=>  x in (x_j, x_j+1]
        p_cell, q_cell = _cell_masses(x, sigma, q, direction)
        p_below, _ = _masses(-inf, x[:1], sigma, q, direction)
        p_above, _ = _masses(x[-1:], inf, sigma, q, direction)
    else:  # x in [x_j+1, x_j)
        p_cell, q_cell = _cell_masses(x[::-1], sigma, q, direction)
        p_cell, q_cell = p_cell[::-1], q_cell[::-1]
        p_below, _ = _masses(x[:1], inf, sigma, q, direction)
        p_above, _ = _masses(-inf, x[-1:], sigma, q, direction)
    # Split each cell's (P, Q) mass onto its end points, preserving both:
    #   w_lo + w_hi = P,  w_lo e^-eps_j + w_hi e^-eps_j+1 = Q   =>  w_hi = (P - e^eps_j Q) / (1 - e^-h).
    excess = np.maximum(p_cell - np.exp(eps[:-1]) * q_cell, 0.0)
    w_hi = np.minimum(excess / -math.expm1(-h), p_cell)
    pmf = np.zeros(len(eps))
    pmf[:-1] += p_cell - w_hi
    pmf[1:] += w_hi
    pmf[0] += p_below[0]
    return j_low, pmf, float(p_above[0])


class LogMGF:
    """Upper bounds of ``log sum_k pmf[k] exp(lambda (j_low + k) h)`` (the finite part of one step's
    discrete PLD), cheap for many ``lambda``: cells are merged in blocks of ``2^l`` with
    ``|lambda| 2^l h <= slack`` and each block's mass is put at its largest loss (``lambda > 0``)
    or smallest (``lambda < 0``), which can only increase the sum (at most by ``e^slack``)."""

    def __init__(self, j_low: int, pmf: np.ndarray, h: float, slack: float) -> None:
        self.h, self.slack = h, slack
        self.levels = []  # (log block masses, loss of each block's first cell, block size)
        masses, start, size = pmf, j_low * h, 1
        while True:
            with np.errstate(divide="ignore"):
                self.levels.append((np.log(masses), start + size * h * np.arange(len(masses)), size))
            if len(masses) <= 64:
                break
            if len(masses) % 2:
                masses = np.append(masses, 0.0)
            masses = masses[0::2] + masses[1::2]
            size *= 2

    def __call__(self, lam: float) -> float:
        level = 0 if lam == 0 else int(math.floor(math.log2(self.slack / (abs(lam) * self.h))))
        log_m, first, size = self.levels[min(max(level, 0), len(self.levels) - 1)]
        loss = first + (size - 1) * self.h if lam > 0 else first
        a = lam * loss + log_m
        top = a.max()
        return float(top + math.log(np.exp(a - top).sum()))


# --------------------------------------------------------------------------------------------------
# Composition plan: one direction, one history shape
# --------------------------------------------------------------------------------------------------
class StepPLD(Protocol):
    """One kind of step, one direction: what :class:`Plan` needs of it."""

    def moments(self) -> Tuple[float, float]:
        """Mean and variance of the step's privacy loss (only used to choose the grid step)."""

    def discretise(self, h: float, tail_top: float, tail_bottom: float) -> Tuple[int, np.ndarray, float]:
        """``(j_low, pmf, mass_inf)`` of a discrete PLD on the grid ``j h`` that dominates the step's pair,
        with at most ``tail_top`` at ``+inf``."""


class GaussianStep:
    """The Poisson-subsampled Gaussian at noise multiplier ``sigma`` and rate ``q``, one ``direction``."""

    def __init__(self, sigma: float, q: float, direction: str) -> None:
        self.sigma, self.q, self.direction = sigma, q, direction

    def moments(self) -> Tuple[float, float]:
        return moments(self.sigma, self.q, self.direction)

    def discretise(self, h: float, tail_top: float, tail_bottom: float) -> Tuple[int, np.ndarray, float]:
        return discretise(self.sigma, self.q, self.direction, h, tail_top, tail_bottom)


class Plan:
    """Everything needed to evaluate ``epsilon`` for step counts up to ``counts`` of the segments'
    ``steps`` (:class:`StepPLD`, one direction): grid step, window, per-segment log characteristic
    functions, Chernoff log-MGFs and masses at infinity. :meth:`epsilon` then costs one complex
    exponential, one inverse FFT and one cumulative sum over the window."""

    # Long on purpose: one pass that builds the composed PLD on one grid; split, its arrays would travel between helpers.
    def __init__(
        self,
        steps: Sequence["StepPLD"],
        counts: Sequence[int],
        low_counts: Sequence[int],
        delta: float,
    ) -> None:
        tau = _TAIL_FRACTION * delta
        self.log_tau = math.log(tau)
        total = float(sum(counts))
        stats = [step.moments() for step in steps]
        var = sum(n * v for n, (_, v) in zip(counts, stats))
        h = min(2.0 * math.sqrt(_RHO * var / total), _MAX_H)
        # Chernoff exponents: a ladder (ratio 2) from 0.25 (heavy tails: rare steps with a large
        # loss) to 4x the Gaussian optimum sqrt(2 log(1/tau) / Var), refined around the best rung.
        lam0 = math.sqrt(2.0 * math.log(1.0 / tau) / max(var, 1e-300))
        lam_min = min(0.25, lam0 / 8.0)
        ladder = lam_min * 2.0 ** np.arange(math.ceil(math.log2(4.0 * lam0 / lam_min)) + 1)
        counts_arr, low_arr = np.asarray(counts, dtype=float), np.asarray(low_counts, dtype=float)
        while True:
            self.h = h
            self._pmfs: List[Tuple[int, np.ndarray]] = []
            mgfs, inf_masses = [], []
            for step, n in zip(steps, counts):
                tail = tau / (len(steps) * n)
                j_low, pmf, mass_inf = step.discretise(h, tail, tail)
                self._pmfs.append((j_low, pmf))
                mgfs.append(LogMGF(j_low, pmf, h, 0.25 / total))
                inf_masses.append(mass_inf)

            def bound(lams: np.ndarray, weights: np.ndarray) -> np.ndarray:
                k = np.array([[mgf(lam) for lam in lams] for mgf in mgfs])  # (segments, lambdas)
                return k, (weights @ k - self.log_tau) / lams

            k_pos, s_pos = bound(ladder, counts_arr)
            best = ladder[int(np.argmin(s_pos))]
            fine = best * 2.0 ** np.array([-0.75, -0.5, -0.25, 0.25, 0.5, 0.75])
            k_fine, s_fine = bound(fine, counts_arr)
            self._lpos = np.concatenate([ladder, fine])
            self._kpos = np.concatenate([k_pos, k_fine], axis=1)
            s_top = min(s_pos.min(), s_fine.min())
            k_neg, s_low = bound(-ladder, counts_arr)
            s_low = min(s_low.max(), np.max((low_arr @ k_neg - self.log_tau) / -ladder))
            self._log1m_inf = np.log1p(-np.minimum(inf_masses, 0.5))
            i_low, i_top = math.floor(s_low / h) - 1, math.ceil(s_top / h) + 1
            width = i_top - i_low + 1
            if width <= _MAX_WINDOW:
                break
            h *= 1.05 * width / _MAX_WINDOW  # coarser grid: still an upper bound, only less tight
        self.i_low = i_low
        self.width = sp_fft.next_fast_len(width, real=True)
        self._log_phi = []
        for j_low, pmf in self._pmfs:
            padded = np.zeros(-(-len(pmf) // self.width) * self.width)
            padded[: len(pmf)] = pmf
            folded = np.roll(padded.reshape(-1, self.width).sum(axis=0), j_low % self.width)
            with np.errstate(divide="ignore"):
                self._log_phi.append(np.log(sp_fft.rfft(folded)))
        self._pmfs = []
        losses = (self.i_low + np.arange(self.width)) * h
        self._first_positive = int(np.searchsorted(losses, 0.0, side="right"))
        self._losses = losses[self._first_positive :]
        small = len(self._losses) and self._losses[-1] < 700.0
        self._exp = (np.exp(self._losses), np.exp(-self._losses)) if small else None

    def epsilon(self, counts: Sequence[int], delta: float) -> float:
        """Smallest ``eps >= 0`` with ``delta_upper(eps) <= delta`` for these step counts."""
        # Σ n·log φ over the entries taken (n > 0). A coefficient φ = 0 (log = −inf) is kept out of the
        # product, where n·(−inf + 0j) would give a NaN imaginary part, and zeroes its bin afterwards.
        log_phi, zero = np.zeros(self.width // 2 + 1, dtype=complex), np.zeros(self.width // 2 + 1, dtype=bool)
        for n, lp in zip(counts, self._log_phi):
            if n:
                finite = np.isfinite(lp.real)
                zero |= ~finite
                log_phi += n * np.where(finite, lp, 0.0)
        phi = np.exp(log_phi)
        phi[zero] = 0.0
        pmf = sp_fft.irfft(phi, self.width)
        if not np.all(np.isfinite(pmf)):  # never turn a numerical failure into a small ε
            raise FloatingPointError("PRV accountant: the composed privacy loss distribution is not finite.")
        pmf = np.roll(pmf, -(self.i_low % self.width))
        counts_arr = np.asarray(counts, dtype=float)
        # Mass above the window (Chernoff), at +inf, and the floating-point noise of the FFT.
        above = float(np.exp(np.min(counts_arr @ self._kpos - self._lpos * (self.i_low + self.width) * self.h)))
        at_inf = -math.expm1(float(counts_arr @ self._log1m_inf))
        noise = self.width * max(0.0, -float(pmf.min()))
        extra = min(above, 1.0) + at_inf + noise
        positive = np.maximum(pmf[self._first_positive :], 0.0)
        return epsilon_from_pmf(positive, self._losses, extra, delta, self._exp)


def epsilon_from_pmf(
    pmf: np.ndarray,
    losses: np.ndarray,
    extra: float,
    delta: float,
    exps: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> float:
    """Smallest ``eps >= 0`` with ``extra + sum_i pmf_i (1 - e^(eps - L_i))_+ <= delta`` (losses
    ``L_i > 0`` ascending). Between grid points the sum is linear in ``e^eps``: solved exactly.

    Works with ``e^(shift - L_i)`` for a shift that keeps every exponential finite: plain floats for
    losses below 700 (almost always; ``exps = (e^L, e^-L)`` may be passed precomputed), log-sums
    beyond.
    """
    if extra >= delta:
        return math.inf
    if len(pmf) == 0:
        return 0.0
    tail_p = np.cumsum(pmf[::-1])[::-1]  # sum_{i >= k}
    if losses[-1] < 700.0:
        exp_pos, exp_neg = exps if exps is not None else (np.exp(losses), np.exp(-losses))
        tail_q = np.cumsum((pmf * exp_neg)[::-1])[::-1]
        log_tail_q = None
    else:
        with np.errstate(divide="ignore"):
            log_tail_q = np.logaddexp.accumulate((np.log(pmf) - losses)[::-1])[::-1]
        tail_q = None
    if extra + tail_p[0] - (tail_q[0] if tail_q is not None else math.exp(log_tail_q[0])) <= delta:
        return 0.0
    # delta at eps = L_k: only the i > k terms remain.
    next_p = np.append(tail_p[1:], 0.0)
    if tail_q is not None:
        at_grid = extra + next_p - exp_pos * np.append(tail_q[1:], 0.0)
    else:
        at_grid = extra + next_p - np.exp(losses + np.append(log_tail_q[1:], -np.inf))
    k = int(np.argmax(at_grid <= delta))
    lower = losses[k - 1] if k > 0 else 0.0
    numerator = extra + tail_p[k] - delta
    if numerator <= 0:
        return float(lower)
    log_q = math.log(tail_q[k]) if tail_q is not None else float(log_tail_q[k])
    return float(min(max(math.log(numerator) - log_q, lower), losses[k]))
