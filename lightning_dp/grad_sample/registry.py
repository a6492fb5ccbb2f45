"""Registry mapping ``nn.Module`` types to how their per-sample gradients are computed.

Two kinds of entries, both registered by decorator, one file per layer family:

* **rules** (:func:`register_grad_sampler`): ``rule(module, activations, backprops) -> {name: grad}``
  where ``activations`` is the tuple of the module's positional inputs, ``backprops`` the gradient of
  the loss with respect to its output (already rescaled to the per-sample loss and by
  ``GradSampleHooks.loss_scale``), batch dimension first, and each returned tensor has shape
  ``(batch_size, *param.shape)``. Only the module's *own* trainable parameters appear
  (``recurse=False``); frozen ones are skipped. ``batch_dim`` says where the batch is: ``0`` for layers
  whose input layout fixes it (convolutions, channel norms), ``None`` for layers that accept any
  leading dims (Linear, Embedding, LayerNorm): the hooks then find it (see ``hooks.py``) and move it
  first before calling the rule.
* **DP forwards** (:func:`register_dp_forward`): for fused modules whose internals hooks cannot see
  (``nn.MultiheadAttention``, ``nn.LSTM``...). While hooks are attached, the module's ``forward`` is
  an equivalent implementation built from operations whose per-sample gradients are known
  (``forward(module, recorder, *args, **kwargs)``, see :class:`~lightning_dp.grad_sample.hooks.Recorder`).
  It uses the module's own ``nn.Parameter`` objects, so ``state_dict`` keys, optimizers and
  checkpoints are unchanged; removing the hooks restores the original forward.

Modules with trainable parameters and neither entry use the ``torch.func`` fallback (``functional.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Type

import torch
from torch import nn

GradSampleRule = Callable[[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor], Dict[str, torch.Tensor]]
DPForward = Callable[..., object]

GRAD_SAMPLERS: Dict[Type[nn.Module], GradSampleRule] = {}
DP_FORWARDS: Dict[Type[nn.Module], DPForward] = {}


@dataclass(frozen=True)
class _RuleInfo:
    batch_dim: Optional[int]


_RULE_INFO: Dict[Type[nn.Module], _RuleInfo] = {}


def register_grad_sampler(
    *module_types: Type[nn.Module], batch_dim: Optional[int] = None
) -> Callable[[GradSampleRule], GradSampleRule]:
    """Register ``rule`` as the per-sample gradient rule for ``module_types`` (exact type match).

    Args:
        module_types: the layer classes the rule handles.
        batch_dim: the batch dimension of the module's input and output when the layer fixes it
            (``0`` for ``(B, C, *spatial)`` layouts); ``None`` (default) when it may be any leading
            dimension — the hooks locate it and hand the rule batch-first tensors.

    Example::

        >>> @register_grad_sampler(MyLayer)                       # doctest: +SKIP
        ... def my_layer_rule(module, activations, backprops):
        ...     return {"weight": torch.einsum("bo,bi->boi", backprops, activations[0])}
    """

    def decorator(rule: GradSampleRule) -> GradSampleRule:
        for module_type in module_types:
            GRAD_SAMPLERS[module_type] = rule
            _RULE_INFO[module_type] = _RuleInfo(batch_dim)
        return rule

    return decorator


def register_dp_forward(*module_types: Type[nn.Module]) -> Callable[[DPForward], DPForward]:
    """Register ``forward(module, recorder, *args, **kwargs)`` as the DP implementation of ``module_types``."""

    def decorator(forward: DPForward) -> DPForward:
        for module_type in module_types:
            DP_FORWARDS[module_type] = forward
        return forward

    return decorator


def get_grad_sampler(module: nn.Module) -> GradSampleRule | None:
    """The rule registered for ``type(module)``, or ``None`` when there is none."""
    return GRAD_SAMPLERS.get(type(module))


def get_rule_batch_dim(module: nn.Module) -> Optional[int]:
    """The batch dimension a rule declared for ``type(module)`` (``None``: any leading dim)."""
    info = _RULE_INFO.get(type(module))
    return None if info is None else info.batch_dim


def get_dp_forward(module: nn.Module) -> DPForward | None:
    """The DP forward registered for ``type(module)``, or ``None``."""
    return DP_FORWARDS.get(type(module))


def trainable_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    """The module's own (non-recursive) parameters that require a gradient, by name."""
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}
