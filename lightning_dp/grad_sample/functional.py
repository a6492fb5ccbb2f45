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
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .registry import trainable_parameters


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
