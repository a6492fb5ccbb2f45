"""The discrete Gaussian ``N_Z(0, σ²)`` on the integers: the sampler of Canonne, Kamath & Steinke (2020),
*The Discrete Gaussian for Differential Privacy* (NeurIPS 2020, arXiv:2004.00010), Algorithm 3, vectorised.

``P(X = x) ∝ exp(-x² / (2σ²))`` for every integer ``x``. The sampler draws ``Y`` from the discrete Laplace
law ``P(Y = y) ∝ exp(-|y|/t)`` with ``t = ⌊σ⌋ + 1`` (a random sign times a geometric variable) and
accepts it with probability ``exp(-(|Y| - σ²/t)² / (2σ²))``; accepted values have exactly the discrete
Gaussian law (CKS 2020, Theorem 6). All pending coordinates are drawn together, round after round, until
every one is accepted (a few rounds; each round needs two uniforms per pending coordinate).

**Precision.** As in the reference implementation of Kairouz, Liu & Steinke (2021), each geometric variable
and each acceptance test is computed in float64 from a 53-bit uniform (``⌊-t·log U⌋`` and ``U' < p``), not
with the rational arithmetic of CKS's Algorithms 1–2: the law is exact up to the float64 evaluation of
``log`` and ``exp`` (relative error of a few 2⁻⁵³ per probability). The sampler is not constant-time.
"""
from __future__ import annotations

import math
from typing import Any, Union

import torch

from .._checks import check_int, check_non_negative

DeviceLike = Union[torch.device, str]

__all__ = ["discrete_gaussian_pmf", "sample_discrete_gaussian", "uniforms"]


def uniforms(generator: Any, count: int, device: DeviceLike = "cpu") -> torch.Tensor:
    """``count`` i.i.d. uniforms in the open interval (0, 1), float64 on ``device``, from ``generator``:
    a :class:`~lightning_dp.noise.SecureRNG` (its ``uniform``: cryptographically secure) or a seeded
    ``torch.Generator`` (reproducible, not secure). Both give ``(2j + 1)·2⁻⁵³``, ``j`` uniform on ``[0, 2⁵²)``."""
    device = torch.device(device)
    if isinstance(generator, torch.Generator):
        j = torch.randint(0, 1 << 52, (count,), generator=generator, dtype=torch.int64, device=generator.device)
        return j.to(torch.float64).mul_(2.0).add_(1.0).mul_(2.0**-53).to(device)
    if hasattr(generator, "uniform"):
        return generator.uniform((count,), device=device, dtype=torch.float64)
    raise TypeError(
        f"`generator` must be a lightning_dp.noise.SecureRNG or a torch.Generator, got {type(generator).__name__}."
    )


@torch.no_grad()
def sample_discrete_gaussian(variance: float, count: int, generator: Any, device: DeviceLike = "cpu") -> torch.Tensor:
    """``count`` i.i.d. draws of the discrete Gaussian ``N_Z(0, variance)`` as an ``int64`` tensor.

    Args:
        variance: σ² ≥ 0 (the variance parameter; for σ ≥ 1 the law's variance is σ² up to 10⁻⁸ relative).
            ``0`` gives zeros.
        count: how many draws.
        generator: a :class:`~lightning_dp.noise.SecureRNG` or a ``torch.Generator`` (see :func:`uniforms`).
        device: where the result lives.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = sample_discrete_gaussian(16.0, 100_000, g)
        >>> x.dtype, abs(x.double().var().item() - 16.0) < 0.5
        (torch.int64, True)
    """
    variance = check_non_negative("variance", variance)
    count = check_int("count", count, 0)
    device = torch.device(device)
    out = torch.zeros(count, dtype=torch.int64, device=device)
    if variance == 0.0 or count == 0:
        return out
    sigma = math.sqrt(variance)
    t = math.floor(sigma) + 1
    shift = variance / t
    pending = torch.arange(count, device=device)
    while pending.numel():
        m = pending.numel()
        u = uniforms(generator, 2 * m, device).view(2, m)
        # Discrete Laplace(t) (CKS Algorithm 2): a sign and a geometric G with P(G >= k) = exp(-k/t), i.e.
        # G = floor(-t log V), both from one uniform: U < 1/2 is the sign, V = 2U mod 1 (U is on the grid
        # (2j + 1)·2⁻⁵³, so V is uniform on (2k + 1)·2⁻⁵²: never 0 or 1). "-0" is rejected.
        doubled = u[0] * 2.0
        negative = doubled < 1.0
        g = torch.floor(torch.where(negative, doubled, doubled - 1.0).log_().mul_(-t))
        y = torch.where(negative, -g, g)
        accept = (u[1] < torch.exp((g - shift).square_().mul_(-0.5 / variance))) & ~(negative & (g == 0))
        out[pending[accept]] = y[accept].to(torch.int64)
        pending = pending[~accept]
    return out


def discrete_gaussian_pmf(variance: float, support: int) -> torch.Tensor:
    """The exact pmf of ``N_Z(0, variance)`` on ``-support .. support`` (float64; the normalising constant
    summed over ``|x| ≤ support + 40σ``, whose tail beyond is below 10⁻³⁰⁰). For tests and tables."""
    variance = check_non_negative("variance", variance)
    if variance == 0.0:
        raise ValueError("`variance` must be > 0 for a pmf, got 0.0.")
    reach = support + int(40 * math.sqrt(variance)) + 1
    xs = torch.arange(-reach, reach + 1, dtype=torch.float64)
    weights = torch.exp(-(xs**2) / (2.0 * variance))
    inner = weights[reach - support : reach + support + 1]
    return inner / weights.sum()
