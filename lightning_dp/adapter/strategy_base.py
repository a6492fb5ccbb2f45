"""The typed base of every DP strategy: :func:`dp_strategy_base` derives it from a host strategy class
(``SingleDeviceStrategy``, ``DDPStrategy``, ``ModelParallelStrategy`` of either Lightning namespace).

Every Lightning hook it overrides is marked ``@override`` and delegates: the privacy state (accountant, σ,
q, C, noise, budgets, checkpoints) to its :class:`~lightning_dp.PrivacyState`, the training data to its
:class:`~lightning_dp.adapter.data.TrainingData`, the step to its :class:`~lightning_dp.DPOptimizer` (built
once, with the exchange :meth:`make_exchange` chooses). Host-specific classes
(:mod:`~lightning_dp.adapter.strategies`, :mod:`~lightning_dp.adapter.fsdp`) derive from it. No Lightning import.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from typing_extensions import override

from ..centering import check_centering_bands, check_centering_unit
from ..config import DPConfig
from ..exchange import GradientExchange, LocalExchange
from ..grad_sample import GradSampleHooks, attach_grad_sample_hooks
from ..optimizer import DPOptimizer
from ..privacy_state import CHECKPOINT_KEY, PrivacyState
from ..report import PrivacyReport
from ..sampling import is_empty_batch
from ..validation import validate
from . import bandmf, reporting
from .data import TrainingData
from .features import check_trainer, plan_steps
from .host import Host
from .recipe_training import RecipeTraining
from ..user_sampling import user_chunks
from .steps import grad_scaler, loss_of, per_sample_scale, physical_chunks, zero_loss


# Long on purpose: the class body is this function's body (the base derives from the host class of whichever
# Lightning namespace binds it; both may be installed, and mixins are not used). Each method in it is short.
def dp_strategy_base(host_base: type, host: Host) -> type:
    """The DP strategy base derived from ``host_base`` (a Lightning strategy class of ``host``'s namespace)."""

    class DPStrategyBase(host_base):  # type: ignore[misc, valid-type]
        """DP-SGD inside a Lightning strategy (see :class:`~lightning_dp.DPStrategy` for the arguments).

        Attributes:
            config: the validated :class:`~lightning_dp.DPConfig`.
            privacy: the run's :class:`~lightning_dp.PrivacyState` (the one record of privacy spent).
            data: the training data under DP (Poisson sampling, per-epoch plan, calibration of σ).
        """

        _host = host
        strategy_name = ""
        registry_description = ""

        def _init_dp(self, config: DPConfig, centering: Optional[Mapping[Any, Any]] = None, user_ids: Any = None) -> None:
            check_centering_bands(centering, config.bands)
            check_centering_unit(centering, config.privacy_unit)
            if centering is not None and not isinstance(centering, Mapping):
                raise ValueError(
                    f"`centering` must be a dict {{layer or its name: centre}}, got {type(centering).__name__}."
                )
            self.config = config
            self.privacy = PrivacyState.from_config(config, warn=host.warn, user_ids=user_ids)
            self._batch_units: Optional[torch.Tensor] = None  # user-level: each record's user in the batch
            self._units_now: Optional[torch.Tensor] = None  # ... and in the micro-batch now backpropagated
            self.data = TrainingData(config, self.privacy, host)
            self._centering_spec: Optional[Dict[Any, Any]] = dict(centering) if centering else None
            self._hooks: Optional[GradSampleHooks] = None
            self._steps_at_batch_start: Optional[int] = None  # manual optimization: one step per batch
            self._fits_started = 0
            self.recipe_training = RecipeTraining(config.recipe, host) if config.recipe is not None else None

        # --- set-up and tear-down -------------------------------------------------------------------------
        @override
        def setup(self, trainer: Any) -> None:
            """Refuse unaccounted Trainer features, validate the model, set up as Lightning does (the optimizer
            is wrapped then) and attach the per-sample-gradient hooks to the LightningModule itself."""
            fitting = trainer.state.fn == "fit"
            if fitting:
                check_trainer(trainer, host, target_epsilon=self.config.target_epsilon, fits_before=self._fits_started)
                validate(self.lightning_module, raise_error=True)
                self.privacy.seed_for_rank(self.global_rank, self.world_size)
                self._fits_started += 1
            super().setup(trainer)
            if fitting:
                self._hooks = attach_grad_sample_hooks(self.lightning_module, loss_reduction=self.config.loss_reduction)
                self.dp_optimizer.reset_accumulation()

        @override
        def teardown(self) -> None:
            """Remove the hooks and the centring: after ``fit`` the LightningModule is an ordinary module again."""
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None
            if self.privacy.centering is not None:
                self.privacy.centering.detach()
            super().teardown()

        @override
        def setup_optimizers(self, trainer: Any) -> None:
            """Create the LightningModule's optimizer as usual and wrap it in a :class:`~lightning_dp.DPOptimizer`
            on this run's privacy state, with the exchange of this host."""
            super().setup_optimizers(trainer)
            if len(self.optimizers) != 1:
                raise host.trainer_error(
                    f"DP training supports exactly one optimizer; configure_optimizers returned "
                    f"{len(self.optimizers)}. Use one optimizer with parameter groups (different learning rates "
                    "per group are fine): with several optimizers stepping on the same batch, each step is a "
                    "separate release of that batch and the accounting would not be clear."
                )
            optimizer = self.optimizers[0]
            if isinstance(optimizer, DPOptimizer):
                optimizer = optimizer.original_optimizer
            if self.recipe_training is not None:
                optimizer = self.recipe_training.optimizer(optimizer, self.lr_scheduler_configs)
            config = self.config
            self.optimizers = [DPOptimizer(
                optimizer, privacy=self.privacy, exchange=self.make_exchange(), clipping_mode=config.clipping_mode,
                clipping=config.clipping, adaptive_clipping=config.adaptive_clipping,
                non_finite="propagate" if grad_scaler(self.precision_plugin) is not None else "drop",
            )]

        def make_exchange(self) -> GradientExchange:
            """How this host's ranks combine their clipped sums (one device: nothing crosses processes)."""
            return LocalExchange()

        @override
        def process_dataloader(self, dataloader: object) -> object:
            """Poisson-sample the training loader (other loaders are untouched) and settle the plan before step 1:
            the sampling rate, released centres (before σ is calibrated: they spend part of the budget), σ."""
            module = self.lightning_module
            trainer = module.trainer if module is not None else None
            if trainer is None or trainer.state.stage != "train":
                return super().process_dataloader(dataloader)
            dataloader = self.data.prepare(trainer, dataloader, self.global_rank, self.world_size)
            changed = self.privacy.changed_settings()
            if changed:
                listed = ", ".join(f"{k}: {a} → {b}" for k, (a, b) in changed.items())
                host.warn(
                    f"Resuming with different DP settings ({listed}). Privacy spent before the checkpoint is kept "
                    "as it was; new steps are accounted with the new settings."
                )
            if self._centering_spec is not None:
                self.privacy.centre(self.lightning_module, self._centering_spec)
            bandmf_plan = bandmf.checked_plan(trainer, host, self.data, self.config, self.world_size)
            if self.config.target_epsilon is not None and self.privacy.noise_multiplier is None:
                self.privacy.configure(noise_multiplier=self.data.calibrate(trainer, self.world_size))
            if bandmf_plan is not None:
                self.privacy.install_correlated_noise(sum(n for _, n in bandmf_plan))
            return super().process_dataloader(dataloader)

        # --- the step ------------------------------------------------------------------------------------------
        @override
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            """Run the user's ``training_step``; skip the model on an empty Poisson batch (the optimizer still takes
            its noise-only step) and split batches above ``max_physical_batch_size``."""
            batch = args[0] if args else kwargs.get("batch")
            if self.config.poisson_sampling and is_empty_batch(batch):
                return zero_loss(self.lightning_module)
            limit = self.config.max_physical_batch_size
            if self._batch_units is not None:  # user-level: split at user boundaries only
                pairs = user_chunks(batch, self._batch_units, limit)
                return self._run_chunks([c for c, _ in pairs], args, kwargs, [u for _, u in pairs])
            return self._run_chunks(physical_chunks(batch, limit), args, kwargs)

        def _run_chunks(self, chunks: List[Any], args: Tuple[Any, ...], kwargs: Dict[str, Any],
                        units: Optional[List[torch.Tensor]] = None) -> Any:
            """``training_step`` on each chunk; every chunk but the last is backpropagated here (divided by
            ``accumulate_grad_batches`` as Lightning divides the returned loss), the last one's output returned.
            ``units``: user-level, each chunk's records' users (read by :meth:`backward`)."""
            accumulation = self.lightning_module.trainer.accumulate_grad_batches
            for i, chunk in enumerate(chunks[:-1]):
                self._units_now = units[i] if units is not None else None
                loss = loss_of(self._training_step_on(chunk, args, kwargs))
                if loss is not None:
                    self.backward(loss / accumulation, self.dp_optimizer)
            self._units_now = units[-1] if units is not None else None
            return self._training_step_on(chunks[-1], args, kwargs)

        def _training_step_on(self, chunk: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            if args:
                return super().training_step(chunk, *args[1:], **kwargs)
            return super().training_step(*args, **{**kwargs, "batch": chunk})

        @override
        def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Any:
            """Backward as usual, then clip this pass's per-sample gradients into the step's running sum, unscaled
            by Lightning's ``1 / accumulate_grad_batches`` and a GradScaler's scale (read without a host sync)."""
            output = super().backward(closure_loss, optimizer, *args, **kwargs)
            self._after_backward()
            trainer = self.lightning_module.trainer
            scale = per_sample_scale(trainer.accumulate_grad_batches, grad_scaler(self.precision_plugin))
            self.dp_optimizer.accumulate_micro_batch(scale=scale, units=self._units_now)
            return output

        def _after_backward(self) -> None:
            """What a host does between the backward pass and clipping (nothing here; FSDP collects)."""

        @override
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            """Check the accumulation the batch was drawn for, bring the step's rate up to the epoch's plan and
            note the step count (manual optimization may step once per batch)."""
            trainer = self.lightning_module.trainer
            self.data.check_batch(trainer)
            self.data.sync(trainer, self.world_size)
            self._batch_units = self._units_now = self.data.units_of(batch)
            self._steps_at_batch_start = self.privacy.steps_taken
            super().on_train_batch_start(batch, batch_idx)

        @override
        def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
            """The DP step. A step over the budget is refused by the privacy state (training stops); a step the
            precision plugin skips is still accounted (whether it overflowed depends on the data)."""
            privacy = self.privacy
            if not self.lightning_module.automatic_optimization:
                start = self._steps_at_batch_start
                if start is not None and privacy.steps_taken > start:
                    raise RuntimeError(
                        "Manual optimization under DP may call optimizer.step() at most once per training batch: "
                        "a second step on the same batch releases it again with noise the accountant does not "
                        "model. Take one step per batch (use accumulate_grad_batches for larger batches)."
                    )
            before, refused_before = privacy.steps_taken, privacy.refused_steps
            recipe = self.recipe_training
            if recipe is not None:
                recipe.set_learning_rate(self.dp_optimizer, privacy.noise_multiplier,
                                         self.lightning_module.trainer.global_step)
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
            if recipe is not None:
                recipe.after_step()
            if privacy.refused_steps > refused_before:
                self.lightning_module.trainer.should_stop = True
            elif privacy.steps_taken == before:  # GradScaler found inf/NaN and skipped optimizer.step()
                self.dp_optimizer.reset_accumulation()
                privacy.record_step()
                host.warn("DP: the precision plugin skipped a step (inf/NaN gradients); it is still accounted.")
            return output

        # --- report and checkpoints ---------------------------------------------------------------------------
        def privacy_report(self, delta: Optional[float] = None) -> PrivacyReport:
            """The record of how this model was trained privately (see :class:`~lightning_dp.PrivacyReport`)."""
            return reporting.build_report(self, delta)

        def secure_aggregation_summary(self) -> Optional[Dict[str, Any]]:
            """The secure-aggregation mechanism for the report (``None``; the DDP strategy may have one)."""
            return None

        @override
        def on_train_start(self) -> None:
            """Log the DP settings as hyperparameters, so runs compare side by side in TensorBoard."""
            super().on_train_start()
            trainer = self.lightning_module.trainer
            if self.recipe_training is not None:
                self.recipe_training.check_limits(trainer.max_epochs, trainer.max_steps)
                plan = plan_steps(trainer, host, self.data.planned_epochs(trainer, self.world_size))
                self.recipe_training.start(self.lightning_module, trainer.global_step, sum(n for _, n in plan))
            reporting.log_hyperparameters(trainer, self.privacy_report())

        @override
        def on_validation_start(self) -> None:
            """With a recipe, validation during ``fit`` sees the weights' average (the model it would release)."""
            super().on_validation_start()
            if self.recipe_training is not None and self.lightning_module.trainer.state.fn == "fit":
                self.recipe_training.swap_in(self.lightning_module)

        @override
        def on_validation_end(self) -> None:
            """Put the trained weights back after validation (training goes on from them)."""
            super().on_validation_end()
            if self.recipe_training is not None:
                self.recipe_training.swap_out()

        @override
        def on_train_end(self) -> None:
            """With a recipe, release the average as the model; write ``privacy_report.json`` beside the logs, log
            the report, print it (rank zero)."""
            if self.recipe_training is not None:
                self.recipe_training.release(self.lightning_module)
            super().on_train_end()
            reporting.write_report(self.lightning_module.trainer, self.privacy_report(), host)

        def privacy_state_dict(self) -> Dict[str, Any]:
            """The privacy state checkpoints keep (:meth:`lightning_dp.PrivacyState.state_dict`, report included)."""
            return self.privacy.state_dict(report=self.privacy_report().to_dict())

        def load_privacy_state_dict(self, state: Dict[str, Any]) -> None:
            """Restore :meth:`privacy_state_dict` (a resumed run never forgets the privacy spent before it)."""
            self.privacy.seed_for_rank(self.global_rank, self.world_size)
            try:
                self.privacy.load_state_dict(state)
            except ValueError as err:
                raise host.trainer_error(str(err)) from err

        @override
        def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
            """Save the checkpoint with the privacy state under the key ``"lightning_dp"`` (every rank calls this;
            in seeded multi-process runs every rank's generator states go in)."""
            checkpoint[CHECKPOINT_KEY] = self.privacy_state_dict()
            if self.recipe_training is not None:
                self.recipe_training.fill_checkpoint(checkpoint)
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

        @override
        def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
            """Load a checkpoint and restore the privacy state saved in it."""
            checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
            if CHECKPOINT_KEY in checkpoint:
                self.load_privacy_state_dict(checkpoint[CHECKPOINT_KEY])
            else:
                host.warn(
                    f"Checkpoint {checkpoint_path} has no privacy state: it was not written by a DP strategy, so "
                    "privacy spent before it is unknown and not counted."
                )
            if self.recipe_training is not None:
                self.recipe_training.load_checkpoint(checkpoint)
            return checkpoint

        @classmethod
        @override
        def register_strategies(cls, strategy_registry: Any) -> None:
            """Register :attr:`strategy_name` with the namespace's strategy registry (σ = 1, C = 1)."""
            strategy_registry.register(
                cls.strategy_name, cls, description=cls.registry_description, override=True,
                noise_multiplier=1.0, max_grad_norm=1.0,
            )

        # --- views of the privacy state (read where they live) -------------------------------------------------
        def get_epsilon(self, delta: Optional[float] = None) -> float:
            """ε spent so far at ``delta`` (default: the strategy's ``delta``), from the accountant's history."""
            return self.privacy.get_epsilon(delta)

        def epsilon_after_next_step(self, delta: Optional[float] = None) -> float:
            """ε at ``delta`` if one more step with the current settings were taken (for stopping in time)."""
            return self.privacy.epsilon_after_next_step(delta)

        def add_privacy_budget(self, epsilon: float, delta: float) -> None:
            """Refuse any optimizer step after which ε at ``delta`` would exceed ``epsilon`` (used by
            :class:`~lightning_dp.PrivacyBudgetCallback`, which normally stops training first)."""
            self.privacy.add_budget(epsilon, delta)

        @property
        def dp_optimizer(self) -> DPOptimizer:
            """The wrapped optimizer (available after setup)."""
            optimizers = getattr(self, "optimizers", [])
            if not optimizers or not isinstance(optimizers[0], DPOptimizer):
                raise RuntimeError("The DP strategy has no DP optimizer yet: it is created when trainer.fit sets up.")
            return optimizers[0]

        accountant = property(lambda self: self.privacy.accountant, doc="The accountant: the record of privacy spent.")
        noise = property(lambda self: self.privacy.noise, doc="The run's noise source (seeded or secure).")
        noise_multiplier = property(lambda self: self.privacy.noise_multiplier, doc="σ (``None`` until calibrated).")
        sample_rate = property(lambda self: self.privacy.sample_rate, doc="The rate the accountant records.")
        expected_batch_size = property(lambda self: self.privacy.expected_batch_size, doc="``q·N`` of the step.")
        dataset_size = property(lambda self: self.privacy.dataset_size, doc="N, the training set's size.")
        max_grad_norm = property(lambda self: self.config.max_grad_norm, doc="Per-sample clipping norm C.")
        delta = property(lambda self: self.config.delta, doc="δ of the guarantee (default of :meth:`get_epsilon`).")
        target_epsilon = property(lambda self: self.config.target_epsilon, doc="The ε σ is calibrated for, if any.")
        bands = property(lambda self: self.config.bands, doc="``b``: 1 for DP-SGD, more for BandMF.")
        max_physical_batch_size = property(lambda self: self.config.max_physical_batch_size,
                                           doc="Batches above this size are processed in chunks inside one step.")
        dropped_samples = property(lambda self: self.privacy.dropped_samples,
                                   doc="Samples dropped for a non-finite gradient, checkpoints before included.")
        dropped_samples_count = property(lambda self: self.privacy.dropped_count,
                                         doc=":attr:`dropped_samples` without a host sync (an int or a device tensor).")
        _bandmf_labels = property(lambda self: self.privacy.bandmf_labels, doc="Each example's BandMF group.")

        def _centering_state(self) -> Optional[Dict[str, List[float]]]:
            """The released centres by layer name (``None`` without centring)."""
            return self.privacy.released_centres

    return DPStrategyBase

