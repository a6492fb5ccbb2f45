"""Registry mapping ``nn.Module`` types to their per-sample gradient rule.

A rule is a function ``rule(module, activations, backprops) -> {param_name: per_sample_grad}`` where
``activations`` is the tuple of tensors the module received in the forward pass, ``backprops`` the
gradient of the loss with respect to the module's output (batch dimension first, already rescaled to
the per-sample loss), and each returned tensor has shape ``(batch_size, *param.shape)``. Only the
module's *own* trainable parameters appear (``recurse=False``), and frozen ones are skipped.

Adding a layer type is one new file with a rule decorated by :func:`register_grad_sampler`.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

import torch
from torch import nn

GradSampleRule = Callable[[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor], Dict[str, torch.Tensor]]

GRAD_SAMPLERS: Dict[Type[nn.Module], GradSampleRule] = {}


def register_grad_sampler(*module_types: Type[nn.Module]) -> Callable[[GradSampleRule], GradSampleRule]:
    """Register ``rule`` as the per-sample gradient rule for ``module_types`` (exact type match).

    Example::

        >>> @register_grad_sampler(MyLayer)                       # doctest: +SKIP
        ... def my_layer_rule(module, activations, backprops):
        ...     return {"weight": torch.einsum("bo,bi->boi", backprops, activations[0])}
    """

    def decorator(rule: GradSampleRule) -> GradSampleRule:
        for module_type in module_types:
            GRAD_SAMPLERS[module_type] = rule
        return rule

    return decorator


def get_grad_sampler(module: nn.Module) -> GradSampleRule | None:
    """The rule registered for ``type(module)``, or ``None`` when there is none."""
    return GRAD_SAMPLERS.get(type(module))


def trainable_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    """The module's own (non-recursive) parameters that require a gradient, by name."""
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}
