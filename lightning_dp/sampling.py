"""Poisson sampling: every example joins every batch independently with probability ``q``.

Privacy amplification by subsampling — the reason DP-SGD's ε is small — is proven for this sampling
scheme; shuffled fixed-size batches are a different mechanism the accountants do not cover.
"""
from __future__ import annotations

import collections
import warnings
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

import torch
from torch.utils.data import (
    BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler,
)

from ._checks import check_positive_int, check_rate


def poisson_mask(generator: Any, n: int, rate: float) -> torch.Tensor:
    """``n`` independent inclusion decisions with probability ``rate`` (a CPU bool tensor), from a
    ``torch.Generator`` (or ``None``: the default one) or a source with ``bernoulli(n, p)``
    (:class:`~lightning_dp.noise.SecureRNG`): the one draw behind every Poisson sampler."""
    if hasattr(generator, "bernoulli"):
        return generator.bernoulli(n, rate).to("cpu")
    return torch.rand(n, generator=generator) < rate


class PoissonBatchSampler(Sampler[List[int]]):
    """Yields ``num_batches`` batches; index ``i`` is in each batch independently with probability ``q``.

    Batch sizes are Binomial(N, q): mean ``q·N``, variance ``q·(1−q)·N``. Batches may be empty; the
    training loop must still take a (noise-only) step for them, or the accounting is wrong.

    Two extensions keep that law while splitting the work:

    * ``micro_batches=k``: each Poisson draw (one *logical* batch, one optimizer step) is yielded as
      ``k`` consecutive chunks, for gradient accumulation; ``len()`` is then ``num_batches · k``.
    * ``rank``/``world_size``: distributed Poisson sampling. Rank ``r`` decides inclusion only for
      indices ``r, r + W, r + 2W, …``; the union over ranks is a Poisson sample of the whole dataset at
      rate ``q`` and every example is in at most one rank's batch. Each rank needs its own generator.

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1].
        num_batches: logical batches per epoch (default ``round(1 / q)``, one pass in expectation).
        generator: a ``torch.Generator`` for the inclusion draws, or any object with a
            ``bernoulli(n, p) -> BoolTensor`` method (e.g. :class:`lightning_dp.noise.SecureRNG`).
        micro_batches: chunks per logical batch.
        rank: this process's rank.
        world_size: number of processes.
        users: user-level sampling (:class:`~lightning_dp.user_sampling.UserPlan`): ``num_samples`` is then the
            number of users, the draws are over users (rank ``r`` decides for users ``r, r+W, …``) and each
            batch holds the records of its users (up to ``k`` each, drawn with ``generator``), each user's
            together; micro-batches are split at user boundaries. Each yielded batch's user indices are
            appended to :attr:`batch_units` (the Trainer strategies read them in order).

    Example::

        >>> sampler = PoissonBatchSampler(num_samples=10, sample_rate=0.5, num_batches=2,
        ...                               generator=torch.Generator().manual_seed(0))
        >>> [len(b) <= 10 for b in sampler]
        [True, True]
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        num_batches: Optional[int] = None,
        generator: Optional[Any] = None,
        *,
        micro_batches: int = 1,
        rank: int = 0,
        world_size: int = 1,
        users: Optional[Any] = None,  # a lightning_dp.user_sampling.UserPlan (not imported: it builds on this module)
    ) -> None:
        check_positive_int("num_samples", num_samples)
        check_rate("sample_rate", sample_rate)
        check_positive_int("micro_batches", micro_batches)
        check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be an integer in [0, world_size={world_size}), got {rank!r}.")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.num_batches = (
            check_positive_int("num_batches", num_batches)
            if num_batches is not None
            else max(1, round(1 / self.sample_rate))
        )
        self.generator = generator
        self.micro_batches = micro_batches
        self.rank = rank
        self.world_size = world_size
        self._candidates = torch.arange(rank, num_samples, world_size)
        self.users = users
        self.batch_units: Deque[torch.Tensor] = collections.deque()  # user-level: each yielded batch's users

    def __len__(self) -> int:
        return self.num_batches * self.micro_batches

    def _draw(self) -> torch.Tensor:
        return self._candidates[poisson_mask(self.generator, len(self._candidates), self.sample_rate)]

    def __iter__(self) -> Iterator[List[int]]:
        self.batch_units.clear()  # a new pass: batches drawn by an earlier one are no longer served
        return self._batches()

    def _batches(self) -> Iterator[List[int]]:
        num_batches, micro_batches = self.num_batches, self.micro_batches  # fixed for this pass
        for _ in range(num_batches):
            indices = self._draw()
            if micro_batches == 1:
                yield self._records(indices)
            else:
                for chunk in torch.tensor_split(indices, micro_batches):
                    yield self._records(chunk)

    def _records(self, drawn: torch.Tensor) -> List[int]:
        """The indices a batch holds: those drawn, or (user-level) the records of the users drawn."""
        if self.users is None:
            return drawn.tolist()
        records, units = self.users.records_of(drawn, self.generator)
        self.batch_units.append(units)
        return records


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in ``batch`` (tensors nested in lists, tuples, namedtuples, dicts),
    keeping the structure; other leaves are returned unchanged."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        items = [map_tensors(b, fn) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return type(batch)((k, map_tensors(v, fn)) for k, v in batch.items())
    return batch


def tensors_in(batch: Any) -> List[torch.Tensor]:
    """Every tensor in ``batch``, in traversal order."""
    found: List[torch.Tensor] = []
    map_tensors(batch, found.append)
    return found


def _empty_like_batch(batch: Any) -> Any:
    return map_tensors(batch, lambda t: t[:0])


class _CollateWithEmpty:
    """Collate function that turns an empty index list into a zero-length batch of the right structure."""

    def __init__(self, collate_fn: Callable[[List[Any]], Any], empty_batch: Any) -> None:
        self.collate_fn = collate_fn
        self.empty_batch = empty_batch

    def __call__(self, samples: List[Any]) -> Any:
        if len(samples) == 0:
            return self.empty_batch
        return self.collate_fn(samples)


def is_empty_batch(batch: Any) -> bool:
    """True when every tensor in ``batch`` has zero length along the batch dimension."""
    tensors = tensors_in(batch)
    return bool(tensors) and all(t.dim() > 0 and t.shape[0] == 0 for t in tensors)


def split_batch(batch: Any, chunk_size: int) -> List[Any]:
    """Split a batch (tensors, possibly nested in tuples/lists/dicts) into chunks of ``chunk_size`` rows."""
    return [
        map_tensors(batch, lambda t, start=start: t[start : start + chunk_size] if t.dim() > 0 else t)
        for start in range(0, batch_size_of(batch), chunk_size)
    ]


def batch_size_of(batch: Any) -> int:
    """Length of the first non-empty tensor in ``batch`` along dimension 0 (0 when there is none)."""
    return next((t.shape[0] for t in tensors_in(batch) if t.dim() > 0 and t.shape[0] > 0), 0)


def expected_batch_size_of(loader: DataLoader) -> int:
    """The batch size a loader was built for (``batch_size``, or dataset size / number of batches)."""
    if loader.batch_size is not None:
        return int(loader.batch_size)
    return max(1, round(len(loader.dataset) / max(1, len(loader))))  # type: ignore[arg-type]


def poisson_dataset_size(dataset: Any) -> int:
    """``len(dataset)`` of a dataset that can be Poisson-sampled.

    Raises:
        ValueError: an ``IterableDataset``, a dataset without ``len``, or an empty dataset, with what to change.
    """
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"Poisson sampling needs a map-style dataset (indexable, with len()); the training loader's "
            f"dataset is an IterableDataset ({type(dataset).__name__}). Use a map-style Dataset, or pass "
            "poisson_sampling=False (the accountant's subsampling guarantee then does not hold)."
        )
    try:
        num_samples = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(
            f"Poisson sampling needs len(dataset); {type(dataset).__name__} has no __len__. Implement it, "
            "or pass poisson_sampling=False."
        ) from err
    if num_samples == 0:
        raise ValueError("The training dataset is empty: there is nothing to sample from.")
    return num_samples


_DEFAULT_SAMPLERS = (SequentialSampler, RandomSampler, DistributedSampler)  # shuffle=True/False, Lightning's DDP

_WRAPPED_SAMPLER_READERS: List[Callable[[Sampler], Optional[Sampler]]] = []
"""Functions giving the user's sampler inside a framework's distributed wrapper (else ``None``). The Lightning
adapter registers its reader of ``DistributedSamplerWrapper``
(:func:`lightning_dp.adapter.lightning_internals.wrapped_sampler`) on import: this core module imports no
adapter and reads no Lightning attribute."""


def register_wrapped_sampler_reader(reader: Callable[[Sampler], Optional[Sampler]]) -> None:
    """Let :func:`replaced_sampling` look inside a distributed sampler wrapper with ``reader``."""
    if reader not in _WRAPPED_SAMPLER_READERS:
        _WRAPPED_SAMPLER_READERS.append(reader)


def replaced_sampling(loader: DataLoader) -> Optional[str]:
    """The user's own sampler or batch sampler on ``loader`` that Poisson sampling replaces (its class name
    and where it sits), or ``None`` for the defaults (``shuffle=True/False``, the ``DistributedSampler``
    Lightning puts in their place, a Poisson sampler of this package)."""
    batch_sampler = loader.batch_sampler
    if batch_sampler is None or isinstance(batch_sampler, PoissonBatchSampler):
        return None
    if type(batch_sampler) is not BatchSampler:
        return f"batch_sampler={type(batch_sampler).__name__}"
    sampler = batch_sampler.sampler
    for read in _WRAPPED_SAMPLER_READERS:  # e.g. Lightning's DistributedSamplerWrapper around the user's sampler
        inner = read(sampler)
        if inner is not None:
            sampler = inner
            break
    if type(sampler) in _DEFAULT_SAMPLERS:
        return None
    return f"sampler={type(sampler).__name__}"


def warn_replaced_sampling(loader: DataLoader) -> None:
    """Warn that the user's own sampler or batch sampler (see :func:`replaced_sampling`) is replaced by
    Poisson sampling, and say what keeps its intent under DP."""
    replaced = replaced_sampling(loader)
    if replaced is None:
        return
    warnings.warn(
        f"The training DataLoader's {replaced} is replaced by Poisson sampling (each example joins each step "
        "independently with probability q), which the privacy accounting assumes; what your sampler did "
        "(class reweighting, grouping by length...) is lost. To weight examples under DP, weight each "
        "example's loss instead: clipping bounds each sample's weighted gradient, so the guarantee is "
        "unchanged (see 'Lightning features under DP' in the docs).",
        UserWarning,
        stacklevel=3,
    )


def poisson_dataloader(
    loader: DataLoader,
    *,
    sample_rate: Optional[float] = None,
    generator: Optional[Any] = None,
    micro_batches: int = 1,
    rank: int = 0,
    world_size: int = 1,
    batch_sampler: Optional[Sampler[List[int]]] = None,
) -> DataLoader:
    """A copy of ``loader`` over the same dataset whose batches come from :class:`PoissonBatchSampler`.

    The rate defaults to ``q = micro_batches · world_size · batch_size / len(dataset)`` (the loader's
    ``batch_size`` is per process and per micro-batch, as in Lightning) and the number of logical
    batches per epoch to ``len(loader) // micro_batches``; workers, pinning, collate function and the
    rest of the loader's settings are kept. ``micro_batches``, ``rank`` and ``world_size`` are passed
    to :class:`PoissonBatchSampler`. A ready ``batch_sampler`` (a Poisson sampler built elsewhere, e.g.
    with a per-epoch plan) replaces that one; ``sample_rate``, ``generator``, ``micro_batches``, ``rank``
    and ``world_size`` are then unused.

    Raises:
        ValueError: when the loader cannot be Poisson-sampled (an ``IterableDataset``, a dataset without
            ``len``, or an empty dataset), with what to change.
    """
    dataset = loader.dataset
    num_samples = poisson_dataset_size(dataset)
    batch_size = expected_batch_size_of(loader)
    warn_replaced_sampling(loader)
    if sample_rate is None:
        sample_rate = min(1.0, micro_batches * world_size * batch_size / num_samples)
    if batch_sampler is None:
        batch_sampler = PoissonBatchSampler(
            num_samples,
            sample_rate,
            max(1, len(loader) // micro_batches),
            generator=generator,
            micro_batches=micro_batches,
            rank=rank,
            world_size=world_size,
        )
    collate_fn = loader.collate_fn
    empty_batch = _empty_like_batch(collate_fn([dataset[0]]))
    kwargs: Dict[str, Any] = dict(
        num_workers=loader.num_workers,
        collate_fn=_CollateWithEmpty(collate_fn, empty_batch),
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )
    if loader.num_workers > 0 and loader.prefetch_factor is not None:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)


__all__ = [
    "PoissonBatchSampler",
    "batch_size_of",
    "expected_batch_size_of",
    "is_empty_batch",
    "poisson_dataloader",
    "poisson_dataset_size",
    "replaced_sampling",
    "split_batch",
]
