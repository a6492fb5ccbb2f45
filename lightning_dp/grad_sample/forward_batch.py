"""The batch of the current forward: its size, where layers find it, and which layer inputs are shared.

Two sizes are kept. ``aware_size``: the batch size noted by the last batch-aware layer (attention, RNN:
their ``batch_first`` fixes where the batch is); layers that take any leading dims find their batch
dimension, 0 or 1, as the one of that size (:meth:`ForwardBatch.find_batch_dim`). ``size``: the batch
size ``B`` of the forward, from the first tensor given to the outermost call of the model or of a
container it holds (a LightningModule's model, or any part of it called from ``training_step``), kept
only during that call. A pre-hook and a hook on the containers (modules with children) count the call
depth; layers (leaf modules, frozen or not) get no module hook.

With ``B`` known, in a batch-first model (time-major models, ``batch_first=False``, take every input
as per-sample, as they always did), a layer input is

* **per-sample** when its first dimension has size ``B`` (or its second, once a batch-aware layer
  has run: the output of attention or an RNN may be time-major);
* **shared** by the batch when it has none (position ids ``(1, T)``; T5's relative buckets ``(q, k)``):
  the layer's output is handed on as a :class:`~lightning_dp.grad_sample.batch_shared_inputs.SharedTensor`;
* **undecided** when it has one only by its shape: an integer input (ids for an embedding) that is not
  one of the forward's own inputs but was made inside it (BERT's token types ``(B, T)``, RoBERTa's
  position ids, but also T5's buckets ``(q, k)`` when ``q`` happens to equal ``B``). Its output is
  handed on as a shared tensor too, and the first operation that meets the batch decides: kept as
  per-sample if its leading dimension lines up with the batch there, shared if it is broadcast over it.

Activation checkpointing runs a block's forward again during the backward pass (its recompute), with the
block's own arguments; every layer input must be taken there as in the original forward. A forward
during a backward pass is such a recompute: ``B`` comes from the recomputed container's arguments (the
last forward's when the checkpointed function calls layers directly, outside any container) and the
inputs that count as the model's own are the last forward's (:meth:`ForwardBatch._current`).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import batch_shared_inputs
from .batch_shared_inputs import PER_SAMPLE, SHARED, UNDECIDED


class ForwardBatch:
    """The batch of the forward in progress (see the module docstring).

    Args:
        batch_first: where the batch is in tensors that do not say (time-major models: ``False``).
        recording: callable telling whether the forward in progress records per-sample gradients.
    """

    def __init__(self, batch_first: bool, recording: Callable[[], bool]) -> None:
        self.batch_first = batch_first
        self.recording = recording
        self.aware_size: Optional[int] = None
        self._size: Optional[int] = None
        self._inputs: set = set()  # storages of the outermost call's tensors
        self._last: Tuple[Optional[int], set] = (None, set())  # (size, inputs) of the last recording forward
        self._depth = 0
        self._entries: set = set()  # ids of the modules whose calls are counted (not their copies)

    def attach(self, module: nn.Module) -> List[torch.utils.hooks.RemovableHandle]:
        """Count calls of ``module`` and of the containers it holds; returns the handles."""
        ref = weakref.ref(self)
        handles = []
        for entry in [m for m in module.modules() if m is module or next(m.children(), None) is not None]:
            self._entries.add(id(entry))
            handles.append(entry.register_forward_pre_hook(functools.partial(_enter, ref), with_kwargs=True))
            handles.append(entry.register_forward_hook(functools.partial(_leave, ref), always_call=True))
        return handles

    def detach(self) -> None:
        """Forget the counted modules (their hooks are removed by the caller)."""
        self._entries.clear()
        self._size, self._depth = None, 0

    @property
    def size(self) -> Optional[int]:
        """``B`` of the forward in progress (``None`` outside any counted call; see :meth:`_current`)."""
        return self._current()[0]

    def enter(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """An outermost call begins: its first tensor argument's first dimension gives ``B``. During a
        backward pass the call is activation checkpointing's recompute of a block: see :meth:`_current`."""
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        first = next((t for t in tensors if t.dim() > 0), None)
        size = None if first is None else first.shape[0]
        if in_backward():
            self._size = self._last[0] if size is None else size
            self._inputs = self._last[1]
            return
        self._size, self._inputs = size, {_storage(t) for t in tensors}
        self._last = (self._size, self._inputs)

    def _current(self) -> Tuple[Optional[int], set]:
        """``(B, storages of the forward's inputs)``.

        A forward during a backward pass is activation checkpointing's recompute of a block (a checkpointed
        container, or a function that calls layers directly) and must take every layer input as the
        original forward did (the same code path: the recompute saves the same tensors, and hooks that run
        record the same per-sample gradients). A recomputed container finds ``B`` in its arguments as
        usual; a layer called outside any container takes the last forward's. The inputs that count as
        the model's own (integer ids, per-sample) are the last forward's, not the block's arguments."""
        if self._depth == 0 and self._size is None and in_backward():
            return self._last
        return self._size, self._inputs

    def find_batch_dim(self, shape: Sequence[int]) -> int:
        """Batch dimension (0 or 1) of a tensor of ``shape`` from a layer that takes any leading dims."""
        if len(shape) < 2:
            return 0
        if self.aware_size is not None:
            hits = [d for d in (0, 1) if shape[d] == self.aware_size]
            if len(hits) == 1:
                return hits[0]
        return 0 if self.batch_first else 1

    def input_kind(self, x: torch.Tensor) -> str:
        """``PER_SAMPLE``, ``SHARED`` or ``UNDECIDED`` for the input ``x`` of a layer that takes any leading
        dims (per-sample whenever ``B`` is unknown: a layer called on its own, outside any container). A
        shared tensor is what its roots are."""
        if isinstance(x, batch_shared_inputs.SharedTensor):
            return batch_shared_inputs.state(x)
        size, inputs = self._current()
        if size is None or not self.batch_first:  # time-major models: as they always were
            return PER_SAMPLE
        # after a batch-aware layer (attention, RNN with their own batch_first) dimension 1 may be the batch
        dims = (0,) if self.aware_size is None else (0, 1)
        if not any(d < x.dim() and x.shape[d] == size for d in dims):
            return SHARED
        if x.shape[0] != size or x.is_floating_point() or x.is_complex() or _storage(x) in inputs:
            return PER_SAMPLE
        return UNDECIDED


def in_backward() -> bool:
    """Whether a backward pass is running on this thread (a forward now is a checkpointed block's recompute)."""
    return torch._C._current_graph_task_id() != -1


def infer_batch_first(module: nn.Module) -> bool:
    """``False`` if every module of the model with a ``batch_first`` attribute has it ``False``, else ``True``."""
    flags = [m.batch_first for m in module.modules() if isinstance(getattr(m, "batch_first", None), bool)]
    return not flags or any(flags)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return id(t)


def _enter(ref: Any, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    batch = ref()
    if batch is None or id(module) not in batch._entries:
        return  # a copy of a counted module (deepcopy): not ours
    if batch._depth == 0 and batch.recording():
        batch.enter(args, kwargs)
    batch._depth += 1


def _leave(ref: Any, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
    batch = ref()
    if batch is None or id(module) not in batch._entries:
        return
    batch._depth = max(0, batch._depth - 1)
    if batch._depth == 0:
        batch._size = None  # B holds for this call only
        batch._inputs = set()
