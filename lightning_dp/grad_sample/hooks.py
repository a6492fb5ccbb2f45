"""Attach per-sample-gradient hooks to a module, in place.

Every submodule that owns trainable parameters gets one of three treatments:

* a **rule** (``linear.py``, ``conv.py``...): the layer's forward is patched (no module hook: it would
  slow every call); it runs the usual forward, keeps the layer's inputs and registers a hook on its
  output tensor; when autograd delivers the gradient of the loss with respect to that output, the rule
  turns (inputs, output gradient) into per-sample gradients. A layer type that declares its
  **factors** (``registry.Factored``: Linear, Conv1/2/3d, Embedding, Hugging Face's ``Conv1D``) instead
  runs, in the fast modes, a forward that records the factors from the backward of its
  weight-gradient-free function;
* a **DP forward** (``attention.py``, ``rnn.py``): fused modules whose internals hooks cannot see run an
  equivalent forward built from recorded linear maps (:meth:`GradSampleHooks.linear`), with the
  module's own parameters; the original forward is restored by :meth:`GradSampleHooks.remove`;
* the **torch.func fallback** (``functional.py``): any other module with its own trainable parameters
  (a user's custom layer); per-sample gradients by ``vmap`` over samples of a ``vjp`` of its forward.

Per-sample gradients are accumulated in ``param.grad_sample`` (shape ``(batch, *param.shape)``). In the
fast clipping modes (``clipping_mode`` ``"auto"``/``"ghost"``, see ``fast.py``) factored layers and the
projections of DP forwards store the factors of their weight gradients in ``param.grad_parts`` instead
(``bookkeeping.py``) and run forwards whose backward skips autograd's weight gradient. Only modules with
trainable parameters of their own are touched: a frozen base model (LoRA) runs its own code, and the
per-sample work scales with the trainable adapter.

Design notes:

* The activation is captured by the closure of the output's tensor hook, not in a list on the module:
  a module called several times in one forward gets one hook per call, and activations are freed with
  the autograd graph (no leak when a forward is never followed by a backward). The closure holds it as
  a tensor saved for backward (``saved.py``), so that activation checkpointing drops it after the
  forward and recomputes it with the rest of its block, as it does the layer's own saved tensors.
* Activation checkpointing: the recompute of a checkpointed block runs these forwards again. Under
  non-reentrant checkpointing its graph is never backpropagated (the original graph is), so its hooks
  never fire; under reentrant checkpointing the original forward runs without gradients and records
  nothing. Either way each call records once. The recompute takes every input as the forward did
  (``batch.py``).
* Tensor hooks on the output see the gradient of the value the module produced, even if a later
  in-place op (``ReLU(inplace=True)``) modifies it — ``register_full_backward_hook`` fails there.
* Nothing is recorded when gradients are disabled (``torch.no_grad``, Lightning's validation and
  predict loops): evaluation runs the modules' original code.
* Contributions to the same parameter (tied weights, a module used twice) are summed per sample.
* Batch dimension: layers that fix it (convolutions, channel norms, RNN/attention through their
  ``batch_first``) use it; layers that take any leading dims (Linear, Embedding, LayerNorm...) use the
  dimension, 0 or 1, whose size is the batch size seen by the last batch-aware layer of this forward,
  and ``batch_first`` when that is ambiguous or unknown (``batch.py``).
* Shared inputs: a layer that takes any leading dims and whose input has no batch dimension of the
  forward's batch size (position ids ``(1, T)``, T5's relative buckets ``(q, k)``; see ``batch.py``) is
  shared by the batch: its output is handed on as a
  :class:`~lightning_dp.grad_sample.shared.SharedTensor`, and its per-sample gradients are made where
  the value meets the batch (``shared.py``).
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

from . import fast, shared
from .batch import PER_SAMPLE, ForwardBatch, infer_batch_first
from .bookkeeping import BiasPart, LinearPart, Part
from .functional import check_fallback, fallback_grad_sample
from .linear import linear_param_grads
from .registry import (
    Factored,
    get_dp_forward,
    get_factored,
    get_grad_sampler,
    get_rule_batch_dim,
    trainable_parameters,
)
from .saved import Saved, no_saved_tensor_hooks
from .utils import flatten_middle, place_rows

_LOSS_REDUCTIONS = ("mean", "sum")
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
        patched_modules: paths of the modules whose forward runs a rule or records factors.
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
        self.batch_first = infer_batch_first(module) if batch_first is None else batch_first
        self.loss_scale: float = 1.0
        self.enabled = True
        self.fallback_modules: List[str] = []
        self._suspended = 0  # > 0 while the fallback re-runs a forward under torch.func
        self.batch = ForwardBatch(self.batch_first, lambda: self.recording)
        self._paths: Dict[int, str] = {}
        self._checked: set = set()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._patched: List[Tuple[nn.Module, Any]] = []
        self._patched_ids: set = set()  # modules whose forward this object patched (not their copies)
        self.patched_modules: List[str] = []
        covered: List[str] = []
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.dp_name = name  # for error messages about this parameter (DPOptimizer)
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
            elif get_grad_sampler(submodule) is not None:  # a rule, or declared factors
                self._patch_forward(submodule, _layer_forward)
                self.patched_modules.append(path or "<root module>")
            else:
                self.fallback_modules.append(path or "<root module>")
                log.info(
                    "lightning_dp: %s (%s) has no per-sample gradient rule; using the torch.func fallback.",
                    path or "<root module>",
                    type(submodule).__name__,
                )
                self._handles.append(submodule.register_forward_pre_hook(self._fallback_inputs, with_kwargs=True))
                self._handles.append(submodule.register_forward_hook(self._fallback_hook, with_kwargs=True))
        self._handles.extend(self.batch.attach(module))

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
        self.batch.aware_size = batch_size

    def find_batch_dim(self, shape: Sequence[int]) -> int:
        """Batch dimension (0 or 1) of a tensor of ``shape`` from a layer that takes any leading dims."""
        return self.batch.find_batch_dim(shape)

    def shared_call(self, module: nn.Module, x: torch.Tensor, kind: str) -> Any:
        """A call of a layer whose input is shared by the batch or undecided (``batch.py``): its output as a
        shared tensor whose per-sample copies carry each sample's gradient to the layer (``shared.py``)."""
        factored = self.factored(module, x)

        def run(inp: torch.Tensor) -> Any:
            return factored.forward(module, inp, None) if factored else type(module).forward(module, inp)

        def record(inp: torch.Tensor, grad: torch.Tensor, copies: bool) -> None:
            self._record(module, factored, (inp,), grad, batch_dim=0 if copies else None)

        where = f"{self._path(module)} ({type(module).__name__})"
        return shared.layer_call(x, kind, self.batch.size, where, run, record)

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
            self._record_factors(module, factored, activations[0], grad, batch_dim)
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

    # --- factored layers: Linear, Conv, Embedding, Conv1D... ----------------------------------------
    def factored(self, module: nn.Module, x: Optional[torch.Tensor]) -> Optional[Factored]:
        """The factors a call of ``module`` on the single input ``x`` records (fast modes), else ``None``
        (its rule runs)."""
        factored = get_factored(module)
        if factored is None or x is None or not factored.applies(module):
            return None
        first = next(iter(trainable_parameters(module).values()), None)
        return factored if self.fast_mode(first) else None

    def _record_factors(
        self, module: nn.Module, factored: Factored, x: torch.Tensor, grad: torch.Tensor,
        batch_dim: Optional[int] = None,
    ) -> None:
        if batch_dim is None and factored.batch_dim is None:
            found = self.find_batch_dim(grad.shape)
            if found != 0:
                grad = grad.movedim(found, 0)
                x = x.movedim(found, 0) if x.dim() > found else x
        # No cast to the parameters' dtype (unlike a rule's inputs): under autocast the factors keep their
        # own dtype (bf16 activations stay bf16, not a float32 copy of twice the size); every part widens
        # them to float32 while it computes a norm or a sum (bookkeeping.wide), one part at a time.
        for param, part in factored.parts(module, x, grad, self.scale_factor(grad.shape[0])):
            self.add_part(param, part)

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
        saved = Saved(x)

        def on_output_grad(grad: torch.Tensor) -> None:
            x_saved = saved.get()
            scale = self.scale_factor(grad.shape[0])
            need_w_now, need_b_now = need_w, need_b
            if factored and need_w:  # factors in their own dtype, as in _record_factors
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
            # inside a checkpointed block the checkpoint's saved-tensor hooks are set, and torch.func refuses
            # to run under them; the check's tensors are its own (not saved for the block's backward)
            with self._suspend(), no_saved_tensor_hooks():
                check_fallback(module, self._path(module), args, kwargs, outputs, live)
            self._checked.add(id(module))
        like = [(outputs[i].shape, outputs[i].dtype, outputs[i].device) for i in live]
        saved = Saved((args, kwargs))  # through autograd's saved-tensor hooks: checkpointing drops them

        def on_output_grads(grads: Sequence[Optional[torch.Tensor]]) -> None:
            grads = [
                torch.zeros(shape, dtype=dtype, device=device) if g is None else self.scale(g, batch_size)
                for g, (shape, dtype, device) in zip(grads, like)
            ]
            args, kwargs = saved.get()
            with self._suspend(), no_saved_tensor_hooks():
                per_sample = fallback_grad_sample(module, args, kwargs, live, grads)
            for name, grad_sample in per_sample.items():
                self.add_grad_sample(module.get_parameter(name), grad_sample, module)

        _on_output_grads([outputs[i] for i in live], on_output_grads)

    def per_sample_inputs(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """The call's arguments with shared tensors made per-sample (``shared.as_per_sample``), for a
        module that needs the batch in its inputs; unchanged (the same objects) when there are none."""
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if not any(isinstance(t, shared.SharedTensor) for t in leaves):
            return args, kwargs
        where = f"{self._path(module)} ({type(module).__name__})"
        return torch.utils._pytree.tree_map_only(
            shared.SharedTensor, lambda t: shared.as_per_sample(t, where), (args, kwargs)
        )

    def _fallback_inputs(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
        if not self.recording:
            return None
        new = self.per_sample_inputs(module, args, kwargs)
        return None if new[0] is args and new[1] is kwargs else new

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
        self.batch.detach()
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


def _on_output_grads(outputs: Sequence[torch.Tensor], fn: Any) -> None:
    """Call ``fn(grads)`` once per backward pass that reaches any of ``outputs``, with the gradient of each
    (``None`` for one the pass does not reach): as soon as all have arrived, else at the end of the pass.

    Unlike ``torch.autograd.graph.register_multi_grad_hook``, nothing here holds the outputs' autograd
    nodes. That function keeps them in its hooks' closure (to count the gradients to expect): a reference
    cycle through the nodes, which the garbage collector cannot break while anything else holds a node
    (the engine, until the next backward pass; for good when the hook also held the outputs, as the
    fallback's did), so every step's inputs and outputs of a custom layer stayed alive. Here the hooks
    live on the outputs' nodes and go with the graph.
    """
    if len(outputs) == 1:
        outputs[0].register_hook(lambda grad: fn([grad]))
        return
    pending: Dict[int, List[Any]] = {}  # graph task → [gradients, number arrived]

    def flush(task: int) -> None:
        entry = pending.pop(task, None)
        if entry is not None:
            fn(entry[0])

    def hook_for(index: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            task = torch._C._current_graph_task_id()
            entry = pending.get(task)
            if entry is None:
                entry = pending[task] = [[None] * len(outputs), 0]
                # outputs the pass does not reach: their gradients stay None, fn runs when the pass ends
                torch.autograd.Variable._execution_engine.queue_callback(lambda: flush(task))
            entry[0][index] = grad
            entry[1] += 1
            if entry[1] == len(outputs):
                flush(task)

        return hook

    for i, t in enumerate(outputs):
        t.register_hook(hook_for(i))


def _layer_forward(module: nn.Module, hooks: "GradSampleHooks", *args: Any, **kwargs: Any) -> Any:
    """Patched forward of a layer with a rule or factors. One tensor input, any leading dims: an input
    shared by the batch goes to ``shared_call``; else the call records per-sample gradients directly."""
    x = _single_tensor(args, kwargs)
    if x is not None and get_rule_batch_dim(module) is None:
        kind = hooks.batch.input_kind(x)
        if kind != PER_SAMPLE:
            return hooks.shared_call(module, x, kind)
        x = shared.plain(x)
        return _unshared_forward(module, hooks, *((x,) if args else ()), **{k: x for k in kwargs})
    args, kwargs = hooks.per_sample_inputs(module, args, kwargs)
    return _unshared_forward(module, hooks, *args, **kwargs)


def _unshared_forward(module: nn.Module, hooks: "GradSampleHooks", *args: Any, **kwargs: Any) -> Any:
    """A per-sample call: in the fast modes a factored layer records its factors from its backward; else
    the usual forward, and the rule's hook on its output."""
    x = _single_tensor(args, kwargs)
    factored = hooks.factored(module, x)
    if factored is not None:
        return factored.forward(module, x, functools.partial(hooks._record_factors, module, factored))
    output = type(module).forward(module, *args, **kwargs)
    hooks._forward_hook(module, args, kwargs, output)
    return output


def _single_tensor(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The input of a call with exactly one argument, a tensor; else ``None``."""
    if len(args) + len(kwargs) != 1:
        return None
    x = args[0] if args else next(iter(kwargs.values()))
    return x if isinstance(x, torch.Tensor) else None


def _dp_forward_call(dp_forward: Any, module: nn.Module, hooks_ref: Any, *args: Any, **kwargs: Any) -> Any:
    hooks = hooks_ref()
    # A copy of a hooked module (copy.deepcopy: an EMA or teacher model) carries the patched forward but
    # is not hooked: it runs its class's forward and gets ordinary gradients.
    if hooks is None or not hooks.recording or id(module) not in hooks._patched_ids:
        return type(module).forward(module, *args, **kwargs)
    if dp_forward is not _layer_forward:  # a fused layer (attention, RNN) needs the batch in its inputs
        args, kwargs = hooks.per_sample_inputs(module, args, kwargs)
    return dp_forward(module, hooks, *args, **kwargs)


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
    caller knows it. Factored parts are not cast (they widen while computing, see ``_record_factors``)."""
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
