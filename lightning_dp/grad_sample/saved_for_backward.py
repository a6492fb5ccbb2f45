"""What the hooks keep from a forward for its backward pass, kept the way autograd keeps its own tensors.

A rule needs a layer's inputs when the gradient of its output arrives. Held in a closure, they would stay
alive until then whatever the forward ran under; activation checkpointing (``torch.utils.checkpoint``,
non-reentrant: Hugging Face's default) drops a block's activations after its forward and recomputes
them in the backward pass, and ``torch.autograd.graph.save_on_cpu`` moves them to host memory. Both work
through autograd's *saved-tensor hooks*, which a closure escapes. :class:`Saved` instead makes the tensors
the saved tensors of a small autograd node of their own (never part of a backward pass: nothing uses its
output), so the saved-tensor hooks in force at the forward apply to them as to the layer's own saved
tensors: under non-reentrant checkpointing they are dropped after the forward and come back from the
block's recompute when read, under ``save_on_cpu`` they wait in host memory. Without such hooks (no
checkpointing) there is nothing to gain: the tensors are kept as they are, as before, at no cost.

Reading them back (:meth:`Saved.get`) happens once per backward pass, in a gradient hook, as autograd
reads a node's saved tensors once (non-reentrant checkpointing refuses a second read).

:func:`no_saved_tensor_hooks`: ``torch.func`` transforms (the fallback's ``vjp``) refuse to run while
saved-tensor hooks are set; the fallback's one-time check runs during the forward, inside a checkpointed
block when the model is checkpointed, and its tensors are its own (nothing the block needs later).
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch.utils import _pytree as pytree

_ANCHOR = torch.zeros((), requires_grad=True)
"""An input that requires grad, so that the keeping node is created whatever the kept tensors are."""


class _Keep(torch.autograd.Function):
    """Saves its tensor inputs for backward; its output (an empty tensor) is never used."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(*tensors)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pragma: no cover  (the node is never reached)
        return (None,) * len(ctx.needs_input_grad)


class Saved:
    """The tensors of ``tree`` (any nesting of tuples, lists, dicts; other leaves kept as they are),
    detached, and kept for the backward pass: through the saved-tensor hooks in force, if any (see the
    module docstring), else as they are (what the hooks did before, at no cost). :meth:`get` gives the
    tree back."""

    __slots__ = ("_leaves", "_spec", "_slots", "_node")

    def __init__(self, tree: Any) -> None:
        leaves, self._spec = pytree.tree_flatten(tree)
        self._slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        self._node: Optional[Any] = None
        tensors = [leaves[i].detach() for i in self._slots]
        if tensors and saved_tensor_hooks_set():
            for i in self._slots:
                leaves[i] = None
            with torch.enable_grad():
                self._node = _Keep.apply(_ANCHOR, *tensors).grad_fn
        else:
            for i, t in zip(self._slots, tensors):
                leaves[i] = t
        self._leaves: List[Any] = leaves

    def get(self) -> Any:
        """The tree, its tensors read back (unpacked by the hooks that packed them)."""
        leaves = self._leaves
        if self._node is not None:
            leaves = list(leaves)
            for i, t in zip(self._slots, self._node.saved_tensors):
                leaves[i] = t
        return pytree.tree_unflatten(leaves, self._spec)


def saved_tensor_hooks_set() -> bool:
    """Whether saved-tensor hooks (activation checkpointing's, ``save_on_cpu``'s) are in force."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(True) is not None


class no_saved_tensor_hooks:  # noqa: N801  (a context manager, used as a function)
    """Run the block with no saved-tensor hooks set (those set are restored after), for code whose saved
    tensors are its own and that cannot run under them (``torch.func``'s ``vjp``).

    A class, not a ``contextlib`` generator: an exception leaving the block (the fallback's check refusing
    a module) would otherwise be kept in a reference cycle with its traceback, and the frames' tensors with it.
    """

    def __enter__(self) -> None:
        self._lifted: List[Any] = []
        if getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None) is None:
            return  # pragma: no cover  (an older torch: nothing to lift)
        while saved_tensor_hooks_set():
            self._lifted.append(torch._C._autograd._top_saved_tensors_default_hooks(True))
            torch._C._autograd._pop_saved_tensors_default_hooks()

    def __exit__(self, *exc: Any) -> None:
        for pack, unpack in reversed(self._lifted):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
        self._lifted = []
