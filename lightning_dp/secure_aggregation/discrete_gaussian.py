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

**Native kernel.** On CPU, where ``lightning_dp.noise._boxmuller`` was built (:func:`native_kernel`), the
same algorithm runs in C (``discrete_gaussian_``: fdlibm's ``log``, libmvec's ``exp``, vectorised) over one
buffer of uniforms from the same generator, sized for the expected acceptance rate plus a margin and topped
up when short; it is cut into fixed chunks, so the draws do not depend on the thread count
(``torch.get_num_threads()`` OpenMP threads). The two paths draw from the same law, not the same values.
"""
from __future__ import annotations

import math
from typing import Any, Union

import torch

from .._checks import check_int, check_non_negative
from ..noise._parallel import load_native

DeviceLike = Union[torch.device, str]

__all__ = ["discrete_gaussian_pmf", "native_kernel", "sample_discrete_gaussian", "uniforms"]


def _load_kernel() -> Any:
    native = load_native()
    return native if native is not None and hasattr(native, "discrete_gaussian_") else None


_native = _load_kernel()
"""``lightning_dp.noise._boxmuller`` when it was built with the secure-aggregation kernels."""


def native_kernel() -> bool:
    """Whether CPU discrete Gaussian draws and the aggregator's rounding / decoding run in the native kernels
    of ``lightning_dp.noise._boxmuller`` (else in torch ops; ``LIGHTNING_DP_NATIVE_NOISE=0`` turns them off)."""
    return _native is not None


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
    if _native is not None and device.type == "cpu":
        add_discrete_gaussian_(out, variance, generator)
    else:
        _sample_torch(out, variance, generator)
    return out


def acceptance_rate(variance: float) -> float:
    """The probability that one candidate (two uniforms) of the sampler is accepted:
    ``½(1 − e^{-1/t})·e^{-σ²/(2t²)}·Σ_y e^{-y²/(2σ²)}`` (discrete Laplace times acceptance is the Gaussian
    kernel; "−0" is rejected). For sizing the uniform buffer only."""
    sigma = math.sqrt(variance)
    t = math.floor(sigma) + 1
    if sigma < 8:
        reach = int(40 * sigma) + 2
        theta = sum(math.exp(-(y * y) / (2.0 * variance)) for y in range(-reach, reach + 1))
    else:  # Poisson summation: the correction 2·exp(-2π²σ²) is below 10⁻⁵⁰⁰
        theta = math.sqrt(2.0 * math.pi * variance)
    return 0.5 * -math.expm1(-1.0 / t) * math.exp(-variance / (2.0 * t * t)) * theta


def add_discrete_gaussian_(out: torch.Tensor, variance: float, generator: Any) -> torch.Tensor:
    """In place: add ``out.numel()`` i.i.d. draws of ``N_Z(0, variance)`` to the contiguous CPU int64 tensor
    ``out``, in the native kernel (requires :func:`native_kernel`). Returns ``out``."""
    if _native is None:
        raise RuntimeError("add_discrete_gaussian_ needs the native kernel (lightning_dp.noise._boxmuller).")
    if out.dtype != torch.int64 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("`out` must be a contiguous CPU int64 tensor.")
    variance = check_non_negative("variance", variance)
    count = out.numel()
    if variance == 0.0 or count == 0:
        return out
    rate = acceptance_rate(variance)
    flat = out.view(-1).numpy()
    threads = torch.get_num_threads()
    filled = 0
    while filled < count:
        remaining = count - filled
        # remaining/rate candidates on average, give or take sqrt(remaining·(1 - rate))/rate: with a margin
        # of 4 of those (+ 64) a top-up is rare (~3·10⁻⁵) and the surplus small (~0.2% at d = 670 000)
        candidates = int((remaining + 4 * math.sqrt(remaining * (1 - rate))) / rate) + 64
        u = uniforms(generator, 2 * candidates).numpy()
        got, _ = _native.discrete_gaussian_(u, flat[filled:], variance, 1, threads)
        filled += got
    return out


def _sample_torch(out: torch.Tensor, variance: float, generator: Any) -> None:
    """The torch path: all pending coordinates drawn together, round after round, into ``out`` (zeros)."""
    device = out.device
    count = out.numel()
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
