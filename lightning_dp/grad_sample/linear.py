"""Per-sample gradients of :class:`torch.nn.Linear` (any number of leading dimensions)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .registry import register_grad_sampler
from .utils import flatten_middle, sum_outer, sum_over_middle


@register_grad_sampler(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def linear_grad_sample(
    module: nn.Linear, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """``∂L_b/∂W = Σ_t g_{b,t} a_{b,t}ᵀ`` and ``∂L_b/∂bias = Σ_t g_{b,t}`` over all middle positions t."""
    grads: Dict[str, torch.Tensor] = {}
    if module.weight.requires_grad:
        grads["weight"] = sum_outer(flatten_middle(backprops), flatten_middle(activations[0]))
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = sum_over_middle(backprops)
    return grads
