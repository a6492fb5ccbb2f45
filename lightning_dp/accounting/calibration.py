"""One-shot epsilon and noise calibration on top of any registered accountant."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

from lightning_dp.accounting.base import (
    DEFAULT_ACCOUNTANT,
    Accountant,
    _check_delta,
    _check_int,
    _check_noise_multiplier,
    _check_positive,
    _check_sample_rate,
    make_accountant,
)

_MIN_SIGMA = 1e-3
_MAX_SIGMA = 1e6
_MAX_BISECTIONS = 100


def compute_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps at ``(noise_multiplier,
    sample_rate)``, for the given ``delta``, computed by ``make_accountant(accountant)``.

    Example:
        >>> from lightning_dp.accounting import compute_epsilon
        >>> round(compute_epsilon(1.1, 256 / 60000, 14062, 1e-5), 3)
        2.384
        >>> round(compute_epsilon(1.1, 256 / 60000, 14062, 1e-5, accountant="rdp"), 3)
        2.597

    Raises:
        ValueError: an argument is out of range (``noise_multiplier >= 0``, ``0 <= sample_rate <= 1``,
            ``steps`` an integer ``>= 0``, ``0 < delta < 1``) or ``accountant`` is unknown.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    steps = _check_int(steps, "steps", 0)
    delta = _check_delta(delta)
    acc = make_accountant(accountant)
    if steps > 0:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return acc.get_epsilon(delta)


def get_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    accountant: str = DEFAULT_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier ``sigma`` that spends ``target_epsilon`` (at ``delta``) in ``steps``
    steps at ``sample_rate``.

    Pass exactly one of ``steps`` and ``epochs`` (``steps = ceil(epochs / sample_rate)``). Epsilon
    decreases with ``sigma``; the search brackets the answer by doubling/halving ``sigma`` from 1,
    then narrows the bracket by regula falsi on ``(log sigma, log epsilon)`` (Illinois variant, with a
    bisection fallback), keeping the upper end always feasible. The returned ``sigma`` satisfies
    ``target_epsilon - tol <= epsilon(sigma) <= target_epsilon`` with
    ``tol = min(epsilon_tolerance, 1e-3 * target_epsilon)``: never
    above the target. (If the tolerance cannot be met before the bracket shrinks to floating-point
    resolution, the feasible end is returned.)

    Example:
        >>> from lightning_dp.accounting import compute_epsilon, get_noise_multiplier
        >>> sigma = get_noise_multiplier(3.0, 1e-5, 256 / 60000, epochs=60)
        >>> 2.99 <= compute_epsilon(sigma, 256 / 60000, 14063, 1e-5) <= 3.0
        True

    Raises:
        ValueError: an argument is out of range (``target_epsilon > 0``, ``0 < delta < 1``,
            ``0 < sample_rate <= 1``, ``steps`` an integer ``>= 1`` or ``epochs > 0``,
            ``epsilon_tolerance > 0``), both or neither of ``steps``/``epochs`` given, or the
            target is out of reach for ``noise_multiplier <= 1e6``.
    """
    target = _check_positive(target_epsilon, "target_epsilon")
    delta = _check_delta(delta)
    q = _check_sample_rate(sample_rate, allow_zero=False)
    tol = _check_positive(epsilon_tolerance, "epsilon_tolerance")
    if (steps is None) == (epochs is None):
        raise ValueError(f"pass exactly one of steps and epochs, got steps={steps!r}, epochs={epochs!r}")
    if steps is not None:
        n = _check_int(steps, "steps", 1)
    else:
        n = math.ceil(_check_positive(epochs, "epochs") / q)
    make_accountant(accountant)  # fail early on an unknown name

    def eps(sigma: float) -> float:
        acc = make_accountant(accountant)
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        return acc.get_epsilon(delta)

    return _smallest_feasible_sigma(eps, target, delta, tol, target_epsilon)


def get_noise_multiplier_for_plan(
    target_epsilon: float,
    delta: float,
    plan: Sequence[Tuple[float, int]],
    accountant: "str | Accountant" = DEFAULT_ACCOUNTANT,
    history: Sequence[Tuple[float, float, int]] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier ``sigma`` such that the steps already taken (``history``, entries
    ``(noise_multiplier, sample_rate, steps)`` as in :attr:`Accountant.history`) followed by the planned
    steps ``plan`` (entries ``(sample_rate, steps)``, all at ``sigma``) spend ``target_epsilon`` at ``delta``.

    This is :func:`get_noise_multiplier` for runs whose sample rate changes (a gradient accumulation
    schedule) or that resume after privacy was already spent; the same search and guarantee
    (``epsilon(sigma) <= target_epsilon``, within the tolerance below it). ``accountant`` is a name of
    :func:`make_accountant` or an accountant object, whose :meth:`~Accountant.fresh` copies (same kind and
    parameters, e.g. secure aggregation's distributed discrete Gaussian) compose the candidates.

    Example:
        >>> from lightning_dp.accounting import get_noise_multiplier, get_noise_multiplier_for_plan
        >>> a = get_noise_multiplier_for_plan(3.0, 1e-5, [(0.01, 500)])
        >>> abs(a - get_noise_multiplier(3.0, 1e-5, 0.01, steps=500)) < 1e-12
        True

    Raises:
        ValueError: an argument is out of range, the plan has no step, or the target is out of reach.
    """
    target = _check_positive(target_epsilon, "target_epsilon")
    delta = _check_delta(delta)
    tol = _check_positive(epsilon_tolerance, "epsilon_tolerance")
    checked = [
        (_check_sample_rate(q, "plan sample_rate", allow_zero=False), _check_int(n, "plan steps", 0)) for q, n in plan
    ]
    if not any(n > 0 for _, n in checked):
        raise ValueError(f"`plan` must contain at least one step, got {list(plan)!r}")
    new_accountant = (lambda: make_accountant(accountant)) if isinstance(accountant, str) else accountant.fresh
    new_accountant()  # an unknown name fails here

    def eps(sigma: float) -> float:
        acc = new_accountant()
        for noise_multiplier, q, n in history:
            acc.step(noise_multiplier=noise_multiplier, sample_rate=q, num_steps=n)
        for q, n in checked:
            if n > 0:
                acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        return acc.get_epsilon(delta)

    return _smallest_feasible_sigma(eps, target, delta, tol, target_epsilon)


# Long on purpose: one bracket-and-bisect search, read top to bottom; its stopping rules share the same state.
def _smallest_feasible_sigma(
    eps: Callable[[float], float], target: float, delta: float, tol: float, target_epsilon: float
) -> float:
    """The search shared by both calibrations: ``eps`` decreases in sigma; see :func:`get_noise_multiplier`."""
    # Stop once target - tol <= eps(hi) <= target: tol is the caller's tolerance, tightened to 0.1%
    # of the target so that sigma is within about 0.1% of the smallest feasible one.
    tol = min(tol, 1e-3 * target)

    # Bracket: eps(lo) > target >= eps(hi) (lo = 0: eps is infinite without noise).
    hi = 1.0
    eps_hi = eps(hi)
    lo, eps_lo = 0.0, math.inf
    if eps_hi > target:
        while eps_hi > target:
            lo, eps_lo = hi, eps_hi
            if hi >= _MAX_SIGMA:
                raise ValueError(
                    f"target_epsilon={target_epsilon!r} is not reachable: noise_multiplier={hi:g} "
                    f"still gives epsilon={eps_hi:.6g} at delta={delta!r}; raise target_epsilon or delta"
                )
            hi *= 2.0
            eps_hi = eps(hi)
    else:
        while hi > _MIN_SIGMA:
            candidate = hi / 2.0
            eps_candidate = eps(candidate)
            if eps_candidate > target:
                lo, eps_lo = candidate, eps_candidate
                break
            hi, eps_hi = candidate, eps_candidate
        else:
            return hi  # even a tiny sigma meets the target

    # Regula falsi on (log sigma, log eps) aimed at eps = target - tol/2, inside the accepted band,
    # with the Illinois modification (halve the weight of an end kept twice running) and a bisection
    # fallback; hi stays feasible. eps is close to a power law in sigma: a few steps suffice.
    aim = target - 0.5 * tol
    kept_lo = kept_hi = 0
    for _ in range(_MAX_BISECTIONS):
        if eps_hi >= target - tol or hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        if lo > 0 and math.isfinite(eps_lo) and eps_hi > 0:
            g_lo = math.log(eps_lo / aim) * 0.5 ** max(kept_lo - 1, 0)
            g_hi = math.log(eps_hi / aim) * 0.5 ** max(kept_hi - 1, 0)
            u_lo, u_hi = math.log(lo), math.log(hi)
            guess = math.exp(u_hi - g_hi * (u_hi - u_lo) / (g_hi - g_lo))
            if lo + 1e-3 * (hi - lo) < guess < hi - 1e-3 * (hi - lo):
                mid = guess
        eps_mid = eps(mid)
        if eps_mid > target:
            lo, eps_lo = mid, eps_mid
            kept_hi, kept_lo = kept_hi + 1, 0
        else:
            hi, eps_hi = mid, eps_mid
            kept_lo, kept_hi = kept_lo + 1, 0
    return hi
