"""Per-sample clipping: norms, clip factors and the clipped sum (flat clipping over all parameters)."""
from __future__ import annotations

from typing import Sequence

import torch


def per_sample_norms(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each sample's gradient over all given tensors (each ``(B, ...)``) → ``(B,)``."""
    squared = [g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grad_samples]
    return torch.stack(squared, dim=0).sum(dim=0).sqrt()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / ‖g_b‖)`` for each sample, computed as ``C / max(‖g_b‖, C)`` (safe at norm 0)."""
    return max_grad_norm / norms.clamp(min=max_grad_norm)


def clipped_sum(grad_sample: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``Σ_b factors[b] · grad_sample[b]`` without materialising the scaled copy."""
    flat = grad_sample.reshape(grad_sample.shape[0], -1)
    return (factors.to(flat.dtype) @ flat).view(grad_sample.shape[1:])
