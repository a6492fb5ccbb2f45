"""Fast clipping modes: which layers record factored gradients, and what every forward without weight
gradients shares.

``clipping_mode`` (see :func:`set_clipping_mode`) is a property of a parameter, set by the
:class:`~lightning_dp.DPOptimizer` that updates it, so hooks attached before or after the optimizer is
built agree with it; hooks attached without a DP optimizer materialise ``param.grad_sample`` as before.

In the fast modes (``"auto"``, ``"ghost"``) Linear, Conv1/2/3d and Embedding layers run a forward whose
backward computes only the gradient of the layer's *input* (each layer's file holds its autograd
Function: ``linear.py``, ``conv.py``, ``embedding.py``): the weight gradient is assembled later, already
clipped, from the factors the hooks keep (``per_sample_parts.py``), so autograd's own weight GEMM would be
thrown away. ``param.grad`` is then left untouched by the backward pass (the optimizer writes the noisy
gradient). Exceptions, where the backward is the usual one: under **float16** autocast (the
``GradScaler`` that goes with it reads the raw gradients in ``unscale_``, before the DP step, to find
overflows and skip the step), and in distributed runs parameters receive zero gradients so that DDP's
reducer sees every parameter (:func:`unused_grad`). Under **bfloat16** autocast (no ``GradScaler``:
nothing reads the raw gradients, the DP optimizer writes ``param.grad``) the fast path stays on, and the
factors keep autocast's dtype (norms and sums are widened to float32 inside the parts,
``per_sample_parts.wide``).

Autocast is asked about only for device types it knows (:func:`autocast_dtype`): a ``meta`` tensor (the
device stand-in of the tests) or a backend without autocast is simply not under autocast.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Type

import torch
from torch.amp.autocast_mode import is_autocast_available

from .saved_for_backward import Saved

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


def unused_grad(param: Optional[torch.Tensor], needed: bool) -> Optional[torch.Tensor]:
    """The gradient a weight-gradient-free backward returns for a parameter: ``None`` (no gradient), or
    zeros in distributed runs, where DDP waits for every parameter's gradient."""
    if param is None or not needed:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.zeros_like(param)
    return None


Record = Optional[Callable[[torch.Tensor, torch.Tensor], None]]
"""``record(layer_input, output_grad)``, called by the backward of the weight-gradient-free functions (the
hooks' factor recorder): the output gradient arrives with the backward itself, no tensor hook needed."""


def _record_from_hook(out: torch.Tensor, x: torch.Tensor, record: Record) -> torch.Tensor:
    """The usual op ran (autocast): ``record`` is called from a hook on its output instead (``x`` kept
    through autograd's saved-tensor hooks, see ``saved_for_backward.py``)."""
    if record is not None and out.requires_grad:
        saved = Saved(x)
        out.register_hook(lambda grad: record(saved.get(), grad))
    return out


def weight_grad_free(
    function: Type[torch.autograd.Function],
    args: Sequence[Any],
    usual: Callable[[], torch.Tensor],
    recorded: torch.Tensor,
    record: Record,
    device_of: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``function.apply(*args)``, a forward whose backward skips autograd's weight gradient and calls
    ``record(recorded, grad)``, when that is allowed on the device of ``device_of`` (default
    ``recorded``; see the module docstring); else ``usual()``, the usual op, with ``record`` called once
    in the backward pass from a hook on its output."""
    if _skip_weight_grads(recorded if device_of is None else device_of):
        return function.apply(*args)
    return _record_from_hook(usual(), recorded, record)
