"""PrivacyBudgetCallback: log ε every step and stop before the budget is exceeded."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ._checks import check_open_unit, check_positive


class PrivacyBudgetCallback(Callback):
    """Logs the privacy spent (ε at δ) after every training step and stops *before* a step would exceed
    ``epsilon_budget``: the final ε is always ≤ the budget.

    ε is read from the DP strategy's accountant (the single record of privacy spent); the callback never
    recomputes it from its own counters. It is logged through ``pl_module.log`` under ``metric_name``
    (progress bar and every logger, e.g. a TensorBoard scalar). As a second line of defence the budget is
    also registered with the strategy, which refuses any optimizer step past it even if something (such
    as ``min_epochs``) keeps the Trainer running.

    Args:
        epsilon_budget: the largest ε the run may spend (> 0).
        delta: δ at which ε is measured; ``None`` takes the strategy's ``delta``.
        metric_name: name of the logged metric.
        prog_bar: show ε in the progress bar.

    Example::

        trainer = pl.Trainer(strategy=DPStrategy(noise_multiplier=1.1),
                             callbacks=[PrivacyBudgetCallback(epsilon_budget=3.0, delta=1e-5)])
    """

    def __init__(
        self,
        epsilon_budget: float,
        delta: Optional[float] = None,
        *,
        metric_name: str = "epsilon",
        prog_bar: bool = True,
    ) -> None:
        self.epsilon_budget = check_positive("epsilon_budget", epsilon_budget)
        self.delta = check_open_unit("delta", delta) if delta is not None else None
        self.metric_name = metric_name
        self.prog_bar = prog_bar
        self.budget_reached = False
        self.last_epsilon: float = 0.0

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints (one per budget and metric)."""
        return self._generate_state_key(epsilon_budget=self.epsilon_budget, metric_name=self.metric_name)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Check the strategy can account for privacy and register the budget with it."""
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not (hasattr(strategy, "get_epsilon") and hasattr(strategy, "epsilon_after_next_step")):
            raise MisconfigurationException(
                "PrivacyBudgetCallback needs a differentially private strategy, got "
                f"{type(strategy).__name__}. Use Trainer(strategy=DPStrategy(...)) or strategy='dp_sgd'."
            )
        if self.delta is None:
            self.delta = strategy.delta
        if trainer.min_epochs or (trainer.min_steps is not None and trainer.min_steps > 0):
            rank_zero_warn(
                "PrivacyBudgetCallback: Trainer min_epochs/min_steps can keep training going after the budget "
                "is reached; those extra steps are skipped (no privacy spent), but the time is wasted."
            )
        strategy.add_privacy_budget(self.epsilon_budget, self.delta)

    def _epsilon(self, trainer: "pl.Trainer") -> float:
        return trainer.strategy.get_epsilon(self.delta)

    def _check_next_step(self, trainer: "pl.Trainer") -> None:
        next_epsilon = trainer.strategy.epsilon_after_next_step(self.delta)
        if next_epsilon > self.epsilon_budget:
            if not self.budget_reached:
                rank_zero_info(
                    f"PrivacyBudgetCallback: stopping at step {trainer.global_step}; ε={self.last_epsilon:.4f} "
                    f"and one more step would spend ε={next_epsilon:.4f} > budget {self.epsilon_budget} "
                    f"(δ={self.delta})."
                )
            self.budget_reached = True
            trainer.should_stop = True

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Stop at once if even the first step would exceed the budget (e.g. zero noise)."""
        self.last_epsilon = self._epsilon(trainer)
        self._check_next_step(trainer)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log ε and stop before the step that would go over the budget."""
        self.last_epsilon = self._epsilon(trainer)
        value = self.last_epsilon if math.isfinite(self.last_epsilon) else float("inf")
        pl_module.log(
            self.metric_name, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar, logger=True, batch_size=1
        )
        self._check_next_step(trainer)

    def state_dict(self) -> Dict[str, Any]:
        """Budget, δ and whether the budget was reached (privacy spent itself lives with the strategy)."""
        return {
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "budget_reached": self.budget_reached,
            "last_epsilon": self.last_epsilon,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.budget_reached = bool(state_dict.get("budget_reached", False))
        self.last_epsilon = float(state_dict.get("last_epsilon", 0.0))
        if self.delta is None:
            self.delta = state_dict.get("delta")
