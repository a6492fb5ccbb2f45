"""Per-sample gradients of :class:`torch.nn.Linear` (any number of leading dimensions)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .registry import register_grad_sampler
from .utils import flatten_middle, sum_outer, sum_over_middle


def linear_param_grads(
    x: torch.Tensor, backprops: torch.Tensor, weight: bool = True, bias: bool = True
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample ``(∂L_b/∂W, ∂L_b/∂bias)`` of ``y = x Wᵀ + bias`` for batch-first ``x: (B, *, I)``.

    ``∂L_b/∂W = Σ_t g_{b,t} a_{b,t}ᵀ`` and ``∂L_b/∂bias = Σ_t g_{b,t}`` over all middle positions t.
    Shared by the Linear rule and the recorded projections of attention and RNNs.
    """
    gw = sum_outer(flatten_middle(backprops), flatten_middle(x)) if weight else None
    gb = sum_over_middle(backprops) if bias else None
    return gw, gb


@register_grad_sampler(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def linear_grad_sample(
    module: nn.Linear, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample weight and bias gradients (see :func:`linear_param_grads`)."""
    gw, gb = linear_param_grads(
        activations[0], backprops, module.weight.requires_grad, module.bias is not None and module.bias.requires_grad
    )
    grads: Dict[str, torch.Tensor] = {}
    if gw is not None:
        grads["weight"] = gw
    if gb is not None:
        grads["bias"] = gb
    return grads
