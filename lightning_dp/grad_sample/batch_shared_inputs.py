"""Layers whose input is shared by the whole batch: exact per-sample gradients through the broadcast.

Hugging Face models look some inputs up once for the whole batch and broadcast the result later:
position ids of shape ``(1, T)`` (GPT-2, BERT, DistilBERT), T5's relative-position buckets ``(q, k)``
whose embedding becomes a ``(1, H, q, k)`` bias added to every sample's attention scores. The gradient
autograd delivers to such a layer's output is the *sum* over the samples; sample ``b``'s share, needed
for its per-sample gradient, is gone by then. It exists only where the shared value meets the batch.

So the hooks hand the model a :class:`SharedTensor` instead of the layer's output: the same values, plus
a *root*, the output expanded to ``(B, *shape)`` (a view, no copy), whose gradient is per sample, and
whose gradient the layer's rule reads. Operations on a shared tensor that involve no per-sample tensor
give shared tensors again, and the chain of operations (its lineage: ``permute``, ``unsqueeze``, ``to``,
adding a causal mask...) is kept. The first operation that meets a per-sample tensor (one whose
batch dimension has the forward's batch size ``B``), or that broadcasts the shared value to the batch
(``expand``), runs instead on the per-sample copies: the lineage replayed on the root under
``torch.func.vmap`` (one value per sample), aligned with the per-sample operands for broadcasting
(batch first). Its result is an ordinary per-sample tensor, autograd delivers each sample's own gradient
to the root, and the layer's contribution to sample ``b`` is made from sample ``b``'s output gradient.
The values are the same as without the hooks; nothing depends on the model's code.

An input whose shape alone cannot say (see :mod:`~lightning_dp.grad_sample.forward_batch`: ids made inside the
forward whose leading dimension has the batch size) gives an *undecided* root: the first operation that
meets the batch decides, for every root its operand comes from. An operand whose leading dimension
lines up with the per-sample operands' batch dimension keeps its plain values (the layer's rule then
reads the gradient of its output, as for any per-sample input); one that is broadcast over the batch
makes its roots shared. A root still undecided at the backward pass is per-sample.

Limits:

* ``B`` is the size of the first dimension of the first tensor given to the outermost call of the model
  or of a container it holds (such as a LightningModule's model); a layer called on its own, outside
  any such call, and every layer of a time-major model (``batch_first=False``) take their input as
  per-sample, as before. A float input (a Linear's) whose leading dimension happens to equal ``B`` is
  taken as per-sample.
* A shared value that reaches the loss without meeting a per-sample tensor, one changed in place, and
  one given to a module that needs the batch in its input (a fused or ``torch.func`` fallback module) are
  errors naming the layer (:class:`SharedInputError`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

_INDEXING = {
    torch.Tensor.__getitem__, torch.Tensor.index_select, torch.index_select, torch.Tensor.gather, torch.gather,
    torch.take_along_dim, torch.Tensor.take_along_dim, F.embedding,
}
"""Operations where a per-sample operand indexes the shared value: run per sample (``vmap``), since
aligning the shared value for broadcasting would shift the dimension the index reads."""
_BROADCASTS = {torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to, torch.Tensor.broadcast_to}
"""Operations that broadcast their input to the batch by themselves."""
PER_SAMPLE, SHARED, UNDECIDED = "per_sample", "shared", "undecided"  # what a layer input (a root) is
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}


class SharedInputError(RuntimeError):
    """A layer's input is shared by the batch and its per-sample gradients cannot be told apart."""


class _Node:
    """One value of a lineage: a root (its per-sample copies ``(B, *shape)`` made by ``make_root`` when
    first needed) or one operation on earlier values (``func`` on ``leaves`` with the shared operands at
    ``slots``, output ``index``)."""

    __slots__ = ("func", "leaves", "spec", "slots", "parents", "index", "batch_size", "where", "_batched",
                 "_decision", "_roots", "make_root", "on_root_grad", "upstream")

    def __init__(
        self,
        where: str,
        batch_size: int,
        make_root: Optional[Callable[[], torch.Tensor]] = None,
        func: Optional[Callable[..., Any]] = None,
        leaves: Sequence[Any] = (),
        spec: Any = None,
        slots: Sequence[int] = (),
        parents: Sequence["_Node"] = (),
        index: int = 0,
    ) -> None:
        self.where, self.batch_size = where, batch_size
        self.func, self.leaves, self.spec, self.slots, self.parents, self.index = (
            func, list(leaves), spec, list(slots), list(parents), index
        )
        self.make_root = make_root
        self.on_root_grad: Optional[Callable[[torch.Tensor], None]] = None
        self.upstream: List["_Node"] = []  # of a root made by a layer from a value of these roots
        self._batched: Optional[torch.Tensor] = None
        # A root's decision, in a cell the gradient hooks read (a hook holding the node would make a
        # reference cycle through the root tensor, freed only by the garbage collector).
        self._decision: List[Optional[str]] = [SHARED]
        self._roots: Optional[List["_Node"]] = None

    @property
    def decision(self) -> Optional[str]:
        """Of a root: ``SHARED``, ``PER_SAMPLE`` or ``None`` (undecided)."""
        return self._decision[0]

    @decision.setter
    def decision(self, value: Optional[str]) -> None:
        self._decision[0] = value

    def roots(self) -> List["_Node"]:
        """The roots this value is made from (a root: itself, and the roots of its layer's input: one
        decision holds for all of them)."""
        if self.make_root is not None:  # not cached: a list holding the node itself would be a cycle
            return list({id(r): r for r in [self] + [r for u in self.upstream for r in u.roots()]}.values())
        if self._roots is None:
            self._roots = list({id(r): r for p in self.parents for r in p.roots()}.values())
        return self._roots

    def batched(self) -> torch.Tensor:
        """This value for every sample, ``(B, *shape)``: the root's copies, or the lineage replayed on
        them (once)."""
        if self._batched is None and self.make_root is not None:
            root = self.make_root()
            on_grad, decision = self.on_root_grad, self._decision
            if on_grad is not None and root.requires_grad:
                root.register_hook(lambda grad: on_grad(grad) if decision[0] == SHARED else None)
            self._batched = root
        if self._batched is None:
            values = [parent.batched() for parent in self.parents]

            def one_sample(*per_sample: torch.Tensor) -> torch.Tensor:
                local = list(self.leaves)
                for slot, value in zip(self.slots, per_sample):
                    local[slot] = value
                args, kwargs = pytree.tree_unflatten(local, self.spec)
                return _tensor_leaves(self.func(*args, **kwargs))[self.index]

            self._batched = torch.func.vmap(one_sample, randomness="same")(*values)
        return self._batched


class SharedTensor(torch.Tensor):
    """The output of a layer whose input is shared by the batch, as the model sees it (same values);
    see the module docstring. :meth:`batched` gives the per-sample copies."""

    _dp_node: _Node

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict] = None) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            return _call(func, args, kwargs or {})

    def batched(self) -> torch.Tensor:
        """``(B, *self.shape)``: this value for every sample, each with its own gradient path to the root."""
        with torch._C.DisableTorchFunctionSubclass():
            return self._dp_node.batched()


def track(
    value: torch.Tensor,
    make_root: Callable[[], torch.Tensor],
    batch_size: int,
    where: str,
    on_root_grad: Callable[[torch.Tensor], None],
    on_value_grad: Optional[Callable[[torch.Tensor], None]] = None,
    upstream: Optional[SharedTensor] = None,
) -> SharedTensor:
    """``value``, a layer's output, as a shared tensor whose per-sample copies ``(B, *shape)`` are made
    by ``make_root`` when first needed; ``where`` names the layer in errors. ``on_root_grad`` gets their
    gradient (each sample's own). ``upstream``: the shared value the layer was given, if any.

    ``on_value_grad``: the root is undecided (see the module docstring), and this is called with the
    gradient of ``value`` itself if the root is kept per-sample. Otherwise gradient reaching ``value`` (not
    the root) is an error: that use of it never met the batch, so no sample can be told its share."""
    with torch._C.DisableTorchFunctionSubclass():
        shared = value.as_subclass(SharedTensor)
        node = _Node(where, batch_size, make_root=make_root)
        node.on_root_grad = on_root_grad
        node.decision = None if on_value_grad is not None else SHARED
        if upstream is not None:
            node.upstream = [upstream._dp_node]
        shared._dp_node = node
        if shared.requires_grad:
            shared.register_hook(_value_hook(node, on_value_grad))
    return shared


def layer_call(
    x: torch.Tensor,
    kind: str,
    batch_size: int,
    where: str,
    run: Callable[[torch.Tensor], Any],
    record: Callable[[torch.Tensor, torch.Tensor, bool], None],
) -> Any:
    """A call of a layer (any leading dims, one input) whose input ``x`` is ``SHARED`` by the batch or
    ``UNDECIDED``: its output as a shared tensor.

    Args:
        run: the layer's forward, recording nothing.
        record: ``record(input, output_grad, copies)`` makes the layer's per-sample gradients; ``copies``:
            both are the per-sample copies ``(B, ...)``, batch first (else: the call's own, the batch
            where the layer's input has it).
    """
    upstream = x if isinstance(x, SharedTensor) else None
    if upstream is not None:
        batch_size = upstream._dp_node.batch_size
    copies: List[torch.Tensor] = []  # the per-sample copies of the input, once made

    def make_root() -> torch.Tensor:
        if upstream is not None:  # the layer on each sample's copy of its input
            copies.append(upstream.batched())
            return run(copies[0])
        copies.append(x.unsqueeze(0).expand(batch_size, *x.shape))
        return out.unsqueeze(0).expand(batch_size, *out.shape)  # views, no copy

    if kind == SHARED and upstream is not None:  # its values are those of any sample's copy
        root = make_root()
        value, make = root.select(0, 0), (lambda: root)
    else:
        out = run(plain(x))
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return out
        value, make = out.view_as(out), make_root
    on_value_grad = None if kind == SHARED else functools.partial(record, plain(x).detach(), copies=False)
    return track(value, make, batch_size, where, lambda grad: record(copies[0].detach(), grad, copies=True),
                 on_value_grad, upstream)


def state(x: SharedTensor) -> str:
    """``SHARED``, ``PER_SAMPLE`` or ``UNDECIDED``: what the roots of ``x`` are (a shared root makes them
    all shared)."""
    roots = x._dp_node.roots()
    if any(r.decision == SHARED for r in roots):
        _share(roots)
        return SHARED
    return PER_SAMPLE if all(r.decision == PER_SAMPLE for r in roots) else UNDECIDED


def as_per_sample(x: torch.Tensor, where: str) -> torch.Tensor:
    """``x`` as a plain per-sample tensor for a module that needs the batch in its input (a fused or
    fallback module, a layer with a fixed batch dimension): a shared tensor is accepted when its roots
    are undecided (then decided per-sample) and its first dimension is the batch; else an error."""
    if not isinstance(x, SharedTensor):
        return x
    if state(x) != SHARED and _decide(x, x.dim()):
        return plain(x)
    raise SharedInputError(
        f"{where} got an input shared by the batch ({x._dp_node.where}: no batch dimension of the batch "
        "size); only layers that take any leading dims can take one. Expand it to the batch size first."
    )


def plain(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an ordinary tensor (same values and autograd history)."""
    with torch._C.DisableTorchFunctionSubclass():
        return x.as_subclass(torch.Tensor) if isinstance(x, SharedTensor) else x


def _value_hook(node: _Node, on_value_grad: Optional[Callable[[torch.Tensor], None]]) -> Callable[[torch.Tensor], None]:
    decision, where = node._decision, node.where  # not the node: no reference cycle through the tensors

    def hook(grad: torch.Tensor) -> None:
        if decision[0] != SHARED and on_value_grad is not None:
            on_value_grad(grad)
            return
        raise SharedInputError(
            f"{where}: its input is shared by the batch (no batch dimension of the batch size), and its "
            "output reached the loss without being combined with a per-sample tensor, so no sample can be "
            "given its share of the gradient. Give the layer a per-sample input (e.g. expand it to the batch "
            "size first)."
        )

    return hook


def _decide(leaf: SharedTensor, rank: int) -> bool:
    """Whether ``leaf``, meeting per-sample tensors of ``rank`` dimensions, is used as it is (per-sample:
    its roots undecided and its leading dimension the batch's), or through its per-sample copies."""
    node = leaf._dp_node
    roots = node.roots()
    if leaf.dim() == rank and leaf.shape[0] == node.batch_size and all(r.decision != SHARED for r in roots):
        for r in roots:
            r.decision = PER_SAMPLE
        return True
    _share(roots)
    return False


def _share(roots: List[_Node]) -> None:
    for r in roots:
        if r.decision == PER_SAMPLE:
            raise SharedInputError(
                f"{r.where}: its output was used as per-sample and, later, broadcast over the batch as a "
                "shared value; give the layer an input whose batch dimension says which it is."
            )
        r.decision = SHARED


def _tensor_leaves(tree: Any) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _is_inplace(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


def _call(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    slots = [i for i, t in enumerate(leaves) if isinstance(t, SharedTensor)]
    if not slots:
        return func(*args, **kwargs)
    node = leaves[slots[0]]._dp_node
    if _is_inplace(func) and args and isinstance(args[0], SharedTensor):
        raise SharedInputError(
            f"{node.where}: its output is shared by the batch and is modified in place "
            f"({getattr(func, '__name__', func)}); per-sample gradients need an out-of-place operation there."
        )
    batch_size = node.batch_size
    batched = [
        i for i, t in enumerate(leaves)
        if isinstance(t, torch.Tensor) and i not in slots and t.dim() > 0 and t.shape[0] == batch_size
    ]
    if batched:
        return _resolve(func, leaves, spec, slots, batched)
    out = func(*args, **kwargs)
    if func in _BROADCASTS and isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == batch_size:
        shape = leaves[slots[0]].shape
        if len(shape) < out.dim() or shape[0] == 1:  # the batch is made here: each sample its own copy
            _share(node.roots())
            return _aligned(node, out.dim()).expand(out.shape)
    return _track_outputs(out, func, leaves, spec, slots)


def _resolve(func: Any, leaves: List[Any], spec: Any, slots: List[int], batched: List[int]) -> Any:
    """``func`` on per-sample operands: the shared ones replaced by their per-sample copies (undecided
    ones whose leading dimension lines up with the batch are kept as they are, per-sample)."""
    rank = max(leaves[i].dim() for i in batched)
    kept = [i for i in slots if _decide(leaves[i], rank)]
    slots = [i for i in slots if i not in kept]
    if not slots:
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        return func(*args, **kwargs)
    if func in _INDEXING:
        return _per_sample_call(func, leaves, spec, slots, batched + kept)
    local = list(leaves)
    for i in slots:
        local[i] = _aligned(leaves[i]._dp_node, rank)
    args, kwargs = pytree.tree_unflatten(local, spec)
    return func(*args, **kwargs)


def _aligned(node: _Node, rank: int) -> torch.Tensor:
    """The per-sample copies ``(B, *shape)`` shaped to broadcast, batch first, against per-sample tensors
    of ``rank`` dimensions: ``shape`` lacks the batch dimension (``(B, 1, ..., *shape)``) or has it of
    size 1 (``(B, *shape[1:])``)."""
    value = node.batched()
    shape = tuple(value.shape[1:])
    if len(shape) < rank:
        return value.reshape(value.shape[0], *([1] * (rank - 1 - len(shape))), *shape)
    if len(shape) == rank and shape[0] == 1:
        return value.squeeze(1)
    raise SharedInputError(
        f"{node.where}: its output is shared by the batch, and a value of shape {shape} made from it meets "
        f"per-sample tensors of {rank} dimensions in a way that does not broadcast it over the batch."
    )


def _per_sample_call(func: Any, leaves: List[Any], spec: Any, slots: List[int], batched: List[int]) -> Any:
    """``func`` once per sample (``vmap``): per-sample operands as batches of one, shared ones as that
    sample's copy; the results stacked on the batch dimension."""
    where = leaves[slots[0]]._dp_node.where
    values = [leaves[i] for i in batched] + [leaves[i]._dp_node.batched() for i in slots]

    def one_sample(*per_sample: torch.Tensor) -> Any:
        local = list(leaves)
        for i, value in zip(batched, per_sample[: len(batched)]):
            local[i] = value.unsqueeze(0)
        for i, value in zip(slots, per_sample[len(batched):]):
            local[i] = value
        args, kwargs = pytree.tree_unflatten(local, spec)
        return pytree.tree_map_only(torch.Tensor, lambda t: _squeeze_batch(t, where), func(*args, **kwargs))

    return torch.func.vmap(one_sample, randomness="different")(*values)


def _squeeze_batch(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != 1:
        raise SharedInputError(f"{where}: an operation on its shared output mixes the samples of the batch.")
    return t.squeeze(0)


def _track_outputs(out: Any, func: Any, leaves: List[Any], spec: Any, slots: List[int]) -> Any:
    """Outputs still shared by the batch (they require grad: they carry the root's gradient) become
    shared tensors with this operation in their lineage; others are returned as they are."""
    inputs = {id(leaves[i]) for i in slots}
    parents = [leaves[i]._dp_node for i in slots]
    stored = [None if i in slots else t for i, t in enumerate(leaves)]
    first = parents[0]
    counter = iter(range(1 << 30))

    def wrap(t: torch.Tensor) -> torch.Tensor:
        index = next(counter)
        if id(t) in inputs or not t.requires_grad:
            return t
        shared = t.as_subclass(SharedTensor)
        shared._dp_node = _Node(first.where, first.batch_size, func=func, leaves=stored, spec=spec, slots=slots,
                                parents=parents, index=index)
        return shared

    return pytree.tree_map_only(torch.Tensor, wrap, out)
