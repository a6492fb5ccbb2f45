"""Iterate averaging (EMA) of the weights: post-processing of the private iterates, free in privacy.

Every iterate ``θ_t`` of DP-SGD is a function of the noisy gradients already released (and of the
public initialisation), so any average of the iterates is *post-processing*: it costs no privacy
(Dwork & Roth 2014, Prop. 2.1) and the accountant records nothing for it. With noisy gradients the
average of the last iterates is much closer to the optimum than the last iterate alone (the noise of
successive steps averages out), which is worth several points of accuracy at small ε.

With Lightning use Lightning's own :class:`~lightning.pytorch.callbacks.WeightAveraging` /
``EMAWeightAveraging`` callbacks, which work with :class:`~lightning_dp.DPStrategy` unchanged (see
``docs/lightning_features.rst``); with :func:`~lightning_dp.make_private` use
:class:`ExponentialMovingAverage`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """Exponential moving average of a module's floating-point parameters and buffers.

    After each optimizer step, :meth:`update` sets ``θ̄ ← d_t·θ̄ + (1 − d_t)·θ`` with
    ``d_t = min(decay, (1 + t)/(10 + t))`` when ``warmup`` (``t`` = updates so far: early on the
    average forgets the random initialisation fast), else ``d_t = decay``. Buffers (e.g. running
    statistics) are averaged the same way when floating point, copied otherwise. Post-processing of the
    private iterates: no privacy cost.

    Args:
        module: the model being trained (its parameters are read, never written, by :meth:`update`).
        decay: ``d`` in ``[0, 1)``; the average spans about ``1/(1 − d)`` steps.
        warmup: use ``min(decay, (1 + t)/(10 + t))`` (TensorFlow's ``num_updates`` rule).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = ExponentialMovingAverage(model, decay=0.9)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ema.update()
        >>> with ema.average_parameters(model):  # evaluate with the averaged weights
        ...     _ = model(torch.zeros(1, 2))
        >>> ema.num_updates
        1
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be a number in [0, 1), got {decay!r}.")
        if not isinstance(warmup, bool):
            raise ValueError(f"`warmup` must be True or False, got {warmup!r}.")
        self.module = module
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            name: t.detach().clone() for name, t in self._tensors(module).items()
        }

    @staticmethod
    def _tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
        named = dict(module.named_parameters())
        named.update(module.named_buffers())
        return named

    def current_decay(self) -> float:
        """The ``d_t`` the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current weights into the average (call after each optimizer step)."""
        d = self.current_decay()
        current = self._tensors(self.module)
        floats: List[torch.Tensor] = []
        targets: List[torch.Tensor] = []
        for name, avg in list(self.shadow.items()):
            value = current[name].detach()
            if avg.device != value.device:  # the module moved (make_private, then .to("cuda")): follow it
                avg = self.shadow[name] = avg.to(value.device)
            if avg.is_floating_point():
                floats.append(avg)
                targets.append(value.to(avg.dtype))
            else:
                avg.copy_(value)
        if floats:
            torch._foreach_lerp_(floats, targets, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (same architecture; e.g. a fresh copy for export)."""
        target = self._tensors(module)
        missing = sorted(set(self.shadow) - set(target))
        if missing:
            raise ValueError(f"`module` lacks the averaged tensors {missing}: pass a module of the same architecture.")
        for name, avg in self.shadow.items():
            target[name].copy_(avg)

    @contextlib.contextmanager
    def average_parameters(self, module: Optional[nn.Module] = None) -> Iterator[nn.Module]:
        """Swap the averaged weights into ``module`` (default: the tracked one) for the ``with`` block,
        then put the trained weights back (evaluation with the average, training goes on unchanged)."""
        module = self.module if module is None else module
        saved = {name: t.detach().clone() for name, t in self._tensors(module).items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                current = self._tensors(module)
                for name, value in saved.items():
                    current[name].copy_(value)

    def state_dict(self) -> Dict[str, Any]:
        """The average and its counters (save it with the checkpoint to resume the average)."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.decay = float(state_dict["decay"])
        self.warmup = bool(state_dict["warmup"])
        self.num_updates = int(state_dict["num_updates"])
        for name, value in state_dict["shadow"].items():
            self.shadow[name].copy_(value)  # onto the average's device (copy_ moves across devices)

    def __repr__(self) -> str:
        return f"ExponentialMovingAverage(decay={self.decay}, warmup={self.warmup}, num_updates={self.num_updates})"
