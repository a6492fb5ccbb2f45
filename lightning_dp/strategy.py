"""DPStrategy: differentially private training as a Lightning ``Strategy``.

A thin adapter over the plain-PyTorch core: it decides *when* the core pieces run inside
``Trainer.fit`` — validation and hooks at setup, Poisson sampling when the training loader is
processed, per-sample clipping after every backward pass, the noisy step inside the optimizer,
privacy state in every checkpoint. The DP logic lives in :class:`DPStrategyMixin`, shared by the
single-device :class:`DPStrategy` and the multi-process :class:`~lightning_dp.DPDDPStrategy`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from .__about__ import __version__
from ._checks import check_choice, check_non_negative, check_open_unit, check_positive, check_positive_int
from .accounting import Accountant, get_noise_multiplier, make_accountant
from .engine import LOSS_REDUCTIONS, make_noise, warn_if_no_noise
from .grad_sample import GradSampleHooks, attach_grad_sample_hooks
from .grad_sample.fast import CLIPPING_MODES
from .noise import GaussianNoise
from .optimizer import DPOptimizer
from .report import PrivacyReport
from .sampling import batch_size_of, expected_batch_size_of, is_empty_batch, poisson_dataloader, split_batch
from .validation import validate

_DEVICE = Union[torch.device, str, int]


class DPStrategyMixin:
    """DP-SGD inside any Lightning strategy (documented on :class:`DPStrategy`).

    Subclasses call :meth:`_init_dp` in ``__init__``; :attr:`world_size` and :attr:`global_rank` come
    from the Lightning strategy they are mixed into.
    """

    def _init_dp(
        self,
        noise_multiplier: Optional[float],
        max_grad_norm: float,
        target_epsilon: Optional[float],
        delta: float,
        poisson_sampling: bool,
        accountant: str,
        loss_reduction: str,
        seed: Optional[int],
        max_physical_batch_size: Optional[int],
        secure_mode: bool = False,
        clipping_mode: str = "auto",
        clipping: str = "flat",
    ) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "Give exactly one of `noise_multiplier` and `target_epsilon` to DPStrategy (got "
                f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}): the noise "
                "multiplier is either set directly or calibrated to reach target_epsilon."
            )
        if noise_multiplier is not None:
            noise_multiplier = check_non_negative("noise_multiplier", noise_multiplier)
        if target_epsilon is not None:
            target_epsilon = check_positive("target_epsilon", target_epsilon)
        self.max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        self.delta = check_open_unit("delta", delta)
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        if not isinstance(poisson_sampling, bool):
            raise ValueError(f"`poisson_sampling` must be True or False, got {poisson_sampling!r}.")
        if max_physical_batch_size is not None:
            check_positive_int("max_physical_batch_size", max_physical_batch_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative integer or None, got {seed!r}.")
        self.noise_multiplier: Optional[float] = noise_multiplier
        self.target_epsilon = target_epsilon
        self.poisson_sampling = poisson_sampling
        self.max_physical_batch_size = max_physical_batch_size
        self.accountant: Accountant = make_accountant(accountant)
        self.seed = seed
        self.clipping_mode = check_choice("clipping_mode", clipping_mode, CLIPPING_MODES)
        self.clipping = check_choice("clipping", clipping, ("flat", "per_layer"))
        self.secure_mode = secure_mode
        self.noise = make_noise(secure_mode, seed)
        # Poisson inclusion decisions: the secure generator itself in secure mode.
        self._sampling_generator: Any = self.noise if secure_mode else torch.Generator()
        self.sample_rate: Optional[float] = None
        self.dataset_size: Optional[int] = None
        self.expected_batch_size: Optional[int] = None
        self._hooks: Optional[GradSampleHooks] = None
        self._budgets: List[Tuple[float, float]] = []
        self._settings_of_checkpoint: Optional[Dict[str, Any]] = None
        self._steps_at_batch_start: Optional[int] = None  # manual optimization: one step per batch
        self._refused_steps = 0  # steps the budget guard refused
        if noise_multiplier is not None:
            warn_if_no_noise(noise_multiplier)

    # --- setup ---------------------------------------------------------------------------------------
    def _seed_generators(self) -> None:
        """Per-rank generators: seeded runs reproduce, every rank draws different noise and samples."""
        if self.secure_mode:
            return  # keyed from the OS in each process
        rank = getattr(self, "global_rank", 0)
        if self.seed is not None and self.noise.seed != self.seed + 7919 * rank:
            self.noise = GaussianNoise(self.seed + 7919 * rank)
        self._sampling_generator.manual_seed(self.noise.seed + 1)

    def setup(self, trainer: "pl.Trainer") -> None:
        """Validate the model and Trainer settings, set up as Lightning does, wrap the optimizer and
        attach the per-sample-gradient hooks (to the LightningModule itself: no wrapper class)."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._check_trainer(trainer)
            validate(self.lightning_module, raise_error=True)
            self._seed_generators()
        super().setup(trainer)  # type: ignore[misc]
        if fitting:
            self._hooks = attach_grad_sample_hooks(self.lightning_module, loss_reduction=self.loss_reduction)
            self.dp_optimizer.reset_accumulation()

    def _check_trainer(self, trainer: "pl.Trainer") -> None:
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips the batch gradient, which "
                "DP-SGD replaces by per-sample clipping. Remove gradient_clip_val and set "
                "DPStrategy(max_grad_norm=...) instead."
            )

    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        """Create the LightningModule's optimizer as usual and wrap it in a :class:`DPOptimizer`."""
        super().setup_optimizers(trainer)  # type: ignore[misc]
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"DP training supports exactly one optimizer; configure_optimizers returned "
                f"{len(self.optimizers)}. Use one optimizer with parameter groups (different learning rates "
                "per group are fine): with several optimizers stepping on the same batch, each step is a "
                "separate release of that batch and the accounting would not be clear."
            )
        optimizer = self.optimizers[0]
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier if self.noise_multiplier is not None else 0.0,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            noise=self.noise,
            accountant=self.accountant,
            sample_rate=self.sample_rate,
            clipping_mode=self.clipping_mode,
            clipping=self.clipping,
        )
        dp_optimizer.world_size = getattr(self, "world_size", 1)
        dp_optimizer.step_guard = self._step_allowed
        self.optimizers = [dp_optimizer]

    @property
    def dp_optimizer(self) -> DPOptimizer:
        """The wrapped optimizer (available after setup)."""
        optimizers = getattr(self, "optimizers", [])
        if not optimizers or not isinstance(optimizers[0], DPOptimizer):
            raise RuntimeError("The DP strategy has no DP optimizer yet: it is created when trainer.fit sets up.")
        return optimizers[0]

    # --- data ----------------------------------------------------------------------------------------
    def process_dataloader(self, dataloader: object) -> object:
        """Poisson-sample the training loader (other loaders are untouched) and configure the DP step."""
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return super().process_dataloader(dataloader)  # type: ignore[misc]
        if not isinstance(dataloader, DataLoader):
            raise MisconfigurationException(
                f"DP training needs the training data as a torch DataLoader, got {type(dataloader).__name__}."
            )
        try:
            dataset_size = len(dataloader.dataset)  # type: ignore[arg-type]
        except TypeError:
            dataset_size = 0
        world_size = getattr(self, "world_size", 1)
        micro_batches = trainer.accumulate_grad_batches
        if self.poisson_sampling:
            try:
                dataloader = poisson_dataloader(
                    dataloader,
                    generator=self._sampling_generator,
                    micro_batches=micro_batches,
                    rank=getattr(self, "global_rank", 0),
                    world_size=world_size,
                )
            except ValueError as err:
                raise MisconfigurationException(f"The DP strategy cannot serve the training loader: {err}") from err
            sample_rate = dataloader.batch_sampler.sample_rate  # type: ignore[union-attr]
            logical_steps = len(dataloader) // micro_batches
        else:
            if dataset_size == 0:
                raise MisconfigurationException(
                    "DP training needs len(train dataset) to account for privacy; the training dataset has none."
                )
            rank_zero_warn(
                "DPStrategy(poisson_sampling=False): batches come from your own sampler, so the "
                "accountant's subsampling (amplification) assumption does not hold; ε is then an estimate."
            )
            sample_rate = min(1.0, micro_batches * world_size * expected_batch_size_of(dataloader) / dataset_size)
            logical_steps = max(1, len(dataloader) // micro_batches)
        self.sample_rate = sample_rate
        self.dataset_size = dataset_size
        self.expected_batch_size = max(1, round(sample_rate * dataset_size))
        self._check_resumed_settings()
        if self.target_epsilon is not None and self.noise_multiplier is None:
            self.noise_multiplier = self._calibrate(trainer, logical_steps)
        optimizer = self.dp_optimizer
        optimizer.sample_rate = self.sample_rate
        optimizer.expected_batch_size = self.expected_batch_size
        optimizer.noise_multiplier = self.noise_multiplier
        return super().process_dataloader(dataloader)  # type: ignore[misc]

    def _planned_steps(self, trainer: "pl.Trainer", steps_per_epoch: int) -> int:
        limits = []
        if trainer.max_steps is not None and trainer.max_steps > 0:
            limits.append(trainer.max_steps)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            limits.append(trainer.max_epochs * steps_per_epoch)
        if not limits:
            raise MisconfigurationException(
                "DPStrategy(target_epsilon=...) needs a finite training length to calibrate the noise: "
                "set Trainer(max_epochs=...) or Trainer(max_steps=...)."
            )
        return min(limits)

    def _calibrate(self, trainer: "pl.Trainer", steps_per_epoch: int) -> float:
        assert self.target_epsilon is not None and self.sample_rate is not None
        steps = self._planned_steps(trainer, steps_per_epoch) - self.accountant.total_steps
        sigma = get_noise_multiplier(
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            sample_rate=self.sample_rate,
            steps=max(1, steps),
            accountant=self.accountant.mechanism,
        )
        rank_zero_info(
            f"DP: noise_multiplier={sigma:.4f} calibrated for ε={self.target_epsilon} at "
            f"δ={self.delta} over {steps} steps (sample rate {self.sample_rate:.5f})."
        )
        return sigma

    # --- steps ---------------------------------------------------------------------------------------
    def _zero_loss(self) -> torch.Tensor:
        """A zero loss connected to every trainable parameter: backward gives zero gradients, no samples."""
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        return torch.stack([p.sum() * 0.0 for p in params]).sum()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the user's ``training_step``; skip the model on an empty Poisson batch (the optimizer still
        takes its noise-only step) and split batches above ``max_physical_batch_size``."""
        batch = args[0] if args else kwargs.get("batch")
        if self.poisson_sampling and is_empty_batch(batch):
            return self._zero_loss()
        limit = self.max_physical_batch_size
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
        ``1 / accumulate_grad_batches`` and, with ``precision="16-mixed"``, the GradScaler's scale.
        """
        output = super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        dp_optimizer = self.dp_optimizer
        scale = float(self.lightning_module.trainer.accumulate_grad_batches)
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale /= float(scaler.get_scale())
        dp_optimizer.per_sample_grad_scale = scale
        dp_optimizer.accumulate_micro_batch()
        return output

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reset the per-batch step counter (manual optimization may step once per batch)."""
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
            rank_zero_warn("DP: the precision plugin skipped a step (inf/NaN gradients); it is still accounted.")
        return output

    def add_privacy_budget(self, epsilon: float, delta: float) -> None:
        """Refuse any optimizer step after which ε at ``delta`` would exceed ``epsilon`` (used by
        :class:`~lightning_dp.PrivacyBudgetCallback`, which normally stops training first)."""
        self._budgets.append((float(epsilon), float(delta)))

    def _step_allowed(self) -> bool:
        for epsilon, delta in self._budgets:
            if self.epsilon_after_next_step(delta) > epsilon:
                rank_zero_warn(
                    f"DP: skipped an optimizer step that would take ε over the budget {epsilon} (δ={delta}). "
                    "Training should stop; check that min_epochs/min_steps do not force it on."
                )
                self._refused_steps += 1
                if self.lightning_module is not None:
                    self.lightning_module.trainer.should_stop = True
                return False
        return True

    # --- privacy spent -------------------------------------------------------------------------------
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """ε spent so far at ``delta`` (default: the strategy's ``delta``), from the accountant's history."""
        return self.accountant.get_epsilon(self.delta if delta is None else check_open_unit("delta", delta))

    def epsilon_after_next_step(self, delta: Optional[float] = None) -> float:
        """ε at ``delta`` if one more step with the current settings were taken (for stopping in time)."""
        if self.sample_rate is None or self.noise_multiplier is None:
            return self.get_epsilon(delta)
        return self.accountant.get_epsilon(
            self.delta if delta is None else delta,
            additional_steps=1,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
        )

    # --- the privacy report ---------------------------------------------------------------------------
    def privacy_report(self, delta: Optional[float] = None) -> PrivacyReport:
        """The record of how this model was trained privately (see :class:`~lightning_dp.PrivacyReport`)."""
        delta = self.delta if delta is None else check_open_unit("delta", delta)
        module = self.lightning_module
        trainer = module.trainer if module is not None and module._trainer is not None else None
        optimizer = self.optimizers[0] if getattr(self, "optimizers", None) else None
        clipping = (
            f"{getattr(optimizer, 'clipping', self.clipping)} "
            f"({getattr(optimizer, 'clipping_mode', self.clipping_mode)} norms)"
        )
        return PrivacyReport(
            epsilon=self.accountant.get_epsilon(delta),
            delta=delta,
            accountant=self.accountant.mechanism,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            clipping_mode=str(clipping),
            sampling="poisson" if self.poisson_sampling else "user sampler (not covered by the subsampling analysis)",
            sample_rate=self.sample_rate,
            expected_batch_size=self.expected_batch_size,
            steps=self.accountant.total_steps,
            epochs=trainer.current_epoch if trainer is not None else 0,
            dataset_size=self.dataset_size,
            secure_mode=self.secure_mode,
            world_size=getattr(self, "world_size", 1),
            target_epsilon=self.target_epsilon,
            versions={
                "lightning_dp": __version__,
                "torch": str(torch.__version__),
                "pytorch_lightning": str(pl.__version__),
            },
        )

    def on_train_start(self) -> None:
        """Log the DP settings as hyperparameters, so runs compare side by side in TensorBoard."""
        super().on_train_start()  # type: ignore[misc]
        trainer = self.lightning_module.trainer
        hparams = self.privacy_report().hparams()
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)

    def on_train_end(self) -> None:
        """Write ``privacy_report.json`` beside the logs, log the report, print it (rank zero)."""
        super().on_train_end()  # type: ignore[misc]
        trainer = self.lightning_module.trainer
        report = self.privacy_report()
        log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: log_dir broadcasts under DDP
        if not trainer.is_global_zero:
            return
        path = Path(log_dir) / "privacy_report.json"
        report.to_json(path)
        for logger in trainer.loggers:
            logger.log_hyperparams(report.hparams())
            logger.save()
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("privacy_report", report.to_markdown(), global_step=trainer.global_step)
        rank_zero_info(f"\n{report.to_table()}\nWritten to {path}")

    # --- checkpoints ---------------------------------------------------------------------------------
    def privacy_state_dict(self) -> Dict[str, Any]:
        """Accountant history, settings and — only in seeded (reproducible) mode — generator states.

        Generators seeded from the OS are never written: their state would let anyone holding the
        checkpoints regenerate and subtract the noise.
        """
        return {
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "sampler": self._sampling_generator.get_state() if self.noise.seeded and not self.secure_mode else None,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "report": self.privacy_report().to_dict(),
        }

    def load_privacy_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`privacy_state_dict`: the accountant's history becomes the checkpoint's (privacy
        spent before the checkpoint is never forgotten); a change of DP settings is warned about once the
        new settings are known."""
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        if state.get("sampler") is not None and self.noise.seeded and not self.secure_mode:
            self._sampling_generator.set_state(state["sampler"])
        self._settings_of_checkpoint = {k: state.get(k) for k in ("noise_multiplier", "max_grad_norm", "sample_rate")}

    def _check_resumed_settings(self) -> None:
        old = self._settings_of_checkpoint
        if not old:
            return
        new = {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
               "sample_rate": self.sample_rate}
        changed = {
            k: (old[k], new[k])
            for k in new
            if old[k] is not None and new[k] is not None and abs(float(old[k]) - float(new[k])) > 1e-12
        }
        if changed:
            listed = ", ".join(f"{k}: {a} → {b}" for k, (a, b) in changed.items())
            rank_zero_warn(
                f"Resuming with different DP settings ({listed}). Privacy spent before the checkpoint is kept "
                "as it was; new steps are accounted with the new settings."
            )
        self._settings_of_checkpoint = None

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Save the checkpoint with the privacy state under the key ``"lightning_dp"``."""
        checkpoint["lightning_dp"] = self.privacy_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Load a checkpoint and restore the privacy state saved in it."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        if "lightning_dp" in checkpoint:
            self.load_privacy_state_dict(checkpoint["lightning_dp"])
        else:
            rank_zero_warn(
                f"Checkpoint {checkpoint_path} has no privacy state: it was not written by a DP strategy, so "
                "privacy spent before it is unknown and not counted."
            )
        return checkpoint

    def teardown(self) -> None:
        """Remove the hooks: after ``fit`` the LightningModule is an ordinary module again."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        super().teardown()  # type: ignore[misc]


class DPStrategy(DPStrategyMixin, SingleDeviceStrategy):
    """Train any LightningModule with DP-SGD on one device: ``Trainer(strategy=DPStrategy(...))``.

    At setup the model is validated (layers that cannot be private raise an error naming the module and
    the fix, before any step), per-sample-gradient hooks are attached to the LightningModule itself and
    its optimizer is wrapped in a :class:`~lightning_dp.DPOptimizer`. The training loader is replaced by
    one over the same dataset with Poisson sampling at rate ``q = batch_size / len(dataset)``. After
    every backward pass each sample's gradient is clipped to ``max_grad_norm``; every optimizer step adds
    Gaussian noise of std ``noise_multiplier * max_grad_norm`` and is recorded by the accountant. The
    LightningModule is not changed; after ``fit`` the hooks are removed.

    Lightning features keep the guarantee: ``accumulate_grad_batches=k`` makes one Poisson draw at rate
    ``k·batch_size/N`` per optimizer step, split over the k micro-batches; ``max_physical_batch_size``
    splits large batches inside a step; ``precision="bf16-mixed"``/``"16-mixed"`` (loss scale undone
    before clipping; a step skipped for inf/NaN is still accounted); manual optimization with one
    optimizer step per batch; checkpoints carry the accountant's history.

    Also available as ``Trainer(strategy="dp_sgd")`` (``noise_multiplier=1.0, max_grad_norm=1.0``)
    once ``lightning_dp`` is imported.

    Args:
        noise_multiplier: σ ≥ 0, noise std relative to ``max_grad_norm``. Give this *or* ``target_epsilon``.
        max_grad_norm: per-sample clipping norm C > 0.
        target_epsilon: calibrate σ so that the whole run (the Trainer's ``max_steps`` or ``max_epochs``)
            spends at most this ε at ``delta``.
        delta: δ of the (ε, δ) guarantee, in (0, 1); used for calibration and as the default of
            :meth:`get_epsilon`. Choose δ well below ``1 / len(dataset)``.
        poisson_sampling: replace the training sampler with Poisson sampling (default). ``False`` keeps
            the user's loader; the accountant's subsampling analysis then does not strictly apply (warned).
        accountant: name of the privacy accountant: ``"prv"`` (default, tight PLD/PRV bound) or ``"rdp"``.
        loss_reduction: ``"mean"`` (Lightning's usual) or ``"sum"`` — how ``training_step``'s loss
            combines samples.
        seed: seed for the noise and sampling generators (reproducible, not cryptographically secure;
            refused with ``secure_mode=True``).
        secure_mode: draw all DP noise and every Poisson sampling decision from
            :class:`~lightning_dp.noise.SecureRNG` (ChaCha20 from vetted crypto, keyed from the OS; the key
            is never written to a checkpoint and a resumed run re-keys). ``False`` (default) is fast and
            reproducible under a seed, and warns once that the guarantee assumes a secure generator.
        max_physical_batch_size: process batches larger than this in chunks inside one optimizer step
            (bounded memory; the update is identical).
        clipping_mode: how per-sample norms and clipped sums are computed: ``"auto"`` (default; fast
            one-backward book-keeping, ghost or materialised norms per layer by cost), ``"ghost"`` or
            ``"materialize"``. The update is the same in every mode.
        clipping: ``"flat"`` (one norm per sample over all parameters, clipped to ``max_grad_norm``) or
            ``"per_layer"`` (each of the K parameter tensors clipped to ``max_grad_norm / √K``).
        device: the device to train on (default: the Trainer's accelerator's first device).
        **kwargs: passed to :class:`~pytorch_lightning.strategies.SingleDeviceStrategy`.

    Example::

        trainer = pl.Trainer(max_epochs=30, strategy=DPStrategy(noise_multiplier=1.1, max_grad_norm=1.0),
                             callbacks=[PrivacyBudgetCallback(epsilon_budget=3.0, delta=1e-5)])
        trainer.fit(model)
        trainer.strategy.get_epsilon(1e-5)
    """

    strategy_name = "dp_sgd"

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
        device: Optional[_DEVICE] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_given = device is not None
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

    @property
    def parallel_devices(self) -> List[torch.device]:
        """The single device in use (Lightning's connector fills it in from the accelerator)."""
        return [self._root_device] if self._device_given else []

    @parallel_devices.setter
    def parallel_devices(self, devices: List[_DEVICE]) -> None:
        if devices and not self._device_given:
            device = devices[0]
            self._root_device = device if isinstance(device, torch.device) else torch.device(device)
            if len(devices) > 1:
                rank_zero_info(f"DPStrategy trains on one device; using {self._root_device} (DPDDPStrategy: several).")

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"dp_sgd"`` with Lightning's strategy registry."""
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="DP-SGD on one device (lightning_dp): noise_multiplier=1.0, max_grad_norm=1.0",
            override=True,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


DPStrategy.register_strategies(StrategyRegistry)
