"""A DP-SGD training recipe with no per-task constants: what to use when nothing has been tuned.

Under DP every hyperparameter tried on the private data costs privacy (:mod:`lightning_dp.tuning` counts it).
:data:`DEFAULT_RECIPE` is one recipe chosen on two tasks (an MLP on digits, a transformer on generated
sequences) and checked on a third of another model family (a CNN on generated images) that it was not
chosen on; ``docs/hyperparameters.rst`` has the tables, with Opacus tuned and untuned beside it.

Every quantity it uses is public: the noise multiplier σ (a function of ε, δ, the sampling rate and the
number of steps, all public), the planned number of steps and, for centring, the size of the centred
layer's input. Its parts:

* **clipping**: automatic clipping (per-sample gradients normalised, ``g/(‖g‖ + γ)``, Bu et al. 2023), so
  that there is no clipping norm to tune;
* **optimizer**: SGD with the **noise-scaled learning rate** ``learning_rate/σ``: the less noise, the longer
  the steps (σ = 0, non-private: ``learning_rate``);
* **schedule**: the learning rate is held for the first 70% of the planned steps, then decays linearly to 0
  (``decay_fraction=0.3``);
* **averaging**: the released model is an exponential moving average of the iterates (free: post-processing);
* **centring**, where it applies: a first ``nn.Linear`` layer fed the raw features is trained around a private
  mean of them (:mod:`lightning_dp.centering`), clipped at ``√d`` (features in ``[0, 1]``) and released with
  noise multiplier ``centering_noise_multiplier``; its cost is accounted before σ is calibrated.

Use it with ``DPStrategy(recipe="default", target_epsilon=...)`` (the strategy then builds the optimizer,
the schedule and the averaging; see :class:`~lightning_dp.DPStrategy`) or, in plain PyTorch, with
:meth:`Recipe.optimizer`, :meth:`Recipe.scheduler` and :meth:`Recipe.averaging` next to
:func:`~lightning_dp.make_private`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterable, Optional, Union

import torch
from torch import nn

from ._checks import check_choice, check_non_negative, check_positive
from .averaging import ExponentialMovingAverage
from .clipping import CLIPPINGS

SCHEDULES = ("linear", "cosine", "constant")

__all__ = ["DEFAULT_RECIPE", "Recipe", "SCHEDULES", "resolve_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A DP-SGD training recipe: clipping, optimizer, learning-rate schedule, averaging and centring.

    Args:
        learning_rate: the noise-scaled learning rate ``η``; SGD's learning rate is ``η/σ`` (``η`` when σ = 0).
        momentum: SGD's momentum.
        clipping: the clipping rule (``"automatic"``: no norm to tune; see :mod:`lightning_dp.clipping`).
        max_grad_norm: the clipping norm ``C`` (with automatic clipping, the norm every per-sample gradient is
            scaled to; the learning rate scales with it).
        schedule: ``"linear"`` (decay to 0 over the planned steps), ``"cosine"`` or ``"constant"``.
        decay_fraction: the last fraction of the planned steps the decay takes (before it, the learning rate is
            constant): 1 decays from the first step, 0.5 holds it for the first half.
        ema_decay: decay of the exponential moving average released as the model (0: the last iterate).
        centering_noise_multiplier: σ of the private mean a first ``nn.Linear`` layer on the raw features is
            centred on (``None``: no centring).

    Example::

        >>> from lightning_dp.recipes import DEFAULT_RECIPE
        >>> DEFAULT_RECIPE.learning_rate_for(2.0) == DEFAULT_RECIPE.learning_rate / 2.0
        True
        >>> DEFAULT_RECIPE.replace(schedule="cosine").schedule
        'cosine'
    """

    learning_rate: float = 3.0
    momentum: float = 0.0
    clipping: str = "automatic"
    max_grad_norm: float = 1.0
    schedule: str = "linear"
    decay_fraction: float = 0.3
    ema_decay: float = 0.9
    centering_noise_multiplier: Optional[float] = 12.0

    def __post_init__(self) -> None:
        check_positive("learning_rate", self.learning_rate)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}.")
        check_choice("clipping", self.clipping, CLIPPINGS)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_choice("schedule", self.schedule, SCHEDULES)
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"`decay_fraction` must be in (0, 1], got {self.decay_fraction!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}.")
        if self.centering_noise_multiplier is not None:
            check_non_negative("centering_noise_multiplier", self.centering_noise_multiplier)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        return replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The recipe's fields (JSON-able)."""
        return asdict(self)

    def learning_rate_for(self, noise_multiplier: Optional[float]) -> float:
        """SGD's learning rate at noise multiplier σ: ``learning_rate/σ`` (``learning_rate`` when σ is 0 or None)."""
        if noise_multiplier is None or noise_multiplier <= 0:
            return self.learning_rate
        return self.learning_rate / noise_multiplier

    def optimizer(self, params: Iterable[Any], noise_multiplier: Optional[float]) -> torch.optim.SGD:
        """The inner optimizer (to wrap with :func:`~lightning_dp.make_private` or ``DPStrategy``)."""
        return torch.optim.SGD(params, lr=self.learning_rate_for(noise_multiplier), momentum=self.momentum)

    def lr_factor(self, step: int, steps: int) -> float:
        """The schedule's factor on the learning rate at ``step`` of ``steps`` (0-based)."""
        if self.schedule == "constant":
            return 1.0
        start = (1.0 - self.decay_fraction) * steps
        progress = min(max(step - start, 0.0) / max(steps - start, 1e-12), 1.0)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def scheduler(self, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The learning-rate schedule over ``steps`` optimizer steps (call its ``step()`` after each)."""
        check_positive("steps", steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: self.lr_factor(t, steps))

    def averaging(self, module: nn.Module) -> Optional[ExponentialMovingAverage]:
        """The EMA of ``module``'s weights to release (``None`` with ``ema_decay = 0``)."""
        if not self.ema_decay:
            return None
        return ExponentialMovingAverage(module, self.ema_decay)

    def centring_layer(self, module: nn.Module) -> Optional[nn.Linear]:
        """The layer the recipe centres: ``module``'s first submodule when it is an ``nn.Linear`` (the raw
        features' layer of an MLP), else ``None`` (no centring: embeddings, convolutions...)."""
        if self.centering_noise_multiplier is None:
            return None
        first = next((m for m in module.modules() if not list(m.children())), None)
        return first if isinstance(first, nn.Linear) else None

    def centring(self, module: nn.Module, data: Any) -> Optional[Dict[nn.Module, Any]]:
        """``make_private``'s ``centering=`` argument: the private mean of ``data`` (the raw features, rows in
        ``[0, 1]^d``, or a loader of them) for :meth:`centring_layer`, clipped at ``√d``; ``None`` where the
        recipe does not centre."""
        from .centering import PrivateMean

        layer = self.centring_layer(module)
        if layer is None:
            return None
        return {layer: PrivateMean(data, max_norm=math.sqrt(layer.in_features),
                                   noise_multiplier=self.centering_noise_multiplier)}


DEFAULT_RECIPE = Recipe()
"""The recipe ``DPStrategy(recipe="default")`` uses (see the module docstring for how it was chosen)."""


def resolve_recipe(recipe: Union[None, str, Recipe, Dict[str, Any]]) -> Optional[Recipe]:
    """``None``, ``"default"``, a :class:`Recipe` or a dict of fields overriding the default, as a ``Recipe``."""
    if recipe is None or isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe != "default":
            raise ValueError(f"`recipe` must be None, 'default', a Recipe or a dict of Recipe fields, got {recipe!r}.")
        return DEFAULT_RECIPE
    if isinstance(recipe, dict):
        unknown = set(recipe) - set(DEFAULT_RECIPE.to_dict())
        if unknown:
            raise ValueError(f"`recipe` has unknown fields {sorted(unknown)}; Recipe's fields are "
                             f"{sorted(DEFAULT_RECIPE.to_dict())}.")
        return DEFAULT_RECIPE.replace(**recipe)
    raise ValueError(f"`recipe` must be None, 'default', a Recipe or a dict of Recipe fields, got {recipe!r}.")
