"""The DP strategies for one device and for DDP (the one list of all strategies is
:data:`lightning_dp.adapter.STRATEGIES`).

Each strategy derives from the typed base :func:`~lightning_dp.adapter.strategy_base.dp_strategy_base` makes
for its host strategy class and adds what that host needs (with ``@override`` on each hook). No Lightning import.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from typing_extensions import override

from ..config import DPConfig
from ..recipes import Recipe
from ..exchange import AllReduceExchange, GradientExchange, SecureAggregationExchange, all_reduce_sum_coalesced
from ..secure_aggregation import DEFAULT_BITS, DEFAULT_SCALE, DistributedDiscreteGaussianAccountant, SecureAggregator
from . import lightning_internals
from .host import Host
from .strategy_base import dp_strategy_base

BANDS_REFUSAL = (
    "BandMF correlated noise works with make_private, DPStrategy and DPDDPStrategy; under FSDP each rank would "
    "hold shards of the b − 1 past noise buffers, which is not implemented."
)


def refuse_options(strategy: str, kwargs: Dict[str, Any], refused: Dict[Tuple[str, ...], str]) -> None:
    """Raise a clear error for DP options a strategy does not take (instead of the host strategy's bare
    ``TypeError`` on an unknown keyword), in place of ``kwargs``: for each group of option names, the reason.
    Options given at their :class:`~lightning_dp.config.DPConfig` default are taken out of ``kwargs`` silently."""
    for names, why in refused.items():
        given = {name: kwargs.pop(name) for name in names if name in kwargs}
        if any(value != getattr(DPConfig, name) for name, value in given.items()):
            listed = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(f"{strategy} does not take `{names[0]}` (got {listed}): {why}")


_DEVICE = Union[torch.device, str, int]
_D = DPConfig  # defaults of the explicit signatures below are DPConfig's: written once


# Long on purpose: the class body is this function's body (the class derives from the host class of
# whichever Lightning namespace binds it; both may be installed). Each method in it is short.
def single_device_strategy(host_base: type, host: Host) -> type:
    """``DPStrategy`` on ``host_base`` (the namespace's ``SingleDeviceStrategy``)."""

    class DPStrategy(dp_strategy_base(host_base, host)):  # type: ignore[misc]
        """Train any LightningModule with DP-SGD on one device: ``Trainer(strategy=DPStrategy(...))``.

        At setup the Trainer's features are checked (each one that changes what feeds an optimizer step is
        accounted exactly or refused before step 1, see the docs page "Lightning features under DP"), the
        model is validated (layers that cannot be private raise an error naming the module and the fix),
        per-sample-gradient hooks are attached to the LightningModule itself and its optimizer is wrapped
        in a :class:`~lightning_dp.DPOptimizer`. The training loader is replaced by one over the same
        dataset with Poisson sampling at rate ``q = accumulate_grad_batches · batch_size / len(dataset)``.
        After every backward pass each sample's gradient is clipped to ``max_grad_norm`` (a sample whose
        gradient is not finite gets clip factor 0 and is counted in the report); every optimizer step adds
        Gaussian noise of std ``noise_multiplier * max_grad_norm`` and is recorded by the accountant. The
        LightningModule is not changed; after ``fit`` the hooks are removed.

        Works with ``import lightning as L`` and with ``pytorch_lightning`` (see ``lightning_dp.lightning``
        and ``lightning_dp.pytorch_lightning``); also available as ``Trainer(strategy="dp_sgd")``
        (``noise_multiplier=1.0, max_grad_norm=1.0``) once ``lightning_dp`` is imported.

        Args:
            noise_multiplier: σ ≥ 0, noise std relative to ``max_grad_norm``. Give this *or* ``target_epsilon``.
            max_grad_norm: per-sample clipping norm C > 0.
            target_epsilon: calibrate σ so that the whole run (the Trainer's ``max_steps`` or ``max_epochs``,
                following a gradient accumulation schedule) spends at most this ε at ``delta``.
            delta: δ of the (ε, δ) guarantee, in (0, 1); used for calibration and as the default of
                :meth:`get_epsilon`. Choose δ well below ``1 / len(dataset)``.
            poisson_sampling: replace the training sampler with Poisson sampling (default). ``False`` keeps
                the user's loader; the accountant's subsampling analysis then does not strictly apply (warned).
            accountant: name of the privacy accountant: ``"prv"`` (default, tight PLD/PRV bound) or ``"rdp"``.
            loss_reduction: ``"mean"`` (Lightning's usual) or ``"sum"``: how ``training_step``'s loss
                combines samples.
            seed: seed for the noise and sampling generators (reproducible, not cryptographically secure;
                refused with ``secure_mode=True``).
            secure_mode: draw all DP noise and every Poisson sampling decision from
                :class:`~lightning_dp.noise.SecureRNG` (ChaCha20 from vetted crypto, keyed from the OS; the key
                is never written to a checkpoint and a resumed run re-keys). ``False`` (default) is fast and
                reproducible under a seed, and warns once that the guarantee assumes a secure generator.
            max_physical_batch_size: process batches larger than this in chunks inside one optimizer step
                (bounded memory; the update is identical).
            clipping_mode: how per-sample norms and clipped sums are computed: ``"auto"`` (default; fast
                one-backward book-keeping, ghost or materialised norms per layer by cost), ``"ghost"`` or
                ``"materialize"``. The update is the same in every mode.
            clipping: ``"flat"`` (one norm per sample over all parameters, clipped to ``max_grad_norm``),
                ``"per_layer"`` (each of the K parameter tensors clipped to ``max_grad_norm / √K``),
                ``"automatic"`` or ``"automatic_per_layer"`` (every sample normalised to norm just under
                ``max_grad_norm``, Bu et al. 2023: the norm then needs no tuning; see ``docs/utility.rst``).
            adaptive_clipping: ``None`` (default), or a dict ``target_quantile`` (0.5), ``learning_rate``
                (0.2), ``count_noise_multiplier`` (``expected_batch_size/20``): ``max_grad_norm`` is then only
                the starting norm, which follows a private estimate of that quantile of the per-sample norms
                (Andrew et al. 2021) at no extra privacy cost: see :class:`~lightning_dp.adaptive_clipping.AdaptiveClipping`.
            bands: ``1`` (default): DP-SGD. ``b > 1``: BandMF correlated noise (Choquette-Choo et al. 2023;
                :mod:`lightning_dp.adapter.bandmf`): the dataset is split once into ``b`` groups, step ``t``
                Poisson-samples group ``t mod b`` at rate ``b·q``, the noise is ``σC·C^{-1}z`` for a ``b``-banded
                strategy optimised for the planned steps, and the accountant records ``ceil(T/b)`` rounds at rate
                ``b·q``. One σ and one rate for the run (a changing accumulation schedule is refused); the groups
                and the past noise (``b − 1`` model-sized buffers, as private as the data) are in checkpoints.
            centering: ``None`` (default) or ``{layer name (or the layer): centre}`` for ``nn.Linear`` layers of the
                LightningModule: they are trained in the geometry of their centred input (``y = W(x − c) + u``,
                better conditioned when the inputs are far from zero on average; :mod:`lightning_dp.centering`).
                A centre is a tensor (public, free) or a :class:`~lightning_dp.centering.PrivateMean` of the
                training inputs: released once before the first step, recorded by the accountant before σ is
                calibrated, kept in checkpoints (a resumed run does not release it again).
            device: the device to train on (default: the Trainer's accelerator's first device).
            privacy_unit: ``"record"`` (default) or ``"user"``: protect each user with all of their records
                (see ``docs/user_level.rst``). Users are Poisson-sampled at rate ``q = k_acc·batch_size / N_users``
                (the loader's ``batch_size`` is then the expected number of *users* per batch), a sampled user
                contributes up to ``max_records_per_user`` records (drawn at random when they have more), the mean
                of their records' gradients is clipped as one, and ε is per user. A user's records are never split
                across micro-batches, physical batches or steps.
            user_ids: one user id per training example (any hashable), in the dataset's order; needed with
                ``privacy_unit="user"``. With ``"record"`` they set the group size of the report's group privacy.
            max_records_per_user: ``k``, the records a sampled user contributes per step at most (``None``: all).
            recipe: ``None`` (default: the LightningModule's optimizer as it is), ``"default"`` (the recipe of
                :data:`~lightning_dp.recipes.DEFAULT_RECIPE`), a :class:`~lightning_dp.recipes.Recipe` or a dict of its
                fields: train with a recipe that needs no tuning. The strategy replaces the module's optimizer by
                the recipe's SGD over the same parameters with the noise-scaled learning rate ``learning_rate/σ``
                decayed over the planned steps, uses the recipe's clipping (do not pass ``clipping`` or
                ``max_grad_norm`` with it), validates during ``fit`` with the weights' moving average and writes the
                average into the module at the end of ``fit`` (the released model). Centring is the recipe's where
                the user passes ``centering`` (:meth:`~lightning_dp.recipes.Recipe.centring` builds it). See
                ``docs/hyperparameters.rst``.
            **kwargs: passed to Lightning's ``SingleDeviceStrategy``.

        Example::

            import lightning as L
            from lightning_dp import DPStrategy, PrivacyBudgetCallback

            trainer = L.Trainer(max_epochs=30, strategy=DPStrategy(noise_multiplier=1.1, max_grad_norm=1.0),
                                callbacks=[PrivacyBudgetCallback(epsilon_budget=3.0, delta=1e-5)])
            trainer.fit(model)
            trainer.strategy.get_epsilon(1e-5)
        """

        strategy_name = "dp_sgd"
        registry_description = "DP-SGD on one device (lightning_dp): noise_multiplier=1.0, max_grad_norm=1.0"

        def __init__(
            self,
            noise_multiplier: Optional[float] = _D.noise_multiplier,
            max_grad_norm: float = _D.max_grad_norm,
            *,
            target_epsilon: Optional[float] = _D.target_epsilon,
            delta: float = _D.delta,
            poisson_sampling: bool = _D.poisson_sampling,
            accountant: str = _D.accountant,
            loss_reduction: str = _D.loss_reduction,
            seed: Optional[int] = _D.seed,
            secure_mode: bool = _D.secure_mode,
            max_physical_batch_size: Optional[int] = _D.max_physical_batch_size,
            clipping_mode: str = _D.clipping_mode,
            clipping: str = _D.clipping,
            adaptive_clipping: Optional[Dict[str, float]] = _D.adaptive_clipping,
            bands: int = _D.bands,
            centering: Optional[Mapping[Any, Any]] = None,
            device: Optional[_DEVICE] = None,
            privacy_unit: str = _D.privacy_unit,
            user_ids: Optional[Sequence[Hashable]] = None,
            max_records_per_user: Optional[int] = _D.max_records_per_user,
            recipe: Union[None, str, Recipe, Dict[str, Any]] = _D.recipe,
            **kwargs: Any,
        ) -> None:
            refuse_options("DPStrategy", kwargs, {
                ("secure_aggregation", "min_honest_ranks", "secure_aggregation_bits"):
                    "one device has nothing to aggregate (its clipped sum never leaves it). "
                    "Use DPDDPStrategy(secure_aggregation=True) to train across data owners.",
            })
            config = DPConfig.from_arguments(locals())
            super().__init__(device=device if device is not None else "cpu", **kwargs)
            self._device_given = device is not None
            self._init_dp(config, centering, user_ids)

        @property
        def parallel_devices(self) -> List[torch.device]:
            """The single device in use (Lightning's connector fills it in from the accelerator)."""
            return [self.root_device] if self._device_given else []

        @parallel_devices.setter
        def parallel_devices(self, devices: List[_DEVICE]) -> None:
            if devices and not self._device_given:
                device = lightning_internals.set_single_device(self, devices[0])
                if len(devices) > 1:
                    host.info(f"{type(self).__name__} trains on one device; using {device} (DPDDPStrategy: several).")

    return DPStrategy


def _local_gradients_only(state: Any, bucket: "torch.distributed.GradBucket") -> "torch.futures.Future[torch.Tensor]":
    """DDP communication hook that does not communicate: each rank keeps its own gradients.

    DP-SGD must not average raw (unclipped) gradients; the DP optimizer's exchange combines the clipped,
    noised sums once per optimizer step (:class:`~lightning_dp.exchange.AllReduceExchange`).
    """
    future: "torch.futures.Future[torch.Tensor]" = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


_local_gradients_only.__annotations__ = {  # real types, not strings: DDP checks the hook's signature
    "state": Any, "bucket": torch.distributed.GradBucket, "return": torch.futures.Future[torch.Tensor],
}


# Long on purpose: the class body is this function's body (see single_device_strategy).
def ddp_strategy(host_base: type, host: Host) -> type:
    """``DPDDPStrategy`` on ``host_base`` (the namespace's ``DDPStrategy``)."""

    class DPDDPStrategy(dp_strategy_base(host_base, host)):  # type: ignore[misc]
        """DP-SGD with data parallelism: ``Trainer(devices=N, strategy=DPDDPStrategy(...))`` (or ``"dp_ddp"``).

        * **Distributed Poisson sampling**: rank ``r`` decides inclusion for examples ``r, r+W, …`` with the
          global rate ``q = W·k·batch_size/N`` (``batch_size`` is per process, as in Lightning). The union of
          the ranks' batches is one Poisson sample of the dataset; every example is in at most one batch.
        * Each rank clips its own samples before any gradient leaves it. DDP's gradient all-reduce is
          replaced by a no-op communication hook (raw gradients are never averaged).
        * Each rank adds Gaussian noise of std ``σC/√W`` to its clipped sum; :meth:`combine_clipped_sums`
          sums the results across ranks (``all_reduce``), so the update carries noise of total std ``σC``
          exactly once, divided by the global expected batch size ``q·N``.
        * Every rank's accountant records the global rate ``q``; ε is the same on every rank.
        * User-level privacy (``privacy_unit="user"``): rank ``r`` decides for users ``r, r+W, …`` and takes all of
          their records, so every user's records are on one rank and each user is clipped there as one unit.

        Arguments are those of :class:`~lightning_dp.DPStrategy` except ``device``; other keyword arguments
        go to Lightning's ``DDPStrategy`` (e.g. ``start_method``, ``process_group_backend``).
        """

        strategy_name = "dp_ddp"
        registry_description = "DP-SGD with DDP (lightning_dp): noise_multiplier=1.0, max_grad_norm=1.0"

        def __init__(
            self,
            noise_multiplier: Optional[float] = _D.noise_multiplier,
            max_grad_norm: float = _D.max_grad_norm,
            *,
            target_epsilon: Optional[float] = _D.target_epsilon,
            delta: float = _D.delta,
            poisson_sampling: bool = _D.poisson_sampling,
            accountant: str = _D.accountant,
            loss_reduction: str = _D.loss_reduction,
            seed: Optional[int] = _D.seed,
            secure_mode: bool = _D.secure_mode,
            max_physical_batch_size: Optional[int] = _D.max_physical_batch_size,
            clipping_mode: str = _D.clipping_mode,
            clipping: str = _D.clipping,
            adaptive_clipping: Optional[Dict[str, float]] = _D.adaptive_clipping,
            secure_aggregation: bool = _D.secure_aggregation,
            min_honest_ranks: Optional[int] = _D.min_honest_ranks,
            secure_aggregation_bits: Optional[int] = _D.secure_aggregation_bits,
            bands: int = _D.bands,
            centering: Optional[Mapping[Any, Any]] = None,
            privacy_unit: str = _D.privacy_unit,
            user_ids: Optional[Sequence[Hashable]] = None,
            max_records_per_user: Optional[int] = _D.max_records_per_user,
            recipe: Union[None, str, Recipe, Dict[str, Any]] = _D.recipe,
            **kwargs: Any,
        ) -> None:
            config = DPConfig.from_arguments(locals())
            if centering and config.secure_aggregation:
                raise ValueError(
                    "DPDDPStrategy(secure_aggregation=True) does not take `centering`: a private mean released by one "
                    "rank would read every rank's data, which secure aggregation keeps from any single party."
                )
            comm = {name: kwargs[name] for name in ("ddp_comm_hook", "ddp_comm_wrapper", "ddp_comm_state")
                    if kwargs.get(name) is not None}
            if comm:
                raise ValueError(
                    f"DPDDPStrategy does not take a DDP communication hook (got {', '.join(sorted(comm))}): it installs "
                    "its own, which keeps each rank's raw gradients on that rank (only the clipped, noised sums are "
                    "all-reduced, once per optimizer step), and DDP takes one hook only."
                )
            super().__init__(**kwargs)
            self._init_dp(config, centering, user_ids)
            self._aggregator: Optional[SecureAggregator] = None
            if config.secure_aggregation:  # the record of privacy spent is the DDG's (dim, shares: at set-up)
                self.privacy.accountant = DistributedDiscreteGaussianAccountant(scale=DEFAULT_SCALE)

        @override
        def make_exchange(self) -> GradientExchange:
            """Plain DDP: each rank noises its clipped sum (BandMF: rank 0 the whole correlated noise), one
            all-reduce adds them up. With ``secure_aggregation``: a
            :class:`~lightning_dp.secure_aggregation.SecureAggregator` (keys exchanged here, a collective)."""
            if not self.config.secure_aggregation:
                return AllReduceExchange(noise_shares=self.world_size if self.config.bands == 1 else 1)
            aggregator = SecureAggregator(
                self.global_rank, self.world_size, self.privacy.aggregation_generator(),
                min_honest_ranks=self.config.min_honest_ranks, scale=DEFAULT_SCALE, bits=self._secure_aggregation_bits,
            )
            aggregator.setup()
            dim = sum(p.numel() for p in self.lightning_module.parameters() if p.requires_grad)
            self.privacy.accountant.configure(dim=dim, num_shares=aggregator.min_honest_ranks)
            self._aggregator = aggregator
            return SecureAggregationExchange(aggregator)

        @property
        def _secure_aggregation_bits(self) -> int:
            """``b`` of the modular space: the config's ``secure_aggregation_bits``, else the aggregator's default."""
            bits = self.config.secure_aggregation_bits
            return DEFAULT_BITS if bits is None else bits

        @override
        def secure_aggregation_summary(self) -> Optional[Dict[str, Any]]:
            """The mechanism, b, the scale and the threat model for the privacy report (``None`` without it)."""
            if not self.config.secure_aggregation:
                return None
            if self._aggregator is not None:
                summary = self._aggregator.describe()
            else:
                summary = {"mechanism": SecureAggregator.mechanism, "bits": self._secure_aggregation_bits,
                           "scale": DEFAULT_SCALE, "min_honest_ranks": self.config.min_honest_ranks}
            summary["accounting"] = DistributedDiscreteGaussianAccountant.description
            return summary

        @override
        def configure_ddp(self) -> None:
            """Lightning's DDP set-up (wraps the module in ``DistributedDataParallel``), then the no-communication
            hook, on every backend, with PyTorch's public ``register_comm_hook``: raw gradients never cross ranks.
            Lightning registers a hook of its own only when given ``ddp_comm_hook``, which ``__init__`` refuses;
            should a release register one anyway, DDP refuses this second one with an error (never silently)."""
            super().configure_ddp()
            self.model.register_comm_hook(state=None, hook=_local_gradients_only)
            self._local_hook_installed_by = "lightning_dp"

        def combine_clipped_sums(self, tensors: List[torch.Tensor]) -> None:
            """Sum every rank's noised clipped sums (``all_reduce`` SUM), in place, a few buckets at a time
            (:func:`~lightning_dp.exchange.all_reduce_sum_coalesced`)."""
            all_reduce_sum_coalesced(tensors)

    return DPDDPStrategy
