"""Book-keeping: per-sample gradients kept as the factors they are made of, never as ``(B, *shape)``.

A weight gradient of a Linear, Conv or Embedding layer is a sum of outer products of the layer's
input activations ``A`` and output gradients ``G``. In the fast clipping modes the hooks store these
factors (a :class:`Part`) on the parameter (``param.grad_parts``) instead of the per-sample gradient,
and the optimizer asks each part for

* ``norm_sq(method)``: every sample's squared gradient norm ``(B,)``, by the **ghost norm**
  ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` (cost ``B·T²·(I+O)``, Li et al. 2022, Bu et al. 2023) or by the
  materialised per-sample gradient (cost ``B·T·I·O``), whichever is cheaper (``method="auto"``);
* ``clipped_sum(factors)``: ``Σ_b c_b ∇W_b = (c ⊙ G)ᵀ A``, one GEMM (a convolution backward for Conv,
  an ``index_add`` for Embedding): the cost of the usual weight gradient, which autograd then skips.

Several parts of one parameter (a reused module, an RNN's recurrent weight at every step) are merged
by concatenating their positions (``Σ_i G_iᵀA_i = [G_1;G_2]ᵀ[A_1;A_2]``); an embedding tied to an
output head keeps both parts and adds their cross term (:class:`TiedPart`); other mixes (a parameter
also seen by the ``torch.func`` fallback) are materialised, with the same result as the plain path.

Bias gradients are factored too (:class:`BiasPart`), and a part's ``scale`` (the loss reduction's batch
size) stays a number applied to norms and clip factors, so no output gradient is copied to rescale it.

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

from typing import List, Optional, Sequence, Tuple

import copy
import functools

import torch

from .utils import conv_patches, conv_weight_grad, pad_input, per_sample_rows

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
_BLOCK_ELEMENTS = 1 << 18  # im2col elements per block of samples in ConvPart.norm_sq (1 MB in float32)


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

    def as_linear(self) -> Optional["LinearPart"]:
        """This part as a ``(A, G)`` pair over positions, if it has one (for merging)."""
        return None


class SharedSquares:
    """Each sample's ``‖g_b‖²`` of an output gradient ``g: (B, 1, O)`` (one position), computed once for
    the weight and the bias part of the layer that both use it."""

    __slots__ = ("g", "_value")

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g
        self._value: Optional[torch.Tensor] = None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            self._value = torch.linalg.vector_norm(wide(self.g), dim=(1, 2)).square()
        return self._value


def use_ghost(positions: int, in_features: int, out_features: int, method: str) -> bool:
    """Ghost norm when asked, or (``auto``) when ``T²·(I+O) ≤ T·I·O``, i.e. its cost is the lower one."""
    if method == "ghost":
        return True
    if method == "materialize":
        return False
    return positions * (in_features + out_features) <= in_features * out_features


class LinearPart(Part):
    """``∇W_b = Σ_t g_{b,t} a_{b,t}ᵀ`` for ``A: (B, T, I)``, ``G: (B, T, O)``, reshaped to ``shape``;
    ``rows`` places it in a block of rows of a packed parameter (attention's ``in_proj_weight``)."""

    def __init__(
        self,
        activations: torch.Tensor,
        backprops: torch.Tensor,
        shape: Sequence[int],
        rows: Optional[slice] = None,
        scale: float = 1.0,
        g_squares: Optional[SharedSquares] = None,
    ) -> None:
        self.a = activations
        self.g = backprops
        self.shape = tuple(shape)
        self.rows = rows
        self.scale = scale
        self.batch_size = activations.shape[0]
        self.g_squares = g_squares  # ‖g_b‖² shared with the layer's bias part (one position only)

    def as_linear(self) -> "LinearPart":
        return self

    def keep_samples(self, keep: torch.Tensor) -> "LinearPart":
        """Both factors zeroed for dropped samples (a NaN in either would survive a zero factor)."""
        return LinearPart(zero_rows(self.a, keep), zero_rows(self.g, keep), self.shape, self.rows, self.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        a = wide(self.a)
        positions, in_features, out_features = a.shape[1], a.shape[2], self.g.shape[2]
        if positions == 1:  # ‖g aᵀ‖ = ‖g‖·‖a‖
            g_sq = (self.g_squares() if self.g_squares is not None
                    else torch.linalg.vector_norm(wide(self.g), dim=(1, 2)).square())
            return torch.linalg.vector_norm(a, dim=(1, 2)).square() * g_sq
        g = wide(self.g)
        if use_ghost(positions, in_features, out_features, method):
            return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))

    def _block(self) -> Tuple[int, ...]:
        return self.shape if self.rows is None else (self.g.shape[2], *self.shape[1:])

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        # (c ⊙ G)ᵀA = Gᵀ(c ⊙ A): scale whichever of the two is smaller (A for a wide output head).
        if self.a.shape[2] < self.g.shape[2]:
            a, g = scaled_rows(self.a, factors), wide(self.g)
        else:
            a, g = wide(self.a), scaled_rows(self.g, factors)
        block = (g.reshape(-1, g.shape[2]).t() @ a.reshape(-1, a.shape[2])).view(self._block())
        return _place(block, self.shape, self.rows)

    def _materialize(self) -> torch.Tensor:
        block = torch.bmm(wide(self.g).transpose(1, 2), wide(self.a)).view(self.batch_size, *self._block())
        return _place(block, self.shape, self.rows, batched=True)


class BiasPart(Part):
    """A bias gradient: each sample's output gradient summed over its positions, ``g: (B, T, O)``; with
    ``T = 1`` (a plain Linear) that is ``g`` itself, used without a copy. ``rows`` as in :class:`LinearPart`."""

    def __init__(
        self,
        backprops: torch.Tensor,
        shape: Sequence[int],
        rows: Optional[slice] = None,
        scale: float = 1.0,
        g_squares: Optional[SharedSquares] = None,
    ) -> None:
        self.g = backprops
        self.shape = tuple(shape)
        self.rows = rows
        self.scale = scale
        self.batch_size = backprops.shape[0]
        self.g_squares = g_squares  # ‖g_b‖², shared with the layer's weight part
        self._summed: Optional[torch.Tensor] = None

    def _per_sample(self) -> torch.Tensor:
        if self.g.shape[1] == 1:
            return wide(self.g[:, 0])
        if self._summed is None:  # summed over positions once, for the norm and the clipped sum
            self._summed = self.g.sum(1, dtype=wide_dtype(self.g.dtype))
        return self._summed

    def as_linear(self) -> LinearPart:
        ones = self.g.new_ones(self.g.shape[0], self.g.shape[1], 1)
        return LinearPart(ones, self.g, self.shape, self.rows, self.scale)

    def keep_samples(self, keep: torch.Tensor) -> "BiasPart":
        """The output gradient zeroed for dropped samples."""
        return BiasPart(zero_rows(self.g, keep), self.shape, self.rows, self.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        if self.g_squares is not None:
            return self.g_squares()
        return torch.linalg.vector_norm(self._per_sample(), dim=1).square()

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        per_sample = self._per_sample()
        return _place(factors.to(per_sample.dtype) @ per_sample, self.shape, self.rows)

    def _materialize(self) -> torch.Tensor:
        return _place(self._per_sample(), self.shape, self.rows, batched=True)


class ConvPart(Part):
    """A convolution's weight gradient from its input ``x: (B, C, *S)`` (zero-padded by ``padding`` on
    both sides of each spatial dim; other padding modes are applied before) and output gradient
    ``g: (B, O, *L)``; norms through unfold (im2col), the clipped sum by one convolution
    backward (``aten.convolution_backward``, the kernel autograd would have run)."""

    def __init__(
        self, module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, padding: Sequence[int], scale: float = 1.0
    ) -> None:
        self.x, self.g = x, g
        self.scale = scale
        self.padding = tuple(padding)
        self.kernel_size = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.weight = module.weight.detach()
        self.shape = tuple(module.weight.shape)
        self.batch_size = x.shape[0]
        self._per_sample: Optional[torch.Tensor] = None  # set by norm_sq when it materialises

    def _windows(self, samples: slice = slice(None), channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """The im2col windows of ``samples`` as a strided view ``(b, *L, C, *K)`` (no copy yet) and their
        output gradient ``(b, O, T)`` over the ``T = prod(L)`` positions the windows cover.

        ``channels_last``: windows ``(b, *L, *K, C)`` of a channels-last copy of the input instead, so that
        the im2col copy moves whole kernel rows of channels at a time (several times faster for C > 1);
        only norms may use this order of the ``C·K`` features.
        """
        x = self._padded(samples)
        spatial = len(self.kernel_size)
        if channels_last:
            x = x.movedim(1, -1).contiguous()  # (b, *S, C)
            for d in range(spatial):
                x = x.unfold(1 + d, self.dilation[d] * (self.kernel_size[d] - 1) + 1, self.stride[d])
                if self.dilation[d] > 1:
                    x = x[..., :: self.dilation[d]]
            order = (0, *range(1, 1 + spatial), *range(2 + spatial, 2 + 2 * spatial), 1 + spatial)
        else:
            x = conv_patches(x, self.kernel_size, self.stride, self.dilation)  # (b, C, *L, *K)
            x = x.movedim(1, 1 + spatial)
            order = tuple(range(x.dim()))
        positions = x.shape[1 : 1 + spatial]
        g = self.g[(samples, slice(None), *(slice(0, n) for n in positions))]
        return x.permute(order), g.reshape(g.shape[0], g.shape[1], -1)

    def keep_samples(self, keep: torch.Tensor) -> "ConvPart":
        """Input, output gradient and the per-sample gradients kept by :meth:`norm_sq` (if any) zeroed
        for dropped samples."""
        kept = copy.copy(self)
        kept.x, kept.g = zero_rows(self.x, keep), zero_rows(self.g, keep)
        if self._per_sample is not None:
            kept._per_sample = zero_rows(self._per_sample, keep)
        return kept

    def as_linear(self) -> Optional[LinearPart]:
        if self.groups != 1:
            return None
        windows, g = self._windows()
        b, positions = g.shape[0], g.shape[2]
        return LinearPart(windows.reshape(b, positions, -1), g.transpose(1, 2), self.shape, scale=self.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        """Squared per-sample norms through im2col, a block of samples at a time: each block's windows
        are copied once into ``(b, T, C·K)`` (about 1 MB per block), so the step's peak memory does not
        grow with the ``B·T·C·K`` im2col of the whole batch and the copies stay in cache."""
        if self.groups != 1:
            return wide(self._materialize()).flatten(1).pow(2).sum(1)
        b, out_features = self.g.shape[:2]
        windows, g = self._windows(slice(0, 1), channels_last=True)
        positions, in_features = g.shape[2], windows.numel() // g.shape[2]
        ghost = use_ghost(positions, in_features, out_features, method)
        block = max(1, _BLOCK_ELEMENTS // (positions * in_features))
        # Per-sample gradients kept for the clipped sum (a (B,)·(B, p) product instead of a convolution
        # backward) when they are no larger than the input and output gradient this part already holds.
        keep = not ghost and out_features * in_features <= self.x[0].numel() + self.g[0].numel()
        per_sample = self.g.new_empty(b, out_features, in_features, dtype=wide_dtype(self.g.dtype)) if keep else None
        norms = []
        for start in range(0, b, block):
            windows, gb = self._windows(slice(start, start + block), channels_last=True)
            a = wide(windows.reshape(-1, positions, in_features))  # the im2col copy, features ordered (*K, C)
            gb = wide(gb)
            if ghost:
                norms.append((torch.bmm(a, a.transpose(1, 2)) * torch.bmm(gb.transpose(1, 2), gb)).sum((1, 2)))
            else:
                grads = torch.bmm(gb, a, out=per_sample[start : start + block]) if keep else torch.bmm(gb, a)
                norms.append(torch.linalg.vector_norm(grads, dim=(1, 2)).square())
        self._per_sample = per_sample
        return norms[0] if len(norms) == 1 else torch.cat(norms)

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        if self._per_sample is not None:  # (B, O, *K, C): back to the weight's (O, C, *K)
            summed = factors.to(self._per_sample.dtype) @ self._per_sample.flatten(1)
            return summed.view(self.shape[0], *self.shape[2:], self.shape[1]).movedim(-1, 1).contiguous()
        spatial = len(self.kernel_size)
        # The weight gradient is bilinear in (x, g): scale whichever of the two is smaller.
        if self.x.numel() < self.g.numel():
            x, g = scaled_rows(self.x, factors), wide(self.g)
        else:
            x, g = wide(self.x), scaled_rows(self.g, factors)
        return torch.ops.aten.convolution_backward(
            g, x, self.weight.to(g.dtype), None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0] * spatial, self.groups, [False, True, False],
        )[1]

    def _padded(self, samples: slice = slice(None)) -> torch.Tensor:
        return pad_input(self.x[samples], [p for p in reversed(self.padding) for _ in range(2)], "zeros")

    def _materialize(self) -> torch.Tensor:
        return conv_weight_grad(
            wide(self._padded()), wide(self.g), self.kernel_size, self.stride, self.dilation, self.groups
        )


class RowsPart(Part):
    """Embedding-style gradients: value ``v_n`` added to row ``rows[n]`` of sample ``samples[n]``.

    Norms without the vocabulary dimension, in ``O(N·D)``: values of the same (sample, row) are summed
    (segments of the sorted keys ``sample·V + row``; no ``unique``, so no host sync), then squared and
    summed per sample. ``tokens_per_sample``: set when the entries are sample-major with the same count
    per sample (an ``nn.Embedding`` lookup), which lets a tied output head be combined without
    materialising (:class:`TiedPart`)."""

    def __init__(
        self,
        samples: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        batch_size: int,
        shape: Sequence[int],
        scale: float = 1.0,
        tokens_per_sample: Optional[int] = None,
    ) -> None:
        self.samples, self.rows, self.values = samples, rows, values
        self.batch_size = batch_size
        self.shape = tuple(shape)
        self.scale = scale
        self.tokens_per_sample = tokens_per_sample

    def keep_samples(self, keep: torch.Tensor) -> "RowsPart":
        """The values of dropped samples' entries zeroed (entries and rows stay, adding zeros)."""
        values = torch.where(keep[self.samples].unsqueeze(1), self.values, self.values.new_zeros(()))
        return RowsPart(
            self.samples, self.rows, values, self.batch_size, self.shape, self.scale, self.tokens_per_sample
        )

    def _norm_sq(self, method: str) -> torch.Tensor:
        # Entries of the same (sample, row) are summed first: segments of the sorted keys. Sizes stay N
        # (no torch.unique, whose output size would make the host wait for the device).
        keys = self.samples * self.shape[0] + self.rows
        order = torch.argsort(keys)
        ordered = keys[order]
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        segment = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0) - 1)  # entry → its segment
        values = wide(self.values)
        summed = values.new_zeros(values.shape).index_add_(0, segment, values)  # segments beyond the last: 0
        owner = torch.zeros_like(order).scatter_(0, segment, self.samples)  # each segment's sample
        return values.new_zeros(self.batch_size).index_add_(0, owner, summed.pow(2).sum(1))

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        values = wide(self.values)
        values = values * factors.to(values.dtype)[self.samples].unsqueeze(1)
        return values.new_zeros(self.shape).index_add_(0, self.rows, values)

    def _materialize(self) -> torch.Tensor:
        return per_sample_rows(self.samples, self.rows, wide(self.values), self.batch_size, self.shape[0])


class TiedPart(Part):
    """An embedding and a Linear sharing one weight ``(V, d)`` (an LM's tied input and output embedding):
    ``‖E_b + H_b‖² = ‖E_b‖² + ‖H_b‖² + 2⟨E_b, H_b⟩`` with the cross term
    ``⟨E_b, H_b⟩ = Σ_{n,t} g_{b,t}[row_n] · (a_{b,t}·v_n)`` from a ``(T_head × T_emb)`` product per sample,
    so the ``B × V × d`` per-sample gradient is never formed; the clipped sum is the two parts' sums."""

    def __init__(self, embedding: RowsPart, head: LinearPart) -> None:
        self.embedding, self.head = embedding, head
        self.shape = embedding.shape
        self.batch_size = embedding.batch_size

    def keep_samples(self, keep: torch.Tensor) -> "TiedPart":
        """Both the embedding and the head part with dropped samples zeroed."""
        return TiedPart(self.embedding.keep_samples(keep), self.head.keep_samples(keep))

    def _cross(self) -> torch.Tensor:
        emb, head = self.embedding, self.head
        b, tokens = emb.batch_size, emb.tokens_per_sample
        a, g = wide(head.a), wide(head.g)
        values = emb.values.view(b, tokens, -1).to(a.dtype)
        rows = emb.rows.view(b, 1, tokens).expand(b, g.shape[1], tokens)
        dots = torch.bmm(a, values.transpose(1, 2))  # (B, T_head, T_emb): a_t · v_n
        return (dots * torch.gather(g, 2, rows)).sum((1, 2)) * (emb.scale * head.scale)

    def _norm_sq(self, method: str) -> torch.Tensor:
        total = self.embedding.norm_sq(method) + self.head.norm_sq(method) + 2 * self._cross()
        return total.clamp(min=0)  # rounding could leave a tiny negative where E_b ≈ -H_b

    def _clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return self.embedding.clipped_sum(factors) + self.head.clipped_sum(factors)

    def _materialize(self) -> torch.Tensor:
        return self.embedding.materialize() + self.head.materialize()


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


def zero_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tensor`` (batch first) with the rows of samples where ``keep`` (bool ``(B,)``) is false set to
    exactly zero, NaN and inf included (``torch.where``, not a product); a new tensor of the same dtype."""
    mask = keep.to(tensor.device).view(-1, *([1] * (tensor.dim() - 1)))
    return torch.where(mask, tensor, tensor.new_zeros(()))


def _place(block: torch.Tensor, shape: Sequence[int], rows: Optional[slice], batched: bool = False) -> torch.Tensor:
    if rows is None:
        return block
    lead = (block.shape[0],) if batched else ()
    out = block.new_zeros(*lead, *shape)
    out[(slice(None), rows) if batched else rows] = block
    return out


def _rows_key(rows: Optional[slice]) -> Optional[Tuple[int, int]]:
    return None if rows is None else (rows.start, rows.stop)


def merge(parts: List[Part]) -> List[Part]:
    """Parts of one parameter as parts whose squared norms add up: parts on the same rows are merged
    into one by concatenating positions, disjoint row blocks stay apart; any other mix is materialised
    into one :class:`MaterializedPart` (the plain path, same result)."""
    if len(parts) == 1:
        return parts
    embeddings = [p for p in parts if isinstance(p, RowsPart)]
    if len(embeddings) == 1 and embeddings[0].tokens_per_sample is not None:
        others = merge([p for p in parts if p is not embeddings[0]])
        head = others[0] if len(others) == 1 else None
        if isinstance(head, LinearPart) and head.rows is None and head.batch_size == embeddings[0].batch_size:
            return [TiedPart(embeddings[0], head)]  # a tied embedding and output head
        return [_materialized_sum(parts)]
    linears = [p.as_linear() for p in parts]
    blocks: dict = {}
    for part in linears:
        if part is None:
            return [_materialized_sum(parts)]
        blocks.setdefault(_rows_key(part.rows), []).append(part)
    keys = list(blocks)
    if len(keys) > 1:
        spans = sorted(keys) if None not in keys else []
        if not spans or any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1)):
            return [_materialized_sum(parts)]  # overlapping blocks would need cross terms
    merged: List[Part] = []
    for group in blocks.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        scale = group[0].scale
        same_scale = all(p.scale == scale for p in group)
        # each factor in the widest dtype among the parts (autocast may leave A float32 and G bf16); G
        # rescaled per part is widened first, so the scales are not rounded to bf16
        a_dtype = functools.reduce(torch.promote_types, [p.a.dtype for p in group])
        g_dtype = functools.reduce(torch.promote_types, [p.g.dtype for p in group])
        g_dtype = g_dtype if same_scale else wide_dtype(g_dtype)
        a = torch.cat([p.a.to(a_dtype) for p in group], dim=1)
        g = torch.cat([p.g.to(g_dtype) * (1.0 if same_scale else p.scale) for p in group], dim=1)
        merged.append(LinearPart(a, g, group[0].shape, group[0].rows, scale if same_scale else 1.0))
    return merged


def _materialized_sum(parts: Sequence[Part]) -> MaterializedPart:
    total = parts[0].materialize()
    for part in parts[1:]:
        total = total + part.materialize().to(total.dtype)
    return MaterializedPart(total)
