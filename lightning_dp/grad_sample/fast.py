"""Fast clipping modes: which layers record factored gradients, and forwards without weight gradients.

``clipping_mode`` (see :func:`set_clipping_mode`) is a property of a parameter, set by the
:class:`~lightning_dp.DPOptimizer` that updates it, so hooks attached before or after the optimizer is
built agree with it; hooks attached without a DP optimizer materialise ``param.grad_sample`` as before.

In the fast modes (``"auto"``, ``"ghost"``) Linear, Conv1/2/3d and Embedding layers run a forward whose
backward computes only the gradient of the layer's *input*: the weight gradient is assembled later,
already clipped, from the factors the hooks keep (``bookkeeping.py``), so autograd's own weight GEMM
would be thrown away. ``param.grad`` is then left untouched by the backward pass (the optimizer writes
the noisy gradient). Exceptions, where the backward is the usual one: under **float16** autocast (the
``GradScaler`` that goes with it reads the raw gradients in ``unscale_``, before the DP step, to find
overflows and skip the step), and in distributed runs parameters receive zero gradients so that DDP's
reducer sees every parameter. Under **bfloat16** autocast (no ``GradScaler``: nothing reads the raw
gradients, the DP optimizer writes ``param.grad``) the fast path stays on, and the factors keep
autocast's dtype (norms and sums are widened to float32 inside the parts, ``bookkeeping.wide``).

Autocast is asked about only for device types it knows (:func:`autocast_dtype`): a ``meta`` tensor (the
device stand-in of the tests) or a backend without autocast is simply not under autocast.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.amp.autocast_mode import is_autocast_available

from .saved import Saved

CLIPPING_MODES = ("auto", "ghost", "materialize")
FAST_MODES = ("auto", "ghost")
_MODE_ATTR = "_dp_clipping_mode"


def set_clipping_mode(params: Iterable[torch.Tensor], mode: str) -> None:
    """Record ``mode`` (one of :data:`CLIPPING_MODES`) for ``params``; hooks read it at each forward."""
    if mode not in CLIPPING_MODES:
        raise ValueError(f"clipping_mode must be one of {CLIPPING_MODES}, got {mode!r}")
    for p in params:
        setattr(p, _MODE_ATTR, mode)


def clipping_mode_of(param: Optional[torch.Tensor]) -> Optional[str]:
    """The clipping mode recorded for ``param`` (``None``: no DP optimizer has claimed it)."""
    return None if param is None else getattr(param, _MODE_ATTR, None)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on ``device_type`` when it is enabled there, else ``None``; ``None``
    also for a device type autocast does not know (``meta``, where ``torch.is_autocast_enabled`` raises)."""
    if not is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _skip_weight_grads(x: torch.Tensor) -> bool:
    """Whether autograd's weight gradient may be skipped: always, except under float16 autocast, whose
    ``GradScaler`` reads the raw gradients for overflows (see the module docstring)."""
    return autocast_dtype(x.device.type) != torch.float16


def _unused_grad(param: Optional[torch.Tensor], needed: bool) -> Optional[torch.Tensor]:
    """``None`` (no gradient), or zeros in distributed runs: DDP waits for every parameter's gradient."""
    if param is None or not needed:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.zeros_like(param)
    return None


Record = Optional[Callable[[torch.Tensor, torch.Tensor], None]]
"""``record(layer_input, output_grad)``, called by the backward of the functions below (the hooks'
factor recorder): the output gradient arrives with the backward itself, no tensor hook needed."""


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
            grad_x, _unused_grad(weight, ctx.needs_input_grad[1]), _unused_grad(ctx.bias, ctx.needs_input_grad[2]),
            None,
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
            grad_x, _unused_grad(weight, ctx.needs_input_grad[1]), _unused_grad(ctx.bias, ctx.needs_input_grad[2]),
            None, None, None, None, None,
        )


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
        return None, _unused_grad(ctx.weight, ctx.needs_input_grad[1]), None, None


def _record_from_hook(out: torch.Tensor, x: torch.Tensor, record: Record) -> torch.Tensor:
    """The usual op ran (autocast): ``record`` is called from a hook on its output instead (``x`` kept
    through autograd's saved-tensor hooks, see ``saved.py``)."""
    if record is not None and out.requires_grad:
        saved = Saved(x)
        out.register_hook(lambda grad: record(saved.get(), grad))
    return out


def linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], record: Record = None
) -> torch.Tensor:
    """``F.linear`` without autograd's weight and bias gradients (when allowed, see module docstring);
    ``record(x, grad)`` is called once in the backward pass either way."""
    if _skip_weight_grads(x):
        return _LinearInputGrad.apply(x, weight, bias, record)
    return _record_from_hook(F.linear(x, weight, bias), x, record)


def conv_padding(module: nn.modules.conv._ConvNd) -> Optional[List[int]]:
    """Symmetric zero padding the convolution applies itself, or ``None`` when its input is padded first
    (``padding="same"`` and the ``reflect``/``replicate``/``circular`` modes)."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return list(module.padding)
    return None


def conv_forward(module: nn.modules.conv._ConvNd, x: torch.Tensor, record: Record = None) -> torch.Tensor:
    """The module's convolution of the (already padded, when ``conv_padding`` is ``None``) ``x``;
    ``record(x, grad)`` as in :func:`linear_forward`."""
    padding = conv_padding(module) or [0] * len(module.kernel_size)
    if _skip_weight_grads(x):
        return _ConvInputGrad.apply(
            x, module.weight, module.bias, module.stride, padding, module.dilation, module.groups, record
        )
    out = torch.convolution(
        x, module.weight, module.bias, module.stride, padding, module.dilation, False,
        [0] * len(module.kernel_size), module.groups,
    )
    return _record_from_hook(out, x, record)


def embedding_fast_ok(module: nn.Embedding) -> bool:
    """Whether the factored path covers this embedding (not ``max_norm``, ``scale_grad_by_freq``, sparse)."""
    return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse


def embedding_forward(module: nn.Embedding, indices: torch.Tensor, record: Record = None) -> torch.Tensor:
    """``module(indices)`` without autograd's weight gradient (when allowed); ``record(indices, grad)`` as
    in :func:`linear_forward`."""
    if _skip_weight_grads(module.weight):
        return _EmbeddingNoGrad.apply(indices, module.weight, module.padding_idx, record)
    return _record_from_hook(F.embedding(indices, module.weight, module.padding_idx), indices, record)
