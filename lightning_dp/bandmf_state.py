"""BandMF's part of a run's privacy state (:class:`BandMFState`, held by :class:`~lightning_dp.PrivacyState`):
each example's group, drawn once by rank 0 and shared with every rank, and rank 0's correlated noise stream
(its ``b − 1`` past noise buffers are as private as the data). Both go into checkpoints; see
:mod:`lightning_dp.correlated`."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .correlated import CorrelatedNoise, banded_toeplitz_coefficients, draw_partition

__all__ = ["BandMFState"]


class BandMFState:
    """The groups and the correlated stream of a run with ``bands`` bands (``1``: DP-SGD, nothing to hold).

    Attributes:
        labels: each example's group (``None`` until drawn or restored), the same on every rank.
        stream: rank 0's :class:`~lightning_dp.correlated.CorrelatedNoise` once installed (``None`` elsewhere).
    """

    def __init__(self, bands: int) -> None:
        self.bands = bands
        self.labels: Optional[torch.Tensor] = None
        self.stream: Optional[CorrelatedNoise] = None
        self._stream_of_checkpoint: Optional[Dict[str, Any]] = None

    def groups(self, num_samples: int, generator: Any, rank: int, world_size: int) -> Optional[torch.Tensor]:
        """Each example's group (``None`` without BandMF): drawn once by rank 0 with ``generator``, shared with all
        ranks. Raises ``ValueError`` when the dataset's size changed."""
        if self.bands == 1:
            return None
        labels = self.labels
        if labels is not None and labels.numel() != num_samples:
            raise ValueError(
                f"bands={self.bands}: the run's groups were drawn for {labels.numel()} examples, the training set "
                f"now has {num_samples}. BandMF needs the same dataset for the whole run (and its checkpoints)."
            )
        if labels is None:
            shared: List[Any] = [None]
            if rank == 0:
                shared[0] = draw_partition(generator, num_samples, self.bands)
            if world_size > 1 and dist.is_available() and dist.is_initialized():
                dist.broadcast_object_list(shared, src=0)
            labels = self.labels = shared[0]
        return labels

    def install(self, noise: Any, rank: int, planned_steps: int = 0, coefficients: Optional[Any] = None) -> None:
        """Rank 0's stream over ``noise``: the checkpoint's, else one for ``coefficients`` or optimised for
        ``planned_steps``; before the first step, once per run."""
        if self.bands == 1 or rank != 0 or self.stream is not None:
            return
        resumed = self._stream_of_checkpoint
        if resumed is not None:
            stream = CorrelatedNoise(noise, resumed["coefficients"])
            stream.load_state_dict(resumed)
        else:
            if coefficients is None:
                coefficients = banded_toeplitz_coefficients(max(planned_steps, self.bands), self.bands)
            stream = CorrelatedNoise(noise, coefficients)
        self.stream = stream

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """The groups and the stream's state (``None`` without BandMF)."""
        if self.bands == 1:
            return None
        return {
            "labels": None if self.labels is None else self.labels.clone(),
            "noise": None if self.stream is None else self.stream.state_dict(),
        }

    def load_state_dict(self, state: Optional[Dict[str, Any]], rank: int) -> None:
        """Restore :meth:`state_dict` (rank 0 keeps the stream's state until :meth:`install`)."""
        if self.bands == 1:
            return
        if state is None:
            raise ValueError(
                f"bands={self.bands}: the checkpoint holds no BandMF state (groups, correlated noise); it was written "
                "by a run without BandMF. Resume with that run's settings, or start a new run."
            )
        if state.get("labels") is not None:
            self.labels = torch.as_tensor(state["labels"], dtype=torch.long)
        self._stream_of_checkpoint = state.get("noise") if rank == 0 else None
