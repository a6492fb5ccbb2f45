"""Shared tensor helpers for the per-sample gradient rules (no layer logic here)."""
from __future__ import annotations

import torch


def flatten_middle(tensor: torch.Tensor) -> torch.Tensor:
    """Reshape ``(B, *middle, F)`` to ``(B, T, F)`` with ``T = prod(middle)`` (``T = 1`` for 2-D input)."""
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def sum_outer(backprops: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Per-sample ``Σ_t g_t a_tᵀ`` for ``g: (B, T, O)`` and ``a: (B, T, I)`` → ``(B, O, I)``."""
    return torch.bmm(backprops.transpose(1, 2), activations)


def sum_over_middle(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``(B, *middle, F)`` over the middle dimensions → ``(B, F)``."""
    return flatten_middle(tensor).sum(dim=1)
