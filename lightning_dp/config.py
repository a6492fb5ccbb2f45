"""DPConfig: the DP-SGD arguments, their defaults and their checks, written once.

Every public entry point (:class:`~lightning_dp.DPStrategy`, :class:`~lightning_dp.DPDDPStrategy`,
:func:`~lightning_dp.make_private`) keeps an explicit signature (LightningCLI and the docs read it) whose
defaults are this class's fields, and builds a :class:`DPConfig` from its arguments: the checks and
their messages live here only (torchmetrics-style: each names the argument, what was passed and what is
allowed).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional

from ._checks import check_choice, check_non_negative, check_open_unit, check_positive, check_positive_int
from .accounting import DEFAULT_ACCOUNTANT, make_accountant
from .adaptive_clipping import AdaptiveClipping
from .clipping import CLIPPINGS
from .grad_sample import CLIPPING_MODES
from .recipes import resolve_recipe
from .user_sampling import PRIVACY_UNITS

LOSS_REDUCTIONS = ("mean", "sum")

__all__ = ["DPConfig", "LOSS_REDUCTIONS"]


@dataclass(frozen=True)
class DPConfig:
    """The validated DP-SGD arguments shared by every strategy and by :func:`~lightning_dp.make_private`.

    Args:
        noise_multiplier: σ ≥ 0, noise std relative to ``max_grad_norm``. Give this *or* ``target_epsilon``.
        max_grad_norm: per-sample clipping norm C > 0.
        target_epsilon: calibrate σ so that the planned run spends at most this ε at ``delta``.
        delta: δ of the (ε, δ) guarantee, in (0, 1).
        poisson_sampling: Poisson-sample the training data (the accountant's assumption).
        accountant: accountant name, ``"prv"`` (default) or ``"rdp"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loss combines samples.
        seed: seed of the (not secure) noise and sampling generators; refused with ``secure_mode``.
        secure_mode: draw noise and sampling decisions from the ChaCha20 generator keyed by the OS.
        max_physical_batch_size: split larger batches into chunks inside one optimizer step.
        clipping_mode: ``"auto"``, ``"ghost"`` or ``"materialize"`` (same update, different cost).
        clipping: ``"flat"``, ``"per_layer"``, ``"automatic"`` or ``"automatic_per_layer"``.
        adaptive_clipping: ``None``, or the arguments of :class:`~lightning_dp.adaptive_clipping.AdaptiveClipping`
            as a dict (``target_quantile``, ``learning_rate``, ``count_noise_multiplier``).
        bands: ``1`` (DP-SGD), or the bands ``b`` of BandMF correlated noise with cyclic Poisson sampling
            (:mod:`lightning_dp.correlated`); :func:`~lightning_dp.make_private` only for now.
        secure_aggregation: sum the ranks' clipped sums by secure aggregation with distributed discrete
            Gaussian noise (:mod:`lightning_dp.secure_aggregation`); ``DPDDPStrategy`` only.
        min_honest_ranks: with ``secure_aggregation``, the ranks whose noise shares alone give the noise
            (default ``W − 1``): ε holds if at most ``W − min_honest_ranks`` ranks are corrupt.
        secure_aggregation_bits: with ``secure_aggregation``, the bits ``b`` of the modular space (default
            48). With ``W·2^b ≤ 2^31`` (``b ≤ 30`` at 2 ranks) the messages are int32, half the bytes and a
            faster step, but every rank's value must stay below ``2^(b−1)/W`` (256 units of ``C/B`` at
            ``b = 30``, 2 ranks: see docs/cross_silo.rst); a step beyond stops with an error, never wraps.
        privacy_unit: ``"record"`` (default: one training example is protected) or ``"user"`` (all of one user's
            records, :mod:`lightning_dp.user_sampling`; needs ``user_ids`` and Poisson sampling, not BandMF).
        recipe: ``None``, ``"default"``, a :class:`~lightning_dp.recipes.Recipe` or a dict of its fields: the strategy
            trains with the recipe's optimizer, learning-rate schedule and averaging, and the recipe sets
            ``clipping`` and ``max_grad_norm`` (given as well, they are refused). Normalised to a ``Recipe``.
        max_records_per_user: ``k ≥ 1``, the records a sampled user contributes per step at most (``None``: the
            largest user's count). With ``privacy_unit="record"`` and user ids, the group size of the report's
            group privacy.

    Example::

        >>> DPConfig(noise_multiplier=1.1).max_grad_norm
        1.0
        >>> DPConfig(noise_multiplier=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: `noise_multiplier` must be a finite number >= 0, got -1.0.
    """

    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    poisson_sampling: bool = True
    accountant: str = DEFAULT_ACCOUNTANT
    loss_reduction: str = "mean"
    seed: Optional[int] = None
    secure_mode: bool = False
    max_physical_batch_size: Optional[int] = None
    clipping_mode: str = "auto"
    clipping: str = "flat"
    adaptive_clipping: Optional[Dict[str, float]] = None
    bands: int = 1
    secure_aggregation: bool = False
    min_honest_ranks: Optional[int] = None
    secure_aggregation_bits: Optional[int] = None
    privacy_unit: str = "record"
    max_records_per_user: Optional[int] = None
    recipe: Optional[Any] = None

    def __post_init__(self) -> None:
        self._apply_recipe()
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "Give exactly one of `noise_multiplier` and `target_epsilon` (got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}): the noise "
                "multiplier is either set directly or calibrated to reach target_epsilon."
            )
        checked = self._checked_values()
        self._check_combinations(checked["bands"])
        self._check_secure_aggregation()
        self._check_privacy_unit(checked["privacy_unit"])
        self._check_seed()
        try:
            make_accountant(self.accountant)
        except ValueError as err:
            raise ValueError(f"`accountant` must name a registered accountant: {err}") from None
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def _apply_recipe(self) -> None:
        """Resolve ``recipe`` to a :class:`~lightning_dp.recipes.Recipe` and take the clipping from it."""
        recipe = resolve_recipe(self.recipe)
        if recipe is None:
            return
        given = [f"{name}={getattr(self, name)!r}" for name in ("clipping", "max_grad_norm", "adaptive_clipping")
                 if getattr(self, name) != getattr(DPConfig, name)]
        if given:
            raise ValueError(
                f"`recipe` sets the clipping, so {', '.join(given)} cannot be given with it. Put them in the recipe "
                "(recipe={'clipping': 'flat', 'max_grad_norm': 1.0}) or train without `recipe`."
            )
        if self.bands != 1:
            raise ValueError(f"`recipe` is a DP-SGD recipe (its learning rate is scaled by DP-SGD's σ); got "
                             f"bands={self.bands!r}. Use bands=1 with a recipe, or no recipe with BandMF.")
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "clipping", recipe.clipping)
        object.__setattr__(self, "max_grad_norm", recipe.max_grad_norm)

    def _checked_values(self) -> Dict[str, Any]:
        """Each argument checked on its own, in its normalised form (what the frozen fields are set to)."""
        checked: Dict[str, Any] = {
            "max_grad_norm": check_positive("max_grad_norm", self.max_grad_norm),
            "delta": check_open_unit("delta", self.delta),
            "loss_reduction": check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS),
            "clipping_mode": check_choice("clipping_mode", self.clipping_mode, CLIPPING_MODES),
            "clipping": check_choice("clipping", self.clipping, CLIPPINGS),
            "bands": check_positive_int("bands", self.bands),
            "privacy_unit": check_choice("privacy_unit", self.privacy_unit, PRIVACY_UNITS),
        }
        if self.max_records_per_user is not None:
            checked["max_records_per_user"] = check_positive_int("max_records_per_user", self.max_records_per_user)
        if self.noise_multiplier is not None:
            checked["noise_multiplier"] = check_non_negative("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            checked["target_epsilon"] = check_positive("target_epsilon", self.target_epsilon)
        for name in ("poisson_sampling", "secure_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.max_physical_batch_size is not None:
            checked["max_physical_batch_size"] = check_positive_int(
                "max_physical_batch_size", self.max_physical_batch_size
            )
        if isinstance(self.adaptive_clipping, dict):
            checked["adaptive_clipping"] = dict(self.adaptive_clipping)
        return checked

    def _check_combinations(self, bands: int) -> None:
        """BandMF and adaptive clipping against the rest."""
        if bands > 1 and not self.poisson_sampling:
            raise ValueError(
                f"bands={self.bands} needs poisson_sampling=True: BandMF's accounting assumes the strategy's cyclic "
                "Poisson groups, which a user sampler does not provide."
            )
        if bands > 1 and self.adaptive_clipping is not None:
            raise ValueError(
                f"`adaptive_clipping` cannot be combined with bands={self.bands}: its noised count would share the "
                "correlated noise stream, which BandMF's accounting does not cover. Use bands=1, or a fixed norm."
            )
        if self.adaptive_clipping is not None:
            AdaptiveClipping.from_config(self.adaptive_clipping)  # checks the keys and values
            if self.clipping.startswith("automatic"):
                raise ValueError(
                    f"`adaptive_clipping` needs clipping='flat' or 'per_layer', got clipping={self.clipping!r}: "
                    "automatic clipping normalises every sample and has no norm to adapt."
                )

    def _check_privacy_unit(self, unit: str) -> None:
        """User-level privacy against what it cannot be combined with."""
        if unit != "user":
            return
        if not self.poisson_sampling or self.bands != 1:
            raise ValueError(
                f"privacy_unit='user' needs poisson_sampling=True and bands=1 (got poisson_sampling="
                f"{self.poisson_sampling!r}, bands={self.bands!r}): its accounting is the Poisson sampling of users."
            )
        k, limit = self.max_records_per_user, self.max_physical_batch_size
        if k is not None and limit is not None and limit < k:
            raise ValueError(
                f"`max_physical_batch_size`={limit} is smaller than `max_records_per_user`={k}: a user's records "
                "must be in one physical batch (they are clipped as one unit). Raise it to at least k."
            )

    def _check_seed(self) -> None:
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative integer or None, got {seed!r}.")
        if self.secure_mode and seed is not None:
            raise ValueError(
                f"`seed` must be None with secure_mode=True, got {seed!r}: a seeded generator is predictable, "
                "so anyone with the seed could subtract the noise. Drop the seed, or use secure_mode=False "
                "for a reproducible (not secure) run."
            )

    def _check_secure_aggregation(self) -> None:
        if not isinstance(self.secure_aggregation, bool):
            raise ValueError(f"`secure_aggregation` must be True or False, got {self.secure_aggregation!r}.")
        if self.min_honest_ranks is not None:
            check_positive_int("min_honest_ranks", self.min_honest_ranks)
            if not self.secure_aggregation:
                raise ValueError(
                    f"`min_honest_ranks`={self.min_honest_ranks!r} needs secure_aggregation=True: without it every "
                    "rank adds its noise in the clear and there is no share to size."
                )
        if self.secure_aggregation_bits is not None:
            check_positive_int("secure_aggregation_bits", self.secure_aggregation_bits)
            if not 2 <= self.secure_aggregation_bits <= 62:
                raise ValueError(f"`secure_aggregation_bits` must be in [2, 62], got {self.secure_aggregation_bits!r}.")
            if not self.secure_aggregation:
                raise ValueError(
                    f"`secure_aggregation_bits`={self.secure_aggregation_bits!r} needs secure_aggregation=True: "
                    "without it the ranks all-reduce floats."
                )
        if not self.secure_aggregation:
            return
        if self.adaptive_clipping is not None:
            raise ValueError(
                "`adaptive_clipping` cannot be combined with secure_aggregation=True for now: its noised count "
                "is not aggregated securely."
            )
        if self.bands != 1:
            raise ValueError(f"`bands`={self.bands} cannot be combined with secure_aggregation=True.")

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> "DPConfig":
        """A config from a function's arguments (``locals()``): the names that are fields are taken,
        everything else (``self``, ``device``, ``**kwargs``) is ignored."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls) if f.name in arguments})

    def to_dict(self) -> Dict[str, Any]:
        """The arguments as a plain dict (for hyperparameter logging and reports)."""
        return asdict(self)
