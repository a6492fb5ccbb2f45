"""Attach per-sample-gradient hooks to a module, in place, and take them off again.

Every submodule that owns trainable parameters gets one of three treatments:

* a **rule** (``linear.py``, ``conv.py``...): the layer's forward is patched (no module hook: it would
  slow every call) to :func:`~lightning_dp.grad_sample.per_sample_recorder.layer_forward`, which runs the
  usual forward, keeps the layer's inputs and registers a hook on its output tensor; when autograd
  delivers the gradient of the loss with respect to that output, the rule turns (inputs, output
  gradient) into per-sample gradients. A layer type that declares its **factors**
  (``registry.Factored``: Linear, Conv1/2/3d, Embedding, Hugging Face's ``Conv1D``) instead runs, in the
  fast modes, a forward that records the factors from the backward of its weight-gradient-free function;
* a **DP forward** (``attention.py``, ``rnn.py``): fused modules whose internals hooks cannot see run an
  equivalent forward built from recorded linear maps
  (:meth:`~lightning_dp.grad_sample.per_sample_recorder.PerSampleRecorder.linear`), with the module's own
  parameters; the original forward is restored by :meth:`GradSampleHooks.remove`;
* the **torch.func fallback** (``torch_func_fallback.py``): any other module with its own trainable
  parameters (a user's custom layer); per-sample gradients by ``vmap`` over samples of a ``vjp`` of its
  forward.

What a hooked call records is :class:`~lightning_dp.grad_sample.per_sample_recorder.PerSampleRecorder`'s
part (``per_sample_recorder.py``). Only modules with trainable parameters of their own are touched: a
frozen base model (LoRA) runs its own code, and the per-sample work scales with the trainable adapter.

Design notes:

* Activation checkpointing: the recompute of a checkpointed block runs these forwards again. Under
  non-reentrant checkpointing its graph is never backpropagated (the original graph is), so its hooks
  never fire; under reentrant checkpointing the original forward runs without gradients and records
  nothing. Either way each call records once. The recompute takes every input as the forward did
  (``forward_batch.py``).
* Nothing is recorded when gradients are disabled (``torch.no_grad``, Lightning's validation and
  predict loops): evaluation runs the modules' original code.
* A copy of a hooked module (``copy.deepcopy``: an EMA or teacher model) carries the patched forward but
  is not hooked: it runs its class's forward and gets ordinary gradients.
"""
from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .forward_batch import infer_batch_first
from .per_sample_recorder import PerSampleRecorder, layer_forward
from .registry import get_dp_forward, get_grad_sampler, trainable_parameters
from .torch_func_fallback import FallbackHooks

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GradSampleHooks]" = weakref.WeakKeyDictionary()
log = logging.getLogger("lightning_dp")


class GradSampleHooks(PerSampleRecorder):
    """Handle on the hooks :func:`attach_grad_sample_hooks` put on a module; ``remove()`` undoes them.

    Args:
        module: the model (changed in place: hooks only, no wrapper, no new parameters).
        loss_reduction: ``"mean"`` if the loss averages over the batch (per-sample gradients are then
            rescaled by the batch size), ``"sum"`` if it sums.
        batch_first: where the batch is for layers that accept any leading dims when it cannot be told
            from the shapes. ``None`` (default): ``False`` if every module of the model with a
            ``batch_first`` attribute (RNNs, attention, transformer layers) has it ``False``, else ``True``.
        clipping_mode: ``"auto"``/``"ghost"`` (factored gradients in ``param.grad_parts``, see
            ``per_sample_parts.py``) or ``"materialize"`` (``param.grad_sample``) for every layer. ``None``
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
        resolved = infer_batch_first(module) if batch_first is None else batch_first
        super().__init__(loss_reduction, resolved, clipping_mode)
        self.module = module
        self.fallback_modules: List[str] = []
        self.patched_modules: List[str] = []
        self._fallback = FallbackHooks(self)
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._patched: List[Tuple[nn.Module, Any]] = []
        self._patched_ids: set = set()  # modules whose forward this object patched (not their copies)
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.dp_name = name  # for error messages about this parameter (DPOptimizer)
        self._attach(module)
        self._handles.extend(self.batch.attach(module))

    def _attach(self, module: nn.Module) -> None:
        """Give each submodule with trainable parameters its treatment (see the module docstring)."""
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
            elif get_grad_sampler(submodule) is not None:  # a rule, or declared factors
                self._patch_forward(submodule, layer_forward)
                self.patched_modules.append(path or "<root module>")
            else:
                self._attach_fallback(submodule, path or "<root module>")

    def _attach_fallback(self, module: nn.Module, path: str) -> None:
        self.fallback_modules.append(path)
        log.info(
            "lightning_dp: %s (%s) has no per-sample gradient rule; using the torch.func fallback.",
            path,
            type(module).__name__,
        )
        self._handles.append(module.register_forward_pre_hook(self._fallback.inputs, with_kwargs=True))
        self._handles.append(module.register_forward_hook(self._fallback.output, with_kwargs=True))

    def _patch_forward(self, module: nn.Module, dp_forward: Any) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        self._patched_ids.add(id(module))
        module.forward = functools.partial(_dp_forward_call, dp_forward, module, weakref.ref(self))

    @property
    def parameters(self) -> List[nn.Parameter]:
        """Trainable parameters of the model (each once, even when tied)."""
        return [p for p in self.module.parameters() if p.requires_grad]

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


def _dp_forward_call(dp_forward: Any, module: nn.Module, hooks_ref: Any, *args: Any, **kwargs: Any) -> Any:
    hooks = hooks_ref()
    # A copy of a hooked module (copy.deepcopy: an EMA or teacher model) carries the patched forward but
    # is not hooked: it runs its class's forward and gets ordinary gradients.
    if hooks is None or not hooks.recording or id(module) not in hooks._patched_ids:
        return type(module).forward(module, *args, **kwargs)
    if dp_forward is not layer_forward:  # a fused layer (attention, RNN) needs the batch in its inputs
        args, kwargs = hooks.per_sample_inputs(module, args, kwargs)
    return dp_forward(module, hooks, *args, **kwargs)


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
