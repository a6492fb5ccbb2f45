"""Per-sample gradients of convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``.

The weight gradient of a convolution is a contraction of the output gradient ``G: (B, O, *L)`` with
the input windows (im2col) ``X: (B, C, *L, *K)`` over the output positions ``L``, per sample and per
group (:func:`~lightning_dp.grad_sample.utils.conv_weight_grad`). Padding is applied explicitly first,
exactly as the module does (``padding="same"``, and ``reflect`` / ``replicate`` / ``circular`` modes,
through the module's own ``_reversed_padding_repeated_twice``).

A transposed convolution is the adjoint of a convolution with the same weight, stride, padding and
dilation: ``⟨g, convᵀ_W(x)⟩ = ⟨conv_W(g), x⟩``, so its per-sample weight gradient is the convolution
weight gradient with the roles swapped — the output gradient as the input, the input as the output
gradient (``output_padding`` only adds positions that no window reads).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import fast
from .bookkeeping import BiasPart, ConvPart, Part
from .registry import Factored, register_factored, register_grad_sampler
from .utils import conv_weight_grad, pad_input, sum_per_channel


def _bias_grad(module: nn.Module, backprops: torch.Tensor, grads: Dict[str, torch.Tensor]) -> None:
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = sum_per_channel(backprops)


@register_grad_sampler(nn.Conv1d, nn.Conv2d, nn.Conv3d, batch_dim=0)
def conv_grad_sample(
    module: nn.modules.conv._ConvNd, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample ``∂L_b/∂W[o,c,k] = Σ_l g[b,o,l] x_pad[b,c,l·s+k·d]`` and bias sums."""
    grads: Dict[str, torch.Tensor] = {}
    if module.weight.requires_grad:
        x = pad_input(activations[0], module._reversed_padding_repeated_twice, module.padding_mode)
        grads["weight"] = conv_weight_grad(
            x, backprops, module.kernel_size, module.stride, module.dilation, module.groups
        )
    _bias_grad(module, backprops, grads)
    return grads


@register_grad_sampler(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, batch_dim=0)
def conv_transpose_grad_sample(
    module: nn.modules.conv._ConvTransposeNd, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample weight gradient via the adjoint convolution (module docstring) and bias sums."""
    grads: Dict[str, torch.Tensor] = {}
    if module.weight.requires_grad:
        pads = [p for p in reversed(module.padding) for _ in range(2)]
        g = pad_input(backprops, pads, "zeros")
        grads["weight"] = conv_weight_grad(
            g, activations[0], module.kernel_size, module.stride, module.dilation, module.groups
        )
    _bias_grad(module, backprops, grads)
    return grads


@register_factored(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvFactors(Factored):
    """A convolution's weight gradient from its (padded) input and output gradient
    (:class:`~lightning_dp.grad_sample.bookkeeping.ConvPart`); the bias gradient sums the output
    gradient over positions."""

    batch_dim = 0

    def forward(
        self, module: nn.Module, x: torch.Tensor, record: Optional[Callable[[torch.Tensor, torch.Tensor], None]]
    ) -> torch.Tensor:
        if fast.conv_padding(module) is None:  # padding the convolution cannot apply itself
            x = pad_input(x, module._reversed_padding_repeated_twice, module.padding_mode)
        return fast.conv_forward(module, x, record)

    def parts(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, scale: float
    ) -> List[Tuple[nn.Parameter, Part]]:
        parts: List[Tuple[nn.Parameter, Part]] = []
        if module.weight.requires_grad:
            padding = fast.conv_padding(module) or [0] * len(module.kernel_size)
            parts.append((module.weight, ConvPart(module, x, grad, padding, scale)))
        bias = module.bias
        if bias is not None and bias.requires_grad:
            parts.append((bias, BiasPart(grad.flatten(2).transpose(1, 2), bias.shape, scale=scale)))
        return parts
