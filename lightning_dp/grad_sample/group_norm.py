"""Per-sample gradients of :class:`torch.nn.GroupNorm` (the DP-compatible BatchNorm replacement)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_grad_sampler


@register_grad_sampler(nn.GroupNorm)
def group_norm_grad_sample(
    module: nn.GroupNorm, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """``∂L_b/∂γ_c = Σ_s g_{b,c,s} x̂_{b,c,s}`` and ``∂L_b/∂β_c = Σ_s g_{b,c,s}`` over spatial positions s."""
    x = activations[0]
    batch_size, channels = x.shape[0], x.shape[1]
    grads: Dict[str, torch.Tensor] = {}
    if module.weight is not None and module.weight.requires_grad:
        normalized = F.group_norm(x, module.num_groups, eps=module.eps)
        grads["weight"] = (normalized * backprops).reshape(batch_size, channels, -1).sum(dim=2)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = backprops.reshape(batch_size, channels, -1).sum(dim=2)
    return grads
