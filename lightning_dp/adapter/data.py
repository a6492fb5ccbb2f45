"""The data side of DP training inside Lightning: Poisson sampling of the training loader, the
per-epoch sampling plan (gradient accumulation, limits, reloads) and the calibration of σ
(:class:`TrainingData`, a part of every DP strategy). No Lightning import."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from ..accounting import get_noise_multiplier_for_plan
from ..config import DPConfig
from ..correlated import CyclicGroups
from ..privacy_state import PrivacyState
from ..sampling import PoissonBatchSampler, expected_batch_size_of, poisson_dataloader, poisson_dataset_size
from ..user_sampling import UserPlan, units_match
from . import lightning_internals
from .bandmf import bandmf_sigma
from .host import Host
from .features import accumulation_for_epoch, check_windows, lightning_cap, planned_accumulations, plan_steps


class EpochPoissonBatchSampler(PoissonBatchSampler):
    """A :class:`~lightning_dp.PoissonBatchSampler` whose accumulation factor ``k`` is read at the start
    of every epoch (``GradientAccumulationScheduler``, or any change of ``accumulate_grad_batches``
    between epochs).

    Each epoch yields ``min(chunks_per_epoch, epoch_cap) // k`` Poisson draws at rate
    ``q_k = min(1, k·W·B/N)`` (``B`` the loader's batch size per process and micro-batch, ``W``
    processes), each split into ``k`` micro-batches: every optimizer step is one whole draw at the rate
    the accountant records. ``epoch_cap`` is the epoch length Lightning fixed when it set the loader up
    (its ``num_training_batches``, read once from this sampler's length then): a later epoch with a
    smaller ``k`` runs at most that many micro-batches, and the plan counts exactly those.

    Args:
        num_samples: dataset size N.
        batch_size: ``B``.
        chunks_per_epoch: micro-batches one epoch may use.
        accumulation: returns ``k`` for the epoch about to start.
        chunks_done: returns how many micro-batches of the epoch were already trained when an iteration
            starts (0, except in a run resumed from a checkpoint saved mid-epoch).
        generator, rank, world_size: as for :class:`~lightning_dp.PoissonBatchSampler`.
        groups: BandMF's cyclic Poisson sampling (:mod:`lightning_dp.adapter.bandmf`): each example's group
            (``N`` labels in ``0 … bands − 1``); optimizer step ``t`` then draws group ``t mod b`` of this rank's
            examples at rate ``b·q``. ``None``: plain Poisson sampling.
        steps_taken: optimizer steps taken so far (read when an epoch's iteration starts: the first draw is
            for that step, whatever the loader prefetches).
        users: user-level sampling (see :class:`~lightning_dp.PoissonBatchSampler`): ``num_samples`` and the
            draws are then users, ``batch_size`` the expected users per micro-batch and process.

    A run resumed from a checkpoint saved inside an accumulation window (``r`` of ``k`` micro-batches
    done, e.g. by a validation-end or time-based save) gets ``k − r`` empty micro-batches first: the
    rest of that window is a noise-only step, accounted like every step, and every later step is again
    one whole Poisson draw. Without them the resumed window would mix parts of two draws.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        chunks_per_epoch: int,
        accumulation: Callable[[], int],
        chunks_done: Callable[[], int] = lambda: 0,
        generator: Any = None,
        rank: int = 0,
        world_size: int = 1,
        groups: Optional[torch.Tensor] = None,
        bands: int = 1,
        steps_taken: Callable[[], int] = lambda: 0,
        users: Optional[UserPlan] = None,
    ) -> None:
        super().__init__(num_samples, 1.0, 1, generator, rank=rank, world_size=world_size, users=users)
        self._cyclic = None if groups is None else CyclicGroups(self._candidates, groups, bands)
        self._steps_taken = steps_taken
        self._next_step = 0
        self.batch_size = batch_size
        self.chunks_per_epoch = chunks_per_epoch
        self._accumulation = accumulation
        self._chunks_done = chunks_done
        self.resumed_inside_window = 0  # empty micro-batches served to finish a resumed window
        self.epoch_cap = chunks_per_epoch  # set to Lightning's fixed epoch length once it has read it
        self._apply_plan()

    def rate_for(self, k: int) -> float:
        """The Poisson rate of one optimizer step that accumulates ``k`` micro-batches."""
        return min(1.0, k * self.world_size * self.batch_size / self.num_samples)

    def draws_for(self, k: int) -> int:
        """Poisson draws (optimizer steps) an epoch yields with accumulation ``k``."""
        return min(self.chunks_per_epoch, self.epoch_cap) // k

    def length_for(self, k: int) -> int:
        """Micro-batches an epoch yields with accumulation ``k``."""
        return self.draws_for(k) * k

    def _apply_plan(self) -> None:
        k = int(self._accumulation())
        self.micro_batches = k
        self.sample_rate = self.rate_for(k)
        self.num_batches = self.draws_for(k)

    def __len__(self) -> int:
        self._apply_plan()
        return super().__len__()

    def __iter__(self) -> Iterator[List[int]]:
        self._apply_plan()
        self.batch_units.clear()
        return self._iterate(self.micro_batches)

    def _iterate(self, k: int) -> Iterator[List[int]]:
        inside = self._chunks_done() % k
        self._next_step = self._steps_taken() + (1 if inside else 0)  # a resumed window's rest is one step
        if inside:
            self.resumed_inside_window = k - inside
            for _ in range(k - inside):
                yield self._records(torch.zeros(0, dtype=torch.long))
        yield from self._batches()

    def _draw(self) -> torch.Tensor:
        if self._cyclic is None:
            return super()._draw()
        indices = self._cyclic.draw(self.generator, self._next_step, self.sample_rate)
        self._next_step += 1
        return indices


class TrainingData:
    """The training loader under DP: Poisson sampling at the rate of each epoch's accumulation plan (or the
    user's own sampler, warned: the subsampling analysis then does not hold), the sampling plan written into
    the privacy state before each step, and σ's calibration for ``target_epsilon``.

    Args:
        config: the run's settings.
        privacy: the run's privacy state (σ, q, the sampling generator, BandMF's groups).
        host: the Lightning namespace (its error type and messages).
    """

    def __init__(self, config: DPConfig, privacy: PrivacyState, host: Host) -> None:
        self.config, self.privacy, self.host = config, privacy, host
        self.sampler: Optional[EpochPoissonBatchSampler] = None
        self.user_loader: Optional[Tuple[int, int, int]] = None  # (N, batch size, length) of the user's loader
        self.calibrated_accumulation: Optional[Dict[int, int]] = None  # epoch → k that σ was calibrated for

    def prepare(self, trainer: Any, dataloader: object, rank: int, world_size: int) -> DataLoader:
        """The training loader to use (Poisson-sampled unless ``poisson_sampling=False``), its plan synced."""
        if not isinstance(dataloader, DataLoader):
            raise self.host.trainer_error(
                f"DP training needs the training data as a torch DataLoader, got {type(dataloader).__name__}."
            )
        if self.config.poisson_sampling:
            dataloader = self._poisson_loader(trainer, dataloader, rank, world_size)
        else:
            self._user_sampler_plan(dataloader)
        self.sync(trainer, world_size)
        return dataloader

    def _poisson_loader(self, trainer: Any, dataloader: DataLoader, rank: int, world_size: int) -> DataLoader:
        host, privacy = self.host, self.privacy
        try:
            num_samples = poisson_dataset_size(dataloader.dataset)
            groups = privacy.bandmf_groups(num_samples)
            users = privacy.users if privacy.privacy_unit == "user" else None
            if privacy.users is not None:
                privacy.users.check_dataset(num_samples)
        except ValueError as err:
            raise host.trainer_error(f"The DP strategy cannot serve the training loader: {err}") from err
        limit = trainer.limit_train_batches
        chunks = len(dataloader)
        if users is not None:  # users are sampled: an epoch is N_users / (W·B) micro-batches in expectation
            num_samples = users.num_users
            chunks = max(1, -(-num_samples // (world_size * expected_batch_size_of(dataloader))))
        if isinstance(limit, int) and not isinstance(limit, bool):
            chunks = min(chunks, limit)  # whole windows only: Lightning's own cap then never cuts one
        sampler = EpochPoissonBatchSampler(
            num_samples,
            expected_batch_size_of(dataloader),
            chunks,
            accumulation=lambda: accumulation_for_epoch(trainer, host, trainer.current_epoch),
            chunks_done=lambda: lightning_internals.epoch_micro_batches_done(trainer),
            generator=privacy.sampling_generator,
            rank=rank,
            world_size=world_size,
            groups=groups,
            bands=privacy.bands,
            steps_taken=lambda: privacy.accountant.total_steps,
            users=users,
        )
        sampler.epoch_cap = len(sampler)  # what Lightning reads now and keeps as the epoch's length
        lengths = [(k, sampler.length_for(k)) for k in planned_accumulations(trainer, host)]
        check_windows(trainer, host, lengths, lightning_cap(sampler.epoch_cap, limit))
        self.sampler = sampler
        return poisson_dataloader(dataloader, batch_sampler=sampler)

    def _user_sampler_plan(self, dataloader: DataLoader) -> None:
        try:
            dataset_size = len(dataloader.dataset)  # type: ignore[arg-type]
        except TypeError:
            dataset_size = 0
        if dataset_size == 0:
            raise self.host.trainer_error(
                "DP training needs len(train dataset) to account for privacy; the training dataset has none."
            )
        self.host.warn(
            "DP strategy with poisson_sampling=False: batches come from your own sampler, so the accountant's "
            "subsampling (amplification) assumption does not hold; ε is then an estimate."
        )
        self.sampler = None
        self.user_loader = (dataset_size, expected_batch_size_of(dataloader), len(dataloader))

    def sync(self, trainer: Any, world_size: int) -> None:
        """Write the current epoch's plan into the privacy state: the accounted rate (BandMF: ``b·q``), the
        expected batch size and the dataset size."""
        if self.sampler is not None:
            self.sampler._apply_plan()
            rate, dataset_size = self.sampler.sample_rate, self.sampler.num_samples
        else:
            dataset_size, batch_size, _ = self.user_loader
            rate = min(1.0, trainer.accumulate_grad_batches * world_size * batch_size / dataset_size)
        self.privacy.configure(sample_rate=self.privacy.accounted_rate(rate), dataset_size=dataset_size,
                               expected_batch_size=max(1, round(rate * dataset_size)))

    def units_of(self, batch: Any) -> Optional[torch.Tensor]:
        """User-level privacy: the users of ``batch``'s records (the sampler's batches are served in the order it
        drew them); ``None`` for record-level runs. Raises when the batch is not the one drawn."""
        sampler = self.sampler
        if sampler is None or sampler.users is None:
            return None
        if not sampler.batch_units:
            raise RuntimeError("User-level privacy: a training batch arrived that the user sampler did not draw.")
        units = sampler.batch_units.popleft()
        if not units_match(batch, units):
            raise RuntimeError(
                f"User-level privacy: the training batch holds a different number of records than the "
                f"{units.numel()} the user sampler drew for it; the loader must keep the sampler's batches as they are."
            )
        return units

    def check_batch(self, trainer: Any) -> None:
        """Refuse a batch whose accumulation differs from the one its Poisson draw was made for, or from the one
        σ was calibrated for (a change the plan could not foresee)."""
        sampler = self.sampler
        if sampler is not None and trainer.accumulate_grad_batches != sampler.micro_batches:
            raise self.host.trainer_error(
                f"Not available under DP: accumulate_grad_batches changed to {trainer.accumulate_grad_batches} "
                f"during epoch {trainer.current_epoch}, whose Poisson batches were drawn for "
                f"{sampler.micro_batches} micro-batches per optimizer step. Change it between epochs only, "
                "with GradientAccumulationScheduler (accounted exactly)."
            )
        planned = self.calibrated_accumulation.get(trainer.current_epoch) if self.calibrated_accumulation else None
        if planned is not None and planned != trainer.accumulate_grad_batches:
            raise self.host.trainer_error(
                f"Not available under DP: accumulate_grad_batches changed to {trainer.accumulate_grad_batches} in "
                f"epoch {trainer.current_epoch}, but σ was calibrated for target_epsilon={self.config.target_epsilon} "
                f"with {planned} there; more micro-batches per step would spend more than the target. Change "
                "it with GradientAccumulationScheduler (planned for), or give noise_multiplier instead."
            )

    def planned_epochs(self, trainer: Any, world_size: int) -> Iterator[Tuple[int, float, int]]:
        """``(epoch, rate, steps)`` of every epoch from the current one on, following the accumulation plan."""
        for epoch in itertools.count(trainer.current_epoch):
            k = accumulation_for_epoch(trainer, self.host, epoch)
            if self.sampler is not None:
                yield epoch, self.sampler.rate_for(k), self.sampler.draws_for(k)
            else:
                dataset_size, batch_size, length = self.user_loader
                yield epoch, min(1.0, k * world_size * batch_size / dataset_size), max(1, length // k)

    def calibrate(self, trainer: Any, world_size: int) -> float:
        """σ for ``target_epsilon`` over the planned rest of the run, composed with the history so far."""
        config, privacy = self.config, self.privacy
        plan = plan_steps(trainer, self.host, self.planned_epochs(trainer, world_size))
        if not plan:
            raise self.host.trainer_error(
                f"DP target_epsilon={config.target_epsilon}: the Trainer's limits leave no optimizer step to plan for."
            )
        first = trainer.current_epoch
        self.calibrated_accumulation = {
            epoch: accumulation_for_epoch(trainer, self.host, epoch) for epoch in range(first, first + len(plan) + 1)
        }
        if privacy.bands > 1:
            sigma = bandmf_sigma(plan, config, privacy, self.host)
        else:
            sigma = get_noise_multiplier_for_plan(
                config.target_epsilon, config.delta, plan, accountant=privacy.accountant,
                history=privacy.accountant.history,
            )
        steps = sum(n for _, n in plan)
        rates = sorted({q for q, _ in plan})
        shown = f"{rates[0]:.5f}" if len(rates) == 1 else f"{rates[0]:.5f}–{rates[-1]:.5f}"
        self.host.info(
            f"DP: noise_multiplier={sigma:.4f} calibrated for ε={config.target_epsilon} at δ={config.delta} over "
            f"{steps} steps (sample rate {shown})."
        )
        return sigma
