"""BandMF correlated noise inside the DP strategies (``bands > 1``; see :mod:`lightning_dp.correlated`).

What make_private does by hand, the strategy does for the whole run:

* **Sampling.** The dataset is split once into ``b`` groups (each example's group drawn independently by
  rank 0 and shared with every rank, kept in checkpoints); optimizer step ``t`` Poisson-samples group ``t mod
  b`` at ``p = b·q``, ``t`` counted from the accountant's steps (noise-only steps included), so every example
  takes part at most once every ``b`` optimizer steps whatever the loader prefetches, however epochs, fits and
  resumes fall.
* **Noise.** Rank 0 adds the whole correlated noise ``σC·C^{-1}z`` (its ``b − 1`` past noise buffers are the
  run's noise state, saved in checkpoints: keep them as private as the data); other ranks add none. The
  strategy's coefficients are optimised for the planned number of steps, or taken from the checkpoint.
* **Accounting.** :class:`~lightning_dp.accounting.bandmf.BandMFAccountant`: ``ceil(T/b)`` rounds at ``(σ, p)``.
  One σ and one rate for the whole run: an accumulation schedule that changes the rate is refused, and a
  resumed run keeps the checkpoint's σ.

No Lightning import.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..accounting.bandmf import BandMFAccountant, bandmf_noise_multiplier, bandmf_sample_rate
from ..correlated import CorrelatedNoise, banded_toeplitz_coefficients, draw_partition
from .features import plan_steps


class _NoNoise:
    """The noise source of ranks other than 0 under BandMF: rank 0 adds the whole correlated noise."""

    seeded = False

    def add_normal_(self, tensors: List[torch.Tensor], std: float) -> None:
        """Add nothing."""

    def state_dict(self) -> Dict[str, Any]:
        return {}


class BandMFMixin:
    """Cyclic Poisson groups, correlated noise and BandMF accounting (part of the DP strategy)."""

    def _init_bandmf(self) -> None:
        self._bandmf_labels: Optional[torch.Tensor] = None  # each example's group (the same on every rank)
        self._correlated_noise: Optional[CorrelatedNoise] = None
        self._correlated_state_of_checkpoint: Optional[Dict[str, Any]] = None
        if self.config.bands > 1:
            self.accountant = BandMFAccountant(self.config.accountant, self.config.bands)

    @property
    def bands(self) -> int:
        """``b``: 1 for DP-SGD, more for BandMF."""
        return self.config.bands

    def _accounted_rate(self, rate: float) -> float:
        """The rate the accountant records for a step at overall rate ``q``: ``q``, or ``b·q`` with BandMF."""
        return bandmf_sample_rate(rate, self.bands) if self.bands > 1 else rate

    def _partition(self, num_samples: int) -> Optional[torch.Tensor]:
        """Each example's group (``None`` without BandMF): drawn once by rank 0, shared with all ranks."""
        if self.bands == 1:
            return None
        labels = self._bandmf_labels
        if labels is not None and labels.numel() != num_samples:
            raise self._host.trainer_error(
                f"bands={self.bands}: the run's groups were drawn for {labels.numel()} examples, the training set "
                f"now has {num_samples}. BandMF needs the same dataset for the whole run (and its checkpoints)."
            )
        if labels is None:
            shared: List[Any] = [None]
            if self.global_rank == 0:
                shared[0] = draw_partition(self._sampling_generator, num_samples, self.bands)
            if self.world_size > 1 and dist.is_available() and dist.is_initialized():
                dist.broadcast_object_list(shared, src=0)
            labels = self._bandmf_labels = shared[0]
        return labels

    def _checked_bandmf_plan(self, trainer: Any) -> Optional[List[Any]]:
        """BandMF's planned ``(rate, steps)`` after checking, before any training work, that the run has one
        rate and automatic optimization (``b·q ≤ 1`` is checked by
        :func:`~lightning_dp.accounting.bandmf.bandmf_sample_rate`); ``None`` without BandMF."""
        if self.bands == 1:
            return None
        plan = plan_steps(trainer, self._host, self._planned_epochs(trainer))
        rates = [q for q, _ in plan]
        if not self.lightning_module.automatic_optimization:
            raise self._host.trainer_error(
                f"bands={self.bands} needs automatic optimization: with manual optimization a training batch may go "
                "without an optimizer step, and the cyclic groups would no longer be b steps apart. Use automatic "
                "optimization, or bands=1."
            )
        if len(set(rates)) > 1:
            raise self._host.trainer_error(
                f"bands={self.bands}: BandMF's accounting covers one sampling rate for the whole run, and the "
                f"accumulation plan gives several ({sorted(set(rates))}). Keep accumulate_grad_batches fixed."
            )
        return plan

    def _bandmf_sigma(self, plan: List[Any]) -> float:
        """σ for ``target_epsilon`` with BandMF: calibrated for the planned steps, or on resuming the
        checkpoint's σ (one σ per run), checked against the target for the rest of the plan."""
        config = self.config
        rate = plan[0][0]
        steps = sum(n for _, n in plan)
        if self.accountant.total_steps == 0:
            return bandmf_noise_multiplier(config.target_epsilon, config.delta, rate, steps, self.bands,
                                           accountant=config.accountant)
        sigma = float(self.accountant.history[-1][0])
        after = self.accountant.get_epsilon(config.delta, additional_steps=steps, noise_multiplier=sigma,
                                            sample_rate=self._accounted_rate(rate))
        if after > config.target_epsilon:  # one σ per run: stop at the target instead of recalibrating
            self.add_privacy_budget(config.target_epsilon, config.delta)
            self._host.warn(
                f"DP bands={self.bands}: resuming at the checkpoint's σ = {sigma:.4g}; the {steps} planned steps would "
                f"spend ε = {after:.4g} > target_epsilon={config.target_epsilon}, so training stops before a step "
                "would exceed the target (BandMF keeps one σ for the whole run)."
            )
        return sigma

    def _step_noise(self) -> Any:
        """The DP optimizer's noise source: the strategy's (DP-SGD), the correlated stream (BandMF, rank 0),
        or no noise (BandMF, other ranks)."""
        if self.bands == 1:
            return self.noise
        if self.global_rank != 0:
            return _NoNoise()
        if self._correlated_noise is None:
            return self.noise  # until the plan is known (process_dataloader installs the stream before step 1)
        return self._correlated_noise

    def _install_correlated_noise(self, planned_steps: int) -> None:
        """Build rank 0's correlated stream (coefficients for the planned steps, or the checkpoint's stream)
        and hand it to the DP optimizer; before the first step."""
        if self.bands == 1 or self.global_rank != 0 or self._correlated_noise is not None:
            return
        resumed = self._correlated_state_of_checkpoint
        if resumed is not None:
            stream = CorrelatedNoise(self.noise, resumed["coefficients"])
            stream.load_state_dict(resumed)
        else:
            coefficients = banded_toeplitz_coefficients(max(planned_steps, self.bands), self.bands)
            stream = CorrelatedNoise(self.noise, coefficients)
        self._correlated_noise = stream
        if self._has_dp_optimizer():
            self.dp_optimizer.noise = stream

    def _bandmf_state(self) -> Optional[Dict[str, Any]]:
        """For checkpoints: the groups and rank 0's correlated noise state (past noise: as private as the data)."""
        if self.bands == 1:
            return None
        stream = self._correlated_noise
        return {
            "labels": None if self._bandmf_labels is None else self._bandmf_labels.clone(),
            "noise": None if stream is None else stream.state_dict(),
        }

    def _load_bandmf_state(self, state: Optional[Dict[str, Any]]) -> None:
        if self.bands == 1:
            return
        if state is None:
            raise self._host.trainer_error(
                f"bands={self.bands}: the checkpoint holds no BandMF state (groups, correlated noise); it was written "
                "by a run without BandMF. Resume with that run's settings, or start a new run."
            )
        if state.get("labels") is not None:
            self._bandmf_labels = torch.as_tensor(state["labels"], dtype=torch.long)
        self._correlated_state_of_checkpoint = state.get("noise") if self.global_rank == 0 else None
