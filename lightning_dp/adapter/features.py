"""Trainer features under DP: each one that changes what feeds an optimizer step is either accounted
exactly or refused here, before the first step, with an error naming the feature and what to do.

The decisions (the docs page "Lightning features under DP" has the same table with reasons):

==========================================  ===========================================================
feature                                     under DP
==========================================  ===========================================================
``accumulate_grad_batches=k``               accounted: one Poisson draw at rate ``k·B·W/N`` per step
``GradientAccumulationScheduler``           accounted: the draw's rate follows ``k`` of each epoch
``accumulate_grad_batches`` changed inside  refused at the first micro-batch after the change
an epoch
``accumulate_grad_batches`` changed between accounted (each epoch's draws at their rate); refused
epochs by another callback                  with ``target_epsilon`` (σ did not plan for it)
``reload_dataloaders_every_n_epochs``       accounted (rate recomputed per reload); refused with
                                            ``target_epsilon`` (future rates are unknown)
``limit_train_batches``                     accounted (fewer full draws per epoch); refused when the
                                            cut falls inside an accumulation window
``overfit_batches``                         refused (fixed batches are not Poisson sampling)
second ``fit`` on the same Trainer          accounted (the history continues); refused with
                                            ``target_epsilon`` (σ was planned for one run)
``target_epsilon`` without a finite length  refused (``max_steps=-1`` and no ``max_epochs``)
``target_epsilon`` with ``max_time``        accounted: σ planned for the step/epoch limit; ``max_time``
                                            can only stop earlier (ε below the target)
``Tuner.lr_find``/``scale_batch_size``      refused (they train on private data and choose by loss)
``val_check_interval``                      accounted (validation data are not private training data);
                                            refused when a check falls inside an accumulation window
``StochasticWeightAveraging``,              allowed: averaging DP iterates is post-processing
``WeightAveraging``
``gradient_clip_val``                       refused (per-sample clipping replaces it)
==========================================  ===========================================================
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Tuple

from . import lightning_internals
from .host import Host


def accumulation_scheduler(trainer: Any, host: Host) -> Optional[Any]:
    """The Trainer's ``GradientAccumulationScheduler`` callback, if any."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, host.accumulation_scheduler)), None)


def accumulation_for_epoch(trainer: Any, host: Host, epoch: int) -> int:
    """``accumulate_grad_batches`` of ``epoch``: the scheduler's value, else the Trainer's."""
    scheduler = accumulation_scheduler(trainer, host)
    if scheduler is not None:
        return int(scheduler.get_accumulate_grad_batches(epoch))
    return int(trainer.accumulate_grad_batches)


def planned_accumulations(trainer: Any, host: Host) -> List[int]:
    """Every accumulation factor the run will use (the scheduler's values, or the Trainer's one)."""
    scheduler = accumulation_scheduler(trainer, host)
    if scheduler is None:
        return [int(trainer.accumulate_grad_batches)]
    return sorted({int(k) for k in scheduler.scheduling.values()} | {accumulation_for_epoch(trainer, host, 0)})


def check_trainer(trainer: Any, host: Host, *, target_epsilon: Optional[float], fits_before: int) -> None:
    """Refuse, before any training work, every Trainer feature whose effect on privacy is not accounted."""
    refuse = _Refusals(host)
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        refuse(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips the batch gradient, which DP-SGD "
            "replaces by per-sample clipping. Remove gradient_clip_val and set max_grad_norm on the DP strategy."
        )
    if trainer.overfit_batches:
        refuse(
            f"Trainer(overfit_batches={trainer.overfit_batches}) trains on the same fixed batches every epoch; "
            "that is not Poisson sampling and the accountant cannot bound it. Debug without the DP strategy, "
            "or use limit_train_batches (Poisson-sampled, accounted)."
        )
    for callback in trainer.callbacks:
        if isinstance(callback, host.tuner_callbacks):
            refuse(
                f"{type(callback).__name__} (Tuner.lr_find / Tuner.scale_batch_size) runs training steps on the "
                "private data, chooses a setting by their loss and then rolls the model back, so neither those "
                "steps nor the choice would be counted in ε. Tune on public or held-out data without the DP "
                "strategy, then train privately with the chosen setting."
            )
    if target_epsilon is None:
        return
    if trainer.reload_dataloaders_every_n_epochs:
        refuse(
            f"DP target_epsilon={target_epsilon} with Trainer(reload_dataloaders_every_n_epochs="
            f"{trainer.reload_dataloaders_every_n_epochs}): σ is calibrated before step 1 for the planned sample "
            "rates, and reloaded loaders may change them. Give noise_multiplier instead (each reload is "
            "accounted at its own rate), with PrivacyBudgetCallback to stop at your budget."
        )
    if fits_before:
        refuse(
            f"A second Trainer.fit with DP target_epsilon={target_epsilon}: σ was calibrated so that the first "
            "fit spends the target, so more steps would exceed it. Use a new Trainer and DP strategy for a new "
            "run, or noise_multiplier with PrivacyBudgetCallback to continue under a budget."
        )
    max_epochs = trainer.max_epochs
    if (trainer.max_steps is None or trainer.max_steps < 0) and (max_epochs is None or max_epochs < 0):
        refuse(
            f"DP target_epsilon={target_epsilon} needs a finite training length to calibrate the noise "
            f"(got max_steps={trainer.max_steps}, max_epochs={max_epochs}): set Trainer(max_epochs=...) or "
            "Trainer(max_steps=...). max_time alone cannot be planned for; it may be added as an earlier stop."
        )


def check_windows(trainer: Any, host: Host, epoch_lengths: Sequence[Tuple[int, int]], cap: float) -> None:
    """Refuse limits and validation intervals that cut an accumulation window.

    ``epoch_lengths`` holds ``(k, micro-batches the sampler yields with k)`` for every planned ``k``;
    ``cap`` is the number of micro-batches per epoch Lightning will run (its ``limit_train_batches``
    applied to the loader's length). A window cut by the cap would release part of a Poisson draw
    (not the mechanism the accountant analyses); a validation (and the checkpoint it may save) inside a
    window would let a resumed run do the same.
    """
    refuse = _Refusals(host)
    for k, length in epoch_lengths:
        if k > 1 and cap < length and int(cap) % k:
            refuse(
                f"Trainer(limit_train_batches={trainer.limit_train_batches}) stops each epoch after {int(cap)} "
                f"micro-batches, inside an accumulation window of accumulate_grad_batches={k}: the last optimizer "
                "step would use part of a Poisson draw. Use an integer limit (the DP strategy then draws whole "
                f"windows only) or a fraction giving a multiple of {k} micro-batches."
            )
    ks = [k for k, _ in epoch_lengths if k > 1]
    if not ks or trainer.limit_val_batches == 0:
        return
    if lightning_internals.val_check_is_time_based(trainer):
        refuse(
            f"Time-based Trainer(val_check_interval={trainer.val_check_interval!r}) with accumulate_grad_batches="
            f"{max(ks)}: a validation (and a checkpoint it may save) can fall inside an accumulation window, and "
            "a run resumed from that checkpoint would step on part of a Poisson draw. Use an integer "
            "val_check_interval that is a multiple of accumulate_grad_batches."
        )
    interval = trainer.val_check_interval
    if isinstance(interval, float):
        if interval >= 1.0:
            return
        interval = max(1, int(cap * interval))
    for k in ks:
        if int(interval) % k:
            refuse(
                f"Trainer(val_check_interval={trainer.val_check_interval}) validates every {int(interval)} "
                f"micro-batches, inside an accumulation window of accumulate_grad_batches={k}: a checkpoint saved "
                "there would resume on part of a Poisson draw. Use a val_check_interval that is a multiple of "
                f"{k} (micro-batches)."
            )


def lightning_cap(length: int, limit: Any) -> float:
    """Micro-batches per epoch Lightning runs from a loader of ``length`` under ``limit_train_batches``
    (the rule of Lightning's ``_parse_num_batches``)."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(length, limit)
    if isinstance(limit, float):
        return length if limit == 1.0 else int(length * limit)
    return length


def plan_steps(
    trainer: Any, host: Host, steps_of: Iterable[Tuple[int, float, int]]
) -> List[Tuple[float, int]]:
    """The planned ``(sample_rate, steps)`` of the rest of the run, capped by ``max_steps``.

    ``steps_of`` yields ``(epoch, rate, steps)`` from the current epoch on, one per epoch up to
    ``max_epochs`` (or without end when only ``max_steps`` limits the run).
    """
    remaining = trainer.max_steps - trainer.global_step if trainer.max_steps is not None and trainer.max_steps >= 0 else None
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    plan: List[Tuple[float, int]] = []
    for epoch, rate, steps in steps_of:
        if max_epochs is not None and epoch >= max_epochs:
            break
        if remaining is not None:
            steps = min(steps, remaining)
            remaining -= steps
        if steps > 0:
            plan.append((rate, steps))
        if remaining is not None and remaining <= 0:
            break
        if max_epochs is None and steps == 0:
            break
    return plan


class _Refusals:
    """Raise the host's configuration error with ``message`` (one message style for every refusal)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def __call__(self, message: str) -> None:
        raise self.host.trainer_error(f"Not available under DP: {message}")
