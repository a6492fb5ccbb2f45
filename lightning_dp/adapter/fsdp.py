"""DP-SGD on a sharded model (FSDP2, ``fully_shard``): the ``DPFSDPStrategy`` built on the namespace's
``ModelParallelStrategy``. Its pieces (shards, unsharded parameters, activation checkpointing) are in
:mod:`~lightning_dp.adapter.fsdp_sharding`; the docs page "Scaling out" has the whole step and why it is
private. No Lightning import.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Optional, Sequence, Set, Type

import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import override

from ..config import DPConfig
from ..exchange import GradientExchange, ReduceScatterExchange
from ..optimizer import DPOptimizer
from ..sampling import batch_size_of, is_empty_batch
from . import lightning_internals
from .host import Host
from ..user_sampling import user_chunks
from .steps import grad_scaler, physical_chunks
from .strategies import BANDS_REFUSAL, refuse_options
from .strategy_base import dp_strategy_base
from .fsdp_sharding import (
    DTensorShards, UnshardedParameters, apply_activation_checkpointing, check_checkpointing_policy,
    check_sharded_parameters, declaring_configure_model, is_sharded, padding_like, shard_module,
    stop_raw_gradient_sync, zero_loss_of,
)

_D = DPConfig


def _refuse_fsdp_options(kwargs: Dict[str, Any], auto_wrap_policy: Any, activation_checkpointing_policy: Any) -> None:
    """Clear errors for what ``DPFSDPStrategy`` does not take (before Lightning's bare ``TypeError``)."""
    refuse_options("DPFSDPStrategy", kwargs, {
        ("secure_aggregation", "min_honest_ranks", "secure_aggregation_bits"):
            "its clipped sums are reduce-scattered into shards after every backward pass (float sums of "
            "each parameter shard, one collective per layer), not one masked integer vector per step; secure "
            "aggregation is implemented for DPDDPStrategy(secure_aggregation=True).",
        ("bands",): BANDS_REFUSAL,
        ("recipe",): "the recipe's optimizer would be built over FSDP2's sharded parameters after set-up, which is "
                     "not implemented yet. Use the recipe's parts directly (lightning_dp.recipes.Recipe: its "
                     "learning_rate_for(σ), clipping, schedule) in configure_optimizers, or DPStrategy/DPDDPStrategy.",
    })
    if kwargs.pop("centering", None):
        raise ValueError(
            "DPFSDPStrategy does not take `centering` for now: the bias correction after each step needs whole "
            "weight and bias tensors, which FSDP2 shards. Use DPStrategy or DPDDPStrategy with centering."
        )
    for name in ("data_parallel_size", "tensor_parallel_size"):
        if name in kwargs:
            raise ValueError(
                f"DPFSDPStrategy got {name}={kwargs[name]!r}: every process is a data-parallel rank (the model is "
                "sharded over all of them) and tensor parallelism is not supported under DP (a sample's norm "
                "would need the tensor-parallel pieces of every layer). Leave it out."
            )
    if auto_wrap_policy is not None and not all(isinstance(c, type) and issubclass(c, nn.Module) for c in auto_wrap_policy):
        raise ValueError(f"`auto_wrap_policy` must be a set of nn.Module classes, got {auto_wrap_policy!r}.")
    check_checkpointing_policy(activation_checkpointing_policy)
    if "activation_checkpointing" in kwargs:
        raise ValueError(
            "DPFSDPStrategy takes `activation_checkpointing_policy` (a set of block classes), not "
            "`activation_checkpointing`."
        )


# Long on purpose: the class body is this function's body (see strategies.single_device_strategy).
def fsdp_strategy(host_base: type, host: Host) -> type:
    """``DPFSDPStrategy`` on ``host_base`` (the namespace's ``ModelParallelStrategy``)."""

    class DPFSDPStrategy(dp_strategy_base(host_base, host)):  # type: ignore[misc]
        """DP-SGD on a sharded model (FSDP2): ``Trainer(devices=N, strategy=DPFSDPStrategy(...))`` (or ``"dp_fsdp"``).

        Each process holds ``1/W`` of every sharded parameter, of its gradient and of the optimizer state, so a
        model that does not fit on one device trains privately. Built on Lightning's ``ModelParallelStrategy``
        with every process a data-parallel rank (no tensor parallelism).

        * **Sharding**: a LightningModule whose ``configure_model`` calls ``fully_shard`` is used as it is
          (use ``self.device_mesh["data_parallel"]`` as the mesh). Otherwise every module whose class is in
          ``auto_wrap_policy`` is given to ``fully_shard`` (innermost first), then the LightningModule itself,
          with ``training_step``/``validation_step``/``test_step``/``predict_step`` registered as FSDP2 forward
          methods. Blocks (a transformer layer) and single layers (``auto_wrap_policy={nn.Linear}``, as Opacus's
          FSDP2 wrapper shards every layer with parameters) both work: FSDP2 gives a sharded module a class of
          its own (``FSDPLinear``), which the per-sample rules read as the layer's class.
        * **The DPDDPStrategy guarantee**: distributed Poisson sampling at the global rate (every example in at
          most one rank's batch); each rank clips its own samples before anything leaves it (FSDP2's raw
          gradient reduce-scatter is off); each layer's clipped sum is reduce-scattered into the ranks' shards
          and each rank adds noise of std ``σC`` to its own shard, so the update carries noise ``σC`` once; the
          accountant records the global rate and ε is the same on every rank.
        * **Flat clipping across layers**: each sample's norm over all layers is formed on its rank from the
          factors the hooks keep for every layer until the backward pass ends; the clipped sums are made layer
          by layer after that, each freed as soon as it is reduce-scattered.
        * Every rank runs the same forward and backward passes (FSDP2's collectives): a rank with an empty
          Poisson batch runs ``training_step`` on one all-zero padding example whose loss is multiplied by 0,
          and ``max_physical_batch_size`` splits every rank's batch into the same number of chunks.
        * Checkpoints, full (``save_distributed_checkpoint=False``) and distributed, carry the privacy state
          and, in seeded mode, every rank's generator states.

        Arguments are those of :class:`~lightning_dp.DPStrategy` except ``device``, and:

        Args:
            auto_wrap_policy: module classes to ``fully_shard`` (plus the root) when the model is not sharded
                by its ``configure_model``; ``None``: the root only (every parameter in one group).
            mp_policy: FSDP2's ``MixedPrecisionPolicy`` for the modules this strategy shards (e.g.
                ``param_dtype=torch.bfloat16``); clipped sums are reduced in float32 (or the sharded
                parameters' dtype, if wider).
            reshard_after_forward: passed to ``fully_shard`` for the modules this strategy shards.
            activation_checkpointing_policy: module classes (blocks, such as a transformer layer) whose forward
                runs under non-reentrant activation checkpointing (``torch.utils.checkpoint``): their activations
                are dropped after the forward and recomputed in the backward pass; per-sample gradients are
                exact as without it. Applied whether this strategy or ``configure_model`` shards the model.
                Single layers with a per-sample rule (``nn.Linear``...) are refused: checkpoint the block that
                holds them.
            privacy_unit, user_ids, max_records_per_user: user-level privacy, as for
                :class:`~lightning_dp.DPStrategy` (each rank decides for users ``r, r+W, …`` and takes all of
                their records; physical chunks end at user boundaries, padding passes have unit id ``-1``).
            **kwargs: passed to Lightning's ``ModelParallelStrategy`` (``save_distributed_checkpoint``,
                ``process_group_backend``, ``timeout``).
        """

        strategy_name = "dp_fsdp"
        registry_description = "DP-SGD with FSDP2 sharding (lightning_dp): noise_multiplier=1.0, max_grad_norm=1.0"

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
            auto_wrap_policy: Optional[Set[Type[nn.Module]]] = None,
            mp_policy: Optional[Any] = None,
            reshard_after_forward: Optional[bool] = None,
            activation_checkpointing_policy: Optional[Set[Type[nn.Module]]] = None,
            privacy_unit: str = _D.privacy_unit,
            user_ids: Optional[Sequence[Hashable]] = None,
            max_records_per_user: Optional[int] = _D.max_records_per_user,
            **kwargs: Any,
        ) -> None:
            _refuse_fsdp_options(kwargs, auto_wrap_policy, activation_checkpointing_policy)
            config = DPConfig.from_arguments(locals())
            super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
            self._init_dp(config, user_ids=user_ids)
            self.auto_wrap_policy = frozenset(auto_wrap_policy) if auto_wrap_policy is not None else None
            self.mp_policy = mp_policy
            self.reshard_after_forward = reshard_after_forward
            self.activation_checkpointing_policy = (
                frozenset(activation_checkpointing_policy) if activation_checkpointing_policy else None
            )
            self._unsharded_parameters: Optional[UnshardedParameters] = None
            self._padding_pass = False
            self._sharded_here = False  # this strategy called fully_shard on the model (auto_wrap_policy)

        # --- sharding --------------------------------------------------------------------------------------
        @override
        def setup_environment(self) -> None:
            """Every process is a data-parallel rank: the device mesh is ``(W, 1)``."""
            lightning_internals.set_data_parallel_size(self, self.num_nodes * self.num_processes)
            super().setup_environment()

        @override
        def setup(self, trainer: Any) -> None:
            """Shard the model unless its ``configure_model`` did, set up as Lightning and the DP base do, then
            make the sharded step private: FSDP2's gradient sync off, unsharded parameters connected."""
            if self.activation_checkpointing_policy:
                apply_activation_checkpointing(self.lightning_module, tuple(self.activation_checkpointing_policy))
            self._shard_model()
            with declaring_configure_model(self.lightning_module):
                super().setup(trainer)
            if trainer.state.fn == "fit":
                self._check_sharded_training()
                stop_raw_gradient_sync(self.lightning_module)
                self._unsharded_parameters = UnshardedParameters(self.lightning_module)

        def _shard_model(self) -> None:
            module = self.lightning_module
            if is_sharded(module):
                if self.auto_wrap_policy is not None and not self._sharded_here:
                    host.warn(
                        "DPFSDPStrategy: the LightningModule's configure_model already called fully_shard; "
                        "auto_wrap_policy is not used."
                    )
                return
            shard_module(module, self.device_mesh["data_parallel"], self.auto_wrap_policy, self.mp_policy,
                         self.reshard_after_forward)
            self._sharded_here = True

        def _check_sharded_training(self) -> None:
            if grad_scaler(self.precision_plugin) is not None:
                raise host.trainer_error(
                    "DPFSDPStrategy does not support precision='16-mixed': its GradScaler would decide on each rank's "
                    "shard alone whether to skip a step, and the ranks' weights would diverge. Use 'bf16-mixed' "
                    "or mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)."
                )
            names = {id(p): n for n, p in self.lightning_module.named_parameters()}
            check_sharded_parameters(self.dp_optimizer.params, names, host.trainer_error)

        @override
        def teardown(self) -> None:
            """Remove the unsharded-parameter hooks, then as the DP base does."""
            if self._unsharded_parameters is not None:
                self._unsharded_parameters.remove()
                self._unsharded_parameters = None
            super().teardown()

        # --- steps -----------------------------------------------------------------------------------------
        @override
        def make_exchange(self) -> GradientExchange:
            """Clipped sums reduce-scattered into the ranks' shards after every backward pass."""
            return ReduceScatterExchange(DTensorShards())

        @override
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            """Run the user's ``training_step`` so that every rank makes the same forward/backward passes: an
            empty batch becomes one zero-weighted padding example, and batches above ``max_physical_batch_size``
            are split into as many chunks as the largest batch of any rank needs (padding fills the rest)."""
            batch = args[0] if args else kwargs.get("batch")
            size = 0 if is_empty_batch(batch) else batch_size_of(batch)
            limit = self.config.max_physical_batch_size
            self._padding_of = batch
            if self._batch_units is not None:  # user-level: chunks end at user boundaries
                return self._run_user_chunks(batch, size, limit, args, kwargs)
            passes = 1 if limit is None else max(1, self._max_over_ranks(-(-size // limit)))
            chunks = physical_chunks(batch, limit, passes)
            return self._run_chunks(chunks, args, kwargs)

        def _run_user_chunks(self, batch: Any, size: int, limit: Optional[int], args: Any, kwargs: Dict[str, Any]) -> Any:
            """User-level: the batch's chunks at user boundaries, padded to the most any rank needs; a padding
            pass's one example has the unit id ``-1`` (its loss is zeroed: it adds nothing)."""
            pairs = user_chunks(batch, self._batch_units, limit) if size else []
            passes = 1 if limit is None else max(1, self._max_over_ranks(len(pairs)))
            padding = passes - len(pairs)
            chunks = [c for c, _ in pairs] + [None] * padding
            units = [u for _, u in pairs] + [torch.tensor([-1])] * padding
            return self._run_chunks(chunks, args, kwargs, units)

        @override
        def _training_step_on(self, chunk: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
            """A padding pass (``chunk`` is ``None``) runs on one all-zero example; its loss is zeroed."""
            self._padding_pass = chunk is None
            return super()._training_step_on(padding_like(self._padding_of) if chunk is None else chunk, args, kwargs)

        @override
        def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Any:
            """Backward as the DP base does; the loss of a padding pass is multiplied by 0 first."""
            if self._padding_pass:
                closure_loss = zero_loss_of(closure_loss)
                self._padding_pass = False
            return super().backward(closure_loss, optimizer, *args, **kwargs)

        @override
        def _after_backward(self) -> None:
            """The per-sample gradients move from the unsharded to the sharded parameters before clipping."""
            if self._unsharded_parameters is not None:
                self._unsharded_parameters.collect()

        def _max_over_ranks(self, value: int) -> int:
            if not (dist.is_available() and dist.is_initialized()):
                return value
            tensor = torch.tensor([value], device=self.root_device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            return int(tensor.item())

        # --- checkpoints -----------------------------------------------------------------------------------
        @override
        def optimizer_state(self, optimizer: Any) -> Dict[str, Any]:
            """The wrapped optimizer's (sharded or full) state: torch's state-dict helpers may call ``step()`` on
            an optimizer without state to create it, which on the DP optimizer would be an accounted step."""
            return super().optimizer_state(getattr(optimizer, "original_optimizer", optimizer))

        @override
        def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
            """Load as Lightning does, with the wrapped optimizer in the DP optimizer's place (see
            :meth:`optimizer_state`), then the privacy state, this rank's generators included."""
            wrapped = self.optimizers
            self.optimizers = [o.original_optimizer if isinstance(o, DPOptimizer) else o for o in wrapped]
            try:
                return super().load_checkpoint(checkpoint_path, *args, **kwargs)
            finally:
                self.optimizers = wrapped

    return DPFSDPStrategy
