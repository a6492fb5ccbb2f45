"""The Fabric DP strategies for one device and for DDP, on :func:`~lightning_dp.fabric.strategy_base.fabric_dp_base`.
No Fabric import: the host classes are handed in by :func:`lightning_dp.fabric.bind`."""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Union

import torch
from typing_extensions import override

from ..adapter.lightning_internals import set_single_device
from ..adapter.strategies import _local_gradients_only, refuse_options
from ..config import DPConfig
from ..exchange import AllReduceExchange, GradientExchange
from .strategy_base import fabric_dp_base

_D = DPConfig
_DEVICE = Union[torch.device, str, int]
NOT_IN_FABRIC = {  # DP options of the Trainer strategies that the Fabric ones do not take, and why
    ("secure_aggregation", "min_honest_ranks", "secure_aggregation_bits"):
        "secure aggregation is implemented for the Trainer's DPDDPStrategy(secure_aggregation=True).",
    ("bands",): "BandMF is implemented for make_private and the Trainer strategies.",
    ("adaptive_clipping",): "adaptive clipping is implemented for make_private and the Trainer strategies.",
    ("recipe",): "in a Fabric loop the optimizer and its schedule are yours: build them with the recipe "
                 "(lightning_dp.recipes.Recipe.optimizer(params, σ) and .scheduler(optimizer, steps)).",
}


# Long on purpose: the class body is this function's body (the class derives from the Fabric class handed in).
def single_device_strategy(host_base: type, warn: Callable[[str], None], versions: Dict[str, str]) -> type:
    """Fabric's ``DPStrategy`` on ``host_base`` (Fabric's ``SingleDeviceStrategy``)."""

    class DPStrategy(fabric_dp_base(host_base, warn, versions)):  # type: ignore[misc]
        """DP-SGD in your own Fabric loop on one device: ``L.Fabric(strategy=DPStrategy(...))`` (or ``"dp_sgd"``).

        ``fabric.setup(model, optimizer)`` validates the model, attaches the per-sample-gradient hooks and wraps
        the optimizer in a :class:`~lightning_dp.DPOptimizer`; ``fabric.setup_dataloaders(loader)`` replaces the
        loader's sampling by Poisson sampling at ``q = k·B/N``; each ``fabric.backward`` clips the pass's
        per-sample gradients; ``optimizer.step()`` adds ``N(0, (σC)²)``, divides by ``q·N`` and is accounted.
        ``fabric.strategy.should_stop`` says when the next step would exceed ``epsilon_budget``; a step taken
        anyway is refused with an error and the weights are not touched. ``fabric.save``/``fabric.load`` carry
        the privacy state. ``fabric.clip_gradients`` is refused (per-sample clipping replaces it).

        Args:
            noise_multiplier, max_grad_norm, target_epsilon, delta, accountant, loss_reduction, seed,
                secure_mode, clipping_mode, clipping: as for the Trainer's :class:`~lightning_dp.DPStrategy`.
            epsilon_budget: the largest ε the run may spend (``should_stop`` turns True before a step would
                exceed it; a step over it raises).
            accumulate_grad_batches: ``k``, the micro-batches (``fabric.backward`` calls) of one optimizer step:
                each step is one Poisson draw at ``q = k·B/N`` served as ``k`` loader batches.
            max_steps: the planned optimizer steps (needed with ``target_epsilon``).
            privacy_unit, user_ids, max_records_per_user: user-level privacy as for the Trainer's strategies (see
                the docs page "User-level privacy"): the loader's ``batch_size`` is then the expected number of
                users per batch, and ε is per user.
            device: the device (default: the accelerator's first device).
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
            device: Optional[_DEVICE] = None,
            **kwargs: Any,
        ) -> None:
            refuse_options("DPStrategy (Fabric)", kwargs, NOT_IN_FABRIC)
            config = DPConfig.from_arguments(locals())
            super().__init__(device=device if device is not None else "cpu", **kwargs)
            self._device_given = device is not None
            self._init_dp(config, epsilon_budget, accumulate_grad_batches, max_steps, user_ids)

        @property
        def parallel_devices(self) -> List[torch.device]:
            """The single device in use (Fabric's connector fills it in from the accelerator)."""
            return [self.root_device] if self._device_given else []

        @parallel_devices.setter
        def parallel_devices(self, devices: List[_DEVICE]) -> None:
            if devices and not self._device_given:
                set_single_device(self, devices[0])

    return DPStrategy


# Long on purpose: the class body is this function's body (the class derives from the Fabric class handed in).
def ddp_strategy(host_base: type, warn: Callable[[str], None], versions: Dict[str, str]) -> type:
    """Fabric's ``DPDDPStrategy`` on ``host_base`` (Fabric's ``DDPStrategy``)."""

    class DPDDPStrategy(fabric_dp_base(host_base, warn, versions)):  # type: ignore[misc]
        """DP-SGD with data parallelism in a Fabric loop: ``L.Fabric(devices=N, strategy=DPDDPStrategy(...))``.

        As the Trainer's :class:`~lightning_dp.DPDDPStrategy`: rank ``r`` decides inclusion for examples
        ``r, r+W, …`` at the global rate (one Poisson draw over all ranks), each rank clips its own samples, DDP's
        raw-gradient all-reduce is replaced by a no-communication hook (``fabric.no_backward_sync`` is then
        free), and each rank's noise ``σC/√W`` is summed with its clipped sum by one all-reduce per step.
        Arguments are those of Fabric's :class:`DPStrategy` except ``device``; others go to Fabric's
        ``DDPStrategy`` (``start_method``, ``process_group_backend``...).
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
            **kwargs: Any,
        ) -> None:
            refuse_options("DPDDPStrategy (Fabric)", kwargs, NOT_IN_FABRIC)
            config = DPConfig.from_arguments(locals())
            super().__init__(**kwargs)
            self._init_dp(config, epsilon_budget, accumulate_grad_batches, max_steps, user_ids)

        @override
        def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
            """Set up as the DP base and Fabric's DDP do, then the no-communication hook: raw gradients never
            cross ranks (only the clipped, noised sums, once per optimizer step)."""
            wrapped = super().setup_module(module)
            wrapped.register_comm_hook(state=None, hook=_local_gradients_only)
            return wrapped

        @override
        def make_exchange(self) -> GradientExchange:
            """Each rank noises its clipped sum with ``σC/√W``; one all-reduce adds them up."""
            return AllReduceExchange(noise_shares=self.world_size)

    return DPDDPStrategy
