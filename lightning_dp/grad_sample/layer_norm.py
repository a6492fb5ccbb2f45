"""Per-sample gradients of :class:`torch.nn.LayerNorm` and :class:`torch.nn.RMSNorm`.

Both normalise over the trailing ``normalized_shape`` and apply an elementwise affine map, so
``∂L_b/∂γ = Σ g ⊙ x̂`` and ``∂L_b/∂β = Σ g``, summed over each sample's non-normalised positions.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_grad_sampler
from .per_sample_ops import sum_to_shape


def affine_grads(
    module: nn.Module, normalized: Optional[torch.Tensor], backprops: torch.Tensor, reduce: "callable"
) -> Dict[str, torch.Tensor]:
    """``{"weight": reduce(g ⊙ x̂), "bias": reduce(g)}`` for the module's trainable affine parameters.

    Shared by every normalisation layer; ``reduce`` sums ``(B, ...)`` to ``(B, *param.shape)``.
    """
    grads: Dict[str, torch.Tensor] = {}
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if weight is not None and weight.requires_grad and normalized is not None:
        grads["weight"] = reduce(normalized * backprops)
    if bias is not None and bias.requires_grad:
        grads["bias"] = reduce(backprops)
    return grads


@register_grad_sampler(nn.LayerNorm)
def layer_norm_grad_sample(
    module: nn.LayerNorm, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Affine gradients of ``LayerNorm`` (weight and optional bias)."""
    x = activations[0]
    shape = tuple(module.normalized_shape)
    normalized = F.layer_norm(x, shape, eps=module.eps) if module.weight is not None else None
    return affine_grads(module, normalized, backprops, lambda t: sum_to_shape(t, shape))


@register_grad_sampler(nn.RMSNorm)
def rms_norm_grad_sample(
    module: nn.RMSNorm, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Gradient of the ``RMSNorm`` scale: ``Σ g ⊙ x / rms(x)``."""
    x = activations[0]
    shape = tuple(module.normalized_shape)
    normalized = F.rms_norm(x, shape, eps=module.eps) if module.weight is not None else None
    return affine_grads(module, normalized, backprops, lambda t: sum_to_shape(t, shape))
