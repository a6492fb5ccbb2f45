"""Per-sample gradients of :class:`torch.nn.Embedding` and :class:`torch.nn.EmbeddingBag`.

Both scatter each sample's output gradient into the rows it looked up
(:func:`~lightning_dp.grad_sample.utils.per_sample_rows`). The row ``padding_idx`` never receives
gradient (as in PyTorch's own backward), so it gets no per-sample gradient either, hence no noise
signal from any sample.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import fast
from .bookkeeping import Part, RowsPart
from .registry import Factored, register_factored, register_grad_sampler
from .utils import per_sample_rows

_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


@register_grad_sampler(nn.Embedding)
def embedding_grad_sample(
    module: nn.Embedding, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """``∂L_b/∂E[r] = Σ_{t: idx[b,t]=r, r≠padding_idx} g[b,t]``."""
    if not module.weight.requires_grad:
        return {}
    indices = activations[0]
    batch_size = indices.shape[0]
    dim = module.weight.shape[1]
    flat_idx = indices.reshape(batch_size, -1)
    flat_grad = backprops.reshape(batch_size, -1, dim)
    if module.padding_idx is not None:
        flat_grad = flat_grad * (flat_idx != module.padding_idx).unsqueeze(-1)
    batch_ids = torch.arange(batch_size, device=indices.device).repeat_interleave(flat_idx.shape[1])
    return {
        "weight": per_sample_rows(
            batch_ids, flat_idx.reshape(-1), flat_grad.reshape(-1, dim), batch_size, module.num_embeddings
        )
    }


@register_factored(nn.Embedding)
class EmbeddingFactors(Factored):
    """An embedding's gradient as the rows it looked up and the output gradient of each lookup
    (:class:`~lightning_dp.grad_sample.bookkeeping.RowsPart`); not for ``max_norm``,
    ``scale_grad_by_freq`` or sparse embeddings (their rule runs)."""

    def applies(self, module: nn.Module) -> bool:
        return fast.embedding_fast_ok(module)

    def forward(
        self, module: nn.Module, x: torch.Tensor, record: Optional[Callable[[torch.Tensor, torch.Tensor], None]]
    ) -> torch.Tensor:
        return fast.embedding_forward(module, x, record)

    def parts(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, scale: float
    ) -> List[Tuple[nn.Parameter, Part]]:
        weight = module.weight
        if not weight.requires_grad:
            return []
        batch_size = grad.shape[0]
        rows = x.reshape(-1)
        values = grad.reshape(-1, weight.shape[1])
        if module.padding_idx is not None:
            values = values * (rows != module.padding_idx).unsqueeze(1).to(values.dtype)
        tokens = rows.numel() // batch_size
        samples = torch.arange(batch_size, device=rows.device).repeat_interleave(tokens)
        return [(weight, RowsPart(samples, rows, values, batch_size, weight.shape, scale, tokens))]


def _bags(
    module: nn.EmbeddingBag, indices: torch.Tensor, offsets: torch.Tensor | None, batch_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(flat indices, bag of each index, offsets)`` for 2-D input or 1-D input with offsets."""
    if indices.dim() == 2:
        length = indices.shape[1]
        bag_ids = torch.arange(batch_size, device=indices.device).repeat_interleave(length)
        offsets = torch.arange(0, batch_size * length, length, device=indices.device) if length else None
        return indices.reshape(-1), bag_ids, offsets
    assert offsets is not None
    starts = offsets[:batch_size]
    ends = offsets[1 : batch_size + 1] if module.include_last_offset else torch.cat(
        [offsets[1:], offsets.new_tensor([indices.numel()])]
    )
    lengths = ends - starts
    bag_ids = torch.arange(batch_size, device=indices.device).repeat_interleave(lengths)
    return indices[int(starts[0]) : int(starts[0]) + bag_ids.numel()], bag_ids, offsets


@register_grad_sampler(nn.EmbeddingBag, batch_dim=0)
def embedding_bag_grad_sample(
    module: nn.EmbeddingBag, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """One bag is one sample. ``sum``: ``∂L_b/∂E[r] = Σ_{i∈bag b, idx_i=r} w_i g_b``; ``mean`` divides by
    the bag's count of non-padding indices; ``max`` routes ``g_b[d]`` to the row that won dimension d."""
    if not module.weight.requires_grad:
        return {}
    indices = activations[0]
    offsets = activations[1] if len(activations) > 1 else None
    weights = activations[2] if len(activations) > 2 else None
    batch_size, dim = backprops.shape
    flat_idx, bag_ids, offsets = _bags(module, indices, offsets, batch_size)
    num_rows = module.num_embeddings
    if module.mode == "max":
        _, _, bag_size, max_rows = torch.embedding_bag(
            module.weight.detach(), flat_idx, offsets, False, _BAG_MODES["max"], False, None,
            module.include_last_offset and indices.dim() == 1, module.padding_idx,
        )
        filled = (max_rows >= 0) & (bag_size > 0).unsqueeze(1)
        grad = backprops.new_zeros(batch_size, num_rows, dim)
        grad.scatter_add_(1, max_rows.clamp(min=0).unsqueeze(1), (backprops * filled).unsqueeze(1))
        return {"weight": grad}
    scale = backprops.new_ones(flat_idx.shape)
    if weights is not None:
        scale = scale * weights.reshape(-1)[: flat_idx.numel()].to(scale.dtype)
    if module.padding_idx is not None:
        scale = scale * (flat_idx != module.padding_idx)
    if module.mode == "mean":
        kept = backprops.new_zeros(batch_size).index_add_(
            0, bag_ids, (flat_idx != module.padding_idx).to(backprops.dtype) if module.padding_idx is not None
            else backprops.new_ones(flat_idx.shape)
        )
        scale = scale / kept.clamp(min=1)[bag_ids]
    values = backprops[bag_ids] * scale.unsqueeze(1)
    return {"weight": per_sample_rows(bag_ids, flat_idx, values, batch_size, num_rows)}
