"""Per-sample gradients kept as the parts they are made of, never as ``(B, *shape)``: the :class:`Part`
protocol every factored layer's part follows, and how several parts of one parameter are merged.

A weight gradient of a Linear, Conv or Embedding layer is a sum of outer products of the layer's
input activations ``A`` and output gradients ``G``. In the fast clipping modes the hooks store these
factors (a :class:`Part`, whose type the layer's own file defines: ``linear.py``, ``conv.py``,
``embedding.py``) on the parameter (``param.grad_parts``) instead of the per-sample gradient, and the
optimizer asks each part for

* ``norm_sq(method)``: every sample's squared gradient norm ``(B,)``, by the **ghost norm**
  ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` (cost ``B·T²·(I+O)``, Li et al. 2022, Bu et al. 2023) or by the
  materialised per-sample gradient (cost ``B·T·I·O``), whichever is cheaper (``method="auto"``,
  :func:`use_ghost`);
* ``clipped_sum(factors)``: ``Σ_b c_b ∇W_b = (c ⊙ G)ᵀ A``, one GEMM (a convolution backward for Conv,
  an ``index_add`` for Embedding): the cost of the usual weight gradient, which autograd then skips.

Several parts of one parameter (a reused module, an RNN's recurrent weight at every step, a tied
embedding and output head) are merged by :func:`merge`, which asks the merge rules the layer files
register (:func:`register_merge_rule`: concatenated positions in ``linear.py``, the tied embedding in
``embedding.py``); a mix no rule takes (a parameter also seen by the ``torch.func`` fallback) is
materialised, with the same result as the plain path.

A part's ``scale`` (the loss reduction's batch size) stays a number applied to norms and clip factors,
so no output gradient is copied to rescale it.

A sample whose gradient is not finite is left out of the clipped sum (see :mod:`lightning_dp.clipping`).
A zero clip factor is not enough there: inside the GEMM ``(c ⊙ G)ᵀA`` the sample's rows of ``A`` and
``G`` still meet, and ``0 · NaN = NaN``. :meth:`Part.keep_samples` gives the part with every factor row of
the dropped samples zeroed (activations *and* output gradients, or the per-sample values), so its
clipped sum is exactly that of the kept samples. On the CPU it is called only for a micro-batch that has
such a sample, so the usual, all-finite step makes no extra pass over the factors; on other devices it is
called for every micro-batch (one elementwise pass), so the host never waits to learn whether it is needed.

**Privacy units.** With user-level privacy a *unit* is one user's records: its gradient is the weighted sum
``Σ_{b∈u} w_b ∇_b`` (``w_b = 1/n_u``, the mean of the user's records in the step), clipped as one.
:meth:`Part.group` turns a part over records into a part over units (a :class:`Grouping` says which record
belongs to which unit). Each part type groups in its own file: a Linear part concatenates a user's records
along its positions (``G`` scaled by ``w_b``; ghost norms and the clipped-sum GEMM stay exact), an embedding
part renames its samples; any other part is wrapped in a :class:`GroupedPart`, whose norm materialises the
units' gradients (or groups its ``(A, G)`` pair, :meth:`Part.as_linear`) and whose clipped sum hands each
record the factor ``c_u·w_b`` of its unit.

**Precision.** Norms and clipped sums are computed in float32 or wider whatever the factors' dtype: a
part whose tensors are bf16/fp16 (a bf16 model, autocast's activations) is widened (:func:`wide`) while
its norm or sum is made, one part at a time. Rounding in the parameter dtype could otherwise make a
clipped sample's contribution longer than ``C`` (by ~0.4 % in bf16), which the sensitivity ``C`` that the
accountant assumes does not allow. The norm and the clipped sum read the same factors, so a sample's
contribution ``c_b·g_b`` has norm ``≤ C`` up to float32 rounding.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

NORM_METHODS = ("auto", "ghost", "materialize")


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is float32 or wider (or not floating point), else float32: the dtype norms, clip
    factors, clipped sums and noise are computed in."""
    if dtype.is_floating_point and dtype.itemsize < 4:
        return torch.float32
    return dtype


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in :func:`wide_dtype` (a float32 copy of a bf16/fp16 tensor; the tensor itself otherwise)."""
    dtype = wide_dtype(tensor.dtype)
    return tensor if dtype == tensor.dtype else tensor.to(dtype)


def scaled_rows(tensor: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``tensor`` (batch first) times ``factors[b]`` on each sample's rows, in :func:`wide_dtype`: one pass
    (type promotion widens a bf16/fp16 tensor within the product, no separate float32 copy first)."""
    return tensor * factors.to(wide_dtype(tensor.dtype)).view(-1, *([1] * (tensor.dim() - 1)))


def zero_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tensor`` (batch first) with the rows of samples where ``keep`` (bool ``(B,)``) is false set to
    exactly zero, NaN and inf included (``torch.where``, not a product); a new tensor of the same dtype."""
    mask = keep.to(tensor.device).view(-1, *([1] * (tensor.dim() - 1)))
    return torch.where(mask, tensor, tensor.new_zeros(()))


def use_ghost(positions: int, in_features: int, out_features: int, method: str) -> bool:
    """Ghost norm when asked, or (``auto``) when ``T²·(I+O) ≤ T·I·O``, i.e. its cost is the lower one."""
    if method == "ghost":
        return True
    if method == "materialize":
        return False
    return positions * (in_features + out_features) <= in_features * out_features


class Grouping(NamedTuple):
    """Which unit (user) each record of a micro-batch belongs to, for :meth:`Part.group`."""

    units: torch.Tensor
    """``(B,)`` long: each record's unit, in ``[0, num_units)``."""
    weights: torch.Tensor
    """``(B,)`` float64: each record's weight ``1/n_u`` (``n_u`` records of its unit in the batch)."""
    num_units: int
    slots: torch.Tensor
    """``(B,)`` long: each record's place among its unit's records (``0 … n_u − 1``)."""
    max_records: int
    """The largest ``n_u``."""

    @classmethod
    def of(cls, ids: torch.Tensor) -> "Grouping":
        """The grouping of records whose unit ids (any integers) are ``ids`` (``(B,)``); units are numbered in
        the order of their sorted ids. One host sync (the number of units and the largest unit)."""
        ids = torch.as_tensor(ids).reshape(-1)
        unique, units, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        order = torch.argsort(units, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slots = torch.empty_like(units)
        slots[order] = torch.arange(units.numel(), device=units.device) - starts[units[order]]
        weights = (1.0 / counts.to(torch.float64))[units]
        return cls(units, weights, int(unique.numel()), slots, int(counts.max()) if counts.numel() else 0)

    def on(self, device: torch.device) -> "Grouping":
        """This grouping with its tensors on ``device``."""
        if self.units.device == device:
            return self
        return Grouping(self.units.to(device), self.weights.to(device), self.num_units, self.slots.to(device),
                        self.max_records)


def pad_units(tensor: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    """``tensor: (B, T, F)`` over records as ``(U, M·T, F)`` over units: each unit's records one after the other
    along the positions (``M`` the largest unit; the slots of smaller units are zeros, which add nothing to
    a norm or a sum)."""
    grouping = grouping.on(tensor.device)
    out = tensor.new_zeros(grouping.num_units, grouping.max_records, *tensor.shape[1:])
    out[grouping.units, grouping.slots] = tensor
    return out.reshape(grouping.num_units, grouping.max_records * tensor.shape[1], *tensor.shape[2:])


def group_rows(tensor: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    """``Σ_{b∈u} w_b · tensor[b]`` for each unit ``u``: ``(B, ...)`` → ``(U, ...)`` in :func:`wide_dtype`."""
    grouping = grouping.on(tensor.device)
    values = scaled_rows(tensor, grouping.weights)
    return values.new_zeros(grouping.num_units, *tensor.shape[1:]).index_add_(0, grouping.units, values)


class Part:
    """The factored per-sample gradient of one use of a parameter (abstract).

    ``scale`` multiplies the per-sample gradient the factors describe (the loss reduction's batch size,
    a loss scale): it is applied to the ``(B,)`` norms and clip factors, never to the factors' tensors.
    Subclasses implement ``_norm_sq``, ``_clipped_sum`` and ``_materialize`` of the unscaled gradient.
    """

    shape: Tuple[int, ...]
    batch_size: int
    scale: float = 1.0

    def norm_sq(self, method: str = "auto", scaled: bool = True) -> torch.Tensor:
        """Squared per-sample norms ``(B,)`` (of the unscaled gradient when ``scaled`` is false: the
        caller then applies ``scale²``, e.g. once for all parts that share it)."""
        norms = self._norm_sq(method)
        return norms if self.scale == 1.0 or not scaled else norms * (self.scale * self.scale)

    def clipped_sum(self, factors: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """``Σ_b factors[b] · ∇_b`` with the parameter's shape (``scaled=False``: ``factors`` already
        include ``scale``)."""
        return self._clipped_sum(factors if self.scale == 1.0 or not scaled else factors * self.scale)

    def materialize(self) -> torch.Tensor:
        """The per-sample gradients ``(B, *shape)`` (the plain path; used for mixes and tests)."""
        grads = self._materialize()
        return grads if self.scale == 1.0 else grads * self.scale

    def keep_samples(self, keep: torch.Tensor) -> "Part":
        """This part with the gradient of every sample ``b`` where ``keep[b]`` is false (a bool ``(B,)``)
        made exactly zero: every tensor row of those samples is replaced by zeros (not multiplied by 0,
        which leaves a NaN a NaN), so norms and clipped sums see only the kept samples. A new part; this
        one is unchanged. The base implementation materialises; subclasses zero their factors."""
        kept = MaterializedPart(zero_rows(self._materialize(), keep))
        kept.scale = self.scale
        return kept

    def _norm_sq(self, method: str) -> torch.Tensor:
        return wide(self._materialize()).flatten(1).pow(2).sum(1)

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        flat = wide(self._materialize()).flatten(1)
        return (factors.to(flat.dtype) @ flat).view(self.shape)

    def _materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def group(self, grouping: Grouping) -> "Part":
        """This part over units (users) instead of records: unit ``u``'s gradient is ``Σ_{b∈u} w_b ∇_b``
        (see :class:`Grouping`; the result's batch is the units). The base implementation wraps the part in a
        :class:`GroupedPart`; part types with factors group them (a new factored layer may add its own)."""
        return GroupedPart(self, grouping)

    def as_linear(self) -> Optional["Part"]:
        """This part as a ``(A, G)`` pair over positions, a
        :class:`~lightning_dp.grad_sample.linear.LinearPart`, if it has one: parts that do can be merged by
        concatenating their positions (``linear.merge_positions``)."""
        return None


class MaterializedPart(Part):
    """Per-sample gradients already materialised ``(B, *shape)`` (rules without a factored form)."""

    def __init__(self, grad_sample: torch.Tensor) -> None:
        self.grad_sample = grad_sample
        self.shape = tuple(grad_sample.shape[1:])
        self.batch_size = grad_sample.shape[0]

    def keep_samples(self, keep: torch.Tensor) -> "MaterializedPart":
        """The per-sample gradients of dropped samples replaced by zeros."""
        kept = MaterializedPart(zero_rows(self.grad_sample, keep))
        kept.scale = self.scale
        return kept

    def group(self, grouping: Grouping) -> "MaterializedPart":
        """The units' gradients ``Σ_{b∈u} w_b g_b`` (one ``index_add``)."""
        grouped = MaterializedPart(group_rows(self.grad_sample, grouping))
        grouped.scale = self.scale
        return grouped

    def _materialize(self) -> torch.Tensor:
        return self.grad_sample


class GroupedPart(Part):
    """A part over records seen as one over units (:meth:`Part.group`): the norm of unit ``u`` is that of
    ``Σ_{b∈u} w_b ∇_b``, from the inner part's ``(A, G)`` pair grouped by positions when it has one
    (:meth:`Part.as_linear`, ghost or materialised), else from the materialised units' gradients; the clipped
    sum ``Σ_u c_u Σ_{b∈u} w_b ∇_b`` is the inner part's clipped sum with record factors ``c_{u(b)}·w_b``."""

    def __init__(self, inner: Part, grouping: Grouping) -> None:
        self.inner, self.grouping = inner, grouping
        self.shape = inner.shape
        self.scale = inner.scale
        self.batch_size = grouping.num_units

    def keep_samples(self, keep: torch.Tensor) -> "GroupedPart":
        """The records of units not kept zeroed in the inner part."""
        return GroupedPart(self.inner.keep_samples(keep[self.grouping.on(keep.device).units]), self.grouping)

    def _norm_sq(self, method: str) -> torch.Tensor:
        linear = self.inner.as_linear()
        if linear is not None:
            return linear.group(self.grouping)._norm_sq(method)
        return wide(self._materialize()).flatten(1).pow(2).sum(1)

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        grouping = self.grouping.on(factors.device)
        return self.inner._clipped_sum(factors[grouping.units] * grouping.weights.to(factors.dtype))

    def _materialize(self) -> torch.Tensor:
        return group_rows(self.inner._materialize(), self.grouping)


def group_units(parts: List[List[Part]], grouping: Grouping) -> List[List[Part]]:
    """Every parameter's parts (already merged, :func:`merge`) over units (:meth:`Part.group`)."""
    return [[part.group(grouping) for part in ps] for ps in parts]


MergeRule = Callable[[List[Part]], Optional[List[Part]]]
"""``rule(parts) -> merged parts`` for two or more parts of one parameter, or ``None`` when the mix is not
one the rule knows (another rule, or the materialised sum, takes it)."""
MERGE_RULES: List[MergeRule] = []


def register_merge_rule(rule: MergeRule) -> MergeRule:
    """Add ``rule`` to those :func:`merge` asks (a layer file registers the merges of its part types).
    The rules must not overlap: each knows mixes no other rule takes, so their order does not matter."""
    MERGE_RULES.append(rule)
    return rule


def merge(parts: List[Part]) -> List[Part]:
    """Parts of one parameter as parts whose squared norms add up: the merge rules' result (parts on the
    same rows concatenated, a tied embedding and head combined...), or, for a mix no rule knows, one
    :class:`MaterializedPart` (the plain path, same result)."""
    if len(parts) == 1:
        return parts
    for rule in MERGE_RULES:
        merged = rule(parts)
        if merged is not None:
            return merged
    return [materialized_sum(parts)]


def materialized_sum(parts: Sequence[Part]) -> MaterializedPart:
    """The parts' per-sample gradients materialised and added, as one part."""
    total = parts[0].materialize()
    for part in parts[1:]:
        total = total + part.materialize().to(total.dtype)
    return MaterializedPart(total)
