"""The discrete Gaussian ``N_Z(0, σ²)`` on the integers: ``P(X = x) ∝ exp(-x² / (2σ²))`` for every integer
``x``. Two exact samplers, vectorised; both draw float64 uniforms from the run's generator.

**CKS** (Canonne, Kamath & Steinke 2020, *The Discrete Gaussian for Differential Privacy*, NeurIPS 2020,
arXiv:2004.00010, Algorithm 3): draw ``Y`` from the discrete Laplace law ``P(Y = y) ∝ exp(-|y|/t)`` with
``t = ⌊σ⌋ + 1`` (a random sign times a geometric variable) and accept it with probability
``exp(-(|Y| - σ²/t)² / (2σ²))``; accepted values have exactly the discrete Gaussian law (CKS 2020,
Theorem 6). About 76 % of candidates are accepted at large σ; each needs two uniforms, a logarithm and an
exponential. All pending coordinates are drawn together, round after round, until every one is accepted.

**Rounded Gaussian with rejection** (native kernel, σ ≥ :data:`ROUNDED_MIN_SIGMA`; the secure aggregator's
shares have σ of order ``2^20``): draw ``Z ~ N(0, 1)`` by the ziggurat (Marsaglia & Tsang 2000, *The
Ziggurat Method for Generating Random Variables*, 256 layers of equal area, the base radius solved for at
load time), let ``X = round(σZ)`` and accept with probability ``exp((σ²Z² − X²)/(2σ²) − c)``. Then
``P(X = x, accepted) = ∫_{x−½}^{x+½} φ_σ(z) e^{(z² − x²)/(2σ²) − c} dz = e^{−c} e^{−x²/(2σ²)}/(√(2π)σ)``:
exactly the discrete Gaussian kernel, as long as the acceptance probability never exceeds 1.
``|σ²Z² − X²| ≤ σ|Z| + ¼`` and the ziggurat on the 2⁻⁵³ grid never gives ``|Z| > 13.71`` (its tail is
``R + a`` with ``a = −ln U/R``, ``U ≥ 2⁻⁵³``), so ``c = (13.71σ + 1)/(2σ²)`` suffices. The ziggurat takes
one word per candidate (its low 52 bits a uniform, 9 of the top bits the layer and the sign; 99.3 % give a
normal at once, the wedges and the tail take a few
more); the acceptance test, ``Bernoulli(e^y)`` with ``y ∈ [−2c, 0]``, is drawn as an event of probability
``1 − e^{−2c}`` (independent of the normal: its gaps are geometric, one uniform each) followed, only then,
by a test of probability ``(e^y − e^{−2c})/(1 − e^{−2c})``: at σ = ``2^20`` about 1.3·10⁻⁵ of the candidates
see an event, so the sampler needs about 1.07 words per coordinate instead of the 2 of a test per candidate.
It is the discrete Gaussian of the 2⁻⁵³ grid's ziggurat law: the tail beyond 13.71σ is never drawn.
Tested against the exact pmf at σ = 2 and 3, where the rejection matters (a rounded normal without it
fails the test).

**Precision.** As in the reference implementation of Kairouz, Liu & Steinke (2021), each geometric variable,
normal and acceptance test is computed in float64 from 53-bit uniforms (``⌊-t·log U⌋``, ``U' < p``), not with
the rational arithmetic of CKS's Algorithms 1–2: the law is exact up to the float64 evaluation of ``log``
and ``exp`` and the ziggurat's tables (relative error of a few 2⁻⁵³ per probability). The samplers are not constant-time.

**Native kernel.** On CPU, where ``lightning_dp.noise._boxmuller`` was built (:func:`native_kernel`), both
run in C (``discrete_gaussian_``: fdlibm's ``log`` kernel, libmvec's ``exp``, vectorised where the
sampler allows) over one buffer of uniforms from the same generator, sized for the expected acceptance rate
plus a margin and topped up when short; it is cut into fixed chunks, so the draws do not depend on the
thread count (``torch.get_num_threads()`` OpenMP threads). The torch path (no extension, or CUDA) runs
CKS. All paths draw from the same law, not the same values.
"""
from __future__ import annotations

import math
from typing import Any, Union

import torch

from .._checks import check_int, check_non_negative
from ..noise._parallel import load_native
from ..noise.secure_normal import uniform_from_words_

DeviceLike = Union[torch.device, str]

__all__ = ["discrete_gaussian_pmf", "native_kernel", "sample_discrete_gaussian", "uniform_words", "uniforms"]


def _load_kernel() -> Any:
    native = load_native()
    return native if native is not None and hasattr(native, "discrete_gaussian_") else None


_native = _load_kernel()
"""``lightning_dp.noise._boxmuller`` when it was built with the secure-aggregation kernels."""


def native_kernel() -> bool:
    """Whether CPU discrete Gaussian draws and the aggregator's rounding / decoding run in the native kernels
    of ``lightning_dp.noise._boxmuller`` (else in torch ops; ``LIGHTNING_DP_NATIVE_NOISE=0`` turns them off)."""
    return _native is not None


def uniform_words(generator: Any, count: int, device: DeviceLike = "cpu") -> torch.Tensor:
    """``count`` int64 words of 64 i.i.d. uniform bits; with ``j`` their low 52 bits, the uniforms of
    :func:`uniforms` are ``(2j + 1)·2⁻⁵³``. The native kernels take these words and convert them themselves
    (one pass fewer); the rounded sampler also reads their top bits."""
    device = torch.device(device)
    if isinstance(generator, torch.Generator):  # two 32-bit draws per word: all 64 bits uniform
        halves = torch.randint(0, 1 << 32, (2, count), generator=generator, dtype=torch.int64, device=generator.device)
        return halves[0].bitwise_left_shift_(32).bitwise_or_(halves[1]).to(device)
    if hasattr(generator, "uniform") and hasattr(generator, "_words"):
        return generator._words(count, device)
    raise TypeError(
        f"`generator` must be a lightning_dp.noise.SecureRNG or a torch.Generator, got {type(generator).__name__}."
    )


def uniforms(generator: Any, count: int, device: DeviceLike = "cpu") -> torch.Tensor:
    """``count`` i.i.d. uniforms in the open interval (0, 1), float64 on ``device``, from ``generator``:
    a :class:`~lightning_dp.noise.SecureRNG` (cryptographically secure: the words of its ``uniform``) or a
    seeded ``torch.Generator`` (reproducible, not secure). Both give ``(2j + 1)·2⁻⁵³``, ``j`` uniform on
    ``[0, 2⁵²)`` (:func:`uniform_words`)."""
    return uniform_from_words_(uniform_words(generator, count, device))


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


ROUNDED_MIN_SIGMA = 32.0
"""From this σ on, the native kernel draws with the rounded-Gaussian sampler (``method="rounded"`` of
:func:`add_discrete_gaussian_`); below it with CKS's. Both give the discrete Gaussian; the rounded one
accepts about ``0.993·e^{-c}`` of its candidates (80 % at σ = 32, 99.3 % at σ = 2^20), CKS's about 76 % at
large σ and with a logarithm and an exponential per candidate."""


def _gaussian_kernel_sum(variance: float) -> float:
    """``Σ_y e^{-y²/(2σ²)}`` over the integers."""
    sigma = math.sqrt(variance)
    if sigma < 8:
        reach = int(40 * sigma) + 2
        return sum(math.exp(-(y * y) / (2.0 * variance)) for y in range(-reach, reach + 1))
    return math.sqrt(2.0 * math.pi * variance)  # Poisson summation: the correction 2·exp(-2π²σ²) < 10⁻⁵⁰⁰


def acceptance_rate(variance: float, method: str = "cks") -> float:
    """The probability that one candidate of the sampler is accepted. CKS (two uniforms):
    ``½(1 − e^{-1/t})·e^{-σ²/(2t²)}·Σ_y e^{-y²/(2σ²)}`` (discrete Laplace times acceptance is the Gaussian
    kernel; "−0" is rejected). Rounded Gaussian: the ziggurat's fraction of candidates that give a normal
    times ``e^{-c}·Σ_y e^{-y²/(2σ²)}/(√(2π)σ)`` (the native kernel's ``c``). For sizing the buffers only."""
    sigma = math.sqrt(variance)
    theta = _gaussian_kernel_sum(variance)
    if method == "rounded":
        if _native is None:
            raise RuntimeError("The rounded sampler needs the native kernel (lightning_dp.noise._boxmuller).")
        _, normal_rate, c = _native.dg_rounded_words(variance, 0)
        return normal_rate * math.exp(-c) * theta / math.sqrt(2.0 * math.pi * variance)
    t = math.floor(sigma) + 1
    return 0.5 * -math.expm1(-1.0 / t) * math.exp(-variance / (2.0 * t * t)) * theta


def add_discrete_gaussian_(out: torch.Tensor, variance: float, generator: Any, method: str = "auto",
                           accumulate: bool = True) -> torch.Tensor:
    """In place: add ``out.numel()`` i.i.d. draws of ``N_Z(0, variance)`` to the contiguous CPU int64 tensor
    ``out`` (or, with ``accumulate=False``, write them over it: ``out`` may then be uninitialised), in the
    native kernel (requires :func:`native_kernel`). Returns ``out``.

    ``method``: ``"cks"`` (Canonne, Kamath & Steinke), ``"rounded"`` (the rounded-Gaussian sampler, see the
    module docstring) or ``"auto"`` (default: rounded from σ = :data:`ROUNDED_MIN_SIGMA` on)."""
    if _native is None:
        raise RuntimeError("add_discrete_gaussian_ needs the native kernel (lightning_dp.noise._boxmuller).")
    if out.dtype != torch.int64 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("`out` must be a contiguous CPU int64 tensor.")
    variance = check_non_negative("variance", variance)
    if method == "auto":
        method = "rounded" if variance >= ROUNDED_MIN_SIGMA**2 else "cks"
    if method not in ("cks", "rounded"):
        raise ValueError(f"`method` must be 'auto', 'cks' or 'rounded', got {method!r}.")
    count = out.numel()
    if variance == 0.0 or count == 0:
        return out if accumulate else out.zero_()
    rate = acceptance_rate(variance, method)
    flat = out.view(-1).numpy()
    threads = torch.get_num_threads()
    filled = 0
    while filled < count:
        remaining = count - filled
        # remaining/rate candidates on average, give or take sqrt(remaining·(1 - rate))/rate: with a margin
        # of 4 of those (+ 64) a top-up is rare (~3·10⁻⁵) and the surplus small (~0.2% at d = 670 000)
        candidates = int((remaining + 4 * math.sqrt(remaining * (1 - rate))) / rate) + 64
        if method == "cks":
            u = uniform_words(generator, 2 * candidates).numpy()
            got, _ = _native.discrete_gaussian_(u, flat[filled:], variance, int(accumulate), threads, 0)
        else:
            words, _, _ = _native.dg_rounded_words(variance, candidates)
            u = uniform_words(generator, words).numpy()
            got, _ = _native.discrete_gaussian_(u, flat[filled:], variance, int(accumulate), threads, 1, candidates)
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
