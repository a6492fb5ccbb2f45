"""DP forward of :class:`torch.nn.MultiheadAttention` (and so of ``nn.Transformer*Layer``).

``F.multi_head_attention_forward`` is one fused call whose projections hooks cannot see. While hooks
are attached, the module runs this equivalent forward instead: the same math written with recorded
projections (:meth:`~lightning_dp.grad_sample.per_sample_recorder.PerSampleRecorder.linear`) on the
module's *own* parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj.*``,
``bias_k``/``bias_v``), so ``state_dict`` keys, optimizers and checkpoints are untouched. Dropout on the
attention weights happens once, in this forward, so per-sample gradients match the step exactly.

Supported: ``batch_first`` both ways, unbatched input, ``kdim``/``vdim``, ``bias`` on/off,
``add_bias_kv``, ``add_zero_attn``, ``key_padding_mask`` and ``attn_mask`` (bool or float, 2-D or
``(N·heads, L, S)``), ``is_causal`` (with its ``attn_mask``, as PyTorch requires), ``need_weights``
and ``average_attn_weights``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_dp_forward


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Bool masks (``True`` = not allowed) → ``-inf``/0; float masks are added as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _pad_last(mask: Optional[torch.Tensor], extra: int) -> Optional[torch.Tensor]:
    return None if mask is None else F.pad(mask, (0, extra))


@register_dp_forward(nn.MultiheadAttention)
def mha_forward(
    module: nn.MultiheadAttention,
    rec: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[torch.Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same inputs and outputs as ``nn.MultiheadAttention.forward``."""
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
    self_attention = query is key and key is value
    batched = query.dim() == 3
    if not batched:
        query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    rec.note_batch_size(query.shape[0])
    q, k, v = _projections(module, rec, query, key, value, self_attention)
    attn_mask = _additive(attn_mask, q.dtype)
    key_padding_mask = _additive(key_padding_mask, q.dtype)
    k, v, attn_mask, key_padding_mask = _extra_keys(module, rec, k, v, attn_mask, key_padding_mask)
    out, weights = _attention(module, q, k, v, attn_mask, key_padding_mask, batched)
    out = rec.linear(out, module.out_proj.weight, module.out_proj.bias)

    if not batched:
        out = out.squeeze(0)
    elif not module.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    if average_attn_weights:
        weights = weights.mean(dim=1)
    return out, weights if batched else weights.squeeze(0)


def _projections(
    module: nn.MultiheadAttention, rec: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    self_attention: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recorded input projections ``(q, k, v)`` of batch-first ``query``, ``key``, ``value``."""
    embed_dim = query.shape[2]
    bias = module.in_proj_bias
    if module._qkv_same_embed_dim and self_attention:
        q, k, v = rec.linear(query, module.in_proj_weight, bias).chunk(3, dim=-1)
        return q, k, v
    blocks = [slice(i * embed_dim, (i + 1) * embed_dim) for i in range(3)]
    if module._qkv_same_embed_dim:
        weights = [(module.in_proj_weight, b) for b in blocks]
    else:
        weights = [(module.q_proj_weight, None), (module.k_proj_weight, None), (module.v_proj_weight, None)]
    q, k, v = (
        rec.linear(x, w, bias, weight_rows=w_rows, bias_rows=b_rows)
        for x, (w, w_rows), b_rows in zip((query, key, value), weights, blocks)
    )
    return q, k, v


def _extra_keys(
    module: nn.MultiheadAttention, rec: Any, k: torch.Tensor, v: torch.Tensor,
    attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Keys and values with ``bias_k``/``bias_v`` and the zero attention position appended (when the
    module adds them), and both masks padded to match."""
    batch_size, _, embed_dim = k.shape
    if module.bias_k is not None:
        k = torch.cat([k, rec.expand(module.bias_k, batch_size).reshape(batch_size, 1, embed_dim)], dim=1)
        v = torch.cat([v, rec.expand(module.bias_v, batch_size).reshape(batch_size, 1, embed_dim)], dim=1)
        attn_mask, key_padding_mask = _pad_last(attn_mask, 1), _pad_last(key_padding_mask, 1)
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch_size, 1, embed_dim)], dim=1)
        v = torch.cat([v, v.new_zeros(batch_size, 1, embed_dim)], dim=1)
        attn_mask, key_padding_mask = _pad_last(attn_mask, 1), _pad_last(key_padding_mask, 1)
    return k, v, attn_mask, key_padding_mask


def _attention(
    module: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], batched: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention of the projected ``q``, ``k``, ``v`` ``(B, L|S, E)`` over the heads:
    the output before ``out_proj`` ``(B, L, E)`` and the attention weights ``(B, H, L, S)``."""
    batch_size, tgt_len, embed_dim = q.shape
    src_len = k.shape[1]
    heads, head_dim = module.num_heads, module.head_dim
    q = q.reshape(batch_size, tgt_len, heads, head_dim).transpose(1, 2)
    k = k.reshape(batch_size, src_len, heads, head_dim).transpose(1, 2)
    v = v.reshape(batch_size, src_len, heads, head_dim).transpose(1, 2)
    scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)  # (B, H, L, S)
    if attn_mask is not None:
        if attn_mask.dim() == 3 and batched:
            attn_mask = attn_mask.reshape(batch_size, heads, tgt_len, src_len)
        scores = scores + attn_mask
    if key_padding_mask is not None:
        scores = scores + key_padding_mask.reshape(batch_size, 1, 1, src_len)
    weights = torch.softmax(scores, dim=-1)
    if module.dropout > 0.0:
        weights = F.dropout(weights, p=module.dropout, training=module.training)
    return (weights @ v).transpose(1, 2).reshape(batch_size, tgt_len, embed_dim), weights
