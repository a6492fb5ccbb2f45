"""Privacy state of a DP strategy: the accountant (the one record of privacy spent), the generators,
the budgets, and how they travel in checkpoints. No Lightning import."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from .._checks import check_open_unit
from ..accounting import Accountant, make_accountant
from ..config import DPConfig
from ..privacy_state import make_noise, warn_if_no_noise
from ..noise import GaussianNoise

CHECKPOINT_KEY = "lightning_dp"
"""Key of the privacy state in every Lightning checkpoint written by a DP strategy."""

_RESUMED_SETTINGS = ("noise_multiplier", "max_grad_norm", "sample_rate")


class PrivacyStateMixin:
    """Accountant, generators, budgets and checkpoints (part of the DP strategy)."""

    config: DPConfig

    def _init_privacy_state(self, config: DPConfig) -> None:
        self.config = config
        self.accountant: Accountant = make_accountant(config.accountant)
        self.noise = make_noise(config.secure_mode, config.seed)
        # Poisson inclusion decisions: the secure generator itself in secure mode.
        self._sampling_generator: Any = self.noise if config.secure_mode else torch.Generator()
        self.noise_multiplier: Optional[float] = config.noise_multiplier
        self.sample_rate: Optional[float] = None
        self.dataset_size: Optional[int] = None
        self.expected_batch_size: Optional[int] = None
        self._budgets: Set[Tuple[float, float]] = set()
        self._settings_of_checkpoint: Optional[Dict[str, Any]] = None
        self._adapted_norm_of_checkpoint: Optional[float] = None
        self._rank_state_of_checkpoint: Optional[Dict[str, Any]] = None  # this rank's, from the checkpoint
        self._refused_steps = 0  # steps the budget guard refused
        self._dropped_before = 0  # non-finite samples dropped before a resumed checkpoint
        self._seeded_rank: Optional[int] = None
        self._rank_states: Optional[List[Dict[str, Any]]] = None  # set while a checkpoint is saved
        if config.noise_multiplier is not None:
            warn_if_no_noise(config.noise_multiplier)

    # --- convenient views of the configuration -----------------------------------------------------
    @property
    def max_grad_norm(self) -> float:
        """Per-sample clipping norm C."""
        return self.config.max_grad_norm

    @property
    def delta(self) -> float:
        """δ of the guarantee (default of :meth:`get_epsilon`)."""
        return self.config.delta

    @property
    def target_epsilon(self) -> Optional[float]:
        """The ε σ is calibrated for, if any."""
        return self.config.target_epsilon

    @property
    def max_physical_batch_size(self) -> Optional[int]:
        """Batches above this size are processed in chunks inside one step."""
        return self.config.max_physical_batch_size

    def _seed_generators(self) -> None:
        """Per-rank generators: seeded runs reproduce, every rank draws different noise and samples.

        Done once per rank, before a checkpoint's generator states are restored (Lightning loads the
        checkpoint before ``setup``): a resumed run continues the streams, it does not restart them, and
        a second ``fit`` continues them too."""
        rank = self.global_rank
        if self.config.secure_mode or self._seeded_rank == rank:
            return  # secure: keyed from the OS in each process
        seed = self.config.seed
        if seed is not None and self.noise.seed != seed + 7919 * rank:
            self.noise = GaussianNoise(seed + 7919 * rank)
        self._sampling_generator.manual_seed(self.noise.seed + 1)
        self._seeded_rank = rank

    # --- privacy spent -------------------------------------------------------------------------------
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """ε spent so far at ``delta`` (default: the strategy's ``delta``), from the accountant's history."""
        return self.accountant.get_epsilon(self.delta if delta is None else check_open_unit("delta", delta))

    def epsilon_after_next_step(self, delta: Optional[float] = None) -> float:
        """ε at ``delta`` if one more step with the current settings were taken (for stopping in time)."""
        if self.sample_rate is None or self.noise_multiplier is None:
            return self.get_epsilon(delta)
        return self.accountant.get_epsilon(
            self.delta if delta is None else delta,
            additional_steps=1,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
        )

    def add_privacy_budget(self, epsilon: float, delta: float) -> None:
        """Refuse any optimizer step after which ε at ``delta`` would exceed ``epsilon`` (used by
        :class:`~lightning_dp.PrivacyBudgetCallback`, which normally stops training first)."""
        self._budgets.add((float(epsilon), float(delta)))

    def _step_allowed(self) -> bool:
        for epsilon, delta in sorted(self._budgets):
            if self.epsilon_after_next_step(delta) > epsilon:
                self._host.warn(
                    f"DP: skipped an optimizer step that would take ε over the budget {epsilon} (δ={delta}). "
                    "Training should stop; check that min_epochs/min_steps do not force it on."
                )
                self._refused_steps += 1
                if self.lightning_module is not None:
                    self.lightning_module.trainer.should_stop = True
                return False
        return True

    # --- checkpoints ---------------------------------------------------------------------------------
    def privacy_state_dict(self) -> Dict[str, Any]:
        """Accountant history, settings and — only in seeded (reproducible) mode — generator states.

        Generators seeded from the OS are never written: their state would let anyone holding the
        checkpoints regenerate and subtract the noise.
        """
        seeded = self.noise.seeded and not self.config.secure_mode
        state = {
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "sampler": self._sampling_generator.get_state() if seeded else None,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "dropped_samples": self.dropped_samples,
            "adapted_max_grad_norm": self._adapted_max_grad_norm(),
            "centering": self._centering_state(),
            "centering_releases": self._centering_releases(),
            "bandmf": self._bandmf_state(),
            "report": self.privacy_report().to_dict(),
        }
        if self._rank_states is not None:
            state["ranks"] = self._rank_states  # every rank's generators (seeded, several processes)
        return state

    def load_privacy_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`privacy_state_dict`: the accountant's history becomes the checkpoint's (privacy
        spent before the checkpoint is never forgotten); a change of DP settings is warned about once the
        new settings are known. A run calibrated to ``target_epsilon`` is recalibrated for the rest of its
        plan composed with the restored history, so the whole run stays within the target."""
        self._seed_generators()
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        if state.get("sampler") is not None and self.noise.seeded and not self.config.secure_mode:
            self._sampling_generator.set_state(state["sampler"])
        self._dropped_before = int(state.get("dropped_samples", 0) or 0)
        self._adapted_norm_of_checkpoint = state.get("adapted_max_grad_norm")
        if state.get("centering") is not None:
            self._released_centres = state["centering"]
        self._centering_events = int(state.get("centering_releases", 0) or 0)
        self._load_bandmf_state(state.get("bandmf"))
        self._settings_of_checkpoint = {k: state.get(k) for k in _RESUMED_SETTINGS}
        self._load_rank_states(state.get("ranks"))

    def _adapted_max_grad_norm(self) -> Optional[float]:
        """The clipping norm adaptive clipping has reached (``None`` without adaptive clipping)."""
        if self.config.adaptive_clipping is None or not self._has_dp_optimizer():
            return None
        return float(self.dp_optimizer.max_grad_norm)

    def _starting_max_grad_norm(self) -> float:
        """The clipping norm a new DP optimizer starts from: ``max_grad_norm``, or on resuming with adaptive
        clipping the norm the checkpoint had reached (the estimate goes on where it was)."""
        adapted = self._adapted_norm_of_checkpoint
        if adapted is not None and self.config.adaptive_clipping is not None:
            return float(adapted)
        return self.config.max_grad_norm

    def _load_rank_states(self, ranks: Optional[List[Dict[str, Any]]]) -> None:
        """Each rank continues its own seeded streams (the top-level ``noise``/``sampler`` are rank 0's)."""
        if self.world_size == 1 or self.config.secure_mode or not self.noise.seeded:
            return
        if not ranks or len(ranks) != self.world_size:
            self._host.warn(
                f"DP: the checkpoint holds no generator states for this run's {self.world_size} processes: every "
                "rank restarts its seeded streams from seed + rank (privacy spent is kept)."
            )
            self._seeded_rank = None
            self._seed_generators()
            return
        own = ranks[self.global_rank]
        self._rank_state_of_checkpoint = own
        self.noise.load_state_dict(own["noise"])
        if own.get("sampler") is not None:
            self._sampling_generator.set_state(own["sampler"])

    def _extra_rank_states(self) -> Dict[str, Any]:
        """More seeded per-rank generator states for checkpoints (``{}``; the DDP strategy adds secure
        aggregation's), restored from :attr:`_rank_state_of_checkpoint` by whoever owns them."""
        return {}

    def _gather_rank_states(self) -> Optional[List[Dict[str, Any]]]:
        """Every rank's seeded generator states, gathered on every rank (a collective; ``None`` for one
        process or OS-keyed generators, which are never written)."""
        if self.world_size == 1 or not self.noise.seeded or self.config.secure_mode:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        own = {"noise": self.noise.state_dict(), "sampler": self._sampling_generator.get_state(),
               **self._extra_rank_states()}
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, own)
        return gathered

    def _check_resumed_settings(self) -> None:
        old = self._settings_of_checkpoint
        if not old:
            return
        new = {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
               "sample_rate": self.sample_rate}
        changed = {
            k: (old[k], new[k])
            for k in new
            if old[k] is not None and new[k] is not None and abs(float(old[k]) - float(new[k])) > 1e-12
        }
        if changed:
            listed = ", ".join(f"{k}: {a} → {b}" for k, (a, b) in changed.items())
            self._host.warn(
                f"Resuming with different DP settings ({listed}). Privacy spent before the checkpoint is kept "
                "as it was; new steps are accounted with the new settings."
            )
        self._settings_of_checkpoint = None

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Save the checkpoint with the privacy state under the key ``"lightning_dp"`` (every rank calls
        this; in seeded multi-process runs every rank's generator states go in)."""
        self._rank_states = self._gather_rank_states()
        try:
            checkpoint[CHECKPOINT_KEY] = self.privacy_state_dict()
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]
        finally:
            self._rank_states = None

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Load a checkpoint and restore the privacy state saved in it."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        if CHECKPOINT_KEY in checkpoint:
            self.load_privacy_state_dict(checkpoint[CHECKPOINT_KEY])
        else:
            self._host.warn(
                f"Checkpoint {checkpoint_path} has no privacy state: it was not written by a DP strategy, so "
                "privacy spent before it is unknown and not counted."
            )
        return checkpoint

    @property
    def dropped_samples(self) -> int:
        """Samples dropped so far because their gradient was not finite (clip factor 0), this process,
        including those before a resumed checkpoint."""
        return int(self.dropped_samples_count)

    @property
    def dropped_samples_count(self) -> Any:
        """:attr:`dropped_samples` without a host sync: an ``int``, or a 0-dim tensor on the device where
        samples are clipped (see :attr:`~lightning_dp.DPOptimizer.dropped_samples_count`)."""
        optimizer = self.optimizers[0] if getattr(self, "optimizers", None) else None
        return self._dropped_before + getattr(optimizer, "dropped_samples_count", 0)

