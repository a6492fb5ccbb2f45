"""What a hooked call records for the backward pass, and how per-sample gradients land on parameters.

:class:`PerSampleRecorder` is the state and the recording half of
:class:`~lightning_dp.grad_sample.hook_attachment.GradSampleHooks` (which decides which module gets what).
A layer with a rule or factors runs :func:`layer_forward` instead of its own forward: in the fast
clipping modes a factored layer records its factors from the backward of its weight-gradient-free
function; otherwise the usual forward runs and a hook on its output applies the rule when the output's
gradient arrives. DP forwards of fused modules (``attention.py``, ``rnn.py``) record their projections
through :meth:`PerSampleRecorder.linear` and broadcast parameters through :meth:`PerSampleRecorder.expand`.

Per-sample gradients are accumulated in ``param.grad_sample`` (shape ``(batch, *param.shape)``); in the
fast clipping modes (``clipping_mode`` ``"auto"``/``"ghost"``, see ``clipping_modes.py``) factored layers
and the projections of DP forwards store the factors of their weight gradients in ``param.grad_parts``
instead (``per_sample_parts.py``). Contributions to the same parameter (tied weights, a module used twice)
are summed per sample.

* The activation is captured by the closure of the output's tensor hook, not in a list on the module:
  a module called several times in one forward gets one hook per call, and activations are freed with
  the autograd graph (no leak when a forward is never followed by a backward). The closure holds it as
  a tensor saved for backward (``saved_for_backward.py``), so that activation checkpointing drops it after
  the forward and recomputes it with the rest of its block, as it does the layer's own saved tensors.
* Tensor hooks on the output see the gradient of the value the module produced, even if a later
  in-place op (``ReLU(inplace=True)``) modifies it — ``register_full_backward_hook`` fails there.
* Batch dimension: layers that fix it (convolutions, channel norms, RNN/attention through their
  ``batch_first``) use it; layers that take any leading dims (Linear, Embedding, LayerNorm...) use the
  dimension, 0 or 1, whose size is the batch size seen by the last batch-aware layer of this forward,
  and ``batch_first`` when that is ambiguous or unknown (``forward_batch.py``).
* Shared inputs: a layer that takes any leading dims and whose input has no batch dimension of the
  forward's batch size (position ids ``(1, T)``, T5's relative buckets ``(q, k)``; see
  ``forward_batch.py``) is shared by the batch: its output is handed on as a
  :class:`~lightning_dp.grad_sample.batch_shared_inputs.SharedTensor`, and its per-sample gradients are
  made where the value meets the batch (``batch_shared_inputs.py``).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import batch_shared_inputs
from .batch_shared_inputs import PER_SAMPLE
from .clipping_modes import CLIPPING_MODES, FAST_MODES, clipping_mode_of
from .forward_batch import ForwardBatch
from .linear import BiasPart, LinearPart, linear_forward, linear_param_grads
from .per_sample_ops import flatten_middle, place_rows
from .per_sample_parts import Part
from .registry import Factored, get_factored, get_grad_sampler, get_rule_batch_dim, trainable_parameters
from .saved_for_backward import Saved

_LOSS_REDUCTIONS = ("mean", "sum")


class PerSampleRecorder:
    """Records per-sample gradients of hooked calls (see the module docstring).

    Args:
        loss_reduction: ``"mean"`` if the loss averages over the batch (per-sample gradients are then
            rescaled by the batch size), ``"sum"`` if it sums.
        batch_first: where the batch is for layers that accept any leading dims when it cannot be told
            from the shapes.
        clipping_mode: ``"auto"``/``"ghost"`` (factored gradients in ``param.grad_parts``) or
            ``"materialize"`` (``param.grad_sample``) for every layer; ``None``: per layer, the mode of the
            :class:`~lightning_dp.DPOptimizer` that updates its parameters, ``"materialize"`` for
            parameters no DP optimizer has claimed.

    Attributes:
        loss_scale: factor multiplying every recovered per-sample gradient (default ``1.0``), e.g. the
            inverse of the factor a trainer applied to the loss (gradient accumulation, AMP scaling).
        enabled: whether forwards record at all.
        batch: the batch of the forward in progress (:class:`~lightning_dp.grad_sample.forward_batch.ForwardBatch`).
    """

    def __init__(self, loss_reduction: str, batch_first: bool, clipping_mode: Optional[str]) -> None:
        if clipping_mode is not None and clipping_mode not in CLIPPING_MODES:
            raise ValueError(f"clipping_mode must be one of {CLIPPING_MODES} or None, got {clipping_mode!r}")
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if not isinstance(batch_first, bool):
            raise ValueError(f"batch_first must be True, False or None, got {batch_first!r}")
        self.loss_reduction = loss_reduction
        self.clipping_mode = clipping_mode
        self.batch_first = batch_first
        self.loss_scale: float = 1.0
        self.enabled = True
        self._suspended = 0  # > 0 while the fallback re-runs a forward under torch.func
        self.batch = ForwardBatch(self.batch_first, lambda: self.recording)
        self._paths: Dict[int, str] = {}  # id(module) → its path in the model, for messages

    @property
    def recording(self) -> bool:
        """Whether a forward run now records what the backward pass needs."""
        return self.enabled and not self._suspended and torch.is_grad_enabled()

    def suspended(self) -> "_Suspend":
        """A context in which forwards record nothing (the fallback re-running a module's forward)."""
        return _Suspend(self)

    def path_of(self, module: Optional[nn.Module]) -> str:
        """The module's path in the hooked model, for messages."""
        if module is None:
            return "?"
        return self._paths.get(id(module), type(module).__name__) or "<root module>"

    def fast_mode(self, param: Optional[torch.Tensor]) -> bool:
        """Whether ``param``'s gradient is recorded in factored form (fast clipping modes)."""
        mode = self.clipping_mode or clipping_mode_of(param) or "materialize"
        return mode in FAST_MODES

    # --- batch dimension and scaling ------------------------------------------------------------------
    def note_batch_size(self, batch_size: int) -> None:
        """Called by batch-aware layers (RNN, attention): the batch size of the current forward."""
        self.batch.aware_size = batch_size

    def find_batch_dim(self, shape: Sequence[int]) -> int:
        """Batch dimension (0 or 1) of a tensor of ``shape`` from a layer that takes any leading dims."""
        return self.batch.find_batch_dim(shape)

    def scale_factor(self, batch_size: int) -> float:
        """The factor from the output gradient of the batch loss to that of the per-sample losses, times
        ``loss_scale`` (factored parts keep it as a number instead of scaling their tensors)."""
        factor = float(batch_size) if self.loss_reduction == "mean" else 1.0
        return factor * self.loss_scale

    def scale(self, grad: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Output gradient of the batch loss → of the per-sample losses, times ``loss_scale``."""
        factor = self.scale_factor(batch_size)
        return grad if factor == 1.0 else grad * factor

    # --- where per-sample gradients land --------------------------------------------------------------
    def add_grad_sample(
        self, param: nn.Parameter, grad_sample: torch.Tensor, module: Optional[nn.Module] = None
    ) -> None:
        """Add ``grad_sample`` (``(B, *param.shape)``) to ``param.grad_sample``."""
        grad_sample = grad_sample.to(param.dtype)
        existing = getattr(param, "grad_sample", None)
        if existing is None:
            param.grad_sample = grad_sample
        elif existing.shape == grad_sample.shape:
            param.grad_sample = existing + grad_sample
        else:
            where = f" (module {self.path_of(module)})" if module is not None else ""
            raise RuntimeError(
                f"Per-sample gradients of batch size {grad_sample.shape[0]} arrived for a parameter{where} "
                f"that already holds per-sample gradients of batch size {existing.shape[0]}. Either a layer "
                "saw a different batch dimension (pass batch_first to attach_grad_sample_hooks), or "
                "optimizer.zero_grad() was not called between batches."
            )

    def add_part(self, param: nn.Parameter, part: Part) -> None:
        """Record a factored per-sample gradient of ``param`` (summed with its other parts when clipping)."""
        parts = getattr(param, "grad_parts", None)
        if parts is None:
            param.grad_parts = [part]
        else:
            parts.append(part)

    # --- rules ----------------------------------------------------------------------------------------
    def hook_output(self, module: nn.Module, inputs: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        """After a call of ``module`` with a rule: keep its inputs, and apply the rule when the gradient of
        its ``output`` arrives."""
        if not self.recording or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if kwargs:  # rules see the forward's arguments positionally, in signature order
            inputs = _positional(module, inputs, kwargs)
        saved = Saved(tuple(inputs))  # through autograd's saved-tensor hooks: checkpointing drops them

        def on_output_grad(grad: torch.Tensor) -> None:
            self._apply_rule(module, saved.get(), grad)

        output.register_hook(on_output_grad)

    def _record(
        self,
        module: nn.Module,
        factored: Optional[Factored],
        activations: Tuple[Any, ...],
        grad: torch.Tensor,
        batch_dim: Optional[int] = None,
    ) -> None:
        """Per-sample gradients of a layer call from its inputs and output gradient: factored parts
        (fast modes) or the rule's ``grad_sample`` (``batch_dim=0``: both already batch first)."""
        if factored is not None:
            self.record_factors(module, factored, activations[0], grad, batch_dim)
        else:
            self._apply_rule(module, activations, grad, batch_dim)

    def _apply_rule(
        self, module: nn.Module, activations: Tuple[Any, ...], grad: torch.Tensor, batch_dim: Optional[int] = None
    ) -> None:
        if batch_dim is None:
            batch_dim = get_rule_batch_dim(module)
        if batch_dim is None:  # any leading dims: find the batch and hand the rule batch-first tensors
            found = self.find_batch_dim(grad.shape)
            if found != 0:
                grad = grad.movedim(found, 0)
                activations = tuple(
                    a.movedim(found, 0) if isinstance(a, torch.Tensor) and a.dim() > found else a
                    for a in activations
                )
            batch_dim = 0
        grad = self.scale(grad, grad.shape[batch_dim])
        grad, activations = _common_dtype(module, grad, activations)
        rule = get_grad_sampler(module)
        assert rule is not None
        for name, grad_sample in rule(module, activations, grad).items():
            self.add_grad_sample(module.get_parameter(name), grad_sample, module)

    # --- factored layers: Linear, Conv, Embedding, Conv1D... ----------------------------------------
    def factored(self, module: nn.Module, x: Optional[torch.Tensor]) -> Optional[Factored]:
        """The factors a call of ``module`` on the single input ``x`` records (fast modes), else ``None``
        (its rule runs)."""
        factored = get_factored(module)
        if factored is None or x is None or not factored.applies(module):
            return None
        first = next(iter(trainable_parameters(module).values()), None)
        return factored if self.fast_mode(first) else None

    def record_factors(
        self, module: nn.Module, factored: Factored, x: torch.Tensor, grad: torch.Tensor,
        batch_dim: Optional[int] = None,
    ) -> None:
        """The parts of a factored layer's call from its input ``x`` and output gradient ``grad``."""
        if batch_dim is None and factored.batch_dim is None:
            found = self.find_batch_dim(grad.shape)
            if found != 0:
                grad = grad.movedim(found, 0)
                x = x.movedim(found, 0) if x.dim() > found else x
        # No cast to the parameters' dtype (unlike a rule's inputs): under autocast the factors keep their
        # own dtype (bf16 activations stay bf16, not a float32 copy of twice the size); every part widens
        # them to float32 while it computes a norm or a sum (per_sample_parts.wide), one part at a time.
        for param, part in factored.parts(module, x, grad, self.scale_factor(grad.shape[0])):
            self.add_part(param, part)

    def shared_call(self, module: nn.Module, x: torch.Tensor, kind: str) -> Any:
        """A call of a layer whose input is shared by the batch or undecided (``forward_batch.py``): its
        output as a shared tensor whose per-sample copies carry each sample's gradient to the layer
        (``batch_shared_inputs.py``)."""
        factored = self.factored(module, x)

        def run(inp: torch.Tensor) -> Any:
            return factored.forward(module, inp, None) if factored else type(module).forward(module, inp)

        def record(inp: torch.Tensor, grad: torch.Tensor, copies: bool) -> None:
            self._record(module, factored, (inp,), grad, batch_dim=0 if copies else None)

        where = f"{self.path_of(module)} ({type(module).__name__})"
        return batch_shared_inputs.layer_call(x, kind, self.batch.size, where, run, record)

    def per_sample_inputs(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """The call's arguments with shared tensors made per-sample (``batch_shared_inputs.as_per_sample``),
        for a module that needs the batch in its inputs; unchanged (the same objects) when there are none."""
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if not any(isinstance(t, batch_shared_inputs.SharedTensor) for t in leaves):
            return args, kwargs
        where = f"{self.path_of(module)} ({type(module).__name__})"
        return torch.utils._pytree.tree_map_only(
            batch_shared_inputs.SharedTensor, lambda t: batch_shared_inputs.as_per_sample(t, where), (args, kwargs)
        )

    # --- DP forwards ----------------------------------------------------------------------------------
    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        weight_rows: Optional[slice] = None,
        bias_rows: Optional[slice] = None,
    ) -> torch.Tensor:
        """``F.linear(x, weight[weight_rows], bias[bias_rows])`` for batch-first ``x``, recording
        per-sample gradients of ``weight`` and ``bias``.

        The ``*_rows`` select a block of a packed parameter (attention's ``in_proj_weight``); the
        per-sample gradient is placed in that block of a zero ``(B, *param.shape)`` tensor.
        """
        w = weight if weight_rows is None else weight[weight_rows]
        b = None if bias is None else (bias if bias_rows is None else bias[bias_rows])
        factored = self.fast_mode(weight)
        out = linear_forward(x, w, b) if factored else F.linear(x, w, b)
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        if not (need_w or need_b) or not out.requires_grad:
            return out
        saved = Saved(x)

        def on_output_grad(grad: torch.Tensor) -> None:
            x_saved = saved.get()
            scale = self.scale_factor(grad.shape[0])
            need_w_now, need_b_now = need_w, need_b
            if factored and need_w:  # factors in their own dtype, as in record_factors
                a, g = flatten_middle(x_saved), flatten_middle(grad)
                self.add_part(weight, LinearPart(a, g, weight.shape, weight_rows, scale))
                need_w_now = False
            if factored and need_b:
                self.add_part(bias, BiasPart(flatten_middle(grad), bias.shape, bias_rows, scale))
                need_b_now = False
            if not (need_w_now or need_b_now):
                return
            gw, gb = linear_param_grads(x_saved, self.scale(grad, grad.shape[0]), need_w_now, need_b_now)
            if gw is not None:
                self.add_grad_sample(weight, place_rows(gw, weight.shape, weight_rows, batched=True))
            if gb is not None:
                self.add_grad_sample(bias, place_rows(gb, bias.shape, bias_rows, batched=True))

        out.register_hook(on_output_grad)
        return out

    def expand(self, param: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``param`` broadcast to ``(B, *param.shape)``, recording each sample's gradient of its copy."""
        out = param.unsqueeze(0).expand(batch_size, *param.shape)
        if param.requires_grad and out.requires_grad:
            out.register_hook(lambda grad: self.add_grad_sample(param, self.scale(grad, batch_size)))
        return out


class _Suspend:
    def __init__(self, recorder: PerSampleRecorder) -> None:
        self.recorder = recorder

    def __enter__(self) -> None:
        self.recorder._suspended += 1

    def __exit__(self, *exc: Any) -> None:
        self.recorder._suspended -= 1


def layer_forward(module: nn.Module, recorder: PerSampleRecorder, *args: Any, **kwargs: Any) -> Any:
    """The forward of a layer with a rule or factors while hooks are attached. One tensor input, any
    leading dims: an input shared by the batch goes to ``shared_call``; else the call records per-sample
    gradients directly."""
    x = _single_tensor(args, kwargs)
    if x is not None and get_rule_batch_dim(module) is None:
        kind = recorder.batch.input_kind(x)
        if kind != PER_SAMPLE:
            return recorder.shared_call(module, x, kind)
        x = batch_shared_inputs.plain(x)
        return _unshared_forward(module, recorder, *((x,) if args else ()), **{k: x for k in kwargs})
    args, kwargs = recorder.per_sample_inputs(module, args, kwargs)
    return _unshared_forward(module, recorder, *args, **kwargs)


def _unshared_forward(module: nn.Module, recorder: PerSampleRecorder, *args: Any, **kwargs: Any) -> Any:
    """A per-sample call: in the fast modes a factored layer records its factors from its backward; else
    the usual forward, and the rule's hook on its output."""
    x = _single_tensor(args, kwargs)
    factored = recorder.factored(module, x)
    if factored is not None:
        return factored.forward(module, x, functools.partial(recorder.record_factors, module, factored))
    output = type(module).forward(module, *args, **kwargs)
    recorder.hook_output(module, args, kwargs, output)
    return output


def _single_tensor(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The input of a call with exactly one argument, a tensor; else ``None``."""
    if len(args) + len(kwargs) != 1:
        return None
    x = args[0] if args else next(iter(kwargs.values()))
    return x if isinstance(x, torch.Tensor) else None


def _positional(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, ...]:
    """``forward(*args, **kwargs)`` as one positional tuple (defaults filled in), in signature order."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())[1:]


def _common_dtype(
    module: nn.Module, grad: torch.Tensor, activations: Tuple[Any, ...], dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, Tuple[Any, ...]]:
    """Under autocast a layer's input, output gradient and weights can have different float dtypes;
    rules compute in the parameters' dtype (float32 for bf16/fp16 mixed precision), ``dtype`` when the
    caller knows it. Factored parts are not cast (they widen while computing, see ``record_factors``)."""
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters(recurse=False)), grad.dtype)
    if grad.dtype != dtype:
        grad = grad.to(dtype)
    activations = tuple(
        a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype else a
        for a in activations
    )
    return grad, activations
