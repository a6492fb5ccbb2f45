"""Per-sample gradients of :class:`torch.nn.Embedding`, respecting ``padding_idx``."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .registry import register_grad_sampler


@register_grad_sampler(nn.Embedding)
def embedding_grad_sample(
    module: nn.Embedding, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Scatter each sample's output gradients into the rows it looked up.

    The row ``padding_idx`` never receives gradient (as in PyTorch's own backward), so it gets no
    per-sample gradient either.
    """
    if not module.weight.requires_grad:
        return {}
    indices = activations[0]
    batch_size = indices.shape[0]
    num_embeddings, dim = module.weight.shape
    flat_idx = indices.reshape(batch_size, -1)
    flat_grad = backprops.reshape(batch_size, -1, dim)
    if module.padding_idx is not None:
        keep = (flat_idx != module.padding_idx).unsqueeze(-1)
        flat_grad = flat_grad * keep
    offsets = torch.arange(batch_size, device=indices.device).unsqueeze(1) * num_embeddings
    rows = (flat_idx + offsets).reshape(-1)
    grad_sample = torch.zeros(
        batch_size * num_embeddings, dim, device=backprops.device, dtype=backprops.dtype
    )
    grad_sample.index_add_(0, rows, flat_grad.reshape(-1, dim))
    return {"weight": grad_sample.view(batch_size, num_embeddings, dim)}
