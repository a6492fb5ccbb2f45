"""Per-sample clipping: norms, clip factors and the clipped sum, flat or per layer.

Each parameter's per-sample gradient comes either materialised (``param.grad_sample``, ``(B, *shape)``)
or factored (``param.grad_parts``, see :mod:`lightning_dp.grad_sample.per_sample_parts`); both are read
through the same two questions: every sample's squared norm, and the sum weighted by clip factors.

* **flat**: one norm per sample over all parameters, ``c_b = C / max(‖g_b‖, C)``.
* **per_layer**: parameter tensor ``k`` (of ``K``) is clipped on its own to ``C_k = C/√K``, so a
  sample's whole clipped gradient still has norm at most ``√(Σ C_k²) = C``: the same sensitivity,
  hence the same noise ``σC`` and the same privacy guarantee as flat clipping.
* **automatic** (Bu et al. 2023, "Automatic Clipping: Differentially Private Deep Learning Made Easier
  and Stronger", their AUTO-S): every sample is *normalised* rather than clipped,
  ``c_b = C / (‖g_b‖ + γ)`` with the stability constant ``γ = AUTOMATIC_STABILITY = 0.01``. Then
  ``‖c_b g_b‖ = C‖g_b‖/(‖g_b‖+γ) < C``: the sensitivity is still ``C``, the noise ``σC`` and the
  accounting are those of flat clipping. Every sample's contribution has (almost) the same norm ``C``,
  so ``C`` only scales the update (together with the learning rate) and needs no tuning; small
  gradients are scaled *up*, which is what makes the method work late in training.
* **automatic_per_layer**: the same per parameter tensor, ``c_{b,k} = (C/√K) / (‖g_{b,k}‖ + γ)``.

**Non-finite samples** (``non_finite="drop"``, the default). A sample whose gradient contains a NaN or an
inf (a NaN feature, a loss that is ``log 0`` for that sample...) gets clip factor ``c_b = 0`` and
contributes *exactly* zero to the clipped sum; the other samples are clipped and summed as usual. The
test is on the norms: flat, the sample's total norm is not finite; per layer, *any* of its per-parameter
norms is not finite, and the sample is then dropped from every parameter, so each sample is either
wholly in or wholly out (squared norms are ``≥ 0`` or NaN, so this is "the sum of its squared norms is
not finite"). A finite gradient whose squared norm overflows to inf is dropped too; its clip factor
``C/∞`` was already 0. Because ``0 · NaN = NaN``, a zero factor is not enough: the dropped samples' rows
are zeroed in every factor the clipped sum reads (:meth:`~lightning_dp.grad_sample.per_sample_parts.Part.keep_samples`:
activations and output gradients of the GEMM ``(c ⊙ G)ᵀA``, embedding values, materialised per-sample
gradients).

Privacy is unchanged. The sensitivity argument asks only that each sample's contribution to the sum
have norm at most ``C`` whatever the other samples are; a dropped sample contributes ``0 ≤ C``, and whether
*it* is dropped depends on its own gradient only, so adding or removing one sample still moves the sum
by at most ``C``, and the noise ``σC`` and the accounting stay as they are. The sum is still divided by
``expected_batch_size`` (never by the number of kept samples, which depends on the data). A micro-batch
whose samples are all dropped contributes zeros: the step is noise only, and is accounted as any step.

On the CPU the check costs one ``torch.isfinite(norms).all()`` per micro-batch; when every norm is finite
(the usual case) nothing else is done. On any other device (CUDA...) reading that answer would make the
host wait for the device at every micro-batch, so there the check is **sync-free**: the mask of kept
samples is always made, the factors go through ``torch.where`` and the rows of dropped samples are zeroed
in every part unconditionally (one elementwise pass over the factors, no host sync); the returned
``dropped`` mask is then always set (a device tensor, counted without a sync by the optimizer).
``non_finite="propagate"`` skips all of it and keeps the plain arithmetic, where one non-finite sample
makes the whole clipped sum non-finite (wanted under a fp16 ``GradScaler``: an overflow must reach the
gradients so that the scaler skips the step and lowers its scale).

``scale`` may be a 0-dim tensor (a ``GradScaler``'s scale, read without a sync): it is only multiplied in,
never compared on the host.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._checks import check_choice
from .grad_sample.per_sample_parts import Grouping, MaterializedPart, Part, group_units, merge, wide

CLIPPINGS = ("flat", "per_layer", "automatic", "automatic_per_layer")
AUTOMATIC_STABILITY = 0.01
"""``γ`` of automatic clipping, ``c_b = C / (‖g_b‖ + γ)`` (Bu et al. 2023 use 0.01)."""
NON_FINITE = ("drop", "propagate")
"""What :func:`clip_and_sum` does with a sample whose gradient is not finite: ``"drop"`` it (clip factor
0, exactly zero contribution), or ``"propagate"`` the NaN/inf into the sums (plain arithmetic)."""


class ClipResult(NamedTuple):
    """What :func:`clip_and_sum` returns."""

    sums: List[torch.Tensor]
    """The clipped sums, one per parameter (in ``params`` order)."""
    norms: torch.Tensor
    """Each sample's norm over all parameters ``(B,)``, before clipping, after ``s`` (NaN/inf for a
    non-finite sample, also when it was dropped)."""
    dropped: Optional[torch.Tensor]
    """Bool ``(B,)``, true for the samples left out of the sums (non-finite gradient); on the CPU ``None``
    when none was (every norm finite: the common case costs no mask), on other devices always the mask
    (sync-free, see the module docstring); ``None`` with ``non_finite="propagate"``."""


def per_sample_norms(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each sample's gradient over all given tensors (each ``(B, ...)``) → ``(B,)``."""
    squared = [wide(g).reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grad_samples]
    return torch.stack(squared, dim=0).sum(dim=0).sqrt()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / ‖g_b‖)`` for each sample, computed as ``C / max(‖g_b‖, C)`` (safe at norm 0; a NaN
    norm gives a NaN factor: :func:`clip_and_sum` replaces it by 0 and drops the sample)."""
    return max_grad_norm / norms.clamp(min=max_grad_norm)


def automatic_factors(
    norms: torch.Tensor, max_grad_norm: float, stability: float = AUTOMATIC_STABILITY
) -> torch.Tensor:
    """``C / (‖g_b‖ + γ)`` for each sample (automatic clipping, Bu et al. 2023): the normalised gradient
    has norm ``C‖g_b‖/(‖g_b‖+γ) < C``. A NaN norm gives a NaN factor (dropped by :func:`clip_and_sum`),
    an infinite one 0."""
    return max_grad_norm / (norms + stability)


def clipped_sum(grad_sample: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``Σ_b factors[b] · grad_sample[b]`` without materialising the scaled copy."""
    flat = wide(grad_sample).reshape(grad_sample.shape[0], -1)
    return (factors.to(flat.dtype) @ flat).view(grad_sample.shape[1:])


def parts_of(param: torch.Tensor) -> Optional[List[Part]]:
    """The per-sample gradient of ``param`` from the last backward pass(es) as parts whose squared
    norms add up, or ``None`` when it has none."""
    parts: List[Part] = list(getattr(param, "grad_parts", None) or [])
    grad_sample = getattr(param, "grad_sample", None)
    if grad_sample is not None:
        parts.insert(0, MaterializedPart(grad_sample))
    return merge(parts) if parts else None


def check_all_seen(
    params: Sequence[torch.Tensor], with_samples: Sequence[torch.Tensor], known: Dict[int, Tuple[Any, int]]
) -> None:
    """Refuse a trainable parameter that got a gradient from the backward pass but no per-sample gradient:
    the model read it outside the forward of the module that holds it (a ``ParameterDict``, another module
    using its tensor), where no rule saw the use. It would be trained on noise alone, silently.

    ``known`` maps ``id(param)`` to (a weak reference to its gradient when the optimizer last looked: the
    last micro-batch's or the gradient the last step set, that gradient's version): a gradient unchanged
    since then is no new use (a second look at the same backward pass, a loop without ``zero_grad``)."""
    seen = {id(p) for p in with_samples}
    unseen = []
    for p in params:
        grad = p.grad
        if grad is None or id(p) in seen:
            continue
        ref = known.get(id(p))
        if ref is not None and ref[0]() is grad and ref[1] == grad._version:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        if bool(local.count_nonzero()):  # distributed runs give unused parameters zero gradients
            unseen.append(getattr(p, "dp_name", None) or f"a parameter of shape {tuple(p.shape)}")
    if unseen:
        raise RuntimeError(
            f"Trainable parameters {unseen} received a gradient in the backward pass but no per-sample gradient: "
            "the model reads them outside the forward of the module that holds them (a ParameterDict, or another "
            "module using their tensor directly), where no per-sample rule sees the use. Freeze them "
            "(requires_grad_(False)), or use them only through their own module's forward (see docs/layers.rst)."
        )


def grads_now(params: Sequence[torch.Tensor]) -> Dict[int, Tuple[Any, int]]:
    """``id(param)`` → (weak reference to its gradient, the gradient's version), for :func:`check_all_seen`."""
    return {id(p): (weakref.ref(p.grad), p.grad._version) for p in params if p.grad is not None}


# Over 50 lines for its docstring, which documents its eleven parameters; the body is some twenty lines.
def clip_and_sum(
    params: Sequence[torch.Tensor],
    parts: Sequence[List[Part]],
    max_grad_norm: float,
    clipping: str = "flat",
    scale: float = 1.0,
    norm_method: str = "auto",
    num_layers: Optional[int] = None,
    release: bool = False,
    sum_scale: float = 1.0,
    non_finite: str = "drop",
    on_sum: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
) -> ClipResult:
    """Clip every sample and sum over the batch: ``([t·Σ_b c_b·s·g_b per param], per-sample norms,
    dropped samples)``.

    Args:
        params: the parameters (``parts[k]`` is the per-sample gradient of ``params[k]``).
        max_grad_norm: ``C`` (flat), or the total ``C`` split as ``C/√K`` over the ``K`` parameters.
        clipping: ``"flat"``, ``"per_layer"``, ``"automatic"`` or ``"automatic_per_layer"`` (see the
            module docstring).
        scale: ``s > 0``, multiplies every per-sample gradient before clipping: a number or a 0-dim tensor
            (read without a host sync).
        norm_method: ``"auto"``, ``"ghost"`` or ``"materialize"`` (how factored parts compute norms).
        num_layers: ``K`` for per-layer clipping (default ``len(params)``): the number of trainable
            parameters of the optimizer, including those without gradient in this pass.
        release: set each ``parts[k]`` to ``None`` once its clipped sum is computed (``parts`` must be a
            list), so the activations and output gradients it holds are freed before the next sum is made:
            the step's peak memory then stays near that of a non-private step.
        sum_scale: ``t``, multiplies the clipped sums (not the norms): folded into the clip factors, so
            dividing by the batch size here costs nothing.
        non_finite: ``"drop"`` (default): a sample with a non-finite norm (flat), or with any non-finite
            per-parameter norm (per layer), gets ``c_b = 0`` and its rows of every part are zeroed, so it
            adds exactly nothing to any sum (see the module docstring); ``"propagate"``: no check, a
            non-finite sample makes the sums non-finite.
        on_sum: called as ``on_sum(k, clipped_sum)`` with each parameter's clipped sum as soon as it is
            made (in ``params`` order); the returned tensor is kept in its place, so the full-size sum can
            be freed before the next one is made (sharded training keeps only this rank's shard of the sum
            over ranks, see :class:`~lightning_dp.optimizer.GradientShards`).

    Returns a :class:`ClipResult`: the clipped sums, each sample's norm over all parameters (before
    clipping, after ``s``) and the mask of dropped samples (``None`` when none was dropped).
    """
    check_choice("non_finite", non_finite, NON_FINITE)
    factor_of = automatic_factors if clipping.startswith("automatic") else clip_factors
    if clipping in ("flat", "automatic"):
        total = _flat_norms(parts, scale, norm_method)
        keep = _kept(total, total) if non_finite == "drop" else None
        factors = [factor_of(total, max_grad_norm)] * len(params)
    else:
        squared = _per_parameter_squared_norms(parts, scale, norm_method)
        stacked = torch.stack(squared)
        total = stacked.sum(0).sqrt()
        # any parameter's norm non-finite: the whole sample out
        keep = _kept(total, stacked) if non_finite == "drop" else None
        bound = max_grad_norm / math.sqrt(num_layers or len(params))
        factors = [factor_of(sq.sqrt(), bound) for sq in squared]
    if keep is not None:  # some sample may not be finite: factor 0, and its rows zeroed in every part
        factors = _drop_samples(factors, keep)
    sums = _clipped_sums(parts, factors, keep, scale * sum_scale, release, on_sum)
    return ClipResult(sums, total, None if keep is None else ~keep)


def _flat_norms(parts: Sequence[List[Part]], scale: float, norm_method: str) -> torch.Tensor:
    """Each sample's norm over all parts ``(B,)``, times ``scale``. Parts keep their own scale (the loss
    reduction's batch size) as a number; it is applied to the ``(B,)`` norms once per distinct value, not
    once per part."""
    groups: Dict[float, List[torch.Tensor]] = {}
    for ps in parts:
        for part in ps:
            groups.setdefault(part.scale, []).append(part.norm_sq(norm_method, scaled=False))
    total_sq = None
    for part_scale, norms in groups.items():
        summed = norms[0] if len(norms) == 1 else torch.stack(norms).sum(0)
        factor = (part_scale * scale) ** 2
        summed = summed if _is_one(factor) else summed * factor
        total_sq = summed if total_sq is None else total_sq + summed
    return total_sq.sqrt()


def _per_parameter_squared_norms(
    parts: Sequence[List[Part]], scale: float, norm_method: str
) -> List[torch.Tensor]:
    """Each parameter's squared per-sample norms ``(B,)`` (the sum over its parts), times ``scale²``."""
    squared = [_sum([part.norm_sq(norm_method) for part in ps]) for ps in parts]
    if not _is_one(scale):
        squared = [sq * (scale * scale) for sq in squared]
    return squared


def _drop_samples(factors: List[torch.Tensor], keep: torch.Tensor) -> List[torch.Tensor]:
    """``factors`` with 0 for every sample not kept (a NaN factor times 0 would stay NaN); a factor tensor
    shared by several parameters stays shared."""
    zeroed: Dict[int, torch.Tensor] = {}
    for f in factors:
        if id(f) not in zeroed:
            zeroed[id(f)] = torch.where(keep, f, f.new_zeros(()))
    return [zeroed[id(f)] for f in factors]


def _clipped_sums(
    parts: Sequence[List[Part]],
    factors: List[torch.Tensor],
    keep: Optional[torch.Tensor],
    multiplier: float,
    release: bool,
    on_sum: Optional[Callable[[int, torch.Tensor], torch.Tensor]],
) -> List[torch.Tensor]:
    """Each parameter's clipped sum ``Σ_b f_b · multiplier · g_b`` (the parts of samples not in ``keep``
    zeroed), in order; ``release`` and ``on_sum`` as in :func:`clip_and_sum`."""
    scaled: Dict[Tuple[int, float], torch.Tensor] = {}  # factors × s × t × part scale, made once each
    sums = []
    for k, f in enumerate(factors):
        contributions = []
        for part in parts[k]:
            if keep is not None:
                part = part.keep_samples(keep)
            key = (id(f), part.scale)
            if key not in scaled:
                part_multiplier = multiplier * part.scale
                scaled[key] = f if _is_one(part_multiplier) else f * part_multiplier
            contributions.append(part.clipped_sum(scaled[key], scaled=False))
        if release:
            parts[k] = None  # type: ignore[index]
        sums.append(_sum(contributions) if on_sum is None else on_sum(k, _sum(contributions)))
    return sums


def _kept(total: torch.Tensor, norms: torch.Tensor) -> Optional[torch.Tensor]:
    """The bool ``(B,)`` mask of the samples to keep: those whose ``norms`` (``(B,)``, or ``(K, B)`` per
    parameter) are all finite. On the CPU ``None`` when every sample's ``total`` norm is finite (one
    reduction and one cheap sync; a NaN/inf among the ``norms`` makes ``total`` non-finite): the common
    step makes no mask and zeroes nothing. On other devices always the mask, without any host sync."""
    if total.device.type == "cpu" and bool(torch.isfinite(total).all()):
        return None
    finite = torch.isfinite(norms)
    return finite if finite.dim() == 1 else finite.all(0)


def _is_one(value: Any) -> bool:
    """Whether ``value`` is the number 1 (a multiplication by it can be skipped); a tensor is never
    compared (that would make the host wait for the device), it is multiplied in."""
    return not isinstance(value, torch.Tensor) and value == 1.0


def _sum(tensors: List[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for more in tensors[1:]:
        total = total + more
    return total


def common_batch_size(parts: List[Any]) -> int:
    """The one batch size every per-sample part of a backward pass has (else a clear error)."""
    batch_sizes = {part.batch_size for ps in parts for part in ps}
    if len(batch_sizes) > 1:
        raise RuntimeError(
            f"Per-sample gradients disagree on the batch size ({sorted(batch_sizes)}): a layer saw a "
            "different batch dimension than the others. Put the batch first in every layer's input, or pass "
            "the right batch_first to attach_grad_sample_hooks (time-major models)."
        )
    return next(iter(batch_sizes))


def parts_by_unit(
    parts: List[List[Part]], units: Any, batch_size: int, seen: Optional[torch.Tensor]
) -> Tuple[List[List[Part]], int, torch.Tensor]:
    """User-level privacy: each parameter's parts over the micro-batch's units (users) instead of its records
    (:meth:`~lightning_dp.grad_sample.per_sample_parts.Part.group`; a unit's gradient is the mean of its
    records'). ``units`` holds each record's user id (``(B,)`` integers); ``seen``: the ids of the step's earlier
    micro-batches (negative ids: padding, not checked). Returns the grouped parts, the number of units and the ids seen so far. Raises when
    ``units`` does not match the batch, or when a user's records were split across micro-batches of one step
    (the user's gradient would be clipped in pieces: its sensitivity would be more than ``C``)."""
    ids = torch.as_tensor(units).reshape(-1)
    if ids.numel() != batch_size or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"`units` must hold one integer user id per record of the micro-batch ({batch_size} records), got "
            f"{ids.numel()} of dtype {ids.dtype}."
        )
    grouping = Grouping.of(ids)
    unique = ids.unique().cpu()
    unique = unique[unique >= 0]  # negative ids: padding examples (FSDP's padding passes), never a user
    if seen is not None and bool(torch.isin(unique, seen).any()):
        split = unique[torch.isin(unique, seen)].tolist()[:5]
        raise RuntimeError(
            f"User-level privacy: the records of user(s) {split} are split across micro-batches of one optimizer "
            "step; each user's gradient must be clipped as one unit. Split batches at user boundaries (see "
            "lightning_dp.user_sampling.user_chunks)."
        )
    seen = unique if seen is None else torch.cat([seen, unique])
    return group_units(parts, grouping), grouping.num_units, seen


def drop_per_sample_attrs(params: Sequence[torch.Tensor], attrs: Tuple[str, ...]) -> None:
    """Delete ``attrs`` (per-sample gradients, parts, clipped sums) from every parameter that has them."""
    for p in params:
        for attr in attrs:
            if hasattr(p, attr):
                delattr(p, attr)
