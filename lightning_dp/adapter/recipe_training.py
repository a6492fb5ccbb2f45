"""What ``DPStrategy(recipe=...)`` adds to a run: the recipe's optimizer, its noise-scaled learning rate on the
planned schedule, and the weights' moving average released as the model (:mod:`lightning_dp.recipes`).

No Lightning import: the strategy calls these methods from its hooks.

* **Optimizer.** The LightningModule's ``configure_optimizers`` still says *which* parameters train (its
  parameter groups are kept); the recipe replaces the optimizer itself by SGD (its momentum). A learning-rate
  scheduler returned with it is refused: the recipe owns the schedule.
* **Learning rate.** Set before every step: ``learning_rate/σ`` (σ as calibrated or given) times the schedule's
  factor at ``trainer.global_step`` of the planned steps (``max_steps`` or ``max_epochs`` of Poisson draws, the
  plan ``target_epsilon`` is calibrated over). A run without a finite plan is refused.
* **Averaging.** After every step the EMA is updated; validation during ``fit`` sees the average (the trained
  weights are put back after it); at the end of ``fit`` the average is written into the LightningModule: the
  released model, which ``trainer.test``/``predict`` then use. Checkpoints follow Lightning's
  ``WeightAveraging``: their ``state_dict`` is the average, and the trained weights and the average's state are
  under ``"lightning_dp_recipe"``, so that a resumed run goes on exactly from the trained weights.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..averaging import ExponentialMovingAverage
from ..recipes import Recipe
from .host import Host

CHECKPOINT_KEY = "lightning_dp_recipe"

__all__ = ["CHECKPOINT_KEY", "RecipeTraining"]


class RecipeTraining:
    """The recipe's part of one ``fit``: optimizer, learning rate per step, EMA (see the module docstring)."""

    def __init__(self, recipe: Recipe, host: Host) -> None:
        self.recipe = recipe
        self.host = host
        self.planned_steps: Optional[int] = None
        self.average: Optional[ExponentialMovingAverage] = None
        self._pending: Optional[Dict[str, Any]] = None  # an average loaded before fit created it
        self._pending_trained: Optional[Dict[str, torch.Tensor]] = None
        self._swapped: Optional[contextlib.ExitStack] = None
        self._trained: Optional[Dict[str, torch.Tensor]] = None

    # --- set-up -------------------------------------------------------------------------------------------
    def optimizer(self, optimizer: torch.optim.Optimizer, schedulers: List[Any]) -> torch.optim.SGD:
        """The recipe's SGD over the parameter groups of the module's ``optimizer`` (its learning rate is set
        before each step)."""
        if schedulers:
            raise self.host.trainer_error(
                "DPStrategy(recipe=...) sets the learning rate and its schedule (noise-scaled, decayed over the planned "
                f"steps), but configure_optimizers also returned {len(schedulers)} learning-rate scheduler(s). Return "
                "only the optimizer (it says which parameters train), or train without `recipe`."
            )
        groups = [{"params": group["params"]} for group in optimizer.param_groups]
        return self.recipe.optimizer(groups, noise_multiplier=None)

    def check_limits(self, max_epochs: Optional[int], max_steps: Optional[int]) -> None:
        """Refuse a run without a finite length (the schedule decays over it)."""
        if (max_epochs is None or max_epochs < 0) and (max_steps is None or max_steps < 0):
            raise self.host.trainer_error(
                "DPStrategy(recipe=...) decays the learning rate over the planned steps, but the Trainer runs without "
                f"end (max_epochs={max_epochs}, max_steps={max_steps}): set max_steps or max_epochs."
            )

    def start(self, module: nn.Module, global_step: int, remaining_steps: int) -> None:
        """At the start of ``fit``: the schedule's length and the average (restored when resuming)."""
        if remaining_steps <= 0:
            raise self.host.trainer_error(
                "DPStrategy(recipe=...) decays the learning rate over the planned steps, but the Trainer's limits "
                "plan none: set max_steps or max_epochs."
            )
        self.planned_steps = global_step + remaining_steps
        self.average = self.recipe.averaging(module)
        if self.average is not None and self._pending is not None:
            self.average.load_state_dict(self._pending)
        self._pending = None

    # --- every step ----------------------------------------------------------------------------------------
    def set_learning_rate(self, optimizer: torch.optim.Optimizer, noise_multiplier: Optional[float], step: int) -> float:
        """Write the recipe's learning rate for ``step`` into every parameter group; returns it."""
        if self.planned_steps is None:
            raise RuntimeError("RecipeTraining.start must run before the first step.")
        lr = self.recipe.learning_rate_for(noise_multiplier) * self.recipe.lr_factor(step, self.planned_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def after_step(self) -> None:
        """Fold the new weights into the average."""
        if self.average is not None:
            self.average.update()

    # --- evaluation, release, checkpoints ----------------------------------------------------------------------
    def swap_in(self, module: nn.Module) -> None:
        """Put the average into ``module`` (validation during ``fit``); :meth:`swap_out` puts the trained weights back."""
        if self.average is None or self._swapped is not None:
            return
        self._trained = {name: t.detach().clone() for name, t in module.state_dict().items()}
        stack = contextlib.ExitStack()
        stack.enter_context(self.average.average_parameters(module))
        self._swapped = stack

    def swap_out(self) -> None:
        """Put the trained weights back after :meth:`swap_in`."""
        if self._swapped is not None:
            self._swapped.close()
            self._swapped = self._trained = None

    def release(self, module: nn.Module) -> None:
        """At the end of ``fit``: write the average into ``module`` (the released model); the trained weights are
        kept for checkpoints saved after ``fit``."""
        self.swap_out()
        if self.average is not None:
            self._trained = {name: t.detach().clone() for name, t in module.state_dict().items()}
            self.average.copy_to(module)

    def fill_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Lightning's convention for averaged weights: the checkpoint's ``state_dict`` is the average (the model to
        use), the trained weights and the average's state go under ``"lightning_dp_recipe"`` (to resume exactly)."""
        saved: Dict[str, Any] = {"recipe": self.recipe.to_dict(), "average": None, "trained": None}
        weights = checkpoint.get("state_dict")
        if self.average is not None and isinstance(weights, dict):
            trained = dict(self._trained) if self._trained is not None else dict(weights)
            saved["average"], saved["trained"] = self.average.state_dict(), trained
            checkpoint["state_dict"] = {**trained, **{k: v.clone() for k, v in self.average.shadow.items()
                                                      if k in trained}}
        elif self._pending is not None:
            saved["average"], saved["trained"] = self._pending, self._pending_trained
        checkpoint[CHECKPOINT_KEY] = saved

    def load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Resume from a checkpoint written with the same recipe: the trained weights replace the checkpoint's
        averaged ``state_dict`` (Lightning loads them into the module next) and the average is restored."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        if saved.get("recipe") != self.recipe.to_dict():
            raise self.host.trainer_error(
                f"The checkpoint was trained with recipe {saved.get('recipe')}, this run has {self.recipe.to_dict()}: "
                "resume with the same recipe (the learning rate and the average would not continue)."
            )
        if saved.get("trained") is not None and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {**checkpoint["state_dict"], **saved["trained"]}
        if saved.get("average") is None:
            return
        if self.average is not None:
            self.average.load_state_dict(saved["average"])
        else:
            self._pending, self._pending_trained = saved["average"], saved.get("trained")
