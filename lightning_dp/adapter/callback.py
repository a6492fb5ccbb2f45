"""PrivacyBudgetCallback's logic: log ε every step and stop before the budget is exceeded. No Lightning
import: :func:`privacy_budget_callback` derives it from a namespace's ``Callback``."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from typing_extensions import override

from .._checks import check_open_unit, check_positive
from ..report import unit_description
from . import lightning_internals
from .host import Host


# Long on purpose: the class body is this function's body (see strategies.single_device_strategy).
def privacy_budget_callback(callback_base: type, host: Host) -> type:
    """``PrivacyBudgetCallback`` on ``callback_base`` (the namespace's ``Callback``). Reason for the length: the
    class body is this function's body (the class derives from the ``Callback`` of whichever namespace binds it)."""

    class PrivacyBudgetCallback(callback_base):  # type: ignore[misc, valid-type]
        """Logs the privacy spent (ε at δ) after every training step and stops *before* a step would exceed
        ``epsilon_budget``: the final ε is always ≤ the budget.

        ε is read from the DP strategy's accountant (the single record of privacy spent); the callback never
        recomputes it from its own counters. It is logged through ``pl_module.log`` under ``metric_name``
        (progress bar and every logger, e.g. a TensorBoard scalar), next to the number of samples dropped
        for a non-finite gradient (``dropped_metric_name``). As a second line of defence the budget is also
        registered with the strategy, which refuses any optimizer step past it even if something (such as
        ``min_epochs``) keeps the Trainer running.

        ε covers the released model, not metrics computed on the private training data: the callback warns
        once when metrics logged from ``training_step`` reach a logger (``warn_uncovered_metrics=False``
        turns that off).

        Args:
            epsilon_budget: the largest ε the run may spend (> 0).
            delta: δ at which ε is measured; ``None`` takes the strategy's ``delta``.
            metric_name: name of the logged ε.
            dropped_metric_name: name of the logged count of dropped samples.
            prog_bar: show ε in the progress bar.
            warn_uncovered_metrics: warn once that training-step metrics are not covered by ε.

        Example::

            import lightning as L
            from lightning_dp import DPStrategy, PrivacyBudgetCallback

            trainer = L.Trainer(strategy=DPStrategy(noise_multiplier=1.1),
                                callbacks=[PrivacyBudgetCallback(epsilon_budget=3.0, delta=1e-5)])
        """

        _host = host

        def __init__(
            self,
            epsilon_budget: float,
            delta: Optional[float] = None,
            *,
            metric_name: str = "epsilon",
            dropped_metric_name: str = "dropped_samples",
            prog_bar: bool = True,
            warn_uncovered_metrics: bool = True,
        ) -> None:
            self.epsilon_budget = check_positive("epsilon_budget", epsilon_budget)
            self.delta = check_open_unit("delta", delta) if delta is not None else None
            self.metric_name = metric_name
            self.dropped_metric_name = dropped_metric_name
            self.prog_bar = prog_bar
            self.warn_uncovered_metrics = bool(warn_uncovered_metrics)
            self.budget_reached = False
            self.last_epsilon: float = 0.0
            self._warned_uncovered = False

        @property
        @override
        def state_key(self) -> str:
            """Key of this callback's state in checkpoints (one per budget and metric)."""
            return lightning_internals.callback_state_key(self, epsilon_budget=self.epsilon_budget, metric_name=self.metric_name)

        @override
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            """Check the strategy can account for privacy and register the budget with it."""
            if stage != "fit":
                return
            strategy = trainer.strategy
            if not (hasattr(strategy, "get_epsilon") and hasattr(strategy, "privacy")):
                raise self._host.trainer_error(
                    "PrivacyBudgetCallback needs a differentially private strategy, got "
                    f"{type(strategy).__name__}. Use Trainer(strategy=DPStrategy(...)) or strategy='dp_sgd'."
                )
            if self.delta is None:
                self.delta = strategy.delta
            if trainer.min_epochs or (trainer.min_steps is not None and trainer.min_steps > 0):
                self._host.warn(
                    "PrivacyBudgetCallback: Trainer min_epochs/min_steps can keep training going after the budget "
                    "is reached; those extra steps are skipped (no privacy spent), but the time is wasted."
                )
            strategy.add_privacy_budget(self.epsilon_budget, self.delta)

        def _check_next_step(self, trainer: Any) -> None:
            next_epsilon = trainer.strategy.privacy.next_step_exceeds(self.epsilon_budget, self.delta)
            if next_epsilon is not None:
                if not self.budget_reached:
                    self._host.info(
                        f"PrivacyBudgetCallback: stopping at step {trainer.global_step}; ε={self.last_epsilon:.4f} "
                        f"and one more step would spend ε={next_epsilon:.4f} > budget {self.epsilon_budget} "
                        f"(δ={self.delta})."
                    )
                self.budget_reached = True
                trainer.should_stop = True

        @override
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            """Say what ε protects (a record or a user, :func:`~lightning_dp.report.unit_description`); stop at once
            if even the first step would exceed the budget (e.g. zero noise)."""
            privacy = getattr(trainer.strategy, "privacy", None)
            users = getattr(privacy, "users", None)
            if users is not None:
                self._host.info("PrivacyBudgetCallback: ε is " + unit_description(
                    privacy.privacy_unit, users.max_records_per_user, users.num_users))
            self.last_epsilon = trainer.strategy.get_epsilon(self.delta)
            self._check_next_step(trainer)

        @override
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            """Log ε and the dropped-sample count, and stop before the step that would go over the budget."""
            self.last_epsilon = trainer.strategy.get_epsilon(self.delta)
            value = self.last_epsilon if math.isfinite(self.last_epsilon) else float("inf")
            log = dict(on_step=True, on_epoch=False, logger=True, batch_size=1)
            pl_module.log(self.metric_name, value, prog_bar=self.prog_bar, **log)
            pl_module.log(self.dropped_metric_name, _dropped_value(trainer.strategy), prog_bar=False, **log)
            self._warn_uncovered(trainer)
            self._check_next_step(trainer)

        def _warn_uncovered(self, trainer: Any) -> None:
            if not self.warn_uncovered_metrics or self._warned_uncovered or not trainer.loggers:
                return
            names = training_step_metrics(trainer)
            if names:
                self._warned_uncovered = True
                self._host.warn(
                    f"Metrics logged from training_step ({', '.join(sorted(names))}) are computed on the private "
                    "training data without noise: they are not covered by ε, and publishing them leaks more than ε "
                    "says. Report metrics on held-out data instead; PrivacyBudgetCallback(warn_uncovered_metrics="
                    "False) silences this warning."
                )

        @override
        def state_dict(self) -> Dict[str, Any]:
            """Budget, δ and whether the budget was reached (privacy spent itself lives with the strategy)."""
            return {
                "epsilon_budget": self.epsilon_budget,
                "delta": self.delta,
                "budget_reached": self.budget_reached,
                "last_epsilon": self.last_epsilon,
            }

        @override
        def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
            """Restore :meth:`state_dict`."""
            self.budget_reached = bool(state_dict.get("budget_reached", False))
            self.last_epsilon = float(state_dict.get("last_epsilon", 0.0))
            if self.delta is None:
                self.delta = state_dict.get("delta")


    return PrivacyBudgetCallback

def _dropped_value(strategy: Any) -> Any:
    """The strategy's dropped-sample count for ``pl_module.log`` without a host sync: off the CPU it is a
    device tensor (logged as a float tensor, which Lightning brings to the host only when it writes the
    logs, every ``log_every_n_steps``; the count is not in the progress bar, which would read it each
    step), on the CPU a number."""
    count = getattr(strategy, "dropped_samples_count", None)
    if count is None:
        return float(strategy.dropped_samples)
    return count.float() if hasattr(count, "float") else float(count)


def training_step_metrics(trainer: Any) -> List[str]:
    """Names of the metrics ``training_step`` logged to a logger in the current batch (read from the
    Trainer's result collection, the same in both Lightning namespaces)."""
    return lightning_internals.training_step_metrics(trainer)
