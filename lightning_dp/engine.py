"""``make_private``: DP-SGD for a plain PyTorch module and optimizer, no Lightning needed."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Sequence

from torch import nn
from torch.optim import Optimizer

from ._checks import check_positive, check_rate
from .accounting import make_accountant
from .accounting.bandmf import BandMFAccountant, bandmf_sample_rate
from .centering import InputCentering, build_centering, check_centering_bands
from .config import DPConfig
from .correlated import CorrelatedNoise, banded_toeplitz_coefficients
from .grad_sample import attach_grad_sample_hooks
from .noise import GaussianNoise, SecureRNG
from .optimizer import DPOptimizer
from .validation import validate

_D = DPConfig  # the defaults below are DPConfig's: written once
_warned_not_secure = False


def make_noise(secure_mode: bool, seed: Optional[int]) -> "GaussianNoise | SecureRNG":
    """The noise source for ``secure_mode``: :class:`SecureRNG` (ChaCha20, keyed from the OS) or the
    seeded, fast, **not** secure :class:`GaussianNoise` (warned once per process). The arguments are
    those of a validated :class:`~lightning_dp.DPConfig` (a seed with secure mode is refused there)."""
    global _warned_not_secure
    if secure_mode:
        return SecureRNG()
    if not _warned_not_secure:
        _warned_not_secure = True
        warnings.warn(
            "secure_mode=False: noise and sampling come from fast, reproducible seeded generators that are "
            "not secret (the seed regenerates the noise); the privacy guarantee assumes an unpredictable "
            "generator. Use secure_mode=True for a run whose guarantee matters.",
            UserWarning,
            stacklevel=3,
        )
    return GaussianNoise(seed)


def warn_if_no_noise(noise_multiplier: float) -> None:
    """The one warning a zero noise multiplier gets: the run has no privacy at all."""
    if noise_multiplier == 0:
        warnings.warn(
            "noise_multiplier=0: no noise is added, so the training is NOT private (ε is infinite). "
            "Use this only for tests and debugging.",
            UserWarning,
            stacklevel=3,
        )


def make_private(
    module: nn.Module,
    optimizer: Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    sample_rate: Optional[float] = None,
    loss_reduction: str = _D.loss_reduction,
    accountant: str = _D.accountant,
    seed: Optional[int] = _D.seed,
    secure_mode: bool = _D.secure_mode,
    clipping_mode: str = _D.clipping_mode,
    clipping: str = _D.clipping,
    adaptive_clipping: Optional[Dict[str, float]] = _D.adaptive_clipping,
    bands: int = _D.bands,
    num_steps: Optional[int] = None,
    noise_coefficients: Optional[Sequence[float]] = None,
    secure_aggregation: bool = _D.secure_aggregation,
    centering: Optional[Mapping[Any, Any]] = None,
) -> DPOptimizer:
    """Make ``loss.backward(); optimizer.step()`` a DP-SGD step, in place.

    Attaches per-sample-gradient hooks to ``module`` (no wrapper: the module keeps its class, its
    ``state_dict`` keys and its parameters) and returns a :class:`~lightning_dp.DPOptimizer` around
    ``optimizer``. Each step clips every sample's gradient to ``max_grad_norm`` (flat, over all trainable
    parameters), sums, adds Gaussian noise of std ``noise_multiplier * max_grad_norm``, divides by
    ``expected_batch_size`` and steps.

    Args:
        module: the model; validated first (raises :class:`~lightning_dp.PrivacyValidationError` listing
            every layer that cannot be made private, with its fix).
        optimizer: an optimizer over ``module``'s parameters.
        noise_multiplier: σ ≥ 0 (0 = no privacy, warned).
        max_grad_norm: clipping norm C > 0.
        expected_batch_size: the average batch size (``q·N`` with Poisson sampling).
        sample_rate: the sampling rate q; when given, an accountant records every step and
            ``optimizer.get_epsilon(delta)`` reports the privacy spent.
        loss_reduction: ``"mean"`` or ``"sum"`` — how the loss combines samples; only used to recover
            per-sample gradients (the update is the same DP-SGD mean either way).
        accountant: accountant name: ``"prv"`` (default) or ``"rdp"``.
        seed: seed of the (non-secure) noise generator, for reproducible runs.
        secure_mode: draw the noise from :class:`~lightning_dp.noise.SecureRNG` (ChaCha20 keyed from the
            OS); seeds are then refused. ``False`` (default) uses a fast seeded generator and warns once.
        clipping_mode: ``"auto"`` (default: one backward pass, ghost norms or per-sample gradients per
            layer, no weight-gradient GEMM from autograd), ``"ghost"`` or ``"materialize"`` (the plain
            path); the update is the same. See :class:`~lightning_dp.DPOptimizer`.
        clipping: ``"flat"`` (default), ``"per_layer"`` (each parameter tensor to ``C/√K``),
            ``"automatic"`` or ``"automatic_per_layer"`` (each sample normalised to norm just under ``C``,
            Bu et al. 2023; ``C`` then only scales the update with the learning rate).
        adaptive_clipping: ``None`` (default) or a dict of :class:`~lightning_dp.clipping.AdaptiveClipping`'s
            arguments: ``max_grad_norm`` becomes the starting norm of a private quantile estimate (Andrew et
            al. 2021), accounted exactly at the same ``noise_multiplier``.
        bands: ``1`` (default): DP-SGD. ``b > 1``: BandMF, banded matrix-factorization correlated noise
            (:mod:`lightning_dp.correlated`): the noise is ``σC·C^{-1}z`` for a ``b``-banded Toeplitz strategy
            (``b − 1`` extra buffers of the model's size), and the data must be sampled by
            :class:`~lightning_dp.correlated.CyclicPoissonBatchSampler` with the same ``b`` and rate (``b·q ≤
            1``). The accountant then records ``ceil(T/b)`` rounds at rate ``b·q``
            (:mod:`lightning_dp.accounting.bandmf`); ``optimizer.sample_rate`` is ``b·q``.
        num_steps: the planned number of steps ``T``; with ``bands > 1`` the strategy's coefficients are
            optimised for it (:func:`~lightning_dp.correlated.banded_toeplitz_coefficients`).
        noise_coefficients: the strategy's ``b`` coefficients instead (then ``num_steps`` is not needed).
        secure_aggregation: refused (``True``): one process has nothing to aggregate; see
            :class:`~lightning_dp.secure_aggregation.SecureAggregator` and ``DPDDPStrategy``.
        centering: ``None`` (default) or ``{layer or its name: centre}`` for ``nn.Linear`` layers: train them
            in the geometry of their centred input (:mod:`lightning_dp.centering`; better conditioned when the
            inputs are far from zero on average). A centre is a tensor (public: free) or a
            :class:`~lightning_dp.centering.PrivateMean` of the training inputs, released here with this
            optimizer's noise source and recorded by the accountant before the first step. Not with ``bands``.

    Example::

        >>> import torch
        >>> model = nn.Linear(4, 2)
        >>> opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
        ...                    max_grad_norm=1.0, expected_batch_size=8, sample_rate=0.01, seed=0)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.get_epsilon(1e-5) > 0
        True
    """
    if noise_multiplier is None:
        raise ValueError("`noise_multiplier` must be a finite number >= 0, got None.")
    if secure_aggregation:
        raise ValueError(
            "make_private does not take `secure_aggregation`=True: it makes one process's optimizer private and has "
            "no ranks to aggregate. Across processes use DPDDPStrategy(secure_aggregation=True), or hand a "
            "lightning_dp.secure_aggregation.SecureAggregator to DPOptimizer(combine=...) in your own loop."
        )
    config = DPConfig.from_arguments(locals())
    check_positive("expected_batch_size", expected_batch_size)
    if sample_rate is not None:
        check_rate("sample_rate", sample_rate)
    noise = make_noise(config.secure_mode, config.seed)
    accountant = make_accountant(config.accountant) if sample_rate is not None else None
    if config.bands > 1 or noise_coefficients is not None:
        noise, accountant, sample_rate = _bandmf(config, noise, accountant, sample_rate, num_steps, noise_coefficients)
    validate(module, raise_error=True)
    warn_if_no_noise(config.noise_multiplier)
    input_centering = _centering(module, centering, config, noise, accountant)
    attach_grad_sample_hooks(module, loss_reduction=config.loss_reduction)
    return DPOptimizer(
        optimizer,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=expected_batch_size,
        noise=noise,
        accountant=accountant,
        sample_rate=sample_rate,
        clipping_mode=config.clipping_mode,
        clipping=config.clipping,
        adaptive_clipping=config.adaptive_clipping,
        centering=input_centering,
    )


def _centering(
    module: nn.Module, centering: Optional[Mapping[Any, Any]], config: DPConfig, noise: Any, accountant: Any
) -> Optional[InputCentering]:
    """The :class:`~lightning_dp.centering.InputCentering` of :func:`make_private`, its private centres
    released now and recorded by the accountant."""
    check_centering_bands(centering, config.bands)
    if not centering:
        return None
    input_centering, events = build_centering(module, centering, noise)
    if accountant is not None:
        for sigma, rate, steps in events:
            accountant.step(noise_multiplier=sigma, sample_rate=rate, num_steps=steps)
    input_centering.attach()
    return input_centering


def _bandmf(
    config: DPConfig,
    noise: "GaussianNoise | SecureRNG",
    accountant: Optional[object],
    sample_rate: Optional[float],
    num_steps: Optional[int],
    coefficients: Optional[Sequence[float]],
) -> tuple:
    """The BandMF noise source, accountant and accounted rate ``b·q`` of :func:`make_private`."""
    if coefficients is None:
        if num_steps is None:
            raise ValueError(
                f"`num_steps` (the planned number of steps) is needed with bands={config.bands}: the noise "
                "strategy's coefficients are optimised for the run's length. Pass it, or `noise_coefficients`."
            )
        coefficients = banded_toeplitz_coefficients(num_steps, config.bands)
    elif len(coefficients) != config.bands:
        raise ValueError(
            f"`noise_coefficients` must hold `bands`={config.bands} numbers, got {len(coefficients)}: "
            f"{list(coefficients)!r}."
        )
    if sample_rate is not None:
        sample_rate = bandmf_sample_rate(sample_rate, config.bands)
        accountant = BandMFAccountant(config.accountant, config.bands)
    return CorrelatedNoise(noise, coefficients), accountant, sample_rate
