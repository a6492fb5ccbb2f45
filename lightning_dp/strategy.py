"""DPStrategy: differentially private training as a Lightning ``Strategy``.

A thin adapter over the plain-PyTorch core: it decides *when* the core pieces run inside
``Trainer.fit`` — validation and hooks at setup, Poisson sampling when the training loader is
processed, the DP step inside the optimizer, privacy state in every checkpoint.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from ._checks import check_choice, check_non_negative, check_open_unit, check_positive
from .accounting import Accountant, get_noise_multiplier, make_accountant
from .engine import LOSS_REDUCTIONS, warn_if_no_noise
from .grad_sample import GradSampleHooks, attach_grad_sample_hooks
from .noise import GaussianNoise
from .optimizer import DPOptimizer
from .sampling import expected_batch_size_of, is_empty_batch, poisson_dataloader
from .validation import validate

_DEVICE = Union[torch.device, str, int]


class DPStrategy(SingleDeviceStrategy):
    """Train any LightningModule with DP-SGD on one device: ``Trainer(strategy=DPStrategy(...))``.

    At setup the model is validated (layers that cannot be private raise an error naming the module and
    the fix, before any step), per-sample-gradient hooks are attached to the LightningModule itself and
    its optimizer is wrapped in a :class:`~lightning_dp.DPOptimizer`. The training loader is replaced by
    one over the same dataset with Poisson sampling at rate ``q = batch_size / len(dataset)``. Every
    optimizer step clips each sample's gradient to ``max_grad_norm``, adds Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` and is recorded by the accountant. The LightningModule is not
    changed; after ``fit`` the hooks are removed.

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
        accountant: name of the privacy accountant (``"rdp"``).
        loss_reduction: ``"mean"`` (Lightning's usual) or ``"sum"`` — how ``training_step``'s loss
            combines samples.
        seed: seed for the noise and sampling generators (reproducible, not cryptographically secure).
        device: the device to train on (default: the Trainer's accelerator's first device).

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
        accountant: str = "rdp",
        loss_reduction: str = "mean",
        seed: Optional[int] = None,
        device: Optional[_DEVICE] = None,
        **kwargs: Any,
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
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_given = device is not None
        self.noise_multiplier: Optional[float] = noise_multiplier
        self.target_epsilon = target_epsilon
        self.poisson_sampling = poisson_sampling
        self.accountant: Accountant = make_accountant(accountant)
        self.seed = seed
        self.noise = GaussianNoise(seed)
        self._sampling_generator = torch.Generator()
        self._sampling_generator.manual_seed(self.noise.seed + 1)
        self.sample_rate: Optional[float] = None
        self.dataset_size: Optional[int] = None
        self.expected_batch_size: Optional[int] = None
        self._hooks: Optional[GradSampleHooks] = None
        self._budgets: List[Tuple[float, float]] = []
        if noise_multiplier is not None:
            warn_if_no_noise(noise_multiplier)

    # --- device selection: the Trainer's accelerator decides unless `device` was given --------------
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
                rank_zero_info(f"DPStrategy trains on one device; using {self._root_device}.")

    # --- setup ---------------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer") -> None:
        """Validate the model and Trainer settings, then set up as Lightning does and attach the hooks."""
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_trainer(trainer)
            validate(self.lightning_module, raise_error=True)
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._hooks = attach_grad_sample_hooks(self.lightning_module, loss_reduction=self.loss_reduction)

    def _check_trainer(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        if not module.automatic_optimization:
            raise MisconfigurationException(
                "DPStrategy supports automatic optimization only; your LightningModule sets "
                "automatic_optimization=False. Remove that (let Lightning call the optimizer)."
            )
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"DPStrategy does not support accumulate_grad_batches={trainer.accumulate_grad_batches} yet: "
                "per-sample clipping and noise are per optimizer step. Use accumulate_grad_batches=1 and a "
                "larger batch_size."
            )
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips the batch gradient, which "
                "DP-SGD replaces by per-sample clipping. Remove gradient_clip_val and set "
                "DPStrategy(max_grad_norm=...) instead."
            )

    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        """Create the LightningModule's optimizer as usual and wrap it in a :class:`DPOptimizer`."""
        super().setup_optimizers(trainer)
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"DPStrategy supports exactly one optimizer; configure_optimizers returned "
                f"{len(self.optimizers)}. Return a single optimizer (use parameter groups for different "
                "learning rates)."
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
        )
        dp_optimizer.step_guard = self._step_allowed
        self.optimizers = [dp_optimizer]

    @property
    def dp_optimizer(self) -> DPOptimizer:
        """The wrapped optimizer (available after setup)."""
        if not self.optimizers or not isinstance(self.optimizers[0], DPOptimizer):
            raise RuntimeError("DPStrategy has no DP optimizer yet: it is created when trainer.fit sets up.")
        return self.optimizers[0]

    # --- data ----------------------------------------------------------------------------------------
    def process_dataloader(self, dataloader: object) -> object:
        """Poisson-sample the training loader (other loaders are untouched) and configure the DP step."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise MisconfigurationException(
                f"DPStrategy needs the training data as a torch DataLoader, got {type(dataloader).__name__}."
            )
        try:
            dataset_size = len(dataloader.dataset)  # type: ignore[arg-type]
        except TypeError:
            dataset_size = 0
        if self.poisson_sampling:
            try:
                dataloader = poisson_dataloader(dataloader, generator=self._sampling_generator)
            except ValueError as err:
                raise MisconfigurationException(f"DPStrategy cannot serve the training loader: {err}") from err
            sample_rate = dataloader.batch_sampler.sample_rate  # type: ignore[union-attr]
            batch_size = round(sample_rate * dataset_size)
        else:
            if dataset_size == 0:
                raise MisconfigurationException(
                    "DPStrategy needs len(train dataset) to account for privacy; the training dataset has none."
                )
            rank_zero_warn(
                "DPStrategy(poisson_sampling=False): batches come from your own sampler, so the "
                "accountant's subsampling (amplification) assumption does not hold; ε is then an estimate."
            )
            batch_size = expected_batch_size_of(dataloader)
            sample_rate = min(1.0, batch_size / dataset_size)
        self.sample_rate = sample_rate
        self.dataset_size = dataset_size
        self.expected_batch_size = max(1, batch_size)
        if self.target_epsilon is not None and self.noise_multiplier is None:
            self.noise_multiplier = self._calibrate(trainer, len(dataloader))
        optimizer = self.dp_optimizer
        optimizer.sample_rate = self.sample_rate
        optimizer.expected_batch_size = self.expected_batch_size
        optimizer.noise_multiplier = self.noise_multiplier
        return dataloader

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
            f"DPStrategy: noise_multiplier={sigma:.4f} calibrated for ε={self.target_epsilon} at "
            f"δ={self.delta} over {steps} steps (sample rate {self.sample_rate:.5f})."
        )
        return sigma

    # --- steps ---------------------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Skip the model on an empty Poisson batch; the optimizer still takes its noise-only step."""
        batch = args[0] if args else kwargs.get("batch")
        if self.poisson_sampling and is_empty_batch(batch):
            return None
        return super().training_step(*args, **kwargs)

    def add_privacy_budget(self, epsilon: float, delta: float) -> None:
        """Refuse any optimizer step after which ε at ``delta`` would exceed ``epsilon`` (used by
        :class:`~lightning_dp.PrivacyBudgetCallback`, which normally stops training first)."""
        self._budgets.append((float(epsilon), float(delta)))

    def _step_allowed(self) -> bool:
        for epsilon, delta in self._budgets:
            if self.epsilon_after_next_step(delta) > epsilon:
                rank_zero_warn(
                    f"DPStrategy skipped an optimizer step: it would take ε over the budget {epsilon} "
                    f"(δ={delta}). Training should stop; check that min_epochs/min_steps do not force it on."
                )
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

    # --- checkpoints ---------------------------------------------------------------------------------
    def privacy_state_dict(self) -> Dict[str, Any]:
        """Accountant history, settings and — only in seeded (reproducible) mode — generator states.

        Generators seeded from the OS are never written: their state would let anyone holding the
        checkpoints regenerate and subtract the noise.
        """
        return {
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "sampler": self._sampling_generator.get_state() if self.noise.seeded else None,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
        }

    def load_privacy_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`privacy_state_dict` (the accountant's history is replaced by the checkpoint's)."""
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        if state.get("sampler") is not None and self.noise.seeded:
            self._sampling_generator.set_state(state["sampler"])

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Save the checkpoint with the privacy state under the key ``"lightning_dp"``."""
        checkpoint["lightning_dp"] = self.privacy_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Load a checkpoint and restore the privacy state saved in it."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        if "lightning_dp" in checkpoint:
            self.load_privacy_state_dict(checkpoint["lightning_dp"])
        else:
            rank_zero_warn(
                f"Checkpoint {checkpoint_path} has no privacy state: it was not written by DPStrategy, so "
                "privacy spent before it is unknown and not counted."
            )
        return checkpoint

    def teardown(self) -> None:
        """Remove the hooks: after ``fit`` the LightningModule is an ordinary module again."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        super().teardown()

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
