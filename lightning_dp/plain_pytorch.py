"""``make_private``: DP-SGD for a plain PyTorch module and optimizer, no Lightning needed. It builds the
run's :class:`~lightning_dp.PrivacyState` and returns the :class:`~lightning_dp.DPOptimizer` that reads it."""
from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping, Optional, Sequence

from torch import nn
from torch.optim import Optimizer

from ._checks import check_positive, check_rate
from .centering import check_centering_bands, check_centering_unit
from .config import DPConfig
from .grad_sample import attach_grad_sample_hooks
from .optimizer import DPOptimizer
from .privacy_state import PrivacyState
from .validation import validate

_D = DPConfig  # the defaults below are DPConfig's: written once


# Long on purpose: half of it is the explicit signature (docs, IDEs and type checkers read it); the body is short.
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
    privacy_unit: str = _D.privacy_unit,
    user_ids: Optional[Sequence[Hashable]] = None,
    max_records_per_user: Optional[int] = _D.max_records_per_user,
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
        adaptive_clipping: ``None`` (default) or a dict of :class:`~lightning_dp.adaptive_clipping.AdaptiveClipping`'s
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
        privacy_unit: ``"record"`` (default) or ``"user"``: protect each user with all of their records
            (:mod:`lightning_dp.user_sampling`). Then ``expected_batch_size`` is the expected number of *users*
            per step, ``sample_rate`` the user rate (default ``expected_batch_size / N_users``: always accounted,
            ε is per user), and every backward pass needs its records' user ids: batches from
            :func:`~lightning_dp.user_sampling.user_poisson_dataloader` come as ``(batch, units)``, and
            ``optimizer.step(units=units)`` (or ``accumulate_micro_batch(units=units)`` per micro-batch) clips
            the mean gradient of each user's records as one. Not with ``bands`` or a private-mean ``centering``.
        user_ids: one user id per training example (any hashable), needed with ``privacy_unit="user"``.
        max_records_per_user: ``k``: a sampled user contributes at most ``k`` records per step (``None``: all).

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
            "lightning_dp.exchange.SecureAggregationExchange to DPOptimizer(exchange=...) in your own loop."
        )
    config = DPConfig.from_arguments(locals())
    check_positive("expected_batch_size", expected_batch_size)
    if sample_rate is not None:
        check_rate("sample_rate", sample_rate)
    check_centering_bands(centering, config.bands)
    check_centering_unit(centering, config.privacy_unit)
    user_level = config.privacy_unit == "user"
    privacy = PrivacyState.from_config(config, accounted=sample_rate is not None or user_level, user_ids=user_ids)
    if user_level and sample_rate is None:
        sample_rate = min(1.0, expected_batch_size / privacy.users.num_users)
    if privacy.users is not None:
        privacy.configure(dataset_size=privacy.users.num_users if user_level else privacy.users.num_records)
    bandmf = config.bands > 1 or noise_coefficients is not None
    if bandmf:
        privacy.install_correlated_noise(coefficients=_bandmf_coefficients(config.bands, num_steps, noise_coefficients))
    privacy.configure(sample_rate=None if sample_rate is None else privacy.accounted_rate(sample_rate),
                      expected_batch_size=expected_batch_size)
    validate(module, raise_error=True)
    input_centering = privacy.centre(module, centering, shared=False) if centering else None
    attach_grad_sample_hooks(module, loss_reduction=config.loss_reduction)
    return DPOptimizer(
        optimizer,
        privacy=privacy,
        clipping_mode=config.clipping_mode,
        clipping=config.clipping,
        adaptive_clipping=config.adaptive_clipping,
        centering=input_centering,
    )


def _bandmf_coefficients(bands: int, num_steps: Optional[int], coefficients: Optional[Sequence[float]]) -> Any:
    """The BandMF strategy's coefficients of :func:`make_private`: given, or optimised for ``num_steps``."""
    if coefficients is None:
        if num_steps is None:
            raise ValueError(
                f"`num_steps` (the planned number of steps) is needed with bands={bands}: the noise "
                "strategy's coefficients are optimised for the run's length. Pass it, or `noise_coefficients`."
            )
        from .correlated import banded_toeplitz_coefficients

        return banded_toeplitz_coefficients(num_steps, bands)
    if len(coefficients) != bands:
        raise ValueError(
            f"`noise_coefficients` must hold `bands`={bands} numbers, got {len(coefficients)}: {list(coefficients)!r}."
        )
    return coefficients
