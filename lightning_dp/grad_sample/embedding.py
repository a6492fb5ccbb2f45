"""Embeddings: per-sample rules of :class:`torch.nn.Embedding` and :class:`torch.nn.EmbeddingBag`; the part
of an embedding's factored gradient (:class:`RowsPart`) and of one tied to an output head
(:class:`TiedPart`, with its merge rule), the embedding's forward without weight gradient
(:func:`embedding_forward`) and its factors (:class:`EmbeddingFactors`: the fast clipping path).

Both rules scatter each sample's output gradient into the rows it looked up
(:func:`~lightning_dp.grad_sample.per_sample_ops.per_sample_rows`). The row ``padding_idx`` never receives
gradient (as in PyTorch's own backward), so it gets no per-sample gradient either, hence no noise
signal from any sample.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .clipping_modes import Record, unused_grad, weight_grad_free
from .linear import LinearPart
from .per_sample_ops import per_sample_rows
from .per_sample_parts import Grouping, Part, merge, register_merge_rule, wide
from .registry import Factored, register_factored, register_grad_sampler

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


class RowsPart(Part):
    """Embedding-style gradients: value ``v_n`` added to row ``rows[n]`` of sample ``samples[n]``.

    Norms without the vocabulary dimension, in ``O(N·D)``: values of the same (sample, row) are summed
    (segments of the sorted keys ``sample·V + row``; no ``unique``, so no host sync), then squared and
    summed per sample. ``tokens_per_sample``: set when the entries are sample-major with the same count
    per sample (an ``nn.Embedding`` lookup), which lets a tied output head be combined without
    materialising (:class:`TiedPart`)."""

    def __init__(
        self,
        samples: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        batch_size: int,
        shape: Sequence[int],
        scale: float = 1.0,
        tokens_per_sample: Optional[int] = None,
    ) -> None:
        self.samples, self.rows, self.values = samples, rows, values
        self.batch_size = batch_size
        self.shape = tuple(shape)
        self.scale = scale
        self.tokens_per_sample = tokens_per_sample

    def keep_samples(self, keep: torch.Tensor) -> "RowsPart":
        """The values of dropped samples' entries zeroed (entries and rows stay, adding zeros)."""
        values = torch.where(keep[self.samples].unsqueeze(1), self.values, self.values.new_zeros(()))
        return RowsPart(
            self.samples, self.rows, values, self.batch_size, self.shape, self.scale, self.tokens_per_sample
        )

    def group(self, grouping: Grouping) -> "RowsPart":
        """Over units: each entry belongs to its record's unit, its value scaled by the record's ``w_b``
        (entries of one unit and row are then summed by the norm, as within one sample)."""
        grouping = grouping.on(self.values.device)
        values = wide(self.values) * grouping.weights.to(wide(self.values).dtype)[self.samples].unsqueeze(1)
        return RowsPart(grouping.units[self.samples], self.rows, values, grouping.num_units, self.shape, self.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        # Entries of the same (sample, row) are summed first: segments of the sorted keys. Sizes stay N
        # (no torch.unique, whose output size would make the host wait for the device).
        keys = self.samples * self.shape[0] + self.rows
        order = torch.argsort(keys)
        ordered = keys[order]
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        segment = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0) - 1)  # entry → its segment
        values = wide(self.values)
        summed = values.new_zeros(values.shape).index_add_(0, segment, values)  # segments beyond the last: 0
        owner = torch.zeros_like(order).scatter_(0, segment, self.samples)  # each segment's sample
        return values.new_zeros(self.batch_size).index_add_(0, owner, summed.pow(2).sum(1))

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        values = wide(self.values)
        values = values * factors.to(values.dtype)[self.samples].unsqueeze(1)
        return values.new_zeros(self.shape).index_add_(0, self.rows, values)

    def _materialize(self) -> torch.Tensor:
        return per_sample_rows(self.samples, self.rows, wide(self.values), self.batch_size, self.shape[0])


class TiedPart(Part):
    """An embedding and a Linear sharing one weight ``(V, d)`` (an LM's tied input and output embedding):
    ``‖E_b + H_b‖² = ‖E_b‖² + ‖H_b‖² + 2⟨E_b, H_b⟩`` with the cross term
    ``⟨E_b, H_b⟩ = Σ_{n,t} g_{b,t}[row_n] · (a_{b,t}·v_n)`` from a ``(T_head × T_emb)`` product per sample,
    so the ``B × V × d`` per-sample gradient is never formed; the clipped sum is the two parts' sums."""

    def __init__(self, embedding: RowsPart, head: LinearPart) -> None:
        self.embedding, self.head = embedding, head
        self.shape = embedding.shape
        self.batch_size = embedding.batch_size

    def keep_samples(self, keep: torch.Tensor) -> "TiedPart":
        """Both the embedding and the head part with dropped samples zeroed."""
        return TiedPart(self.embedding.keep_samples(keep), self.head.keep_samples(keep))

    def _cross(self) -> torch.Tensor:
        emb, head = self.embedding, self.head
        b, tokens = emb.batch_size, emb.tokens_per_sample
        a, g = wide(head.a), wide(head.g)
        values = emb.values.view(b, tokens, -1).to(a.dtype)
        rows = emb.rows.view(b, 1, tokens).expand(b, g.shape[1], tokens)
        dots = torch.bmm(a, values.transpose(1, 2))  # (B, T_head, T_emb): a_t · v_n
        return (dots * torch.gather(g, 2, rows)).sum((1, 2)) * (emb.scale * head.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        total = self.embedding.norm_sq(method) + self.head.norm_sq(method) + 2 * self._cross()
        return total.clamp(min=0)  # rounding could leave a tiny negative where E_b ≈ -H_b

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return self.embedding.clipped_sum(factors) + self.head.clipped_sum(factors)

    def _materialize(self) -> torch.Tensor:
        return self.embedding.materialize() + self.head.materialize()


@register_merge_rule
def merge_tied(parts: List[Part]) -> Optional[List[Part]]:
    """One embedding lookup (:class:`RowsPart` with ``tokens_per_sample``) and parts that merge into one
    Linear part on the whole weight with the same batch (a tied output head): their :class:`TiedPart`;
    any other mix with that one lookup: ``None`` (materialised); ``None`` too without such a lookup."""
    embeddings = [p for p in parts if isinstance(p, RowsPart)]
    if len(embeddings) != 1 or embeddings[0].tokens_per_sample is None:
        return None
    others = merge([p for p in parts if p is not embeddings[0]])
    head = others[0] if len(others) == 1 else None
    if isinstance(head, LinearPart) and head.rows is None and head.batch_size == embeddings[0].batch_size:
        return [TiedPart(embeddings[0], head)]
    return None


class _EmbeddingNoGrad(torch.autograd.Function):
    """``F.embedding`` whose backward computes nothing (its input is integer indices)."""

    @staticmethod
    def forward(
        ctx: Any, indices: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int], record: Record = None
    ) -> torch.Tensor:
        ctx.weight, ctx.record = weight, record
        if record is not None:
            ctx.save_for_backward(indices)
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        if ctx.record is not None:
            ctx.record(ctx.saved_tensors[0], grad)
        return None, unused_grad(ctx.weight, ctx.needs_input_grad[1]), None, None


def embedding_fast_ok(module: nn.Embedding) -> bool:
    """Whether the factored path covers this embedding (not ``max_norm``, ``scale_grad_by_freq``, sparse)."""
    return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse


def embedding_forward(module: nn.Embedding, indices: torch.Tensor, record: Record = None) -> torch.Tensor:
    """``module(indices)`` without autograd's weight gradient (when allowed); ``record(indices, grad)`` is
    called once in the backward pass either way."""
    weight, padding_idx = module.weight, module.padding_idx
    return weight_grad_free(
        _EmbeddingNoGrad, (indices, weight, padding_idx, record), lambda: F.embedding(indices, weight, padding_idx),
        indices, record, device_of=weight,
    )


@register_factored(nn.Embedding)
class EmbeddingFactors(Factored):
    """An embedding's gradient as the rows it looked up and the output gradient of each lookup
    (:class:`RowsPart`); not for ``max_norm``, ``scale_grad_by_freq`` or sparse embeddings (their rule
    runs)."""

    def applies(self, module: nn.Module) -> bool:
        return embedding_fast_ok(module)

    def forward(
        self, module: nn.Module, x: torch.Tensor, record: Optional[Callable[[torch.Tensor, torch.Tensor], None]]
    ) -> torch.Tensor:
        return embedding_forward(module, x, record)

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
