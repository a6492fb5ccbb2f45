"""The pieces of a DP training step inside Lightning that do not depend on the host strategy: the
per-sample scale of a backward pass, the loss of an empty Poisson batch, and the physical micro-batches a
batch is split into. No Lightning import."""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..sampling import batch_size_of, is_empty_batch, split_batch


def grad_scaler(precision_plugin: Any) -> Optional[Any]:
    """The precision plugin's enabled GradScaler (``precision="16-mixed"``), else ``None``."""
    scaler = getattr(precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def per_sample_scale(accumulation: int, scaler: Optional[Any]) -> "float | torch.Tensor":
    """The factor that undoes the loss scaling done outside the model: Lightning's ``1 / accumulate_grad_batches``
    and, with a GradScaler, its scale. The scale is read as the device tensor it is (``get_scale()`` would make
    the host wait for the device at every micro-batch): the result is then a new 0-dim float64 tensor (the
    scaler updates its own tensor in place after the step)."""
    scale: Any = float(accumulation)
    if scaler is None:
        return scale
    scaler_scale = getattr(scaler, "_get_scale_async", lambda: None)()  # torch's GradScaler, no host sync
    if isinstance(scaler_scale, torch.Tensor):
        return scale / scaler_scale.to(torch.float64)
    return scale / float(scaler.get_scale())


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A zero loss connected to every trainable parameter: backward gives zero gradients, no samples."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.stack([p.sum() * 0.0 for p in params]).sum()


def loss_of(output: Any) -> Optional[torch.Tensor]:
    """The loss of a ``training_step`` output (a tensor, a dict with ``"loss"``, or ``None``)."""
    return output["loss"] if isinstance(output, dict) else output


def physical_chunks(batch: Any, limit: Optional[int], passes: Optional[int] = None) -> List[Any]:
    """``batch`` split into chunks of at most ``limit`` examples (``None``: one chunk), padded with ``None``
    (a padding pass) up to ``passes`` chunks when every rank must run the same number (FSDP)."""
    size = 0 if is_empty_batch(batch) else batch_size_of(batch)
    if limit is None or size <= limit:
        chunks = [batch] if size or passes is None else []
    else:
        chunks = split_batch(batch, limit)
    if passes is not None:
        chunks += [None] * (passes - len(chunks))
    return chunks
