"""DPDDPStrategy: DP-SGD over several processes on Lightning's DDP (gloo on CPU, NCCL on GPU)."""
from typing import Any, Optional

import torch
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

from .strategy import DPStrategyMixin


# No ``from __future__ import annotations`` here: DDP checks this hook's annotations as real types.
def _local_gradients_only(state: Any, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook that does not communicate: each rank keeps its own gradients.

    DP-SGD must not average raw (unclipped) gradients; the DP optimizer all-reduces the clipped, noised
    sums itself, once per optimizer step.
    """
    future: "torch.futures.Future[torch.Tensor]" = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class DPDDPStrategy(DPStrategyMixin, DDPStrategy):
    """DP-SGD with data parallelism: ``Trainer(devices=N, strategy=DPDDPStrategy(...))`` (or ``"dp_ddp"``).

    * **Distributed Poisson sampling**: rank ``r`` decides inclusion for examples ``r, r+W, …`` with the
      global rate ``q = W·batch_size/N`` (``batch_size`` is per process, as in Lightning). The union of
      the ranks' batches is one Poisson sample of the dataset; every example is in at most one batch.
    * Each rank clips its own samples before any gradient leaves it. DDP's gradient all-reduce is
      replaced by a no-op communication hook (raw gradients are never averaged).
    * Each rank adds Gaussian noise of std ``σC/√W`` to its clipped sum; the DP optimizer sums the
      results across ranks, so the update carries noise of total std ``σC`` exactly once, divided by
      the global expected batch size ``q·N``.
    * Every rank's accountant records the global rate ``q``; ε is the same on every rank.

    Arguments are those of :class:`~lightning_dp.DPStrategy`; other keyword arguments go to
    :class:`~pytorch_lightning.strategies.DDPStrategy` (e.g. ``start_method``, ``process_group_backend``).
    """

    strategy_name = "dp_ddp"

    def __init__(
        self,
        noise_multiplier: Optional[float] = None,
        max_grad_norm: float = 1.0,
        *,
        target_epsilon: Optional[float] = None,
        delta: float = 1e-5,
        poisson_sampling: bool = True,
        accountant: str = "prv",
        loss_reduction: str = "mean",
        seed: Optional[int] = None,
        secure_mode: bool = False,
        max_physical_batch_size: Optional[int] = None,
        clipping_mode: str = "auto",
        clipping: str = "flat",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._init_dp(
            noise_multiplier,
            max_grad_norm,
            target_epsilon,
            delta,
            poisson_sampling,
            accountant,
            loss_reduction,
            seed,
            max_physical_batch_size,
            secure_mode,
            clipping_mode,
            clipping,
        )

    def _register_ddp_hooks(self) -> None:
        """Install the no-communication hook on every backend (Lightning only does so on CUDA)."""
        self.model.register_comm_hook(state=None, hook=_local_gradients_only)  # type: ignore[union-attr]

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"dp_ddp"`` with Lightning's strategy registry."""
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="DP-SGD with DDP (lightning_dp): noise_multiplier=1.0, max_grad_norm=1.0",
            override=True,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


DPDDPStrategy.register_strategies(StrategyRegistry)
