"""Linear maps ``y = x Wᵀ + b``: the per-sample rule of :class:`torch.nn.Linear` (any number of leading
dimensions), the parts of its factored gradient (:class:`LinearPart`, :class:`BiasPart`) and how parts on
the same rows merge, its forward without weight gradients (:func:`linear_forward`), and its factors
(:class:`LinearFactors`: the fast clipping path, also of the recorded projections of attention and RNNs).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..centering import centered_input
from .clipping_modes import Record, unused_grad, weight_grad_free
from .per_sample_ops import flatten_middle, place_rows, sum_outer, sum_over_middle
from .per_sample_parts import (
    Grouping, Part, pad_units, register_merge_rule, scaled_rows, use_ghost, wide, wide_dtype, zero_rows,
)
from .registry import Factored, register_factored, register_grad_sampler


def linear_param_grads(
    x: torch.Tensor, backprops: torch.Tensor, weight: bool = True, bias: bool = True
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample ``(∂L_b/∂W, ∂L_b/∂bias)`` of ``y = x Wᵀ + bias`` for batch-first ``x: (B, *, I)``.

    ``∂L_b/∂W = Σ_t g_{b,t} a_{b,t}ᵀ`` and ``∂L_b/∂bias = Σ_t g_{b,t}`` over all middle positions t.
    Shared by the Linear rule and the recorded projections of attention and RNNs.
    """
    gw = sum_outer(flatten_middle(backprops), flatten_middle(x)) if weight else None
    gb = sum_over_middle(backprops) if bias else None
    return gw, gb


@register_grad_sampler(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def linear_grad_sample(
    module: nn.Linear, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample weight and bias gradients (see :func:`linear_param_grads`; a centred layer's weight
    gradient is that of its centred input, see :mod:`lightning_dp.centering`)."""
    need_bias = module.bias is not None and module.bias.requires_grad
    gw, gb = linear_param_grads(centered_input(module, activations[0]), backprops, module.weight.requires_grad, need_bias)
    grads: Dict[str, torch.Tensor] = {}
    if gw is not None:
        grads["weight"] = gw
    if gb is not None:
        grads["bias"] = gb
    return grads


class SharedSquares:
    """Each sample's ``‖g_b‖²`` of an output gradient ``g: (B, 1, O)`` (one position), computed once for
    the weight and the bias part of the layer that both use it."""

    __slots__ = ("g", "_value")

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g
        self._value: Optional[torch.Tensor] = None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            self._value = torch.linalg.vector_norm(wide(self.g), dim=(1, 2)).square()
        return self._value


class LinearPart(Part):
    """``∇W_b = Σ_t g_{b,t} a_{b,t}ᵀ`` for ``A: (B, T, I)``, ``G: (B, T, O)``, reshaped to ``shape``;
    ``rows`` places it in a block of rows of a packed parameter (attention's ``in_proj_weight``)."""

    def __init__(
        self,
        activations: torch.Tensor,
        backprops: torch.Tensor,
        shape: Sequence[int],
        rows: Optional[slice] = None,
        scale: float = 1.0,
        g_squares: Optional[SharedSquares] = None,
    ) -> None:
        self.a = activations
        self.g = backprops
        self.shape = tuple(shape)
        self.rows = rows
        self.scale = scale
        self.batch_size = activations.shape[0]
        self.g_squares = g_squares  # ‖g_b‖² shared with the layer's bias part (one position only)

    def as_linear(self) -> "LinearPart":
        return self

    def keep_samples(self, keep: torch.Tensor) -> "LinearPart":
        """Both factors zeroed for dropped samples (a NaN in either would survive a zero factor)."""
        return LinearPart(zero_rows(self.a, keep), zero_rows(self.g, keep), self.shape, self.rows, self.scale)

    def group(self, grouping: Grouping) -> "LinearPart":
        """Over units: each unit's records concatenated along the positions, ``G`` scaled by ``w_b``
        (``Σ_{b∈u} w_b Σ_t g_{b,t} a_{b,t}ᵀ`` is one longer sequence's gradient); norms and sums stay exact."""
        g = pad_units(scaled_rows(self.g, grouping.on(self.g.device).weights), grouping)
        return LinearPart(pad_units(self.a, grouping), g, self.shape, self.rows, self.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        a = wide(self.a)
        positions, in_features, out_features = a.shape[1], a.shape[2], self.g.shape[2]
        if positions == 1:  # ‖g aᵀ‖ = ‖g‖·‖a‖
            g_sq = (self.g_squares() if self.g_squares is not None
                    else torch.linalg.vector_norm(wide(self.g), dim=(1, 2)).square())
            return torch.linalg.vector_norm(a, dim=(1, 2)).square() * g_sq
        g = wide(self.g)
        if use_ghost(positions, in_features, out_features, method):
            return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))

    def _block(self) -> Tuple[int, ...]:
        return self.shape if self.rows is None else (self.g.shape[2], *self.shape[1:])

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        # (c ⊙ G)ᵀA = Gᵀ(c ⊙ A): scale whichever of the two is smaller (A for a wide output head).
        if self.a.shape[2] < self.g.shape[2]:
            a, g = scaled_rows(self.a, factors), wide(self.g)
        else:
            a, g = wide(self.a), scaled_rows(self.g, factors)
        block = (g.reshape(-1, g.shape[2]).t() @ a.reshape(-1, a.shape[2])).view(self._block())
        return place_rows(block, self.shape, self.rows)

    def _materialize(self) -> torch.Tensor:
        block = torch.bmm(wide(self.g).transpose(1, 2), wide(self.a)).view(self.batch_size, *self._block())
        return place_rows(block, self.shape, self.rows, batched=True)


class BiasPart(Part):
    """A bias gradient: each sample's output gradient summed over its positions, ``g: (B, T, O)``; with
    ``T = 1`` (a plain Linear) that is ``g`` itself, used without a copy. ``rows`` as in :class:`LinearPart`."""

    def __init__(
        self,
        backprops: torch.Tensor,
        shape: Sequence[int],
        rows: Optional[slice] = None,
        scale: float = 1.0,
        g_squares: Optional[SharedSquares] = None,
    ) -> None:
        self.g = backprops
        self.shape = tuple(shape)
        self.rows = rows
        self.scale = scale
        self.batch_size = backprops.shape[0]
        self.g_squares = g_squares  # ‖g_b‖², shared with the layer's weight part
        self._summed: Optional[torch.Tensor] = None

    def _per_sample(self) -> torch.Tensor:
        if self.g.shape[1] == 1:
            return wide(self.g[:, 0])
        if self._summed is None:  # summed over positions once, for the norm and the clipped sum
            self._summed = self.g.sum(1, dtype=wide_dtype(self.g.dtype))
        return self._summed

    def as_linear(self) -> LinearPart:
        ones = self.g.new_ones(self.g.shape[0], self.g.shape[1], 1)
        return LinearPart(ones, self.g, self.shape, self.rows, self.scale)

    def keep_samples(self, keep: torch.Tensor) -> "BiasPart":
        """The output gradient zeroed for dropped samples."""
        return BiasPart(zero_rows(self.g, keep), self.shape, self.rows, self.scale)

    def group(self, grouping: Grouping) -> "BiasPart":
        """Over units: each unit's records' output gradients, scaled by ``w_b``, as one longer sequence."""
        g = pad_units(scaled_rows(self.g, grouping.on(self.g.device).weights), grouping)
        return BiasPart(g, self.shape, self.rows, self.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        if self.g_squares is not None:
            return self.g_squares()
        return torch.linalg.vector_norm(self._per_sample(), dim=1).square()

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        per_sample = self._per_sample()
        return place_rows(factors.to(per_sample.dtype) @ per_sample, self.shape, self.rows)

    def _materialize(self) -> torch.Tensor:
        return place_rows(self._per_sample(), self.shape, self.rows, batched=True)


@register_merge_rule
def merge_positions(parts: List[Part]) -> Optional[List[Part]]:
    """Parts that are all ``(A, G)`` pairs over positions (:meth:`Part.as_linear`: Linear, bias, ungrouped
    Conv): those on the same rows merged into one by concatenating positions
    (``Σ_i G_iᵀA_i = [G_1;G_2]ᵀ[A_1;A_2]``), disjoint row blocks kept apart, overlapping ones materialised
    (they would need cross terms); ``None`` when some part has no such pair."""
    blocks: Dict[Optional[Tuple[int, int]], List[LinearPart]] = {}
    for part in parts:
        linear = part.as_linear()
        if linear is None:
            return None
        key = None if linear.rows is None else (linear.rows.start, linear.rows.stop)
        blocks.setdefault(key, []).append(linear)
    keys = list(blocks)
    if len(keys) > 1:
        spans = sorted(keys) if None not in keys else []
        if not spans or any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1)):
            return None  # overlapping blocks: materialised
    return [group[0] if len(group) == 1 else _concatenated(group) for group in blocks.values()]


def _concatenated(group: List[LinearPart]) -> LinearPart:
    """One part whose positions are those of every part of ``group`` (the same rows)."""
    scale = group[0].scale
    same_scale = all(p.scale == scale for p in group)
    # each factor in the widest dtype among the parts (autocast may leave A float32 and G bf16); G
    # rescaled per part is widened first, so the scales are not rounded to bf16
    a_dtype = functools.reduce(torch.promote_types, [p.a.dtype for p in group])
    g_dtype = functools.reduce(torch.promote_types, [p.g.dtype for p in group])
    g_dtype = g_dtype if same_scale else wide_dtype(g_dtype)
    a = torch.cat([p.a.to(a_dtype) for p in group], dim=1)
    g = torch.cat([p.g.to(g_dtype) * (1.0 if same_scale else p.scale) for p in group], dim=1)
    return LinearPart(a, g, group[0].shape, group[0].rows, scale if same_scale else 1.0)


class _LinearInputGrad(torch.autograd.Function):
    """``F.linear`` whose backward returns the input gradient only (and hands ``(x, grad)`` to ``record``)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], record: Record = None
    ) -> torch.Tensor:
        if record is not None:
            ctx.save_for_backward(weight, x)
        else:
            ctx.save_for_backward(weight)
        ctx.bias, ctx.record = bias, record
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        saved = ctx.saved_tensors  # read once: non-reentrant checkpointing refuses a second read
        weight = saved[0]
        if ctx.record is not None:
            ctx.record(saved[1].detach(), grad)
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return (
            grad_x, unused_grad(weight, ctx.needs_input_grad[1]), unused_grad(ctx.bias, ctx.needs_input_grad[2]),
            None,
        )


def linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], record: Record = None
) -> torch.Tensor:
    """``F.linear`` without autograd's weight and bias gradients (when allowed, see
    :mod:`~lightning_dp.grad_sample.clipping_modes`); ``record(x, grad)`` is called once in the backward
    pass either way."""
    return weight_grad_free(_LinearInputGrad, (x, weight, bias, record), lambda: F.linear(x, weight, bias), x, record)


class LinearFactors(Factored):
    """``y = x Wᵀ + b`` over the last dimension of ``x``: ``∇W_b = Σ_t g_{b,t} a_{b,t}ᵀ`` from the input
    ``a`` and output gradient ``g`` (:class:`LinearPart`), ``∇b_b = Σ_t g_{b,t}`` (:class:`BiasPart`).

    Args:
        transposed: the weight is stored ``(in, out)``, ``y = x W + b`` (Hugging Face's ``Conv1D``): its
            gradient ``Σ_t a_{b,t} g_{b,t}ᵀ`` is the same part with the two factors in swapped roles.
    """

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    def forward(
        self, module: nn.Module, x: torch.Tensor, record: Optional[Callable[[torch.Tensor, torch.Tensor], None]]
    ) -> torch.Tensor:
        weight = module.weight.t() if self.transposed else module.weight
        return linear_forward(x, weight, module.bias, record)

    def parts(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, scale: float
    ) -> List[Tuple[nn.Parameter, Part]]:
        weight, bias = module.weight, module.bias
        a, g = flatten_middle(centered_input(module, x)), flatten_middle(grad)
        need_bias = bias is not None and bias.requires_grad
        # one position per sample: ‖g_b‖² serves both parts (the bias part reads g in its own dtype too,
        # widened while it computes, as every part does)
        shared = SharedSquares(g) if (
            need_bias and weight.requires_grad and g.shape[1] == 1 and not self.transposed
        ) else None
        parts: List[Tuple[nn.Parameter, Part]] = []
        if weight.requires_grad:
            factors = (g, a) if self.transposed else (a, g)
            parts.append((weight, LinearPart(*factors, weight.shape, scale=scale, g_squares=shared)))
        if need_bias:
            parts.append((bias, BiasPart(g, bias.shape, scale=scale, g_squares=shared)))
        return parts


register_factored(nn.Linear)(LinearFactors())
