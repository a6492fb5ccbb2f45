r"""Renyi-DP of a hyperparameter search with a random number of trials (numpy only).

A search runs a private trial (a whole DP training run plus a private validation score) ``K`` times,
``K`` drawn from a known distribution independently of the data, and releases only the best trial. If
each trial is ``(lambda, eps(lambda))``-RDP, the search is RDP with the bounds of Papernot and Steinke
2022 ("Hyperparameter Tuning with Renyi Differential Privacy", ICLR, arXiv:2110.03620):

* ``K ~ Poisson(mu)`` (their Theorem 6): with ``eps_hat = log(1 + 1/(lambda - 1))`` and ``delta_hat``
  the ``delta`` of one trial at ``eps_hat`` (from its RDP curve, Canonne-Kamath-Steinke Prop. 12 and the
  Bretagnolle-Huber bound, minimised over the orders),

  .. math:: e^{(\lambda - 1)\varepsilon'(\lambda)} = e^{-\mu} + \mu\, e^{(\lambda - 1)(\varepsilon(\lambda) +
            \mu\hat\delta)}.

  Theorem 6 as stated, ``eps' = eps + mu delta_hat + log(mu)/(lambda - 1)``, leaves out the first term: the
  output "nothing" of ``K = 0`` (probability ``e^-mu`` on both inputs). It matters for ``mu < 1``, where the
  stated bound can even be negative (no Renyi divergence is): for a Gaussian trial with sigma = 1 and ``mu =
  0.5`` the exact divergence at order 2 is 0.49 (numerical integration) and the stated bound 0.48. With the
  term ours is valid for every ``mu > 0`` and, for ``mu >= 1`` (dp-accounting's domain), within a hair of
  the stated bound.

* ``K`` truncated negative binomial ``D_{eta, gamma}`` (their Theorem 2, ``eta > -1``, ``0 < gamma < 1``;
  ``eta = 0`` is the logarithmic, ``eta = 1`` the geometric distribution), minimised over a second order
  ``lambda_hat``:

  .. math:: \varepsilon'(\lambda) = \varepsilon(\lambda) + (1 + \eta)\min_{\hat\lambda}\Big[(1 -
            \tfrac{1}{\hat\lambda})\varepsilon(\hat\lambda) + \frac{\log(1/\gamma)}{\hat\lambda}\Big]
            + \frac{\log \mathbb{E}[K]}{\lambda - 1}.

Both curves are then made non-decreasing in the order from above (``eps'(lambda) <= eps'(lambda')`` for
``lambda <= lambda'``, which holds for every Renyi divergence), as dp-accounting does for the negative
binomial. ``K`` itself must stay secret: the bound is for a release of the best trial only. The same
results as dp-accounting's ``RdpAccountant`` composing a ``RepeatAndSelectDpEvent`` (tested to 1%, ours
never below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from lightning_dp.accounting.base import (
    HistoryEntry,
    _check_delta,
    _check_int,
    _check_positive,
    _check_sample_rate,
)
from lightning_dp.accounting.calibration import _smallest_feasible_sigma
from lightning_dp.accounting.rdp import RDPAccountant, _delta_from_rdp, _epsilon_from_rdp

__all__ = [
    "PoissonTrials",
    "TruncatedNegativeBinomialTrials",
    "search_epsilon",
    "search_noise_multiplier",
    "search_rdp",
    "trial_history",
]

_MAX_DRAW = 10**7


class UniformSource(Protocol):
    """What a distribution draws with: ``random.Random(seed)`` or ``random.SystemRandom()``."""

    def random(self) -> float: ...


def _inverse_cdf(log_pmf: Any, first: int, rng: UniformSource) -> int:
    """The smallest ``k >= first`` with ``P[K <= k] >= u``, ``u`` uniform in [0, 1)."""
    u, total, k = rng.random(), 0.0, first
    for k in range(first, first + _MAX_DRAW):
        total += math.exp(log_pmf(k))
        if total > u:
            return k
    return k


@dataclass(frozen=True)
class PoissonTrials:
    """``K ~ Poisson(mean)`` trials, any ``mean > 0`` (``K = 0`` has probability ``e^-mean``: then nothing
    is released, and the bound counts it).

    Example:
        >>> import random
        >>> PoissonTrials(mean=3.0).sample(random.Random(0))
        5
    """

    mean: float
    name = "poisson"

    def __post_init__(self) -> None:
        _check_positive(self.mean, "mean")

    def sample(self, rng: UniformSource) -> int:
        """One draw of ``K`` by inversion of the CDF."""
        mu = self.mean
        return _inverse_cdf(lambda k: k * math.log(mu) - mu - math.lgamma(k + 1), 0, rng)

    def search_rdp(self, orders: np.ndarray, rdp: np.ndarray) -> np.ndarray:
        """Theorem 6 of Papernot-Steinke: the search's RDP from one trial's ``rdp`` at ``orders``."""
        eps_hat = np.log1p(1.0 / (orders - 1.0))
        delta_hat = np.minimum(_delta_from_rdp(orders, rdp, eps_hat), _bretagnolle_huber(rdp))
        # Theorem 6 bounds the outputs of K >= 1 runs by mu * exp((lambda - 1)(eps + mu * delta_hat)); the
        # output of K = 0 (nothing, probability e^-mu, the same on both inputs) adds e^-mu.
        with np.errstate(over="ignore"):
            runs = math.log(self.mean) + (orders - 1.0) * (rdp + self.mean * delta_hat)
        return np.logaddexp(-self.mean, runs) / (orders - 1.0)

    def to_dict(self) -> Dict[str, Any]:
        """``{"name": "poisson", "mean": mu}``."""
        return {"name": self.name, "mean": self.mean}


@dataclass(frozen=True)
class TruncatedNegativeBinomialTrials:
    """``K`` from the truncated negative binomial ``D_{shape, gamma}`` of Papernot-Steinke (Def. 1):
    ``P[K = k] ∝ (1 - gamma)^k prod_{l<k} (l + shape)/(l + 1)`` for ``k >= 1``; ``shape = 0`` is the
    logarithmic distribution, ``shape = 1`` the geometric one (``mean = 1/gamma``).

    Args:
        shape: ``eta > -1``; smaller shapes cost less privacy for the same mean but have heavier tails.
        gamma: in ``(0, 1)``; :meth:`from_mean` finds it for a wanted mean.

    Example:
        >>> TruncatedNegativeBinomialTrials(shape=1.0, gamma=0.2).mean
        5.0
    """

    shape: float
    gamma: float
    name = "truncated_negative_binomial"

    def __post_init__(self) -> None:
        if not isinstance(self.shape, (int, float)) or not math.isfinite(self.shape) or self.shape <= -1:
            raise ValueError(f"`shape` must be a finite number > -1, got {self.shape!r}.")
        if not isinstance(self.gamma, (int, float)) or not 0 < self.gamma < 1:
            raise ValueError(f"`gamma` must be in (0, 1), got {self.gamma!r}.")

    @classmethod
    def from_mean(cls, mean: float, shape: float) -> "TruncatedNegativeBinomialTrials":
        """The distribution of the given ``shape`` whose mean is ``mean`` (> 1), ``gamma`` found by
        bisection to 1e-12 relative; the mean of the result is its own exact mean."""
        if not isinstance(mean, (int, float)) or not 1 < mean < math.inf:
            raise ValueError(f"`mean` must be a finite number > 1, got {mean!r}.")
        lo, hi = 0.0, 1.0  # mean decreases in gamma: mean(lo) = inf, mean(hi) = 1
        while hi - lo > 1e-12 * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cls(shape, mid).mean > mean else (lo, mid)
        return cls(shape, hi)

    @property
    def mean(self) -> float:
        """``E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta))``, ``(1 - gamma)/(gamma log(1/gamma))`` at 0."""
        log_gamma = math.log(self.gamma)
        x = self.shape * log_gamma
        ratio = -1.0 / log_gamma if self.shape == 0 else self.shape / -math.expm1(x)
        return (1.0 - self.gamma) / self.gamma * ratio

    def sample(self, rng: UniformSource) -> int:
        """One draw of ``K >= 1`` by inversion of the CDF."""
        eta, log_1mg = self.shape, math.log1p(-self.gamma)
        if eta == 0:
            log_p1 = log_1mg - math.log(-math.log(self.gamma))
        else:
            log_p1 = log_1mg + math.log(eta / math.expm1(-eta * math.log(self.gamma)))
        # log P[K = k] = log P[K = 1] + (k - 1) log(1 - gamma) + sum_{l=1}^{k-1} log((l + eta)/(l + 1))
        state = {"k": 1, "log_p": log_p1}

        def log_pmf(k: int) -> float:
            while state["k"] < k:
                j = state["k"]
                state["log_p"] += log_1mg + math.log((j + eta) / (j + 1))
                state["k"] = j + 1
            return state["log_p"]

        return _inverse_cdf(log_pmf, 1, rng)

    def search_rdp(self, orders: np.ndarray, rdp: np.ndarray) -> np.ndarray:
        """Theorem 2 of Papernot-Steinke (``lambda_hat`` over the same orders)."""
        constant = (1.0 + self.shape) * np.min((1.0 - 1.0 / orders) * rdp - math.log(self.gamma) / orders)
        return rdp + constant + math.log(self.mean) / (orders - 1.0)

    def to_dict(self) -> Dict[str, Any]:
        """``{"name": ..., "shape": eta, "gamma": gamma, "mean": E[K]}``."""
        return {"name": self.name, "shape": self.shape, "gamma": self.gamma, "mean": self.mean}


def _bretagnolle_huber(rdp: np.ndarray) -> float:
    """``delta <= TV <= sqrt(1 - exp(-KL))`` with ``KL <= rdp(alpha)`` at every order ``alpha > 1``."""
    with np.errstate(divide="ignore"):
        return float(np.min(np.sqrt(-np.expm1(-np.asarray(rdp)))))


def _monotone(rdp: np.ndarray) -> np.ndarray:
    """``out[i] = min_{j: orders[j] >= orders[i]} rdp[j]`` for ``orders`` sorted ascending."""
    return np.minimum.accumulate(rdp[::-1])[::-1]


def trial_history(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    validation_releases: int = 1,
    validation_noise_multiplier: Optional[float] = None,
    extra_releases: Sequence[HistoryEntry] = (),
) -> List[HistoryEntry]:
    """The accountant history of one trial: ``steps`` DP-SGD steps at ``(noise_multiplier, sample_rate)``,
    ``validation_releases`` Gaussian releases of a private metric at sampling rate 1, each with noise
    multiplier ``validation_noise_multiplier`` (default: ``noise_multiplier``), and ``extra_releases``:
    ``(noise_multiplier, sample_rate, count)`` entries every trial spends as well, at a σ of their own (e.g. a
    :class:`~lightning_dp.centering.PrivateMean` centre, ``(12.0, 1.0, 1)``)."""
    sigma = _check_positive(noise_multiplier, "noise_multiplier")
    q = _check_sample_rate(sample_rate, allow_zero=False)
    history = [(sigma, q, _check_int(steps, "steps", 1))]
    releases = _check_int(validation_releases, "validation_releases", 0)
    if releases:
        sigma_val = sigma if validation_noise_multiplier is None else validation_noise_multiplier
        history.append((float(_check_positive(sigma_val, "validation_noise_multiplier")), 1.0, releases))
    for entry in extra_releases:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ValueError(f"`extra_releases` entries must be (noise_multiplier, sample_rate, count), got {entry!r}.")
        history.append((float(_check_positive(entry[0], "extra_releases noise_multiplier")),
                        _check_sample_rate(entry[1], allow_zero=False), _check_int(entry[2], "extra_releases count", 1)))
    return history


def search_rdp(
    history: Sequence[HistoryEntry],
    distribution: "PoissonTrials | TruncatedNegativeBinomialTrials",
    orders: Optional[Sequence[float]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """``(orders, rdp)``: the whole search's RDP curve for trials each spending ``history``."""
    accountant = RDPAccountant(orders)
    ordered = np.asarray(sorted(accountant.orders), dtype=np.float64)
    accountant = RDPAccountant(tuple(ordered))
    trial = accountant.get_rdp(list(history))
    return ordered, _monotone(distribution.search_rdp(ordered, trial))


def search_epsilon(
    history: Sequence[HistoryEntry],
    distribution: "PoissonTrials | TruncatedNegativeBinomialTrials",
    delta: float,
    orders: Optional[Sequence[float]] = None,
) -> float:
    """ε at ``delta`` of releasing the best of ``K ~ distribution`` trials, each spending ``history``
    (``(noise_multiplier, sample_rate, steps)`` entries, e.g. from :func:`trial_history`).

    Example:
        >>> h = trial_history(1.0, 0.01, 1000)  # 1000 DP-SGD steps and one validation release at σ = 1
        >>> round(search_epsilon(h, PoissonTrials(mean=5.0), 1e-5), 3)  # the best of K ~ Poisson(5)
        8.29

        One such trial alone costs ε = 5.221 with the RDP accountant.
    """
    delta = _check_delta(delta)
    ordered, rdp = search_rdp(history, distribution, orders)
    return _epsilon_from_rdp(ordered, rdp, delta)[0]


def search_noise_multiplier(
    target_epsilon: float,
    delta: float,
    distribution: "PoissonTrials | TruncatedNegativeBinomialTrials",
    sample_rate: float,
    steps: int,
    validation_releases: int = 1,
    validation_noise_multiplier: Optional[float] = None,
    orders: Optional[Sequence[float]] = None,
    epsilon_tolerance: float = 0.01,
    extra_releases: Sequence[HistoryEntry] = (),
) -> float:
    """The noise multiplier σ of every trial (training and, unless ``validation_noise_multiplier`` is
    given, the validation releases; ``extra_releases`` keep their own) such that the whole search spends at most
    ``target_epsilon``.

    The search of :func:`~lightning_dp.accounting.get_noise_multiplier`: the result satisfies
    ``target - min(epsilon_tolerance, 1e-3 target) <= search_epsilon(σ) <= target``, never above it.

    Raises:
        ValueError: an argument is out of range or the target cannot be met with σ <= 1e6.
    """
    target = _check_positive(target_epsilon, "target_epsilon")
    delta = _check_delta(delta)
    tol = _check_positive(epsilon_tolerance, "epsilon_tolerance")
    trial_history(1.0, sample_rate, steps, validation_releases, validation_noise_multiplier, extra_releases)  # checks

    def eps(sigma: float) -> float:
        history = trial_history(sigma, sample_rate, steps, validation_releases, validation_noise_multiplier,
                                extra_releases)
        return search_epsilon(history, distribution, delta, orders)

    return _smallest_feasible_sigma(eps, target, delta, tol, target_epsilon)

