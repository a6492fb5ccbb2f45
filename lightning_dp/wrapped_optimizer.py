"""An ``Optimizer`` that is a view of another: its parameter groups, state and defaults *are* the wrapped
optimizer's (shared objects, no copies), so schedulers, checkpoints and Lightning see one optimizer.

:class:`~lightning_dp.DPOptimizer` builds on it; what is DP-SGD lives there, what is "being an optimizer
around another" lives here.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from torch import nn
from torch.optim import Optimizer


class WrappedOptimizer(Optimizer):
    """Wraps ``optimizer``: reads and writes of ``param_groups``, ``state``, ``defaults`` and the state dict
    go to it. Subclasses decide what ``step`` does (they call ``self.original_optimizer.step()``)."""

    def __init__(self, optimizer: Optimizer) -> None:  # no super().__init__: the state is the wrapped one's
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        self.original_optimizer = optimizer
        # Optimizer base-class bookkeeping that torch's hooks and profiler expect to exist.
        self._optimizer_step_pre_hooks: Dict[int, Callable] = {}
        self._optimizer_step_post_hooks: Dict[int, Callable] = {}
        self._optimizer_state_dict_pre_hooks: Dict[int, Callable] = {}
        self._optimizer_state_dict_post_hooks: Dict[int, Callable] = {}
        self._optimizer_load_state_dict_pre_hooks: Dict[int, Callable] = {}
        self._optimizer_load_state_dict_post_hooks: Dict[int, Callable] = {}

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups."""
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Dict[Any, Any]:  # type: ignore[override]
        """The wrapped optimizer's state."""
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Dict[Any, Any]) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults."""
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    @property
    def params(self) -> List[nn.Parameter]:
        """Every trainable parameter the optimizer updates."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict (checkpoints stay loadable without lightning_dp)."""
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load into the wrapped optimizer."""
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer."""
        self.original_optimizer.add_param_group(param_group)
