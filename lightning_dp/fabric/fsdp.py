"""Fabric's ``DPFSDPStrategy``: DP-SGD on a model sharded with FSDP2 in a Fabric loop, on the namespace's
``ModelParallelStrategy`` (every process a data-parallel rank). The pieces are the Trainer's
(:mod:`lightning_dp.adapter.fsdp_sharding`): each layer's clipped sum is reduce-scattered into the ranks'
shards after every backward pass and each rank noises its own shard with ``σC``; FSDP2's raw-gradient
reduce-scatter stays off, also through ``fabric.no_backward_sync``. No Fabric import."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Set, Type

import torch
from torch import nn
from typing_extensions import override

from ..adapter.fsdp_sharding import (
    DTensorShards, UnshardedParameters, apply_activation_checkpointing, check_checkpointing_policy,
    check_sharded_parameters, is_sharded, shard_module, stop_raw_gradient_sync,
)
from ..adapter.lightning_internals import set_backward_sync_control, set_data_parallel_size
from ..adapter.strategies import refuse_options
from ..config import DPConfig
from ..exchange import GradientExchange, ReduceScatterExchange
from .strategies import NOT_IN_FABRIC
from .strategy_base import fabric_dp_base

_D = DPConfig


class _RawGradientsStayLocal:
    """``fabric.no_backward_sync`` under DP-FSDP: nothing to switch, FSDP2's raw-gradient sync is always off."""

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """A context that changes nothing."""
        return contextlib.nullcontext()


# Long on purpose: the class body is this function's body (the class derives from the Fabric class handed in).
def fsdp_strategy(host_base: type, warn: Callable[[str], None], versions: Dict[str, str]) -> type:
    """Fabric's ``DPFSDPStrategy`` on ``host_base`` (Fabric's ``ModelParallelStrategy``)."""

    class DPFSDPStrategy(fabric_dp_base(host_base, warn, versions)):  # type: ignore[misc]
        """DP-SGD on an FSDP2-sharded model in a Fabric loop: ``L.Fabric(devices=N, strategy=DPFSDPStrategy(...))``.

        The model is given to ``fully_shard`` as the Trainer's ``DPFSDPStrategy`` does it: every module whose
        class is in ``auto_wrap_policy`` (innermost first), then the model itself, unless it is sharded already.
        Distributed Poisson sampling, per-sample clipping on each rank, clipped sums reduce-scattered into the
        shards, noise ``σC`` on each rank's own shard. Arguments are those of Fabric's ``DPStrategy`` except
        ``device``, and ``auto_wrap_policy``, ``mp_policy``, ``reshard_after_forward``,
        ``activation_checkpointing_policy`` as for the Trainer's ``DPFSDPStrategy``.
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
            epsilon_budget: Optional[float] = None,
            accumulate_grad_batches: int = 1,
            max_steps: Optional[int] = None,
            accountant: str = _D.accountant,
            loss_reduction: str = _D.loss_reduction,
            seed: Optional[int] = _D.seed,
            secure_mode: bool = _D.secure_mode,
            clipping_mode: str = _D.clipping_mode,
            clipping: str = _D.clipping,
            privacy_unit: str = _D.privacy_unit,
            user_ids: Optional[Sequence[Hashable]] = None,
            max_records_per_user: Optional[int] = _D.max_records_per_user,
            auto_wrap_policy: Optional[Set[Type[nn.Module]]] = None,
            mp_policy: Optional[Any] = None,
            reshard_after_forward: Optional[bool] = None,
            activation_checkpointing_policy: Optional[Set[Type[nn.Module]]] = None,
            **kwargs: Any,
        ) -> None:
            refuse_options("DPFSDPStrategy (Fabric)", kwargs, NOT_IN_FABRIC)
            check_checkpointing_policy(activation_checkpointing_policy)
            config = DPConfig.from_arguments(locals())
            super().__init__(parallelize_fn=self._shard, data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
            self._init_dp(config, epsilon_budget, accumulate_grad_batches, max_steps, user_ids)
            self.auto_wrap_policy = frozenset(auto_wrap_policy) if auto_wrap_policy is not None else None
            self.mp_policy, self.reshard_after_forward = mp_policy, reshard_after_forward
            self.activation_checkpointing_policy = tuple(activation_checkpointing_policy or ())
            self._unsharded_parameters: Optional[UnshardedParameters] = None
            set_backward_sync_control(self, _RawGradientsStayLocal())

        @override
        def setup_environment(self) -> None:
            """Every process is a data-parallel rank: the device mesh is ``(W, 1)``."""
            set_data_parallel_size(self, self.num_nodes * self.num_processes)
            super().setup_environment()

        def _shard(self, module: nn.Module, mesh: Any) -> nn.Module:
            if self.activation_checkpointing_policy:
                apply_activation_checkpointing(module, self.activation_checkpointing_policy)
            if not is_sharded(module):
                shard_module(module, mesh["data_parallel"], self.auto_wrap_policy, self.mp_policy,
                             self.reshard_after_forward)
            return module

        @override
        def setup_module(self, module: nn.Module) -> nn.Module:
            """Shard (the base then attaches the hooks), keep FSDP2's raw-gradient sync off, connect the unsharded
            parameters FSDP2 computes with to the sharded ones the optimizer holds."""
            sharded = super().setup_module(module)
            stop_raw_gradient_sync(sharded)
            self._unsharded_parameters = UnshardedParameters(sharded)
            return sharded

        @override
        def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
            """Wrap as the base does, after checking every parameter is an FSDP2 shard."""
            wrapped = super().setup_optimizer(optimizer)
            names = {id(p): n for n, p in self._module.named_parameters()} if self._module is not None else {}
            check_sharded_parameters(self.dp_optimizer.params, names, RuntimeError)
            return wrapped

        @override
        def make_exchange(self) -> GradientExchange:
            """Clipped sums reduce-scattered into the ranks' shards after every backward pass."""
            return ReduceScatterExchange(DTensorShards())

        @override
        def _after_backward(self) -> None:
            """The per-sample gradients move from the unsharded to the sharded parameters before clipping."""
            if self._unsharded_parameters is not None:
                self._unsharded_parameters.collect()

        @override
        def teardown(self) -> None:
            """Remove the unsharded-parameter hooks, then as the base does."""
            if self._unsharded_parameters is not None:
                self._unsharded_parameters.remove()
                self._unsharded_parameters = None
            super().teardown()

    return DPFSDPStrategy
