"""Convolutions: per-sample rules of ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``; the part of a
convolution's factored weight gradient (:class:`ConvPart`), its forward without weight gradients
(:func:`conv_forward`) and its factors (:class:`ConvFactors`: the fast clipping path).

The weight gradient of a convolution is a contraction of the output gradient ``G: (B, O, *L)`` with
the input windows (im2col) ``X: (B, C, *L, *K)`` over the output positions ``L``, per sample and per
group (:func:`~lightning_dp.grad_sample.per_sample_ops.conv_weight_grad`). Padding is applied explicitly
first, exactly as the module does (``padding="same"``, and ``reflect`` / ``replicate`` / ``circular``
modes, through the module's own ``_reversed_padding_repeated_twice``).

A transposed convolution is the adjoint of a convolution with the same weight, stride, padding and
dilation: ``⟨g, convᵀ_W(x)⟩ = ⟨conv_W(g), x⟩``, so its per-sample weight gradient is the convolution
weight gradient with the roles swapped — the output gradient as the input, the input as the output
gradient (``output_padding`` only adds positions that no window reads).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .clipping_modes import Record, unused_grad, weight_grad_free
from .linear import BiasPart, LinearPart
from .per_sample_ops import conv_patches, conv_weight_grad, pad_input, sum_per_channel
from .per_sample_parts import Part, scaled_rows, use_ghost, wide, wide_dtype, zero_rows
from .registry import Factored, register_factored, register_grad_sampler

_BLOCK_ELEMENTS = 1 << 18  # im2col elements per block of samples in ConvPart.norm_sq (1 MB in float32)


def _bias_grad(module: nn.Module, backprops: torch.Tensor, grads: Dict[str, torch.Tensor]) -> None:
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = sum_per_channel(backprops)


@register_grad_sampler(nn.Conv1d, nn.Conv2d, nn.Conv3d, batch_dim=0)
def conv_grad_sample(
    module: nn.modules.conv._ConvNd, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample ``∂L_b/∂W[o,c,k] = Σ_l g[b,o,l] x_pad[b,c,l·s+k·d]`` and bias sums."""
    grads: Dict[str, torch.Tensor] = {}
    if module.weight.requires_grad:
        x = pad_input(activations[0], module._reversed_padding_repeated_twice, module.padding_mode)
        grads["weight"] = conv_weight_grad(
            x, backprops, module.kernel_size, module.stride, module.dilation, module.groups
        )
    _bias_grad(module, backprops, grads)
    return grads


@register_grad_sampler(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, batch_dim=0)
def conv_transpose_grad_sample(
    module: nn.modules.conv._ConvTransposeNd, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-sample weight gradient via the adjoint convolution (module docstring) and bias sums."""
    grads: Dict[str, torch.Tensor] = {}
    if module.weight.requires_grad:
        pads = [p for p in reversed(module.padding) for _ in range(2)]
        g = pad_input(backprops, pads, "zeros")
        grads["weight"] = conv_weight_grad(
            g, activations[0], module.kernel_size, module.stride, module.dilation, module.groups
        )
    _bias_grad(module, backprops, grads)
    return grads


class ConvPart(Part):
    """A convolution's weight gradient from its input ``x: (B, C, *S)`` (zero-padded by ``padding`` on
    both sides of each spatial dim; other padding modes are applied before) and output gradient
    ``g: (B, O, *L)``; norms through unfold (im2col), the clipped sum by one convolution
    backward (``aten.convolution_backward``, the kernel autograd would have run)."""

    def __init__(
        self, module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, padding: Sequence[int], scale: float = 1.0
    ) -> None:
        self.x, self.g = x, g
        self.scale = scale
        self.padding = tuple(padding)
        self.kernel_size = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.weight = module.weight.detach()
        self.shape = tuple(module.weight.shape)
        self.batch_size = x.shape[0]
        self._per_sample: Optional[torch.Tensor] = None  # set by norm_sq when it materialises

    def _windows(self, samples: slice = slice(None), channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """The im2col windows of ``samples`` as a strided view ``(b, *L, C, *K)`` (no copy yet) and their
        output gradient ``(b, O, T)`` over the ``T = prod(L)`` positions the windows cover.

        ``channels_last``: windows ``(b, *L, *K, C)`` of a channels-last copy of the input instead, so that
        the im2col copy moves whole kernel rows of channels at a time (several times faster for C > 1);
        only norms may use this order of the ``C·K`` features.
        """
        x = self._padded(samples)
        spatial = len(self.kernel_size)
        if channels_last:
            x = x.movedim(1, -1).contiguous()  # (b, *S, C)
            for d in range(spatial):
                x = x.unfold(1 + d, self.dilation[d] * (self.kernel_size[d] - 1) + 1, self.stride[d])
                if self.dilation[d] > 1:
                    x = x[..., :: self.dilation[d]]
            order = (0, *range(1, 1 + spatial), *range(2 + spatial, 2 + 2 * spatial), 1 + spatial)
        else:
            x = conv_patches(x, self.kernel_size, self.stride, self.dilation)  # (b, C, *L, *K)
            x = x.movedim(1, 1 + spatial)
            order = tuple(range(x.dim()))
        positions = x.shape[1 : 1 + spatial]
        g = self.g[(samples, slice(None), *(slice(0, n) for n in positions))]
        return x.permute(order), g.reshape(g.shape[0], g.shape[1], -1)

    def keep_samples(self, keep: torch.Tensor) -> "ConvPart":
        """Input, output gradient and the per-sample gradients kept by :meth:`norm_sq` (if any) zeroed
        for dropped samples."""
        kept = copy.copy(self)
        kept.x, kept.g = zero_rows(self.x, keep), zero_rows(self.g, keep)
        if self._per_sample is not None:
            kept._per_sample = zero_rows(self._per_sample, keep)
        return kept

    def as_linear(self) -> Optional[LinearPart]:
        if self.groups != 1:
            return None
        windows, g = self._windows()
        b, positions = g.shape[0], g.shape[2]
        return LinearPart(windows.reshape(b, positions, -1), g.transpose(1, 2), self.shape, scale=self.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        """Squared per-sample norms through im2col, a block of samples at a time: each block's windows
        are copied once into ``(b, T, C·K)`` (about 1 MB per block), so the step's peak memory does not
        grow with the ``B·T·C·K`` im2col of the whole batch and the copies stay in cache."""
        if self.groups != 1:
            return wide(self._materialize()).flatten(1).pow(2).sum(1)
        b, out_features = self.g.shape[:2]
        windows, g = self._windows(slice(0, 1), channels_last=True)
        positions, in_features = g.shape[2], windows.numel() // g.shape[2]
        ghost = use_ghost(positions, in_features, out_features, method)
        block = max(1, _BLOCK_ELEMENTS // (positions * in_features))
        # Per-sample gradients kept for the clipped sum (a (B,)·(B, p) product instead of a convolution
        # backward) when they are no larger than the input and output gradient this part already holds.
        keep = not ghost and out_features * in_features <= self.x[0].numel() + self.g[0].numel()
        per_sample = self.g.new_empty(b, out_features, in_features, dtype=wide_dtype(self.g.dtype)) if keep else None
        norms = []
        for start in range(0, b, block):
            windows, gb = self._windows(slice(start, start + block), channels_last=True)
            a = wide(windows.reshape(-1, positions, in_features))  # the im2col copy, features ordered (*K, C)
            gb = wide(gb)
            if ghost:
                norms.append((torch.bmm(a, a.transpose(1, 2)) * torch.bmm(gb.transpose(1, 2), gb)).sum((1, 2)))
            else:
                grads = torch.bmm(gb, a, out=per_sample[start : start + block]) if keep else torch.bmm(gb, a)
                norms.append(torch.linalg.vector_norm(grads, dim=(1, 2)).square())
        self._per_sample = per_sample
        return norms[0] if len(norms) == 1 else torch.cat(norms)

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        if self._per_sample is not None:  # (B, O, *K, C): back to the weight's (O, C, *K)
            summed = factors.to(self._per_sample.dtype) @ self._per_sample.flatten(1)
            return summed.view(self.shape[0], *self.shape[2:], self.shape[1]).movedim(-1, 1).contiguous()
        spatial = len(self.kernel_size)
        # The weight gradient is bilinear in (x, g): scale whichever of the two is smaller.
        if self.x.numel() < self.g.numel():
            x, g = scaled_rows(self.x, factors), wide(self.g)
        else:
            x, g = wide(self.x), scaled_rows(self.g, factors)
        return torch.ops.aten.convolution_backward(
            g, x, self.weight.to(g.dtype), None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0] * spatial, self.groups, [False, True, False],
        )[1]

    def _padded(self, samples: slice = slice(None)) -> torch.Tensor:
        return pad_input(self.x[samples], [p for p in reversed(self.padding) for _ in range(2)], "zeros")

    def _materialize(self) -> torch.Tensor:
        return conv_weight_grad(
            wide(self._padded()), wide(self.g), self.kernel_size, self.stride, self.dilation, self.groups
        )


class _ConvInputGrad(torch.autograd.Function):
    """A zero-padded convolution whose backward returns the input gradient only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        record: Record = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias, ctx.conf, ctx.record = bias, (list(stride), list(padding), list(dilation), groups), record
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        if ctx.record is not None:
            ctx.record(x.detach(), grad)
        stride, padding, dilation, groups = ctx.conf
        grad_x = None
        if ctx.needs_input_grad[0]:
            # Under autocast (CUDA casts convolutions) the output gradient is bf16 while the saved input and
            # weight are float32: the backward kernel takes one dtype (autograd casts grad_x back to x's).
            grad_x = torch.ops.aten.convolution_backward(
                grad, x.to(grad.dtype), weight.to(grad.dtype), None, stride, padding, dilation, False,
                [0] * len(stride), groups,
                [True, False, False],
            )[0]
        return (
            grad_x, unused_grad(weight, ctx.needs_input_grad[1]), unused_grad(ctx.bias, ctx.needs_input_grad[2]),
            None, None, None, None, None,
        )


def conv_padding(module: nn.modules.conv._ConvNd) -> Optional[List[int]]:
    """Symmetric zero padding the convolution applies itself, or ``None`` when its input is padded first
    (``padding="same"`` and the ``reflect``/``replicate``/``circular`` modes)."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return list(module.padding)
    return None


def conv_forward(module: nn.modules.conv._ConvNd, x: torch.Tensor, record: Record = None) -> torch.Tensor:
    """The module's convolution of the (already padded, when ``conv_padding`` is ``None``) ``x`` without
    autograd's weight and bias gradients (when allowed); ``record(x, grad)`` is called once in the
    backward pass either way."""
    padding = conv_padding(module) or [0] * len(module.kernel_size)
    args = (x, module.weight, module.bias, module.stride, padding, module.dilation, module.groups, record)

    def usual() -> torch.Tensor:
        return torch.convolution(
            x, module.weight, module.bias, module.stride, padding, module.dilation, False,
            [0] * len(module.kernel_size), module.groups,
        )

    return weight_grad_free(_ConvInputGrad, args, usual, x, record)


@register_factored(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvFactors(Factored):
    """A convolution's weight gradient from its (padded) input and output gradient (:class:`ConvPart`);
    the bias gradient sums the output gradient over positions
    (:class:`~lightning_dp.grad_sample.linear.BiasPart`)."""

    batch_dim = 0

    def forward(
        self, module: nn.Module, x: torch.Tensor, record: Optional[Callable[[torch.Tensor, torch.Tensor], None]]
    ) -> torch.Tensor:
        if conv_padding(module) is None:  # padding the convolution cannot apply itself
            x = pad_input(x, module._reversed_padding_repeated_twice, module.padding_mode)
        return conv_forward(module, x, record)

    def parts(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, scale: float
    ) -> List[Tuple[nn.Parameter, Part]]:
        parts: List[Tuple[nn.Parameter, Part]] = []
        if module.weight.requires_grad:
            padding = conv_padding(module) or [0] * len(module.kernel_size)
            parts.append((module.weight, ConvPart(module, x, grad, padding, scale)))
        bias = module.bias
        if bias is not None and bias.requires_grad:
            parts.append((bias, BiasPart(grad.flatten(2).transpose(1, 2), bias.shape, scale=scale)))
        return parts
