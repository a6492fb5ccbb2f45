"""Attach per-sample-gradient hooks to a module, in place.

Every submodule that owns trainable parameters gets one of three treatments:

* a **rule** (``linear.py``, ``conv.py``...): a forward hook keeps the layer's inputs and registers a
  hook on its output tensor; when autograd delivers the gradient of the loss with respect to that
  output, the rule turns (inputs, output gradient) into per-sample gradients. Linear, Conv1/2/3d and
  Embedding get no module hook: their forward is patched, records factors itself in the fast modes
  (from the backward of its weight-gradient-free function) and otherwise runs the same forward hook;
* a **DP forward** (``attention.py``, ``rnn.py``): fused modules whose internals hooks cannot see run an
  equivalent forward built from recorded linear maps (:meth:`GradSampleHooks.linear`), with the
  module's own parameters; the original forward is restored by :meth:`GradSampleHooks.remove`;
* the **torch.func fallback** (``functional.py``): any other module with its own trainable parameters
  (a user's custom layer); per-sample gradients by ``vmap`` over samples of a ``vjp`` of its forward.

Per-sample gradients are accumulated in ``param.grad_sample`` (shape ``(batch, *param.shape)``). In the
fast clipping modes (``clipping_mode`` ``"auto"``/``"ghost"``, see ``fast.py``) Linear, Conv1/2/3d and
Embedding layers, and the projections of DP forwards, store the factors of their weight gradients in
``param.grad_parts`` instead (``bookkeeping.py``) and run forwards whose backward skips autograd's weight
gradient.

Design notes:

* The activation is captured by the closure of the output's tensor hook, not in a list on the module:
  a module called several times in one forward gets one hook per call, and activations are freed with
  the autograd graph (no leak when a forward is never followed by a backward).
* Tensor hooks on the output see the gradient of the value the module produced, even if a later
  in-place op (``ReLU(inplace=True)``) modifies it — ``register_full_backward_hook`` fails there.
* Nothing is recorded when gradients are disabled (``torch.no_grad``, Lightning's validation and
  predict loops): evaluation runs the modules' original code.
* Contributions to the same parameter (tied weights, a module used twice) are summed per sample.
* Batch dimension: layers that fix it (convolutions, channel norms, RNN/attention through their
  ``batch_first``) use it; layers that take any leading dims (Linear, Embedding, LayerNorm...) use the
  dimension, 0 or 1, whose size is the batch size seen by the last batch-aware layer of this forward,
  and ``batch_first`` when that is ambiguous or unknown.
"""
from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .bookkeeping import BiasPart, ConvPart, LinearPart, Part, RowsPart, SharedSquares
from .functional import check_fallback, fallback_grad_sample
from .linear import linear_param_grads
from .registry import get_dp_forward, get_grad_sampler, get_rule_batch_dim, trainable_parameters
from .utils import flatten_middle, pad_input, place_rows

_LOSS_REDUCTIONS = ("mean", "sum")
_FACTORED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GradSampleHooks]" = weakref.WeakKeyDictionary()
log = logging.getLogger("lightning_dp")


class GradSampleHooks:
    """Handle on the hooks :func:`attach_grad_sample_hooks` put on a module; ``remove()`` undoes them.

    Args:
        module: the model (changed in place: hooks only, no wrapper, no new parameters).
        loss_reduction: ``"mean"`` if the loss averages over the batch (per-sample gradients are then
            rescaled by the batch size), ``"sum"`` if it sums.
        batch_first: where the batch is for layers that accept any leading dims when it cannot be told
            from the shapes. ``None`` (default): ``False`` if every module of the model with a
            ``batch_first`` attribute (RNNs, attention, transformer layers) has it ``False``, else ``True``.
        clipping_mode: ``"auto"``/``"ghost"`` (factored gradients in ``param.grad_parts``, see
            ``bookkeeping.py``) or ``"materialize"`` (``param.grad_sample``) for every layer. ``None``
            (default): per layer, the mode of the :class:`~lightning_dp.DPOptimizer` that updates its
            parameters, and ``"materialize"`` for parameters no DP optimizer has claimed.

    Attributes:
        loss_scale: factor multiplying every recovered per-sample gradient (default ``1.0``), e.g. the
            inverse of the factor a trainer applied to the loss (gradient accumulation, AMP scaling).
        fallback_modules: paths of the modules handled by the ``torch.func`` fallback.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_reduction: str = "mean",
        batch_first: Optional[bool] = None,
        clipping_mode: Optional[str] = None,
    ) -> None:
        if clipping_mode is not None and clipping_mode not in fast.CLIPPING_MODES:
            raise ValueError(f"clipping_mode must be one of {fast.CLIPPING_MODES} or None, got {clipping_mode!r}")
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if batch_first is not None and not isinstance(batch_first, bool):
            raise ValueError(f"batch_first must be True, False or None, got {batch_first!r}")
        self.module = module
        self.loss_reduction = loss_reduction
        self.clipping_mode = clipping_mode
        self.batch_first = _infer_batch_first(module) if batch_first is None else batch_first
        self.loss_scale: float = 1.0
        self.enabled = True
        self.fallback_modules: List[str] = []
        self._suspended = 0  # > 0 while the fallback re-runs a forward under torch.func
        self._batch_size: Optional[int] = None  # batch size seen by the last batch-aware layer
        self._paths: Dict[int, str] = {}
        self._checked: set = set()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._patched: List[Tuple[nn.Module, Any]] = []
        self._patched_ids: set = set()  # modules whose forward this object patched (not their copies)
        covered: List[str] = []
        for path, submodule in module.named_modules():
            if any(not prefix or path.startswith(prefix + ".") for prefix in covered):
                continue  # parameters handled by an enclosing DP forward
            self._paths[id(submodule)] = path
            dp_forward = get_dp_forward(submodule)
            if dp_forward is not None:
                if any(p.requires_grad for p in submodule.parameters()):
                    self._patch_forward(submodule, dp_forward)
                covered.append(path)
            elif not trainable_parameters(submodule):
                continue
            elif type(submodule) in _FACTORED_TYPES:  # the patched forward also runs the rule's hook
                self._patch_forward(submodule, _factored_forward)
            elif get_grad_sampler(submodule) is not None:
                self._handles.append(submodule.register_forward_hook(self._forward_hook, with_kwargs=True))
            else:
                self.fallback_modules.append(path or "<root module>")
                log.info(
                    "lightning_dp: %s (%s) has no per-sample gradient rule; using the torch.func fallback.",
                    path or "<root module>",
                    type(submodule).__name__,
                )
                self._handles.append(submodule.register_forward_hook(self._fallback_hook, with_kwargs=True))

    @property
    def parameters(self) -> List[nn.Parameter]:
        """Trainable parameters of the model (each once, even when tied)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def recording(self) -> bool:
        """Whether a forward run now records what the backward pass needs."""
        return self.enabled and not self._suspended and torch.is_grad_enabled()

    def fast_mode(self, param: Optional[torch.Tensor]) -> bool:
        """Whether ``param``'s gradient is recorded in factored form (fast clipping modes)."""
        mode = self.clipping_mode or fast.clipping_mode_of(param) or "materialize"
        return mode in fast.FAST_MODES

    # --- batch dimension and scaling ------------------------------------------------------------------
    def note_batch_size(self, batch_size: int) -> None:
        """Called by batch-aware layers (RNN, attention): the batch size of the current forward."""
        self._batch_size = batch_size

    def find_batch_dim(self, shape: Sequence[int]) -> int:
        """Batch dimension (0 or 1) of a tensor of ``shape`` from a layer that takes any leading dims."""
        if len(shape) < 2:
            return 0
        if self._batch_size is not None:
            hits = [d for d in (0, 1) if shape[d] == self._batch_size]
            if len(hits) == 1:
                return hits[0]
        return 0 if self.batch_first else 1

    def scale_factor(self, batch_size: int) -> float:
        """The factor from the output gradient of the batch loss to that of the per-sample losses, times
        ``loss_scale`` (factored parts keep it as a number instead of scaling their tensors)."""
        factor = float(batch_size) if self.loss_reduction == "mean" else 1.0
        return factor * self.loss_scale

    def scale(self, grad: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Output gradient of the batch loss → of the per-sample losses, times ``loss_scale``."""
        factor = self.scale_factor(batch_size)
        return grad if factor == 1.0 else grad * factor

    # --- rules ----------------------------------------------------------------------------------------
    def _forward_hook(
        self, module: nn.Module, inputs: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any
    ) -> None:
        if not self.recording or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if kwargs:  # rules see the forward's arguments positionally, in signature order
            inputs = _positional(module, inputs, kwargs)
        activations = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)

        def on_output_grad(grad: torch.Tensor) -> None:
            self._apply_rule(module, activations, grad)

        output.register_hook(on_output_grad)

    def _apply_rule(self, module: nn.Module, activations: Tuple[Any, ...], grad: torch.Tensor) -> None:
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
            where = f" (module {self._path(module)})" if module is not None else ""
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

    # --- factored layers: Linear, Conv, Embedding -------------------------------------------------
    def factored(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        """Whether this call of a Linear/Conv/Embedding layer records factors (else its rule runs)."""
        if len(args) + len(kwargs) != 1 or not isinstance(args[0] if args else next(iter(kwargs.values())), torch.Tensor):
            return False
        if isinstance(module, nn.Embedding) and not fast.embedding_fast_ok(module):
            return False
        return self.fast_mode(module.weight if module.weight.requires_grad else getattr(module, "bias", None))

    def factored_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward of a Linear/Conv/Embedding layer that records its weight gradient's factors: from the
        backward of its weight-gradient-free function, or (under autocast) from a hook on its output."""
        record = functools.partial(self._record_factors, module)
        if isinstance(module, nn.Linear):
            out = fast.linear_forward(x, module.weight, module.bias, record)
        elif isinstance(module, nn.Embedding):
            out = fast.embedding_forward(module, x, record)
        else:
            if fast.conv_padding(module) is None:
                x = pad_input(x, module._reversed_padding_repeated_twice, module.padding_mode)
            out = fast.conv_forward(module, x, record)
        recorded = fast.skips_weight_grads(module.weight if isinstance(module, nn.Embedding) else x)
        if out.requires_grad and not recorded:
            saved = x.detach()
            out.register_hook(lambda grad: self._record_factors(module, saved, grad))
        return out

    def _record_factors(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        if isinstance(module, nn.modules.conv._ConvNd):
            batch_size = grad.shape[0]
        else:
            found = self.find_batch_dim(grad.shape)
            if found != 0:
                grad = grad.movedim(found, 0)
                x = x.movedim(found, 0) if x.dim() > found else x
            batch_size = grad.shape[0]
        scale = self.scale_factor(batch_size)
        weight, bias = module.weight, getattr(module, "bias", None)
        grad, (x,) = _common_dtype(module, grad, (x,), dtype=weight.dtype)
        if isinstance(module, nn.Embedding):
            if weight.requires_grad:
                rows = x.reshape(-1)
                values = grad.reshape(-1, weight.shape[1])
                if module.padding_idx is not None:
                    values = values * (rows != module.padding_idx).unsqueeze(1).to(values.dtype)
                samples = torch.arange(batch_size, device=rows.device).repeat_interleave(rows.numel() // batch_size)
                self.add_part(
                    weight, RowsPart(samples, rows, values, batch_size, weight.shape, scale, rows.numel() // batch_size)
                )
            return
        if isinstance(module, nn.Linear):
            g = flatten_middle(grad)
            need_bias = bias is not None and bias.requires_grad
            # one position per sample and a bias in the same dtype: ‖g_b‖² serves both parts
            shared = SharedSquares(g) if need_bias and weight.requires_grad and g.shape[1] == 1 and (
                bias.dtype == g.dtype) else None
            if weight.requires_grad:
                self.add_part(weight, LinearPart(flatten_middle(x), g, weight.shape, scale=scale, g_squares=shared))
            if need_bias:
                self.add_part(bias, BiasPart(g.to(bias.dtype), bias.shape, scale=scale, g_squares=shared))
            return
        if weight.requires_grad:
            padding = fast.conv_padding(module) or [0] * len(module.kernel_size)
            self.add_part(weight, ConvPart(module, x, grad, padding, scale))
        if bias is not None and bias.requires_grad:
            self.add_part(bias, BiasPart(grad.flatten(2).transpose(1, 2).to(bias.dtype), bias.shape, scale=scale))

    # --- DP forwards ----------------------------------------------------------------------------------
    def _patch_forward(self, module: nn.Module, dp_forward: Any) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        self._patched_ids.add(id(module))
        module.forward = functools.partial(_dp_forward_call, dp_forward, module, weakref.ref(self))

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
        out = fast.linear_forward(x, w, b) if factored else F.linear(x, w, b)
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        if not (need_w or need_b) or not out.requires_grad:
            return out
        x_saved = x.detach()

        def on_output_grad(grad: torch.Tensor) -> None:
            scale = self.scale_factor(grad.shape[0])
            need_w_now, need_b_now = need_w, need_b
            if factored and need_w:
                a, g = flatten_middle(x_saved.to(weight.dtype)), flatten_middle(grad.to(weight.dtype))
                self.add_part(weight, LinearPart(a, g, weight.shape, weight_rows, scale))
                need_w_now = False
            if factored and need_b:
                self.add_part(bias, BiasPart(flatten_middle(grad.to(bias.dtype)), bias.shape, bias_rows, scale))
                need_b_now = False
            if not (need_w_now or need_b_now):
                return
            gw, gb = linear_param_grads(x_saved, self.scale(grad, grad.shape[0]), need_w_now, need_b_now)
            if gw is not None:
                self.add_grad_sample(weight, place_rows(gw, weight.shape, weight_rows))
            if gb is not None:
                self.add_grad_sample(bias, place_rows(gb, bias.shape, bias_rows))

        out.register_hook(on_output_grad)
        return out

    def expand(self, param: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``param`` broadcast to ``(B, *param.shape)``, recording each sample's gradient of its copy."""
        out = param.unsqueeze(0).expand(batch_size, *param.shape)
        if param.requires_grad and out.requires_grad:
            out.register_hook(lambda grad: self.add_grad_sample(param, self.scale(grad, batch_size)))
        return out

    # --- torch.func fallback --------------------------------------------------------------------------
    def _fallback_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        if not self.recording:
            return
        outputs = [o for o in torch.utils._pytree.tree_leaves(output) if isinstance(o, torch.Tensor)]
        live = [i for i, o in enumerate(outputs) if o.requires_grad]
        if not live:
            return
        args = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), args)
        kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), kwargs)
        batch_size = outputs[live[0]].shape[0]
        if id(module) not in self._checked:
            with self._suspend():
                check_fallback(module, self._path(module), args, kwargs, outputs, live)
            self._checked.add(id(module))
        shapes = [outputs[i] for i in live]

        def on_output_grads(grads: Sequence[Optional[torch.Tensor]]) -> None:
            grads = [torch.zeros_like(o) if g is None else self.scale(g, batch_size) for g, o in zip(grads, shapes)]
            with self._suspend():
                per_sample = fallback_grad_sample(module, args, kwargs, live, grads)
            for name, grad_sample in per_sample.items():
                self.add_grad_sample(module.get_parameter(name), grad_sample, module)

        # the handle lives on the output tensors and is freed with the graph
        torch.autograd.graph.register_multi_grad_hook([outputs[i] for i in live], on_output_grads)

    def _suspend(self) -> "_Suspend":
        return _Suspend(self)

    def _path(self, module: Optional[nn.Module]) -> str:
        if module is None:
            return "?"
        return self._paths.get(id(module), type(module).__name__) or "<root module>"

    def remove(self) -> None:
        """Remove all hooks, restore patched forwards, drop per-sample gradients: the module is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, previous in self._patched:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched.clear()
        self._patched_ids.clear()
        clear_grad_samples(self.module)
        if _ATTACHED.get(self.module) is self:
            del _ATTACHED[self.module]


class _Suspend:
    def __init__(self, hooks: GradSampleHooks) -> None:
        self.hooks = hooks

    def __enter__(self) -> None:
        self.hooks._suspended += 1

    def __exit__(self, *exc: Any) -> None:
        self.hooks._suspended -= 1


def _factored_forward(module: nn.Module, hooks: "GradSampleHooks", *args: Any, **kwargs: Any) -> Any:
    """Patched forward of Linear/Conv/Embedding: factored in the fast modes, else the usual forward
    followed by what the rule's forward hook does (no module hook: it would slow every call)."""
    if hooks.factored(module, args, kwargs):
        return hooks.factored_forward(module, args[0] if args else next(iter(kwargs.values())))
    output = type(module).forward(module, *args, **kwargs)
    hooks._forward_hook(module, args, kwargs, output)
    return output


def _dp_forward_call(dp_forward: Any, module: nn.Module, hooks_ref: Any, *args: Any, **kwargs: Any) -> Any:
    hooks = hooks_ref()
    # A copy of a hooked module (copy.deepcopy: an EMA or teacher model) carries the patched forward but
    # is not hooked: it runs its class's forward and gets ordinary gradients.
    if hooks is None or not hooks.recording or id(module) not in hooks._patched_ids:
        return type(module).forward(module, *args, **kwargs)
    return dp_forward(module, hooks, *args, **kwargs)


def _positional(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, ...]:
    """``forward(*args, **kwargs)`` as one positional tuple (defaults filled in), in signature order."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())[1:]


def _infer_batch_first(module: nn.Module) -> bool:
    flags = [m.batch_first for m in module.modules() if isinstance(getattr(m, "batch_first", None), bool)]
    return not flags or any(flags)


def _common_dtype(
    module: nn.Module, grad: torch.Tensor, activations: Tuple[Any, ...], dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, Tuple[Any, ...]]:
    """Under autocast a layer's input, output gradient and weights can have different float dtypes;
    rules compute in the parameters' dtype (float32 for bf16/fp16 mixed precision), ``dtype`` when the
    caller knows it."""
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters(recurse=False)), grad.dtype)
    if grad.dtype != dtype:
        grad = grad.to(dtype)
    activations = tuple(
        a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype else a
        for a in activations
    )
    return grad, activations


def clear_grad_samples(module: nn.Module) -> None:
    """Drop ``grad_sample`` and ``grad_parts`` from every parameter of ``module``."""
    for param in module.parameters():
        for attr in ("grad_sample", "grad_parts"):
            if hasattr(param, attr):
                delattr(param, attr)


def attach_grad_sample_hooks(
    module: nn.Module,
    loss_reduction: str = "mean",
    batch_first: Optional[bool] = None,
    clipping_mode: Optional[str] = None,
) -> GradSampleHooks:
    """Attach per-sample-gradient hooks to ``module`` in place (replacing earlier ones) and return them.

    See :class:`GradSampleHooks` for the arguments.
    """
    previous = _ATTACHED.get(module)
    if previous is not None:
        previous.remove()
    hooks = GradSampleHooks(module, loss_reduction=loss_reduction, batch_first=batch_first, clipping_mode=clipping_mode)
    _ATTACHED[module] = hooks
    return hooks


def get_attached_hooks(module: nn.Module) -> GradSampleHooks | None:
    """The hooks currently attached to ``module`` by this package, if any."""
    return _ATTACHED.get(module)
