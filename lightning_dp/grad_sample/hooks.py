"""Attach per-sample-gradient hooks to a module, in place.

For every submodule that owns trainable parameters and has a registered rule, a forward hook keeps
the layer's inputs and registers a hook on its output tensor. When autograd delivers the gradient of
the loss with respect to that output, the rule turns (inputs, output gradient) into per-sample
gradients, which are accumulated in ``param.grad_sample`` (shape ``(batch, *param.shape)``).

Design notes:

* The activation is captured by the closure of the output's tensor hook, not in a list on the module:
  a module called several times in one forward gets one hook per call, and activations are freed with
  the autograd graph (no leak when a forward is never followed by a backward).
* Tensor hooks on the output see the gradient of the value the module produced, even if a later
  in-place op (``ReLU(inplace=True)``) modifies it — ``register_full_backward_hook`` fails there.
* Nothing is recorded when gradients are disabled (``torch.no_grad``, Lightning's validation and
  predict loops), so evaluation is unaffected.
* Contributions to the same parameter (tied weights, a module used twice) are summed per sample.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

import torch
from torch import nn

from .registry import get_grad_sampler, trainable_parameters

_LOSS_REDUCTIONS = ("mean", "sum")
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GradSampleHooks]" = weakref.WeakKeyDictionary()


class GradSampleHooks:
    """Handle on the hooks :func:`attach_grad_sample_hooks` put on a module; ``remove()`` undoes them.

    Args:
        module: the model (changed in place: hooks only, no wrapper, no new parameters).
        loss_reduction: ``"mean"`` if the loss averages over the batch (per-sample gradients are then
            rescaled by the batch size), ``"sum"`` if it sums.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean") -> None:
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.module = module
        self.loss_reduction = loss_reduction
        self.enabled = True
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        for submodule in module.modules():
            if trainable_parameters(submodule) and get_grad_sampler(submodule) is not None:
                self._handles.append(submodule.register_forward_hook(self._forward_hook))

    @property
    def parameters(self) -> List[nn.Parameter]:
        """Trainable parameters of the model (each once, even when tied)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def _forward_hook(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not (self.enabled and torch.is_grad_enabled()):
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        activations = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)

        def on_output_grad(grad: torch.Tensor) -> None:
            self._accumulate(module, activations, grad)

        output.register_hook(on_output_grad)

    def _accumulate(self, module: nn.Module, activations: Tuple[torch.Tensor, ...], grad: torch.Tensor) -> None:
        if self.loss_reduction == "mean":
            grad = grad * grad.shape[0]
        rule = get_grad_sampler(module)
        assert rule is not None
        per_sample: Dict[str, torch.Tensor] = rule(module, activations, grad)
        for name, grad_sample in per_sample.items():
            param = getattr(module, name)
            grad_sample = grad_sample.to(param.dtype)
            existing = getattr(param, "grad_sample", None)
            if existing is None:
                param.grad_sample = grad_sample
            elif existing.shape == grad_sample.shape:
                param.grad_sample = existing + grad_sample
            else:
                raise RuntimeError(
                    f"Per-sample gradients of batch size {grad_sample.shape[0]} arrived for a parameter "
                    f"that already holds per-sample gradients of batch size {existing.shape[0]} "
                    f"(module {type(module).__name__}). Call optimizer.zero_grad() between batches; "
                    "gradient accumulation over several backward passes is not supported yet."
                )

    def remove(self) -> None:
        """Remove all hooks and per-sample gradients; the module is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        clear_grad_samples(self.module)
        if _ATTACHED.get(self.module) is self:
            del _ATTACHED[self.module]


def clear_grad_samples(module: nn.Module) -> None:
    """Drop ``grad_sample`` from every parameter of ``module``."""
    for param in module.parameters():
        if hasattr(param, "grad_sample"):
            del param.grad_sample


def attach_grad_sample_hooks(module: nn.Module, loss_reduction: str = "mean") -> GradSampleHooks:
    """Attach per-sample-gradient hooks to ``module`` in place (replacing earlier ones) and return them."""
    previous = _ATTACHED.get(module)
    if previous is not None:
        previous.remove()
    hooks = GradSampleHooks(module, loss_reduction=loss_reduction)
    _ATTACHED[module] = hooks
    return hooks


def get_attached_hooks(module: nn.Module) -> GradSampleHooks | None:
    """The hooks currently attached to ``module`` by this package, if any."""
    return _ATTACHED.get(module)
