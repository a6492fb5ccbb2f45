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

**Precision.** Norms and clipped sums are computed in float32 or wider whatever the factors' dtype: a
part whose tensors are bf16/fp16 (a bf16 model, autocast's activations) is widened (:func:`wide`) while
its norm or sum is made, one part at a time. Rounding in the parameter dtype could otherwise make a
clipped sample's contribution longer than ``C`` (by ~0.4 % in bf16), which the sensitivity ``C`` that the
accountant assumes does not allow. The norm and the clipped sum read the same factors, so a sample's
contribution ``c_b·g_b`` has norm ``≤ C`` up to float32 rounding.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

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

    def _materialize(self) -> torch.Tensor:
        return self.grad_sample


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
