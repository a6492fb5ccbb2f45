"""Adding Gaussian noise from any noise source into tensors, in place: the one call every release of the
package draws its noise through (DP-SGD steps, adaptive clipping's count, private centres)."""
from __future__ import annotations

from typing import Any, List

import torch

NOISE_PIECE = 1 << 16
"""A noise source without ``add_normal_`` is asked for this many normals at a time (64× on GPU), each
added to the clipped sum at once: the step never holds a second parameter-sized tensor."""


@torch.no_grad()
def add_noise_(noise: Any, tensors: List[torch.Tensor], std: float) -> None:
    """Add i.i.d. ``N(0, std²)`` from ``noise`` to every element of ``tensors`` (contiguous), in place:
    through ``noise.add_normal_`` when the source has one (:class:`~lightning_dp.noise.GaussianNoise`,
    :class:`~lightning_dp.noise.SecureRNG`: one draw for all of the step's tensors), else ``NOISE_PIECE``
    draws of ``noise.normal`` at a time (a user's source with only ``normal``)."""
    add_normal = getattr(noise, "add_normal_", None)
    if add_normal is not None:
        add_normal(tensors, std)
        return
    for tensor in tensors:
        flat = tensor.view(-1)
        piece_size = NOISE_PIECE if tensor.device.type == "cpu" else 64 * NOISE_PIECE
        for start in range(0, flat.numel(), piece_size):
            piece = flat[start : start + piece_size]
            piece.add_(noise.normal(piece.shape, std=std, device=tensor.device, dtype=tensor.dtype))
