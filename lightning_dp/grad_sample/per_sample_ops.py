"""Tensor helpers shared by the per-sample gradient rules and parts (no layer logic here).

Helpers take tensors with the batch dimension first and return per-sample results ``(B, ...)``
(:func:`place_rows` places a summed block too).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def flatten_middle(tensor: torch.Tensor) -> torch.Tensor:
    """Reshape ``(B, *middle, F)`` to ``(B, T, F)`` with ``T = prod(middle)`` (``T = 1`` for 2-D input)."""
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def sum_outer(backprops: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Per-sample ``Σ_t g_t a_tᵀ`` for ``g: (B, T, O)`` and ``a: (B, T, I)`` → ``(B, O, I)``."""
    return torch.bmm(backprops.transpose(1, 2), activations)


def sum_over_middle(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``(B, *middle, F)`` over the middle dimensions → ``(B, F)``."""
    return flatten_middle(tensor).sum(dim=1)


def sum_per_channel(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``(B, C, *spatial)`` over the spatial dimensions → ``(B, C)``."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1).sum(dim=2)


def sum_to_shape(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Per-sample sum of ``(B, *dims)`` down to ``(B, *shape)``, where ``shape`` are the trailing dims."""
    n = len(shape)
    if n == 0:
        return tensor.reshape(tensor.shape[0], -1).sum(dim=1)
    return tensor.reshape(tensor.shape[0], -1, *tensor.shape[-n:]).sum(dim=1).reshape(tensor.shape[0], *shape)


def conv_patches(
    x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> torch.Tensor:
    """Sliding windows of an (already padded) input, any number of spatial dims, as a strided view.

    ``x: (B, C, *S)`` → ``(B, C, *L, *K)`` with ``L`` the output positions and ``K = kernel_size``:
    ``patches[b, c, l…, k…] = x[b, c, l·stride + k·dilation]`` (the im2col of a convolution).
    """
    spatial = len(kernel_size)
    for d in range(spatial):
        span = dilation[d] * (kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])  # window appended as the last dim
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    return x


def conv_weight_grad(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Per-sample weight gradient of ``y = conv(x, W)`` (``x`` already padded): ``(B, O, C/groups, *K)``.

    ``∂L_b/∂W[o, c, k] = Σ_l g[b, o, l] · x[b, c, l·stride + k·dilation]``, grouped channels kept apart.
    """
    batch_size, channels = x.shape[:2]
    out_channels = grad_out.shape[1]
    spatial = len(kernel_size)
    patches = conv_patches(x, kernel_size, stride, dilation)  # (B, C, *L, *K)
    positions = patches.shape[2 : 2 + spatial]
    grad_out = grad_out[(slice(None), slice(None), *(slice(0, n) for n in positions))]
    patches = patches.reshape(batch_size, groups, channels // groups, -1, *kernel_size).flatten(4)
    g = grad_out.reshape(batch_size, groups, out_channels // groups, -1)
    weight_grad = torch.einsum("bgol,bgclk->bgock", g, patches)
    return weight_grad.reshape(batch_size, out_channels, channels // groups, *kernel_size)


def pad_input(x: torch.Tensor, pads: Sequence[int], mode: str) -> torch.Tensor:
    """``F.pad`` with a conv ``padding_mode`` name (``"zeros"`` → constant); no-op without padding."""
    if not any(pads):
        return x
    return F.pad(x, list(pads), mode="constant" if mode == "zeros" else mode)


def per_sample_rows(
    batch_ids: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, batch_size: int, num_rows: int
) -> torch.Tensor:
    """Scatter-add ``values[i]`` into row ``rows[i]`` of sample ``batch_ids[i]`` → ``(B, num_rows, D)``."""
    out = torch.zeros(batch_size * num_rows, values.shape[-1], device=values.device, dtype=values.dtype)
    out.index_add_(0, batch_ids * num_rows + rows, values)
    return out.view(batch_size, num_rows, values.shape[-1])


def place_rows(
    block: torch.Tensor, full_shape: Sequence[int], rows: slice | None, batched: bool = False
) -> torch.Tensor:
    """``block``, the gradient of the rows ``rows`` of a packed parameter of ``full_shape`` (attention's
    ``in_proj_weight``), placed in zeros of that shape; ``batched``: per-sample, ``(B, *param.shape)``.
    ``block`` itself when ``rows`` is ``None``."""
    if rows is None:
        return block
    lead = (block.shape[0],) if batched else ()
    out = block.new_zeros(*lead, *full_shape)
    out[(slice(None), rows) if batched else rows] = block
    return out
