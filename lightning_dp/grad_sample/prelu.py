"""Per-sample gradients of :class:`torch.nn.PReLU`: ``y = max(0, x) + a · min(0, x)``.

``∂L_b/∂a_c = Σ g ⊙ min(0, x)`` over every position of channel ``c`` (dimension 1), or over all
positions when one slope is shared (``num_parameters=1``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .registry import register_grad_sampler
from .per_sample_ops import sum_per_channel


@register_grad_sampler(nn.PReLU, batch_dim=0)
def prelu_grad_sample(
    module: nn.PReLU, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample slope gradients."""
    if not module.weight.requires_grad:
        return {}
    contribution = backprops * activations[0].clamp(max=0)
    if module.num_parameters == 1 or contribution.dim() < 2:
        return {"weight": contribution.reshape(contribution.shape[0], -1).sum(1, keepdim=True)}
    return {"weight": sum_per_channel(contribution)}
