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

The groups, the stream and their checkpoint state belong to the run's
:class:`~lightning_dp.PrivacyState`; here are the Trainer-side checks and σ. No Lightning import.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from ..accounting.bandmf import bandmf_noise_multiplier
from ..config import DPConfig
from ..privacy_state import PrivacyState
from .features import plan_steps
from .host import Host


def checked_plan(trainer: Any, host: Host, data: Any, config: DPConfig, world_size: int) -> Optional[List[Tuple[float, int]]]:
    """BandMF's planned ``(rate, steps)`` after checking, before any training work, that the run has one
    rate and automatic optimization (``b·q ≤ 1`` is checked by
    :func:`~lightning_dp.accounting.bandmf.bandmf_sample_rate`); ``None`` without BandMF. ``data`` is the
    strategy's :class:`~lightning_dp.adapter.data.TrainingData`."""
    if config.bands == 1:
        return None
    plan = plan_steps(trainer, host, data.planned_epochs(trainer, world_size))
    rates = [q for q, _ in plan]
    if not trainer.lightning_module.automatic_optimization:
        raise host.trainer_error(
            f"bands={config.bands} needs automatic optimization: with manual optimization a training batch may go "
            "without an optimizer step, and the cyclic groups would no longer be b steps apart. Use automatic "
            "optimization, or bands=1."
        )
    if len(set(rates)) > 1:
        raise host.trainer_error(
            f"bands={config.bands}: BandMF's accounting covers one sampling rate for the whole run, and the "
            f"accumulation plan gives several ({sorted(set(rates))}). Keep accumulate_grad_batches fixed."
        )
    return plan


def bandmf_sigma(plan: List[Tuple[float, int]], config: DPConfig, privacy: PrivacyState, host: Host) -> float:
    """σ for ``target_epsilon`` with BandMF: calibrated for the planned steps, or on resuming the
    checkpoint's σ (one σ per run), checked against the target for the rest of the plan."""
    rate = plan[0][0]
    steps = sum(n for _, n in plan)
    accountant = privacy.accountant
    if accountant.total_steps == 0:
        return bandmf_noise_multiplier(config.target_epsilon, config.delta, rate, steps, config.bands,
                                       accountant=config.accountant)
    sigma = float(accountant.history[-1][0])
    after = accountant.get_epsilon(config.delta, additional_steps=steps, noise_multiplier=sigma,
                                   sample_rate=privacy.accounted_rate(rate))
    if after > config.target_epsilon:  # one σ per run: stop at the target instead of recalibrating
        privacy.add_budget(config.target_epsilon, config.delta)
        host.warn(
            f"DP bands={config.bands}: resuming at the checkpoint's σ = {sigma:.4g}; the {steps} planned steps would "
            f"spend ε = {after:.4g} > target_epsilon={config.target_epsilon}, so training stops before a step "
            "would exceed the target (BandMF keeps one σ for the whole run)."
        )
    return sigma
