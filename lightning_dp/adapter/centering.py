"""Input centring inside the DP strategies (see :mod:`lightning_dp.centering`): the private centres are
released once per run before the first step (rank 0 releases, every rank gets the same values), recorded by
the accountant before σ is calibrated, and saved in checkpoints so that a resumed run never releases them
again. No Lightning import."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch.distributed as dist

from ..centering import InputCentering, PrivateMean, build_centering


class CenteringMixin:
    """The strategy's :class:`~lightning_dp.centering.InputCentering` (part of the DP strategy)."""

    def _init_centering(self, centering: Optional[Mapping[Any, Any]]) -> None:
        if centering is not None and not isinstance(centering, Mapping):
            raise ValueError(
                f"`centering` must be a dict {{layer or its name: centre}}, got {type(centering).__name__}."
            )
        self._centering_spec: Optional[Mapping[Any, Any]] = dict(centering) if centering else None
        self._input_centering: Optional[InputCentering] = None
        self._centering_of_checkpoint: Optional[Dict[str, List[float]]] = None

    def _release_centering(self) -> None:
        """Build the centring once (before σ is calibrated): centres from the checkpoint when resuming, else
        released now by rank 0 (its privacy recorded by every rank's accountant) and shared with all ranks."""
        if self._centering_spec is None or self._input_centering is not None:
            return
        model = self.lightning_module
        restored = self._centering_of_checkpoint
        events: List[Any] = []
        if restored is None:
            restored = self._released_by_rank_zero(model)
            events = [spec.accounting_event for spec in self._centering_spec.values() if isinstance(spec, PrivateMean)]
        centering, _ = build_centering(model, self._centering_spec, self.noise, restored=restored)
        for sigma, rate, steps in events:
            self.accountant.step(noise_multiplier=sigma, sample_rate=rate, num_steps=steps)
        centering.attach()
        self._input_centering = centering
        if self._has_dp_optimizer():
            self.dp_optimizer.centering = centering

    def _released_by_rank_zero(self, model: Any) -> Dict[str, List[float]]:
        """Rank 0's released centres (one process: its own), the same on every rank."""
        distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        released: List[Any] = [None]
        if not distributed or self.global_rank == 0:
            released[0] = build_centering(model, self._centering_spec, self.noise)[0].state_dict()
        if distributed:
            dist.broadcast_object_list(released, src=0)
        return released[0]

    def _remove_centering(self) -> None:
        if self._input_centering is not None:
            self._input_centering.detach()

    def _centering_releases(self) -> int:
        """How many entries of the accountant's history are private centres (not optimizer steps)."""
        return sum(isinstance(spec, PrivateMean) for spec in (self._centering_spec or {}).values())

    def _centering_summary(self) -> Optional[Dict[str, str]]:
        """For the privacy report: how each centred layer's centre was obtained."""
        if self._centering_spec is None:
            return None
        names = {id(m): n for n, m in self.lightning_module.named_modules()} if self.lightning_module else {}
        summary = {}
        for key, spec in self._centering_spec.items():
            name = key if isinstance(key, str) else names.get(id(key), type(key).__name__)
            summary[name] = (
                f"private mean (Gaussian, σ = {spec.noise_multiplier:g}, row norm ≤ {spec.max_norm:g}; one release "
                "at sampling rate 1, in ε)" if isinstance(spec, PrivateMean) else "public centre (no privacy cost)"
            )
        return summary

    def _centering_state(self) -> Optional[Dict[str, List[float]]]:
        """What checkpoints keep: the released centres by layer name (``None`` without centring)."""
        if self._input_centering is not None:
            return self._input_centering.state_dict()
        return self._centering_of_checkpoint
