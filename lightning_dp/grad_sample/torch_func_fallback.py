"""The ``torch.func`` fallback: per-sample gradients of any module's *own* parameters.

For a module with trainable parameters and no rule (a user's custom layer), the backward hook re-runs
the module's forward on each sample alone, ``vmap``-ed over the batch, and takes the ``vjp`` with
respect to its own parameters (``recurse=False``; children are handled by their own hooks) at the
output gradient the real backward delivered. The result is exact: the same math, one sample at a time.

Assumptions: tensor inputs whose first dimension is the batch size are per-sample (dimension 0),
other inputs are shared; every tensor output has the batch first. The re-run must be deterministic
(dropout inside the module's *own* forward would draw a different mask): ``randomness="error"`` makes
such a module fail the one-time check on its first forward, as does anything ``vmap`` rejects (in-place
ops on shared tensors, ``.item()``, data-dependent control flow): the error names the module path
before any optimizer step.

:class:`FallbackHooks` are the forward hooks that run it: they check a module once, keep its inputs
through autograd's saved-tensor hooks (``saved_for_backward.py``) and compute its per-sample gradients
when the gradients of its outputs arrive.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .registry import trainable_parameters
from .saved_for_backward import Saved, no_saved_tensor_hooks

if TYPE_CHECKING:
    from .per_sample_recorder import PerSampleRecorder


class UnsupportedModuleError(RuntimeError):
    """A module with trainable parameters whose per-sample gradients cannot be computed."""

    def __init__(self, path: str, module: nn.Module, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"{path} ({type(module).__name__}) has trainable parameters "
            f"({', '.join(trainable_parameters(module))}) and no per-sample gradient rule, and the torch.func "
            f"fallback cannot handle it: {reason}. Fix: freeze its parameters (requires_grad_(False)), build "
            "it from supported layers, avoid in-place ops / randomness in its own forward, or register a rule "
            "with lightning_dp.grad_sample.register_grad_sampler."
        )


def fallback_grad_sample(
    module: nn.Module,
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    live: Sequence[int],
    grads: Sequence[torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """``{name: (B, *param.shape)}`` for the module's own trainable parameters.

    Args:
        module: the module (its forward is re-run functionally with its own parameters).
        args, kwargs: the (detached) inputs of the forward call.
        live: indices, among the tensor leaves of the output, of the outputs that received gradients.
        grads: the per-sample-loss gradients of those outputs, batch first.
    """
    params = {name: p.detach() for name, p in trainable_parameters(module).items()}
    batch_size = grads[0].shape[0]
    leaves, spec = pytree.tree_flatten((args, kwargs))
    batched = [
        i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch_size
    ]

    def one_sample(samples: List[torch.Tensor], sample_grads: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        local = list(leaves)
        for i, t in zip(batched, samples):
            local[i] = t.unsqueeze(0)
        a, k = pytree.tree_unflatten(local, spec)

        def run(p: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
            out = torch.func.functional_call(module, p, a, k, strict=False)
            tensors = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            return tuple(tensors[i] for i in live)

        _, vjp_fn = torch.func.vjp(run, params)
        return vjp_fn(tuple(g.unsqueeze(0) for g in sample_grads))[0]

    with torch.enable_grad():
        return torch.func.vmap(one_sample, randomness="error")([leaves[i] for i in batched], list(grads))


def check_fallback(
    module: nn.Module,
    path: str,
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    outputs: Sequence[torch.Tensor],
    live: Sequence[int],
) -> None:
    """Run the fallback once on this batch (unit output gradients); raise :class:`UnsupportedModuleError`."""
    try:
        grads = [torch.ones_like(outputs[i]) for i in live]
        if any(g.dim() == 0 for g in grads):
            raise ValueError("an output has no batch dimension")
        per_sample = fallback_grad_sample(module, args, kwargs, live, grads)
        for name, p in trainable_parameters(module).items():
            got = per_sample[name]
            if got.shape[1:] != p.shape:
                raise ValueError(f"per-sample gradient of {name} has shape {tuple(got.shape)}")
    except UnsupportedModuleError:
        raise
    except Exception as err:  # noqa: BLE001  (any failure of the dry run means: not supported)
        raise UnsupportedModuleError(path, module, f"{type(err).__name__}: {err}") from err


class FallbackHooks:
    """The forward pre-hook and hook of the modules the ``torch.func`` fallback handles, recording through
    ``recorder``; each module is checked (:func:`check_fallback`) at its first recording forward."""

    def __init__(self, recorder: "PerSampleRecorder") -> None:
        self.recorder = recorder
        self._checked: set = set()  # ids of the modules checked

    def inputs(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
        """Pre-hook: inputs shared by the batch made per-sample (the fallback needs the batch in them)."""
        if not self.recorder.recording:
            return None
        new = self.recorder.per_sample_inputs(module, args, kwargs)
        return None if new[0] is args and new[1] is kwargs else new

    def output(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        """Hook: the module checked once, its inputs kept, and its per-sample gradients computed when the
        gradients of its outputs arrive."""
        recorder = self.recorder
        if not recorder.recording:
            return
        outputs = [o for o in pytree.tree_leaves(output) if isinstance(o, torch.Tensor)]
        live = [i for i, o in enumerate(outputs) if o.requires_grad]
        if not live:
            return
        args = pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), args)
        kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), kwargs)
        batch_size = outputs[live[0]].shape[0]
        if id(module) not in self._checked:
            # inside a checkpointed block the checkpoint's saved-tensor hooks are set, and torch.func refuses
            # to run under them; the check's tensors are its own (not saved for the block's backward)
            with recorder.suspended(), no_saved_tensor_hooks():
                check_fallback(module, recorder.path_of(module), args, kwargs, outputs, live)
            self._checked.add(id(module))
        like = [(outputs[i].shape, outputs[i].dtype, outputs[i].device) for i in live]
        saved = Saved((args, kwargs))  # through autograd's saved-tensor hooks: checkpointing drops them

        def on_output_grads(grads: Sequence[Optional[torch.Tensor]]) -> None:
            grads = [
                torch.zeros(shape, dtype=dtype, device=device) if g is None else recorder.scale(g, batch_size)
                for g, (shape, dtype, device) in zip(grads, like)
            ]
            args, kwargs = saved.get()
            with recorder.suspended(), no_saved_tensor_hooks():
                per_sample = fallback_grad_sample(module, args, kwargs, live, grads)
            for name, grad_sample in per_sample.items():
                recorder.add_grad_sample(module.get_parameter(name), grad_sample, module)

        _on_output_grads([outputs[i] for i in live], on_output_grads)


def _on_output_grads(outputs: Sequence[torch.Tensor], fn: Callable[[List[Optional[torch.Tensor]]], None]) -> None:
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
