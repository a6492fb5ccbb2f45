"""Input centring inside the DP strategies (see :mod:`lightning_dp.centering`): the private centres are
released once per run before the first step (rank 0 releases, every rank gets the same values), recorded by
the accountant before σ is calibrated, and saved in checkpoints so that a resumed run never releases them
again. No Lightning import."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch.distributed as dist

from ..centering import InputCentering, PrivateMean, build_centering, resolve_layer


class CenteringMixin:
    """The strategy's :class:`~lightning_dp.centering.InputCentering` (part of the DP strategy)."""

    def _init_centering(self, centering: Optional[Mapping[Any, Any]]) -> None:
        if centering is not None and not isinstance(centering, Mapping):
            raise ValueError(
                f"`centering` must be a dict {{layer or its name: centre}}, got {type(centering).__name__}."
            )
        self._centering_spec: Optional[Mapping[Any, Any]] = dict(centering) if centering else None
        self._input_centering: Optional[InputCentering] = None
        self._released_centres: Optional[Dict[str, List[float]]] = None  # by layer name: released or restored
        self._centering_events = 0  # entries of the accountant's history that are private centres (restored too)

    def _release_centering(self) -> None:
        """Centre the layers for this fit (before σ is calibrated) around the centres already released in this
        run or restored from a checkpoint; a centre not yet released is released now by rank 0 (its privacy
        recorded by every rank's accountant) and shared with all ranks. Each centre is released once per run."""
        if self._centering_spec is None:
            return
        model = self.lightning_module
        released = dict(self._released_centres or {})
        missing = {key: spec for key, spec in self._centering_spec.items()
                   if resolve_layer(model, key)[1] not in released}
        if missing:
            released.update(self._released_by_rank_zero(model, missing))
            for spec in missing.values():
                if isinstance(spec, PrivateMean):
                    sigma, rate, steps = spec.accounting_event
                    self.accountant.step(noise_multiplier=sigma, sample_rate=rate, num_steps=steps)
                    self._centering_events += steps
            self._released_centres = released
        self._remove_centering()
        centering, _ = build_centering(model, self._centering_spec, self.noise, restored=released)
        centering.attach()
        self._input_centering = centering
        if self._has_dp_optimizer():
            self.dp_optimizer.centering = centering

    def _released_by_rank_zero(self, model: Any, specs: Mapping[Any, Any]) -> Dict[str, List[float]]:
        """Rank 0's release of ``specs`` (one process: its own), the same values on every rank."""
        distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        released: List[Any] = [None]
        if not distributed or self.global_rank == 0:
            released[0] = build_centering(model, specs, self.noise)[0].state_dict()
        if distributed:
            dist.broadcast_object_list(released, src=0)
        return released[0]

    def _remove_centering(self) -> None:
        if self._input_centering is not None:
            self._input_centering.detach()

    def _centering_releases(self) -> int:
        """How many steps of the accountant's history are private centres (not optimizer steps)."""
        return self._centering_events

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
        return self._released_centres
