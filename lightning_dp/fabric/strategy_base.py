"""The typed base of the Fabric DP strategies: :func:`fabric_dp_base` derives it from a Fabric strategy class
(``SingleDeviceStrategy``, ``DDPStrategy``). The user's loop stays a Fabric loop; the strategy's hooks
(``@override`` each) delegate to the run's :class:`~lightning_dp.PrivacyState` — the same class the Trainer
strategies and :func:`~lightning_dp.make_private` use — and to a :class:`~lightning_dp.DPOptimizer`.

* ``setup_module``: validates the model and attaches the per-sample-gradient hooks (once per model);
* ``setup_optimizer``: wraps the optimizer in a ``DPOptimizer`` on the privacy state and the host's exchange;
* ``process_dataloader``: Poisson sampling at ``q = k·W·B/N`` (``k`` micro-batches per step), σ calibrated for
  ``target_epsilon`` over ``max_steps``; a loader marked with :func:`evaluation_loader` is left as it is;
* ``backward``: clips the pass's per-sample gradients into the step's sum;
* ``optimizer_step``: refuses a step over the budget (weights untouched) or one that is not a whole Poisson
  draw, then clip → exchange → noise → step, accounted;
* ``save_checkpoint``/``load_checkpoint``: the privacy state under the key ``"lightning_dp"``.
No Fabric import: the host class is handed in.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from ..accounting import get_noise_multiplier_for_plan
from ..adapter.data import EpochPoissonBatchSampler
from ..adapter.steps import grad_scaler, per_sample_scale
from ..config import DPConfig
from ..exchange import GradientExchange, LocalExchange
from ..grad_sample import GradSampleHooks, attach_grad_sample_hooks
from ..optimizer import DPOptimizer
from ..privacy_state import CHECKPOINT_KEY, PrivacyState
from ..report import PrivacyReport, describe_run
from ..sampling import expected_batch_size_of, poisson_dataloader, poisson_dataset_size
from ..validation import validate

EVALUATION_MARK = "_lightning_dp_evaluation"


def evaluation_loader(loader: DataLoader) -> DataLoader:
    """Mark ``loader`` as evaluation data: ``fabric.setup_dataloaders`` then leaves it as it is (no Poisson
    sampling). Metrics on it are computed without noise: use held-out data, not the private training set."""
    setattr(loader, EVALUATION_MARK, True)
    return loader


def _is_dp_optimizer(obj: Any) -> bool:
    return isinstance(getattr(obj, "optimizer", obj), DPOptimizer)


def _inner_optimizers(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` with every DP optimizer (bare or in Fabric's wrapper) replaced by the optimizer it wraps: its
    state is the same object, and torch's state-dict helpers may call ``step()`` on an optimizer without state
    to create it, which on the DP optimizer would be an accounted step."""
    return {k: getattr(v, "optimizer", v).original_optimizer if _is_dp_optimizer(v) else v for k, v in state.items()}


# Long on purpose: the class body is this function's body (the class derives from the Fabric strategy class
# handed in). Each method in it is short.
def fabric_dp_base(host_base: type, warn: Callable[[str], None], versions: Dict[str, str]) -> type:
    """The Fabric DP strategy base derived from ``host_base`` (a Fabric strategy class)."""

    class DPFabricStrategyBase(host_base):  # type: ignore[misc, valid-type]
        """DP-SGD behind Fabric's hooks (see :class:`lightning_dp.fabric.DPStrategy` for the arguments)."""

        strategy_name = ""
        registry_description = ""

        def _init_dp(self, config: DPConfig, epsilon_budget: Optional[float], accumulate_grad_batches: int,
                     max_steps: Optional[int], user_ids: Any = None) -> None:
            if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) \
                    or accumulate_grad_batches < 1:
                raise ValueError(f"`accumulate_grad_batches` must be an integer >= 1, got {accumulate_grad_batches!r}.")
            if config.target_epsilon is not None and (max_steps is None or max_steps < 1):
                raise ValueError(
                    f"target_epsilon={config.target_epsilon} needs `max_steps` (the planned optimizer steps) to "
                    "calibrate σ: a Fabric loop has no other length the strategy could plan for."
                )
            self.config = config
            self.privacy = PrivacyState.from_config(config, warn=warn, user_ids=user_ids)
            self.epsilon_budget = epsilon_budget
            if epsilon_budget is not None:
                self.privacy.add_budget(epsilon_budget, config.delta)
            self.accumulate_grad_batches = accumulate_grad_batches
            self.max_steps = max_steps
            self._module: Optional[torch.nn.Module] = None
            self._hooks: Optional[GradSampleHooks] = None
            self._optimizer: Optional[DPOptimizer] = None
            self._sampler: Optional[EpochPoissonBatchSampler] = None
            self._micro_batches = 0  # backward passes since the last step

        # --- set-up -----------------------------------------------------------------------------------------
        @override
        def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
            """Validate the model and attach the per-sample-gradient hooks, then set it up as Fabric does."""
            if self._module is not None:
                raise RuntimeError(
                    "The DP strategy sets up one model per run: a second `fabric.setup` of a model would train it "
                    "with a second optimizer on the same Poisson draws, which the accountant does not model. Set "
                    "the model and its optimizer up once: `model, optimizer = fabric.setup(model, optimizer)`."
                )
            validate(module, raise_error=True)
            self.privacy.seed_for_rank(self.global_rank, self.world_size)
            wrapped = super().setup_module(module)  # DDP wraps it, FSDP2 shards it: the hooks come after
            self._hooks = attach_grad_sample_hooks(module, loss_reduction=self.config.loss_reduction)
            self._module = module
            return wrapped

        @override
        def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
            """Wrap the optimizer in a :class:`~lightning_dp.DPOptimizer` on the run's privacy state."""
            if self._optimizer is not None:
                raise RuntimeError("The DP strategy takes exactly one optimizer per run (use parameter groups).")
            optimizer = super().setup_optimizer(optimizer)
            config = self.config
            self._optimizer = DPOptimizer(
                optimizer, privacy=self.privacy, exchange=self.make_exchange(), clipping_mode=config.clipping_mode,
                clipping=config.clipping, adaptive_clipping=config.adaptive_clipping,
                non_finite="propagate" if grad_scaler(self.precision) is not None else "drop",
            )
            return self._optimizer

        def make_exchange(self) -> GradientExchange:
            """How the ranks combine their clipped sums (one device: nothing crosses processes)."""
            return LocalExchange()

        @override
        def process_dataloader(self, dataloader: DataLoader) -> DataLoader:
            """Poisson-sample the training loader (each optimizer step one draw at ``q = k·W·B/N``, served as
            ``k`` micro-batches); an :func:`evaluation_loader` is returned as it is."""
            if getattr(dataloader, EVALUATION_MARK, False):
                return super().process_dataloader(dataloader)
            if self._sampler is not None:
                raise RuntimeError(
                    "The DP strategy Poisson-samples one training loader per run; a second one would be a second "
                    "dataset the accountant does not know. Mark evaluation loaders with "
                    "lightning_dp.fabric.evaluation_loader(loader) before fabric.setup_dataloaders."
                )
            k, privacy, batch_size = self.accumulate_grad_batches, self.privacy, expected_batch_size_of(dataloader)
            users = privacy.users if privacy.privacy_unit == "user" else None
            try:
                num_samples = poisson_dataset_size(dataloader.dataset)
                if privacy.users is not None:
                    privacy.users.check_dataset(num_samples)
            except (ValueError, TypeError) as err:
                raise ValueError(f"The DP strategy cannot Poisson-sample this training loader: {err}") from err
            chunks = len(dataloader)
            if users is not None:  # users are sampled: the loader's batch_size is the expected users per batch
                num_samples = users.num_users
                chunks = max(1, -(-num_samples // (self.world_size * batch_size)))
            sampler = EpochPoissonBatchSampler(
                num_samples, batch_size, chunks, accumulation=lambda: k, generator=privacy.sampling_generator,
                rank=self.global_rank, world_size=self.world_size, steps_taken=lambda: privacy.steps_taken, users=users,
            )
            self._sampler = sampler
            privacy.configure(sample_rate=sampler.sample_rate, dataset_size=num_samples,
                              expected_batch_size=max(1, round(sampler.sample_rate * num_samples)))
            if self.config.target_epsilon is not None and privacy.noise_multiplier is None:
                remaining = self.max_steps - privacy.steps_taken
                privacy.configure(noise_multiplier=get_noise_multiplier_for_plan(
                    self.config.target_epsilon, self.config.delta, [(sampler.sample_rate, remaining)],
                    accountant=privacy.accountant, history=privacy.accountant.history))
            return super().process_dataloader(poisson_dataloader(dataloader, batch_sampler=sampler))

        # --- the step -------------------------------------------------------------------------------------------
        @override
        def backward(self, tensor: torch.Tensor, module: Optional[torch.nn.Module], *args: Any, **kwargs: Any) -> None:
            """Backward as Fabric does, then clip this pass's per-sample gradients into the step's sum."""
            super().backward(tensor, module, *args, **kwargs)
            self._after_backward()
            self.dp_optimizer.accumulate_micro_batch(scale=per_sample_scale(1, grad_scaler(self.precision)),
                                                     units=self._next_units(), every_rank=True)
            self._micro_batches += 1

        def _next_units(self) -> Optional[torch.Tensor]:
            """User-level privacy: the users of the micro-batch just backpropagated (the sampler's batches, in the
            order it drew them: one per ``fabric.backward``); ``None`` for record-level runs."""
            sampler = self._sampler
            if sampler is None or sampler.users is None:
                return None
            if not sampler.batch_units:
                raise RuntimeError("User-level privacy: fabric.backward ran on a batch the user sampler did not draw.")
            return sampler.batch_units.popleft()

        def _after_backward(self) -> None:
            """What a host does between the backward pass and clipping (nothing here; FSDP collects)."""

        @override
        def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
            """The DP step: refused (weights untouched) over the budget or when the backward passes since the last
            step are not one whole Poisson draw; a step the precision plugin skips is still accounted."""
            privacy, k = self.privacy, self.accumulate_grad_batches
            if self.should_stop:
                raise RuntimeError(
                    f"DP: the next optimizer step would take ε over the budget {self.epsilon_budget} "
                    f"(δ={self.config.delta}); it was not taken and the weights are unchanged. Stop the loop when "
                    "`fabric.strategy.should_stop` is True."
                )
            if self._sampler is None:
                raise RuntimeError(
                    "DP: an optimizer step before the training loader was set up: without it the step's sampling rate "
                    "is unknown and the step could not be accounted. Pass the training loader through "
                    "`fabric.setup_dataloaders(loader)` (Poisson sampling) before the first step."
                )
            if self._micro_batches != k:
                raise RuntimeError(
                    f"DP: {self._micro_batches} fabric.backward call(s) since the last optimizer step, but each step is "
                    f"one Poisson draw served as accumulate_grad_batches={k} micro-batch(es). Call fabric.backward once "
                    "per loader batch and step every k batches (or set accumulate_grad_batches to what the loop does)."
                )
            before, refused_before = privacy.steps_taken, privacy.refused_steps
            output = super().optimizer_step(optimizer, **kwargs)
            if privacy.steps_taken == before and privacy.refused_steps == refused_before:  # GradScaler skipped it
                self.dp_optimizer.reset_accumulation()
                privacy.record_step()
                warn("DP: the precision plugin skipped a step (inf/NaN gradients); it is still accounted.")
            self._micro_batches = 0
            return output

        @override
        def clip_gradients_norm(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            """Refused: per-sample clipping (``max_grad_norm``) replaces it."""
            raise RuntimeError(
                "fabric.clip_gradients is not available under DP: it clips the batch gradient, which DP-SGD replaces "
                "by per-sample clipping. Remove it and set max_grad_norm on the DP strategy."
            )

        @override
        def clip_gradients_value(self, *args: Any, **kwargs: Any) -> None:
            """Refused: per-sample clipping (``max_grad_norm``) replaces it."""
            self.clip_gradients_norm()

        # --- checkpoints ------------------------------------------------------------------------------------------
        @override
        def save_checkpoint(self, path: Any, state: Dict[str, Any], storage_options: Optional[Any] = None,
                            filter: Optional[Dict[str, Callable[[str, Any], bool]]] = None) -> None:
            """Save as Fabric does, with the privacy state under ``"lightning_dp"`` (every rank calls this)."""
            state = {**_inner_optimizers(state), CHECKPOINT_KEY: self.privacy.state_dict(report=self.privacy_report().to_dict())}
            super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)

        @override
        def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True,
                            weights_only: Optional[bool] = None) -> Dict[str, Any]:
            """Load as Fabric does and restore the privacy state (history, generators, budget's spend)."""
            inner = _inner_optimizers(state) if isinstance(state, dict) else state
            remainder = super().load_checkpoint(path, inner, strict=strict, weights_only=False if weights_only is None
                                                else weights_only)
            if isinstance(state, dict) and inner is not state:  # plain values restored in place, as Fabric does
                state.update({k: v for k, v in inner.items() if not _is_dp_optimizer(state.get(k))})
            saved = remainder.pop(CHECKPOINT_KEY, None) if isinstance(remainder, dict) else None
            if saved is None:
                warn(f"Checkpoint {path} has no privacy state: privacy spent before it is unknown and not counted.")
            else:
                self.privacy.seed_for_rank(self.global_rank, self.world_size)
                self.privacy.load_state_dict(saved)
            return remainder

        @override
        def teardown(self) -> None:
            """Remove the per-sample-gradient hooks: the model is an ordinary module again."""
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None
            super().teardown()

        @classmethod
        @override
        def register_strategies(cls, strategy_registry: Any) -> None:
            """Register :attr:`strategy_name` with Fabric's strategy registry (σ = 1, C = 1)."""
            strategy_registry.register(cls.strategy_name, cls, description=cls.registry_description, override=True,
                                       noise_multiplier=1.0, max_grad_norm=1.0)

        # --- privacy spent ------------------------------------------------------------------------------------------
        @property
        def should_stop(self) -> bool:
            """Whether the next optimizer step would take ε over a budget (the loop should stop now)."""
            return any(self.privacy.next_step_exceeds(eps, delta) is not None for eps, delta in self.privacy.budgets)

        def get_epsilon(self, delta: Optional[float] = None) -> float:
            """ε spent so far at ``delta`` (default: the strategy's ``delta``), from the accountant's history."""
            return self.privacy.get_epsilon(delta)

        def privacy_report(self, delta: Optional[float] = None) -> PrivacyReport:
            """The record of how this model was trained privately (see :class:`~lightning_dp.PrivacyReport`)."""
            return describe_run(self.privacy, self.config, optimizer=self._optimizer, world_size=self.world_size,
                                epochs=0, versions=versions, delta=delta)

        @property
        def dp_optimizer(self) -> DPOptimizer:
            """The wrapped optimizer (after ``fabric.setup``)."""
            if self._optimizer is None:
                raise RuntimeError("The DP strategy has no DP optimizer yet: call fabric.setup(model, optimizer).")
            return self._optimizer

        accountant = property(lambda self: self.privacy.accountant, doc="The accountant: the record of privacy spent.")
        noise_multiplier = property(lambda self: self.privacy.noise_multiplier, doc="σ (``None`` until calibrated).")
        sample_rate = property(lambda self: self.privacy.sample_rate, doc="The rate the accountant records.")
        delta = property(lambda self: self.config.delta, doc="δ of the guarantee (default of :meth:`get_epsilon`).")

    return DPFabricStrategyBase

