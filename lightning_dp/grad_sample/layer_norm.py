"""Per-sample gradients of :class:`torch.nn.LayerNorm` (elementwise affine, optional bias)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_grad_sampler


@register_grad_sampler(nn.LayerNorm)
def layer_norm_grad_sample(
    module: nn.LayerNorm, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """``∂L_b/∂γ = Σ g ⊙ x̂`` and ``∂L_b/∂β = Σ g`` summed over each sample's non-normalised positions."""
    x = activations[0]
    batch_size = x.shape[0]
    feature_shape = tuple(module.normalized_shape)
    grads: Dict[str, torch.Tensor] = {}
    if module.weight is not None and module.weight.requires_grad:
        normalized = F.layer_norm(x, feature_shape, eps=module.eps)
        grads["weight"] = (normalized * backprops).reshape(batch_size, -1, *feature_shape).sum(dim=1)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = backprops.reshape(batch_size, -1, *feature_shape).sum(dim=1)
    return grads
