"""Per-sample gradients of :class:`torch.nn.Linear` (any number of leading dimensions), and the factors
of every linear map ``y = x Wᵀ + b`` (:class:`LinearFactors`: the fast clipping path)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import fast
from ..centering import centered_input
from .bookkeeping import BiasPart, LinearPart, Part, SharedSquares
from .registry import Factored, register_factored, register_grad_sampler
from .utils import flatten_middle, sum_outer, sum_over_middle


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


class LinearFactors(Factored):
    """``y = x Wᵀ + b`` over the last dimension of ``x``: ``∇W_b = Σ_t g_{b,t} a_{b,t}ᵀ`` from the input
    ``a`` and output gradient ``g`` (:class:`~lightning_dp.grad_sample.bookkeeping.LinearPart`),
    ``∇b_b = Σ_t g_{b,t}``.

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
        return fast.linear_forward(x, weight, module.bias, record)

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
