"""User-level privacy: protect people, not rows.

Real data often hold several records per person. Record-level DP at ε protects one row; a person with ``k``
rows only gets group privacy (about ``k·ε``). With ``privacy_unit="user"`` the unit of privacy is a user
(all of their records), as in user-level DP-SGD (JAX Privacy; Charles et al. 2024, "Fine-tuning LLMs with
user-level DP"):

* **Sampling**: each step samples users by Poisson at rate ``q = expected users per batch / N_users``; a
  sampled user contributes up to ``k = max_records_per_user`` records: all of them when they have ``≤ k``,
  else ``k`` drawn at random (with the sampling generator) at each step.
* **Clipping**: a user's gradient is the **mean** of their contributed records' gradients, clipped to ``C`` as
  one unit (:meth:`~lightning_dp.grad_sample.per_sample_parts.Part.group`; exact in every clipping mode). The
  update is the sum over sampled users, plus ``N(0, σ²C²)``, divided by the expected number of users.
* **Accounting**: the subsampled Gaussian at the user rate ``q``: ε and δ are per user.

A user's records are always in one micro-batch of one step: batches are drawn as whole users, split into
micro-batches (gradient accumulation) and physical chunks at user boundaries only (:func:`user_chunks`). With
several processes, rank ``r`` decides for users ``r, r+W, …`` and takes all of their records, so a user's
records are on one rank.

This module is the core's part: :class:`UserPlan` (each record's user), the loader for plain PyTorch
(:func:`user_poisson_dataloader`, yielding ``(batch, units)``) and :func:`user_chunks`. No Lightning import.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ._checks import check_positive_int
from .sampling import (
    PoissonBatchSampler, _empty_like_batch, batch_size_of, expected_batch_size_of, map_tensors, poisson_dataset_size,
)

__all__ = ["PRIVACY_UNITS", "UserPlan", "user_chunks", "user_plan", "user_poisson_dataloader"]

PRIVACY_UNITS = ("record", "user")


class UserPlan:
    """Which user each training record belongs to, and ``k``, the records a user contributes per step at most.

    Args:
        user_ids: one id per training example (record ``i`` of the dataset), any hashable (ints, strings...);
            a list, tuple, array or tensor. ``None`` (and NaN) ids are refused: every record needs its user.
        max_records_per_user: ``k ≥ 1``; ``None``: the largest user's count (no record is ever left out).

    Attributes:
        num_records, num_users: the dataset's records and distinct users.
        record_user: ``(num_records,)`` long: each record's user index (users numbered by first appearance).
        counts: ``(num_users,)`` long: each user's records.

    Example::

        >>> plan = UserPlan(["ann", "bob", "ann", "cid"], max_records_per_user=1)
        >>> plan.num_users, plan.max_records_per_user, plan.record_user.tolist()
        (3, 1, [0, 1, 0, 2])
    """

    def __init__(self, user_ids: Sequence[Hashable], max_records_per_user: Optional[int] = None) -> None:
        ids = user_ids.tolist() if hasattr(user_ids, "tolist") else list(user_ids)
        index: Dict[Hashable, int] = {}
        record_user = []
        for i, uid in enumerate(ids):
            if uid is None or (isinstance(uid, float) and math.isnan(uid)):
                raise ValueError(
                    f"`user_ids`[{i}] is {uid!r}: every record needs the id of the user it belongs to under "
                    "privacy_unit='user' (a record without one could not be bounded with its user's other records)."
                )
            try:
                record_user.append(index.setdefault(uid, len(index)))
            except TypeError as err:
                raise ValueError(f"`user_ids`[{i}] = {uid!r} is not hashable: user ids must be hashable.") from err
        if not record_user:
            raise ValueError("`user_ids` is empty: give one user id per training example.")
        self.record_user = torch.tensor(record_user, dtype=torch.long)
        self.num_records, self.num_users = len(record_user), len(index)
        self.counts = torch.bincount(self.record_user, minlength=self.num_users)
        self._order = torch.argsort(self.record_user, stable=True)  # records grouped by user, in dataset order
        self._starts = torch.cumsum(self.counts, 0) - self.counts
        self.largest_user = int(self.counts.max())
        self.max_records_per_user = (
            self.largest_user if max_records_per_user is None
            else check_positive_int("max_records_per_user", max_records_per_user)
        )

    def check_dataset(self, num_records: int) -> None:
        """Refuse a dataset whose length is not that of ``user_ids``."""
        if num_records != self.num_records:
            raise ValueError(
                f"`user_ids` holds {self.num_records} ids but the training dataset has {num_records} examples: give "
                "exactly one user id per training example, in the dataset's order."
            )

    def summary(self) -> Dict[str, int]:
        """``max_records_per_user``, ``num_users`` and ``num_records`` (for checkpoints and reports)."""
        return {"max_records_per_user": self.max_records_per_user, "num_users": self.num_users,
                "num_records": self.num_records}

    def records_of(self, users: torch.Tensor, generator: Any = None) -> Tuple[List[int], torch.Tensor]:
        """The records the sampled ``users`` contribute (each user's together, in the order of ``users``): all
        of a user's records when they have at most ``k``, else ``k`` drawn at random with ``generator`` (a
        ``torch.Generator``, a source with ``uniform``, or ``None``). Returns the record indices and each
        record's user index."""
        users = users.to(torch.long)
        counts, k = self.counts[users], self.max_records_per_user
        take = counts.clamp(max=k)
        owner = torch.repeat_interleave(torch.arange(users.numel()), take)
        position = torch.arange(int(take.sum())) - torch.repeat_interleave(torch.cumsum(take, 0) - take, take)
        over = torch.nonzero(counts > k).flatten().tolist()
        if over:
            segment_starts = (torch.cumsum(take, 0) - take).tolist()
            for j in over:
                keys = _uniform(generator, int(counts[j]))
                picked = torch.sort(torch.topk(keys, k, largest=False).indices).values
                position[segment_starts[j] : segment_starts[j] + k] = picked
        records = self._order[self._starts[users][owner] + position]
        return records.tolist(), users[owner]


def user_plan(privacy_unit: str, user_ids: Any, max_records_per_user: Optional[int]) -> Optional[UserPlan]:
    """The :class:`UserPlan` of a run (``None`` without ``user_ids``, which ``privacy_unit="user"`` refuses)."""
    if user_ids is None:
        if privacy_unit == "user":
            raise ValueError(
                "privacy_unit='user' needs `user_ids`: one user id per training example (records without an id "
                "cannot be bounded with the rest of their user's records)."
            )
        return None
    return UserPlan(user_ids, max_records_per_user)


def _uniform(generator: Any, n: int) -> torch.Tensor:
    """``n`` uniforms from ``generator`` (a ``torch.Generator``, a source with ``uniform``, or ``None``)."""
    if hasattr(generator, "uniform"):
        return generator.uniform((n,)).to("cpu")
    return torch.rand(n, generator=generator, dtype=torch.float64)


def user_chunks(batch: Any, units: torch.Tensor, limit: Optional[int]) -> List[Tuple[Any, torch.Tensor]]:
    """``batch`` (its records grouped by user, ``units`` each record's user) split into chunks of at most
    ``limit`` records at user boundaries only: a user's records stay in one chunk. ``None``: one chunk.

    Raises:
        ValueError: a user holds more records than ``limit`` (raise ``max_physical_batch_size``).
    """
    units = torch.as_tensor(units).reshape(-1).cpu()
    size = units.numel()
    if limit is None or size <= limit:
        return [(batch, units)]
    starts = [0] + [i for i in range(1, size) if units[i] != units[i - 1]]
    chunks, begin = [], 0
    for start, end in zip(starts, starts[1:] + [size]):
        if end - start > limit:
            raise ValueError(
                f"max_physical_batch_size={limit} is smaller than the {end - start} records of one sampled user: a "
                "user's records must be in one physical batch. Raise it to at least max_records_per_user."
            )
        if end - begin > limit:
            chunks.append((begin, start))
            begin = start
    chunks.append((begin, size))
    return [(map_tensors(batch, lambda t, a=a, b=b: t[a:b] if t.dim() > 0 else t), units[a:b]) for a, b in chunks]


class _RecordsWithUnits(Dataset):
    """``dataset[i]`` with record ``i``'s user index: ``(item, unit)``."""

    def __init__(self, dataset: Any, record_user: torch.Tensor) -> None:
        self.dataset, self.record_user = dataset, record_user

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        return self.dataset[index], int(self.record_user[index])


class _CollateWithUnits:
    """Collate ``(item, unit)`` pairs into ``(batch, units)``; an empty batch keeps its structure."""

    def __init__(self, collate_fn: Any, empty_batch: Any) -> None:
        self.collate_fn, self.empty_batch = collate_fn, empty_batch

    def __call__(self, samples: List[Tuple[Any, int]]) -> Tuple[Any, torch.Tensor]:
        units = torch.tensor([u for _, u in samples], dtype=torch.long)
        if not samples:
            return self.empty_batch, units
        return self.collate_fn([item for item, _ in samples]), units


def user_poisson_dataloader(
    loader: DataLoader, users: UserPlan, *, sample_rate: Optional[float] = None, generator: Any = None,
    num_batches: Optional[int] = None, micro_batches: int = 1, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """A loader over ``loader``'s dataset yielding ``(batch, units)``: each batch holds the records of the users
    Poisson-sampled for one step (or one of its ``micro_batches``: split at user boundaries), ``units`` each
    record's user index, to pass to :meth:`~lightning_dp.DPOptimizer.step` (``units=``) or
    :meth:`~lightning_dp.DPOptimizer.accumulate_micro_batch`.

    ``sample_rate`` defaults to ``micro_batches · world_size · loader.batch_size / N_users`` (the loader's
    ``batch_size`` is the expected number of users per micro-batch and process); ``num_batches`` (steps per
    pass) to ``round(1/q)``. Rank ``r`` of ``world_size`` decides for users ``r, r+W, …``.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> plan = UserPlan([0, 0, 1, 2, 2, 2], max_records_per_user=2)
        >>> data = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=3)
        >>> batch, units = next(iter(user_poisson_dataloader(data, plan, generator=torch.Generator().manual_seed(0))))
        >>> len(batch[0]) == len(units) and len(units) <= 5
        True
    """
    dataset = loader.dataset
    users.check_dataset(poisson_dataset_size(dataset))
    if sample_rate is None:
        sample_rate = min(1.0, micro_batches * world_size * expected_batch_size_of(loader) / users.num_users)
    sampler = PoissonBatchSampler(users.num_users, sample_rate, num_batches, generator, micro_batches=micro_batches,
                                  rank=rank, world_size=world_size, users=users)
    collate = _CollateWithUnits(loader.collate_fn, _empty_like_batch(loader.collate_fn([dataset[0]])))
    return DataLoader(_RecordsWithUnits(dataset, users.record_user), batch_sampler=sampler, collate_fn=collate,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def units_match(batch: Any, units: torch.Tensor) -> bool:
    """Whether ``units`` has one entry per record of ``batch`` (an empty batch: none)."""
    return units.numel() == batch_size_of(batch)
