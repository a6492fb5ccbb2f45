"""The step side of DP training inside Lightning: the DP optimizer, empty and oversized batches,
per-sample clipping after every backward pass, and steps the precision plugin skips. No Lightning import.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..optimizer import DPOptimizer
from ..sampling import batch_size_of, is_empty_batch, split_batch


class StepsMixin:
    """Optimizer wrapping and the training step (part of the DP strategy)."""

    def setup_optimizers(self, trainer: Any) -> None:
        """Create the LightningModule's optimizer as usual and wrap it in a :class:`~lightning_dp.DPOptimizer`."""
        super().setup_optimizers(trainer)  # type: ignore[misc]
        if len(self.optimizers) != 1:
            raise self._host.trainer_error(
                f"DP training supports exactly one optimizer; configure_optimizers returned "
                f"{len(self.optimizers)}. Use one optimizer with parameter groups (different learning rates "
                "per group are fine): with several optimizers stepping on the same batch, each step is a "
                "separate release of that batch and the accounting would not be clear."
            )
        optimizer = self.optimizers[0]
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        config = self.config
        self.optimizers = [
            DPOptimizer(
                optimizer,
                noise_multiplier=self.noise_multiplier if self.noise_multiplier is not None else 0.0,
                max_grad_norm=self._starting_max_grad_norm(),
                expected_batch_size=self.expected_batch_size,
                noise=self._step_noise(),
                accountant=self.accountant,
                sample_rate=self.sample_rate,
                clipping_mode=config.clipping_mode,
                clipping=config.clipping,
                adaptive_clipping=config.adaptive_clipping,
                centering=self._input_centering,
                step_guard=self._step_allowed,
                **self._gradient_exchange(),
                non_finite="propagate" if self._grad_scaler() is not None else "drop",
            )
        ]

    def _gradient_exchange(self) -> Dict[str, Any]:
        """How the ranks' clipped sums become one gradient: the DPOptimizer's ``combine``/``noise_shares``
        (each rank noises its full clipped sum, :meth:`combine_clipped_sums` adds them up), or ``shards``
        for a sharded model (the FSDP strategy)."""
        # BandMF: rank 0 adds the whole correlated noise (one stream, one noise state), the others none
        return {"combine": self.combine_clipped_sums, "noise_shares": self.world_size if self.bands == 1 else 1}

    def combine_clipped_sums(self, tensors: List[torch.Tensor]) -> None:
        """Combine, in place, each rank's noised clipped sums into the step's gradient (one process:
        nothing to do). Multi-process strategies override this (DDP: ``all_reduce`` SUM)."""

    def _has_dp_optimizer(self) -> bool:
        optimizers = getattr(self, "optimizers", [])
        return bool(optimizers) and isinstance(optimizers[0], DPOptimizer)

    @property
    def dp_optimizer(self) -> DPOptimizer:
        """The wrapped optimizer (available after setup)."""
        optimizers = getattr(self, "optimizers", [])
        if not optimizers or not isinstance(optimizers[0], DPOptimizer):
            raise RuntimeError("The DP strategy has no DP optimizer yet: it is created when trainer.fit sets up.")
        return optimizers[0]

    def _grad_scaler(self) -> Optional[Any]:
        scaler = getattr(self.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss connected to every trainable parameter: backward gives zero gradients, no samples."""
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        return torch.stack([p.sum() * 0.0 for p in params]).sum()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the user's ``training_step``; skip the model on an empty Poisson batch (the optimizer still
        takes its noise-only step) and split batches above ``max_physical_batch_size``."""
        batch = args[0] if args else kwargs.get("batch")
        if self.config.poisson_sampling and is_empty_batch(batch):
            return self._zero_loss()
        limit = self.config.max_physical_batch_size
        if limit is None or batch_size_of(batch) <= limit:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        chunks = split_batch(batch, limit)
        for chunk in chunks[:-1]:
            output = self._call_training_step(chunk, args, kwargs)
            loss = output["loss"] if isinstance(output, dict) else output
            if loss is not None:
                # Lightning divides the returned loss by accumulate_grad_batches; do the same here.
                self.backward(loss / self.lightning_module.trainer.accumulate_grad_batches, self.dp_optimizer)
        return self._call_training_step(chunks[-1], args, kwargs)

    def _call_training_step(self, chunk: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if args:
            return super().training_step(chunk, *args[1:], **kwargs)  # type: ignore[misc]
        return super().training_step(*args, **{**kwargs, "batch": chunk})  # type: ignore[misc]

    def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Any:
        """Backward as usual, then clip this pass's per-sample gradients into the step's running sum.

        Per-sample gradients are first unscaled by the factors applied outside the model: Lightning's
        ``1 / accumulate_grad_batches`` and, with ``precision="16-mixed"``, the GradScaler's scale. The
        scaler's scale is read as the device tensor it is (``get_scale()`` would make the host wait for
        the device at every micro-batch): the per-sample scale is then a 0-dim tensor, made now (the
        scaler updates its own tensor in place after the step).
        """
        output = super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        dp_optimizer = self.dp_optimizer
        scale: Any = float(self.lightning_module.trainer.accumulate_grad_batches)
        scaler = self._grad_scaler()
        if scaler is not None:
            scaler_scale = getattr(scaler, "_get_scale_async", lambda: None)()
            if isinstance(scaler_scale, torch.Tensor):
                scale = scale / scaler_scale.to(torch.float64)  # a new tensor: in-place updates do not reach it
            else:
                scale /= float(scaler.get_scale())
        dp_optimizer.per_sample_grad_scale = scale
        dp_optimizer.accumulate_micro_batch()
        return output

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Check the accumulation the batch was drawn for, bring the step's rate up to the epoch's plan
        and reset the per-batch step counter (manual optimization may step once per batch)."""
        trainer = self.lightning_module.trainer
        sampler = self._sampler
        if sampler is not None and trainer.accumulate_grad_batches != sampler.micro_batches:
            raise self._host.trainer_error(
                f"Not available under DP: accumulate_grad_batches changed to {trainer.accumulate_grad_batches} "
                f"during epoch {trainer.current_epoch}, whose Poisson batches were drawn for "
                f"{sampler.micro_batches} micro-batches per optimizer step. Change it between epochs only, "
                "with GradientAccumulationScheduler (accounted exactly)."
            )
        self._check_calibrated_plan(trainer)
        self._sync_sampling_plan()
        self._steps_at_batch_start = self.dp_optimizer.steps_taken
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """The DP step; a step the precision plugin skips is still accounted (see below)."""
        dp_optimizer = self.dp_optimizer
        if not self.lightning_module.automatic_optimization:
            start = self._steps_at_batch_start
            if start is not None and dp_optimizer.steps_taken > start:
                raise RuntimeError(
                    "Manual optimization under DP may call optimizer.step() at most once per training batch: "
                    "a second step on the same batch releases it again with noise the accountant does not "
                    "model. Take one step per batch (use accumulate_grad_batches for larger batches)."
                )
        before = dp_optimizer.steps_taken
        refused_before = self._refused_steps
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        if dp_optimizer.steps_taken == before and self._refused_steps == refused_before:
            # GradScaler found inf/NaN and skipped optimizer.step(): no weight moves, but whether it
            # overflowed depends on the data, so the step still counts as privacy spent.
            dp_optimizer.reset_accumulation()
            dp_optimizer.record_step()
            self._host.warn("DP: the precision plugin skipped a step (inf/NaN gradients); it is still accounted.")
        return output
