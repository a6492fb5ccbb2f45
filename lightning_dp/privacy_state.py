"""The one owner of a run's privacy state: :class:`PrivacyState`.

It holds everything that decides or records privacy spent: the accountant (the only record of privacy
spent), the noise multiplier σ and the sampling plan (rate q, expected batch size, dataset size) once, the
current clipping norm C, the noise source (seeded or secure, BandMF's correlated stream), the Poisson
sampling generator, the budget guard, the step count, the released centres, and their ``state_dict`` — every
checkpoint key, in one place. :func:`~lightning_dp.make_private`, every Lightning strategy and the Fabric
integration build one; the :class:`~lightning_dp.DPOptimizer` reads σ, q, C and the noise from it and records
its steps with it. No Lightning import.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from ._checks import check_non_negative, check_open_unit, check_positive, check_positive_int, check_rate
from .accounting import Accountant, make_accountant
from .accounting.bandmf import BandMFAccountant, bandmf_sample_rate
from .bandmf_state import BandMFState
from .centering import InputCentering, PrivateMean, build_centering, resolve_layer
from .config import DPConfig
from .noise import GaussianNoise, SecureRNG
from .noise.sources import NoNoise, make_noise, warn_if_no_noise
from .user_sampling import UserPlan, user_plan

__all__ = ["CHECKPOINT_KEY", "RESUMED_SETTINGS", "PrivacyState"]

CHECKPOINT_KEY = "lightning_dp"
"""Key of the privacy state in every checkpoint written by a DP strategy."""

RESUMED_SETTINGS = ("noise_multiplier", "max_grad_norm", "sample_rate")
"""Settings a resumed run compares with its checkpoint's (a change is warned about, never hidden)."""

class PrivacyState:
    """Accountant, σ, the sampling plan, C, the noise source, the budget guard and the step count of one run.

    Args:
        noise_multiplier: σ (``None`` until calibrated for a target ε).
        max_grad_norm: the clipping norm C (adaptive clipping moves :attr:`max_grad_norm` from here).
        accountant: records every step at ``(σ, q)``; ``None``: steps are counted, not accounted.
        noise: the run's noise source (default: :func:`make_noise` for ``secure_mode`` and ``seed``).
        seed, secure_mode: of the default noise source and of the Poisson sampling generator.
        sample_rate, expected_batch_size, dataset_size: the sampling plan, when known.
        delta: δ of the guarantee (the default of :meth:`get_epsilon`).
        bands: BandMF's ``b`` (1: DP-SGD). The accountant then records ``b·q``.
        adaptive: whether adaptive clipping moves C (its reached norm goes into checkpoints).
        warn: how a refusal or a changed setting is reported (default :func:`warnings.warn`).
        privacy_unit: ``"record"`` or ``"user"`` (:mod:`lightning_dp.user_sampling`: q, the expected batch size
            and the dataset size are then over users, and ε is per user).
        users: each record's user (:class:`~lightning_dp.user_sampling.UserPlan`), when known.
    """

    def __init__(
        self, *, noise_multiplier: Optional[float], max_grad_norm: float, accountant: Optional[Accountant] = None,
        noise: Any = None, seed: Optional[int] = None, secure_mode: bool = False, sample_rate: Optional[float] = None,
        expected_batch_size: Optional[int] = None, dataset_size: Optional[int] = None, delta: float = DPConfig.delta,
        bands: int = 1, adaptive: bool = False, warn: Optional[Callable[[str], None]] = None,
        privacy_unit: str = "record", users: Optional[UserPlan] = None,
    ) -> None:
        self.privacy_unit, self.users = privacy_unit, users
        self.noise_multiplier = None if noise_multiplier is None else check_non_negative("noise_multiplier", noise_multiplier)
        self.initial_max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        self.max_grad_norm = self.initial_max_grad_norm
        self.accountant = accountant
        self.secure_mode, self.seed, self.bands, self.adaptive = secure_mode, seed, bands, adaptive
        self.noise: Any = noise if noise is not None else make_noise(secure_mode, seed)
        self.sampling_generator: Any = self.noise if secure_mode else torch.Generator()
        self.sample_rate: Optional[float] = None
        self.expected_batch_size: Optional[int] = None
        self.dataset_size = dataset_size
        self.configure(sample_rate=sample_rate, expected_batch_size=expected_batch_size)
        self.delta = check_open_unit("delta", delta)
        self.warn = warn or (lambda message: warnings.warn(message, UserWarning, stacklevel=3))
        self.rank, self.world_size, self._seeded_rank = 0, 1, None  # see seed_for_rank
        self.steps_taken = 0
        self.refused_steps = 0
        self.dropped_count: "int | torch.Tensor" = 0  # non-finite samples dropped, checkpoints before included
        self.budgets: Set[Tuple[float, float]] = set()
        self.centering: Optional[InputCentering] = None  # the centred layers, once released
        self.released_centres: Optional[Dict[str, List[float]]] = None  # by layer name
        self.centring_releases = 0  # entries of the accountant's history that are private centres
        self.bandmf = BandMFState(bands)  # BandMF's groups and rank 0's correlated stream
        self.aggregation_stream: Optional[SecureRNG] = None  # secure aggregation's seeded stream
        self.rank_state_of_checkpoint: Optional[Dict[str, Any]] = None
        self.settings_of_checkpoint: Optional[Dict[str, Any]] = None

    @classmethod
    def standalone(cls, noise_multiplier: Optional[float], max_grad_norm: Optional[float],
                   expected_batch_size: Optional[int], noise: Any, accountant: Optional[Accountant],
                   sample_rate: Optional[float]) -> "PrivacyState":
        """The privacy state a :class:`~lightning_dp.DPOptimizer` built from its own keyword arguments holds."""
        for name, value in (("noise_multiplier", noise_multiplier), ("max_grad_norm", max_grad_norm)):
            if value is None:
                raise TypeError(f"DPOptimizer needs `{name}` (or a `privacy` state that holds it).")
        return cls(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, accountant=accountant, noise=noise,
                   sample_rate=sample_rate, expected_batch_size=expected_batch_size)

    @classmethod
    def from_config(cls, config: DPConfig, *, accounted: bool = True, user_ids: Any = None, **kwargs: Any) -> "PrivacyState":
        """The privacy state of a run with ``config`` (its accountant unless ``accounted=False``; ``user_ids``:
        one user id per training example, needed with ``privacy_unit="user"``)."""
        kwargs.update(privacy_unit=config.privacy_unit,
                      users=user_plan(config.privacy_unit, user_ids, config.max_records_per_user))
        accountant: Optional[Accountant] = None
        if accounted:
            accountant = BandMFAccountant(config.accountant, config.bands) if config.bands > 1 else make_accountant(config.accountant)
        if config.noise_multiplier is not None:
            warn_if_no_noise(config.noise_multiplier)
        return cls(
            noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm, accountant=accountant,
            seed=config.seed, secure_mode=config.secure_mode, delta=config.delta, bands=config.bands,
            adaptive=config.adaptive_clipping is not None, **kwargs,
        )

    # --- the plan ------------------------------------------------------------------------------------------
    def configure(self, *, noise_multiplier: Optional[float] = None, sample_rate: Optional[float] = None,
                  expected_batch_size: Optional[int] = None, dataset_size: Optional[int] = None) -> None:
        """Set σ (once calibrated) and the sampling plan of the coming steps (validated; ``None`` keeps one)."""
        if noise_multiplier is not None:
            self.noise_multiplier = check_non_negative("noise_multiplier", noise_multiplier)
        if sample_rate is not None:
            self.sample_rate = check_rate("sample_rate", sample_rate)
        if expected_batch_size is not None:
            self.expected_batch_size = check_positive_int("expected_batch_size", expected_batch_size)
        if dataset_size is not None:
            self.dataset_size = int(dataset_size)

    def accounted_rate(self, rate: float) -> float:
        """The rate the accountant records for a step at overall rate ``q``: ``q``, or ``b·q`` with BandMF."""
        return bandmf_sample_rate(rate, self.bands) if self.bands > 1 else rate

    @property
    def step_noise(self) -> Any:
        """Where the optimizer's step noise comes from: the run's source (DP-SGD), BandMF's correlated stream
        (rank 0, once installed), or nothing (BandMF, other ranks)."""
        if self.bands == 1:
            return self.noise
        if self.rank != 0:
            return NoNoise()
        return self.correlated if self.correlated is not None else self.noise

    # --- steps and budgets ---------------------------------------------------------------------------------
    def record_step(self) -> None:
        """Count one optimizer step and record it with the accountant at ``(σ, q)``."""
        self.steps_taken += 1
        if self.accountant is not None and self.sample_rate is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def record_release(self, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        """Record a release that is not an optimizer step (a private centre) with the accountant."""
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps)
        self.centring_releases += num_steps

    def add_budget(self, epsilon: float, delta: float) -> None:
        """Refuse any step after which ε at ``delta`` would exceed ``epsilon``."""
        self.budgets.add((float(epsilon), float(delta)))

    def next_step_exceeds(self, epsilon: float, delta: float) -> Optional[float]:
        """ε at ``delta`` after one more step, when that exceeds ``epsilon`` (else ``None``): the one test of
        stopping before a budget, for the budget guard and for :class:`~lightning_dp.PrivacyBudgetCallback`."""
        after = self.epsilon_after_next_step(delta)
        return after if after > epsilon else None

    def step_allowed(self) -> bool:
        """Whether the next step stays within every budget; a refusal is counted and reported."""
        for epsilon, delta in sorted(self.budgets):
            if self.next_step_exceeds(epsilon, delta) is not None:
                self.warn(
                    f"DP: skipped an optimizer step that would take ε over the budget {epsilon} (δ={delta}). "
                    "Training should stop; check that min_epochs/min_steps do not force it on."
                )
                self.refused_steps += 1
                return False
        return True

    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """ε spent so far at ``delta`` (default :attr:`delta`), from the accountant's history."""
        if self.accountant is None:
            raise RuntimeError("This run has no accountant: pass sample_rate to make_private.")
        return self.accountant.get_epsilon(self.delta if delta is None else check_open_unit("delta", delta))

    def epsilon_after_next_step(self, delta: Optional[float] = None) -> float:
        """ε at ``delta`` if one more step with the current σ and q were taken (for stopping in time)."""
        if self.sample_rate is None or self.noise_multiplier is None or self.accountant is None:
            return self.get_epsilon(delta)
        return self.accountant.get_epsilon(
            self.delta if delta is None else delta, additional_steps=1,
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
        )

    def add_dropped(self, count: "int | torch.Tensor") -> None:
        """Count samples dropped for a non-finite gradient (a device tensor stays on its device)."""
        self.dropped_count = self.dropped_count + count

    @property
    def dropped_samples(self) -> int:
        """Samples dropped for a non-finite gradient in this run, checkpoints before included (a host sync)."""
        return int(self.dropped_count)

    # --- generators ----------------------------------------------------------------------------------------
    def seed_for_rank(self, rank: int, world_size: int) -> None:
        """Per-rank generators: seeded runs reproduce, every rank draws different noise and samples. Done
        once per rank, before a checkpoint's generator states are restored: a resumed run continues the
        streams, and a second ``fit`` continues them too."""
        self.rank, self.world_size = rank, world_size
        if self.secure_mode or self._seeded_rank == rank:
            return  # secure: keyed from the OS in each process
        if self.seed is not None and self.noise.seed != self.seed + 7919 * rank:
            self.noise = GaussianNoise(self.seed + 7919 * rank)
        self.sampling_generator.manual_seed(self.noise.seed + 1)
        self._seeded_rank = rank

    @property
    def seeded(self) -> bool:
        """Whether the generators are seeded (reproducible): only then are their states written."""
        return bool(getattr(self.noise, "seeded", False)) and not self.secure_mode

    def aggregation_generator(self) -> SecureRNG:
        """Secure aggregation's rounding and noise stream: the secure generator itself in secure mode, else
        the same fast keystream keyed from this rank's seed (continued from the checkpoint when resumed)."""
        if self.secure_mode:
            return self.noise
        generator = SecureRNG(seed=f"lightning_dp.secure_aggregation:{self.noise.seed}".encode())
        resumed = (self.rank_state_of_checkpoint or {}).get("aggregation")
        if resumed is not None:
            generator.load_state_dict(resumed)
        self.aggregation_stream = generator
        return generator

    # --- input centring -------------------------------------------------------------------------------------
    def centre(self, model: torch.nn.Module, spec: Dict[Any, Any], *, shared: bool = True) -> InputCentering:
        """Centre the layers of ``spec`` (``{layer or its name: tensor or PrivateMean}``, attached): centres
        released before in this run or restored from a checkpoint are reused, the others are released now with
        the run's noise and recorded by the accountant — each centre once per run. ``shared``: rank 0 releases,
        every rank gets the same values (as numbers in float32, what checkpoints keep)."""
        released = dict(self.released_centres or {})
        if not shared:
            centering, events = build_centering(model, spec, self.noise, restored=released)
            for event in events:
                self.record_release(*event)
            centering.attach()  # its centres reach checkpoints through state_dict (read then, not now)
            self.centering = centering
            return centering
        missing = {key: value for key, value in spec.items() if resolve_layer(model, key)[1] not in released}
        if missing:
            released.update(self._released_by_rank_zero(model, missing))
            for value in missing.values():
                if isinstance(value, PrivateMean):
                    self.record_release(*value.accounting_event)
            self.released_centres = released
        if self.centering is not None:
            self.centering.detach()
        centering, _ = build_centering(model, spec, self.noise, restored=released)
        centering.attach()
        self.centering = centering
        return centering

    def _released_by_rank_zero(self, model: torch.nn.Module, spec: Dict[Any, Any]) -> Dict[str, List[float]]:
        distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        released: List[Any] = [None]
        if not distributed or self.rank == 0:
            released[0] = build_centering(model, spec, self.noise)[0].state_dict()
        if distributed:
            dist.broadcast_object_list(released, src=0)
        return released[0]

    # --- BandMF (lightning_dp.bandmf_state) ---------------------------------------------------------------
    correlated = property(lambda self: self.bandmf.stream, lambda self, stream: setattr(self.bandmf, "stream", stream),
                          doc="BandMF's correlated stream (rank 0, once installed), else ``None``.")
    bandmf_labels = property(lambda self: self.bandmf.labels, doc="Each example's BandMF group, once drawn.")

    def bandmf_groups(self, num_samples: int) -> Optional[torch.Tensor]:
        """Each example's BandMF group (``None`` without BandMF), drawn once by rank 0 and shared."""
        return self.bandmf.groups(num_samples, self.sampling_generator, self.rank, self.world_size)

    def install_correlated_noise(self, planned_steps: int = 0, coefficients: Optional[Any] = None) -> None:
        """BandMF's correlated stream on rank 0 (the checkpoint's, or new); before the first step."""
        self.bandmf.install(self.noise, self.rank, planned_steps, coefficients)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self, report: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Every checkpoint key: accountant history, settings, released centres, BandMF state, the privacy
        report (``report``) and — only in seeded (reproducible) mode — generator states (every rank's, when
        :meth:`gather_rank_states` found several). OS-keyed generators are never written: their state would
        let anyone holding the checkpoints regenerate and subtract the noise."""
        state = {
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "noise": self.noise.state_dict(),
            "sampler": self.sampling_generator.get_state() if self.seeded else None,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.initial_max_grad_norm,
            "sample_rate": self.sample_rate,
            "dropped_samples": self.dropped_samples,
            "adapted_max_grad_norm": float(self.max_grad_norm) if self.adaptive else None,
            "centering": self._released_centres(),
            "centering_releases": self.centring_releases,
            "bandmf": self.bandmf.state_dict(),
            "report": report,
            "privacy_unit": self.privacy_unit,
            "users": self.users.summary() if self.users is not None else None,
        }
        ranks = self.gather_rank_states()
        if ranks is not None:
            state["ranks"] = ranks
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also one written by lightning-dp 0.1.0.dev0): the accountant's history
        becomes the checkpoint's (privacy spent before it is never forgotten); a change of settings is
        reported by :meth:`changed_settings` once the new ones are known."""
        unit = state.get("privacy_unit") or "record"  # checkpoints before user-level privacy: records
        if unit != self.privacy_unit:
            raise ValueError(
                f"The checkpoint was written by a run with privacy_unit={unit!r}, this run has "
                f"privacy_unit={self.privacy_unit!r}: ε of one unit cannot continue the other's. Resume with "
                "that run's privacy unit, or start a new run."
            )
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        if state.get("sampler") is not None and self.seeded:
            self.sampling_generator.set_state(state["sampler"])
        self.dropped_count = int(state.get("dropped_samples", 0) or 0)
        adapted = state.get("adapted_max_grad_norm")
        if adapted is not None and self.adaptive:
            self.max_grad_norm = float(adapted)  # the estimate goes on where it was
        if state.get("centering") is not None:
            self.released_centres = state["centering"]
        self.centring_releases = int(state.get("centering_releases", 0) or 0)
        self.bandmf.load_state_dict(state.get("bandmf"), self.rank)
        self.settings_of_checkpoint = {k: state.get(k) for k in RESUMED_SETTINGS}
        self._load_rank_states(state.get("ranks"))

    def _released_centres(self) -> Optional[Dict[str, List[float]]]:
        if self.released_centres is None and self.centering is not None:
            return self.centering.state_dict()
        return self.released_centres

    def changed_settings(self) -> Dict[str, Tuple[Any, Any]]:
        """``{setting: (checkpoint's, now)}`` for σ, C and q that differ from the resumed checkpoint's (asked
        once, when the new settings are known)."""
        old, self.settings_of_checkpoint = self.settings_of_checkpoint or {}, None
        new = {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.initial_max_grad_norm,
               "sample_rate": self.sample_rate}
        return {k: (old[k], new[k]) for k in new if old.get(k) is not None and new[k] is not None
                and abs(float(old[k]) - float(new[k])) > 1e-12}

    def gather_rank_states(self) -> Optional[List[Dict[str, Any]]]:
        """Every rank's seeded generator states, gathered on every rank (a collective; ``None`` for one
        process or OS-keyed generators, which are never written)."""
        if self.world_size == 1 or not self.seeded or not (dist.is_available() and dist.is_initialized()):
            return None
        own = {"noise": self.noise.state_dict(), "sampler": self.sampling_generator.get_state()}
        if self.aggregation_stream is not None:
            own["aggregation"] = self.aggregation_stream.state_dict()
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, own)
        return gathered

    def _load_rank_states(self, ranks: Optional[List[Dict[str, Any]]]) -> None:
        """Each rank continues its own seeded streams (the top-level ``noise``/``sampler`` are rank 0's)."""
        if self.world_size == 1 or not self.seeded:
            return
        if not ranks or len(ranks) != self.world_size:
            self.warn(
                f"DP: the checkpoint holds no generator states for this run's {self.world_size} processes: every "
                "rank restarts its seeded streams from seed + rank (privacy spent is kept)."
            )
            self._seeded_rank = None
            self.seed_for_rank(self.rank, self.world_size)
            return
        own = self.rank_state_of_checkpoint = ranks[self.rank]
        self.noise.load_state_dict(own["noise"])
        if own.get("sampler") is not None:
            self.sampling_generator.set_state(own["sampler"])
