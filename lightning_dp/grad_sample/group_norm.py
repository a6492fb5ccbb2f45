"""Per-sample gradients of channel normalisations: :class:`torch.nn.GroupNorm` (the DP-compatible
BatchNorm replacement) and :class:`torch.nn.InstanceNorm1d/2d/3d` with ``affine=True``.

Both normalise each sample on its own and scale/shift per channel:
``∂L_b/∂γ_c = Σ_s g_{b,c,s} x̂_{b,c,s}`` and ``∂L_b/∂β_c = Σ_s g_{b,c,s}`` over spatial positions s.

InstanceNorm uses the statistics of each sample's own input in training (and in evaluation unless
``track_running_stats=True``), so its outputs never mix samples. Its *running* statistics, when
tracked, are batch averages of training data stored without noise: ``validate`` reports that and
``fix`` turns tracking off.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layer_norm import affine_grads
from .registry import register_grad_sampler
from .per_sample_ops import sum_per_channel


@register_grad_sampler(nn.GroupNorm, batch_dim=0)
def group_norm_grad_sample(
    module: nn.GroupNorm, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Affine gradients of ``GroupNorm``."""
    x = activations[0]
    normalized = F.group_norm(x, module.num_groups, eps=module.eps) if module.weight is not None else None
    return affine_grads(module, normalized, backprops, sum_per_channel)


@register_grad_sampler(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, batch_dim=0)
def instance_norm_grad_sample(
    module: nn.modules.instancenorm._InstanceNorm, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Affine gradients of ``InstanceNorm`` (normalised exactly as the module's forward did)."""
    x = activations[0]
    use_input_stats = module.training or not module.track_running_stats
    normalized = F.instance_norm(
        x,
        None if use_input_stats else module.running_mean,
        None if use_input_stats else module.running_var,
        use_input_stats=use_input_stats,
        eps=module.eps,
    )
    return affine_grads(module, normalized, backprops, sum_per_channel)
