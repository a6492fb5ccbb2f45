"""Per-sample clipping: norms, clip factors and the clipped sum, flat or per layer.

Each parameter's per-sample gradient comes either materialised (``param.grad_sample``, ``(B, *shape)``)
or factored (``param.grad_parts``, see :mod:`lightning_dp.grad_sample.bookkeeping`); both are read
through the same two questions: every sample's squared norm, and the sum weighted by clip factors.

* **flat**: one norm per sample over all parameters, ``c_b = C / max(‖g_b‖, C)``.
* **per_layer**: parameter tensor ``k`` (of ``K``) is clipped on its own to ``C_k = C/√K``, so a
  sample's whole clipped gradient still has norm at most ``√(Σ C_k²) = C``: the same sensitivity,
  hence the same noise ``σC`` and the same privacy guarantee as flat clipping.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .grad_sample.bookkeeping import MaterializedPart, Part, merge

CLIPPINGS = ("flat", "per_layer")


def per_sample_norms(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each sample's gradient over all given tensors (each ``(B, ...)``) → ``(B,)``."""
    squared = [g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grad_samples]
    return torch.stack(squared, dim=0).sum(dim=0).sqrt()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / ‖g_b‖)`` for each sample, computed as ``C / max(‖g_b‖, C)`` (safe at norm 0)."""
    return max_grad_norm / norms.clamp(min=max_grad_norm)


def clipped_sum(grad_sample: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``Σ_b factors[b] · grad_sample[b]`` without materialising the scaled copy."""
    flat = grad_sample.reshape(grad_sample.shape[0], -1)
    return (factors.to(flat.dtype) @ flat).view(grad_sample.shape[1:])


def parts_of(param: torch.Tensor) -> Optional[List[Part]]:
    """The per-sample gradient of ``param`` from the last backward pass(es) as parts whose squared
    norms add up, or ``None`` when it has none."""
    parts: List[Part] = list(getattr(param, "grad_parts", None) or [])
    grad_sample = getattr(param, "grad_sample", None)
    if grad_sample is not None:
        parts.insert(0, MaterializedPart(grad_sample))
    return merge(parts) if parts else None


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
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Clip every sample and sum over the batch: ``([t·Σ_b c_b·s·g_b per param], per-sample norms)``.

    Args:
        params: the parameters (``parts[k]`` is the per-sample gradient of ``params[k]``).
        max_grad_norm: ``C`` (flat), or the total ``C`` split as ``C/√K`` over the ``K`` parameters.
        clipping: ``"flat"`` or ``"per_layer"``.
        scale: ``s > 0``, multiplies every per-sample gradient before clipping.
        norm_method: ``"auto"``, ``"ghost"`` or ``"materialize"`` (how factored parts compute norms).
        num_layers: ``K`` for per-layer clipping (default ``len(params)``): the number of trainable
            parameters of the optimizer, including those without gradient in this pass.
        release: set each ``parts[k]`` to ``None`` once its clipped sum is computed (``parts`` must be a
            list), so the activations and output gradients it holds are freed before the next sum is made:
            the step's peak memory then stays near that of a non-private step.
        sum_scale: ``t``, multiplies the clipped sums (not the norms): folded into the clip factors, so
            dividing by the batch size here costs nothing.

    Returns the clipped sums and each sample's norm over all parameters (before clipping, after ``s``).
    """
    # Parts keep their own scale (the loss reduction's batch size) as a number; it is applied to the
    # (B,) norms and factors once per distinct value, not once per part.
    if clipping == "flat":
        groups: Dict[float, List[torch.Tensor]] = {}
        for ps in parts:
            for part in ps:
                groups.setdefault(part.scale, []).append(part.norm_sq(norm_method, scaled=False))
        total_sq = None
        for part_scale, norms in groups.items():
            summed = norms[0] if len(norms) == 1 else torch.stack(norms).sum(0)
            factor = (part_scale * scale) ** 2
            summed = summed if factor == 1.0 else summed * factor
            total_sq = summed if total_sq is None else total_sq + summed
        total = total_sq.sqrt()
        factors = [clip_factors(total, max_grad_norm)] * len(params)
    else:
        squared = [_sum([part.norm_sq(norm_method) for part in ps]) for ps in parts]
        if scale != 1.0:
            squared = [sq * (scale * scale) for sq in squared]
        total = torch.stack(squared).sum(0).sqrt()
        bound = max_grad_norm / math.sqrt(num_layers or len(params))
        factors = [clip_factors(sq.sqrt(), bound) for sq in squared]
    scaled: Dict[Tuple[int, float], torch.Tensor] = {}  # factors × s × t × part scale, made once each
    sums = []
    for k, f in enumerate(factors):
        contributions = []
        for part in parts[k]:
            key = (id(f), part.scale)
            if key not in scaled:
                multiplier = scale * sum_scale * part.scale
                scaled[key] = f if multiplier == 1.0 else f * multiplier
            contributions.append(part.clipped_sum(scaled[key], scaled=False))
        if release:
            parts[k] = None  # type: ignore[index]
        sums.append(_sum(contributions))
    return sums, total


def _sum(tensors: List[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for more in tensors[1:]:
        total = total + more
    return total
