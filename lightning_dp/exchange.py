"""How the ranks' clipped sums become one noised gradient: the gradient exchange of a
:class:`~lightning_dp.DPOptimizer`, chosen when the optimizer is built.

* :class:`LocalExchange`: nothing crosses processes (one process); the optimizer adds ``N(0, (σC)²)``.
* :class:`AllReduceExchange`: each rank adds ``σC/√shares`` to its clipped sum and one all-reduce SUM
  (coalesced into buckets) adds them up: noise ``σC`` exactly once.
* :class:`ReduceScatterExchange`: every clipped sum is reduce-scattered into the ranks' shards after each
  backward pass (FSDP2); each rank noises its own shard with ``σC``.
* :class:`SecureAggregationExchange`: quantised, masked integer sums with distributed discrete Gaussian noise
  (:class:`~lightning_dp.secure_aggregation.SecureAggregator`).

The optimizer calls :meth:`GradientExchange.noise_and_combine` once per step with the clipped sums (already
divided by the expected batch size) and the noise of the step; nothing here calls back into a strategy.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from ._checks import check_positive_int
from .grad_sample import wide_dtype
from .noise.adding import add_noise_

__all__ = [
    "AllReduceExchange", "BUCKET_BYTES", "CallableExchange", "GradientExchange", "GradientShards", "LocalExchange",
    "ReduceScatterExchange", "SecureAggregationExchange", "all_reduce_sum_coalesced", "exchange_from_arguments",
]


class GradientShards(Protocol):
    """How a sharded host (FSDP2) keeps the DP gradient: each rank holds only its shard of each parameter.

    With :class:`ReduceScatterExchange` every clipped sum goes to :meth:`reduce` as soon as it is made, after
    each backward pass, for every trainable parameter in the same order on every rank (a parameter without
    per-sample gradients on this rank contributes zeros); the optimizer keeps the shard it returns, adds
    the noise of std ``σC`` to that shard only (each element of the gradient is noised once, by the rank
    that owns it) and sets ``param.grad = to_grad(param, shard)``.
    """

    def reduce(self, param: nn.Parameter, clipped_sum: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the sum over ranks of ``clipped_sum`` (full size: this rank's samples);
        a collective, called by every rank."""

    def zeros(self, param: nn.Parameter) -> torch.Tensor:
        """A zero tensor shaped like this rank's shard of ``param`` (a step without per-sample gradients)."""

    def to_grad(self, param: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """The value of ``param.grad`` for this rank's noised ``shard`` (FSDP2: a DTensor over it)."""


class GradientExchange:
    """Base of the exchanges: one process's view. Subclasses say how sums cross processes.

    Attributes:
        noise_shares: how many ranks each add part of the noise (each adds std ``σC/√noise_shares``).
        shards: the :class:`GradientShards` of a sharded model (``None``: every rank holds whole tensors).
    """

    noise_shares = 1
    shards: Optional[GradientShards] = None

    def noise_and_combine(self, grads: List[torch.Tensor], noise: Any, std: float, sensitivity: float) -> None:
        """Add this rank's share of ``N(0, std²)`` from ``noise`` to ``grads`` and combine them across ranks,
        in place; ``sensitivity`` is one example's bound on ``grads`` (``C/B``)."""
        if std > 0:
            add_noise_(noise, grads, std / math.sqrt(self.noise_shares))
        self.combine(grads)

    def combine(self, tensors: List[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place (one process: nothing to do)."""

    def zeros(self, param: nn.Parameter) -> torch.Tensor:
        """The clipped sum of ``param`` in a step without per-sample gradients (float32 or wider)."""
        return torch.zeros(param.shape, device=param.device, dtype=wide_dtype(param.dtype))

    def to_grad(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """The value of ``param.grad`` for the noised ``grad``."""
        return grad

    def describe(self) -> Optional[Dict[str, Any]]:
        """The mechanism of the exchange for the privacy report, when it is more than a sum (else ``None``)."""
        return None


class LocalExchange(GradientExchange):
    """One process: the clipped sum is the gradient, the optimizer adds all of the noise."""


class AllReduceExchange(GradientExchange):
    """Data parallelism: each of ``noise_shares`` ranks noises its own clipped sum with ``σC/√noise_shares``,
    then one all-reduce SUM (coalesced, :func:`all_reduce_sum_coalesced`) adds them up, so the update carries
    noise ``σC`` exactly once. ``noise_shares=1`` when one rank adds the whole noise (BandMF's correlated
    stream lives on rank 0)."""

    def __init__(self, noise_shares: int, bucket_bytes: Optional[int] = None) -> None:
        self.noise_shares = check_positive_int("noise_shares", noise_shares)
        self.bucket_bytes = BUCKET_BYTES if bucket_bytes is None else check_positive_int("bucket_bytes", bucket_bytes)

    def combine(self, tensors: List[torch.Tensor]) -> None:
        """All-reduce SUM of ``tensors`` in a few buckets."""
        all_reduce_sum_coalesced(tensors, self.bucket_bytes)


class CallableExchange(GradientExchange):
    """A user's ``combine`` callable (``DPOptimizer(combine=..., noise_shares=...)``) as an exchange. A callable
    with ``adds_noise = True`` (a :class:`~lightning_dp.secure_aggregation.SecureAggregator`) adds the noise
    itself: see :class:`SecureAggregationExchange`."""

    def __init__(self, combine: Callable[[List[torch.Tensor]], None], noise_shares: int = 1) -> None:
        self._combine = combine
        self.noise_shares = check_positive_int("noise_shares", noise_shares)

    def combine(self, tensors: List[torch.Tensor]) -> None:
        """Call the user's ``combine``."""
        self._combine(tensors)


class ReduceScatterExchange(GradientExchange):
    """A sharded model (FSDP2): clipped sums are reduce-scattered into shards after every backward pass
    (:meth:`reduce_in_order`, called by the optimizer), and each rank adds the whole ``σC`` to its own shard."""

    def __init__(self, shards: GradientShards) -> None:
        self.shards = shards

    def zeros(self, param: nn.Parameter) -> torch.Tensor:
        """Zeros shaped like this rank's shard of ``param``."""
        return self.shards.zeros(param).to(wide_dtype(param.dtype))

    def to_grad(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """The shard as the parameter's gradient (FSDP2: a DTensor)."""
        return self.shards.to_grad(param, grad)

    def reduce_in_order(
        self, params: List[nn.Parameter], with_samples: List[nn.Parameter]
    ) -> Tuple[Callable[[int, torch.Tensor], torch.Tensor], Callable[[], List[Tuple[nn.Parameter, torch.Tensor]]]]:
        """``on_sum`` for :func:`~lightning_dp.clipping.clip_and_sum`, and a function that finishes the pass.

        Every trainable parameter is reduced once per backward pass in ``params`` order, on every rank
        alike (each reduction is a collective): before a parameter's clipped sum, the parameters before it
        that have no per-sample gradient on this rank are reduced with zeros (other ranks may have some);
        the finishing function does the same for the rest and returns those ``(param, shard)`` pairs.
        """
        shards, pending = self.shards, iter(params)
        unsampled: List[Tuple[nn.Parameter, torch.Tensor]] = []

        def reduce_zeros_until(target: Optional[nn.Parameter]) -> None:
            for p in pending:
                if p is target:
                    return
                zeros = torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype))
                unsampled.append((p, shards.reduce(p, zeros)))

        def on_sum(k: int, clipped: torch.Tensor) -> torch.Tensor:
            reduce_zeros_until(with_samples[k])
            return shards.reduce(with_samples[k], clipped.to(wide_dtype(with_samples[k].dtype)))

        def finish() -> List[Tuple[nn.Parameter, torch.Tensor]]:
            reduce_zeros_until(None)
            return unsampled

        return on_sum, finish


class SecureAggregationExchange(GradientExchange):
    """Secure aggregation: the aggregator quantises, adds a discrete Gaussian share, masks and sums; it gets
    the total std ``σC/B`` and the bound ``C/B`` on one example's contribution."""

    def __init__(self, aggregator: Any) -> None:
        self.aggregator = aggregator

    def noise_and_combine(self, grads: List[torch.Tensor], noise: Any, std: float, sensitivity: float) -> None:
        """The aggregator's masked sum with its distributed discrete Gaussian noise (``noise`` is unused)."""
        self.aggregator(grads, std=std, sensitivity=sensitivity)

    def combine(self, tensors: List[torch.Tensor]) -> None:
        """Refused: everything leaving a rank under secure aggregation goes through the aggregator with its
        noise (adaptive clipping's count is refused with secure aggregation for this reason)."""
        raise RuntimeError("Under secure aggregation only noised, masked sums leave a rank (noise_and_combine).")

    def describe(self) -> Optional[Dict[str, Any]]:
        """The aggregator's parameters (no key material)."""
        return self.aggregator.describe()


def exchange_from_arguments(
    combine: Optional[Callable[..., None]], noise_shares: int, shards: Optional[GradientShards]
) -> GradientExchange:
    """The exchange that :class:`~lightning_dp.DPOptimizer`'s keyword arguments ``combine``, ``noise_shares``
    and ``shards`` describe (the arguments it took before exchanges were objects)."""
    check_positive_int("noise_shares", noise_shares)
    if shards is not None:
        if combine is not None or noise_shares != 1:
            raise ValueError(
                f"`shards` reduces the clipped sums and noises each rank's shard itself; got also combine={combine!r}, "
                f"noise_shares={noise_shares!r}. Pass `shards` alone (sharded model) or `combine` and `noise_shares`."
            )
        return ReduceScatterExchange(shards)
    if combine is None:
        return LocalExchange() if noise_shares == 1 else CallableExchange(lambda tensors: None, noise_shares)
    if getattr(combine, "adds_noise", False):
        return SecureAggregationExchange(combine)
    return CallableExchange(combine, noise_shares)


BUCKET_BYTES = 1 << 24
"""The largest flat buffer one all-reduce of :func:`all_reduce_sum_coalesced` carries (16 MiB; DDP's
buckets bound their copies the same way)."""


def all_reduce_sum_coalesced(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES,
                             all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> None:
    """Sum ``tensors`` over the ranks, in place, with as few collectives as possible: the tensors of one
    device and dtype, in order, are packed into flat buffers of at most ``bucket_bytes`` (a tensor that
    fills a bucket alone is reduced in place), each buffer is all-reduced once and copied back. Every
    element is summed over the same ranks as by one all-reduce per tensor; only the number of messages
    changes (a model of many small tensors paid one round trip per tensor).

    ``all_reduce`` (default ``torch.distributed.all_reduce`` with SUM) reduces one tensor in place."""
    reduce = all_reduce or (lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM))
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        for bucket in _buckets(group, bucket_bytes):
            _reduce_bucket(bucket, reduce)


def _buckets(tensors: List[torch.Tensor], bucket_bytes: int) -> List[List[torch.Tensor]]:
    """``tensors`` in order, cut into runs of at most ``bucket_bytes`` (a larger tensor alone)."""
    buckets: List[List[torch.Tensor]] = []
    bucket: List[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        buckets.append(bucket)
    return buckets


def _reduce_bucket(bucket: List[torch.Tensor], reduce: Callable[[torch.Tensor], None]) -> None:
    if len(bucket) == 1 and bucket[0].is_contiguous():
        reduce(bucket[0])
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    reduce(flat)
    offset = 0
    for t in bucket:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
