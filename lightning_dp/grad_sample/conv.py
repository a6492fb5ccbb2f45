"""Per-sample gradients of :class:`torch.nn.Conv2d` through ``unfold`` (im2col).

The weight gradient of a convolution is a GEMM between the output gradient ``G: (B, O, L)`` and the
unfolded input patches ``U: (B, C·kh·kw, L)`` (``L`` output positions): per sample, ``G Uᵀ``. Padding
modes other than zeros are applied explicitly before unfolding; ``padding="same"`` is resolved to the
amounts PyTorch uses (extra padding on the right/bottom for even kernels).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_grad_sampler


def _explicit_padding(module: nn.Conv2d) -> List[int]:
    """Padding as ``[left, right, top, bottom]`` (the order ``F.pad`` wants for 2-D)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0, 0, 0, 0]
        pads: List[int] = []
        for dim in (1, 0):  # F.pad order: last spatial dim first
            total = module.dilation[dim] * (module.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = module.padding
    return [pw, pw, ph, ph]


def unfold_conv2d_input(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches of ``module`` for input ``x``: ``(B, C·kh·kw, L)`` in the weight's memory order."""
    pads = _explicit_padding(module)
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)


@register_grad_sampler(nn.Conv2d)
def conv2d_grad_sample(
    module: nn.Conv2d, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample ``∂L_b/∂W`` (grouped GEMM of output gradients with input patches) and bias sums."""
    x = activations[0]
    batch_size = x.shape[0]
    grads_out = backprops.reshape(batch_size, module.out_channels, -1)  # (B, O, L)
    grads: Dict[str, torch.Tensor] = {}
    if module.weight.requires_grad:
        patches = unfold_conv2d_input(module, x)  # (B, C·k, L)
        groups = module.groups
        g = grads_out.reshape(batch_size, groups, module.out_channels // groups, -1)
        p = patches.reshape(batch_size, groups, patches.shape[1] // groups, -1)
        weight_grad = torch.einsum("bgol,bgil->bgoi", g, p)
        grads["weight"] = weight_grad.reshape(batch_size, *module.weight.shape)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = grads_out.sum(dim=2)
    return grads
