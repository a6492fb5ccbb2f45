"""The accountant interface, argument checks and the accountant registry.

An accountant keeps one record, its ``history``: the list of ``(noise_multiplier, sample_rate,
num_steps)`` entries of the Poisson-subsampled Gaussian steps taken so far, run-length encoded
(consecutive steps with the same ``(noise_multiplier, sample_rate)`` share one entry). Every privacy
number is computed from that history; nothing else is stored, so ``state_dict()`` is the whole
privacy state.

This module is pure Python (no numpy, torch or Lightning import).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from .._checks import check_int, check_non_negative, check_open_unit, check_positive, check_rate

HistoryEntry = Tuple[float, float, int]

_REGISTRY: Dict[str, Type["Accountant"]] = {}

DEFAULT_ACCOUNTANT = "prv"
"""Name of the default accountant (:class:`~lightning_dp.accounting.PRVAccountant`): the tightest
upper bound we compute."""

_A = TypeVar("_A", bound=Type["Accountant"])


# Argument checks: thin aliases of the package-wide checks (one implementation, one message style).
def _check_noise_multiplier(value: Any, name: str = "noise_multiplier") -> float:
    return check_non_negative(name, value)


def _check_sample_rate(value: Any, name: str = "sample_rate", allow_zero: bool = True) -> float:
    return check_rate(name, value, allow_zero=allow_zero)


def _check_delta(value: Any, name: str = "delta") -> float:
    return check_open_unit(name, value)


def _check_positive(value: Any, name: str) -> float:
    return check_positive(name, value)


def _check_int(value: Any, name: str, minimum: int) -> int:
    return check_int(name, value, minimum)


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------
class Accountant(abc.ABC):
    """Base class of privacy accountants for the Poisson-subsampled Gaussian mechanism.

    The ``history`` is the single source of truth for the privacy spent: a list of
    ``(noise_multiplier, sample_rate, num_steps)`` tuples in the order the steps were taken, with
    consecutive steps at the same ``(noise_multiplier, sample_rate)`` merged into one entry.
    Subclasses only implement :meth:`_epsilon`, the ``(epsilon, delta)`` bound of a history.

    Attributes:
        mechanism: name of the accounting method (the key in :func:`make_accountant`), written into
            ``state_dict()`` so that a checkpoint is never read by a different kind of accountant.
        history: the composed steps, see above.
    """

    mechanism: str = ""

    def __init__(self) -> None:
        self.history: List[HistoryEntry] = []

    # -- recording ---------------------------------------------------------------------------------
    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Records ``num_steps`` steps of the Gaussian mechanism with noise standard deviation
        ``noise_multiplier * sensitivity`` applied to a Poisson sample taken with rate
        ``sample_rate``.

        Raises:
            ValueError: ``noise_multiplier < 0``, ``sample_rate`` outside ``[0, 1]`` or
                ``num_steps`` not an integer ``>= 1``.
        """
        sigma = _check_noise_multiplier(noise_multiplier)
        q = _check_sample_rate(sample_rate)
        n = _check_int(num_steps, "num_steps", 1)
        _append(self.history, sigma, q, n)

    @property
    def total_steps(self) -> int:
        """Number of steps recorded in the history."""
        return sum(entry[2] for entry in self.history)

    def __len__(self) -> int:
        return self.total_steps

    # -- querying ----------------------------------------------------------------------------------
    def get_epsilon(
        self,
        delta: float,
        *,
        additional_steps: int = 0,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
    ) -> float:
        """Returns the epsilon of an ``(epsilon, delta)``-DP guarantee for the steps taken so far.

        With ``additional_steps > 0`` the answer is the epsilon *as if* that many more steps at
        ``(noise_multiplier, sample_rate)`` had been taken (both default to the last history
        entry's values); the history is not changed. An empty history (and no additional steps)
        gives ``0.0``; any step with ``noise_multiplier == 0`` and ``sample_rate > 0`` gives
        ``math.inf``.

        Raises:
            ValueError: an argument is out of range, or ``additional_steps > 0`` on an empty
                history without both ``noise_multiplier`` and ``sample_rate``.
        """
        delta = _check_delta(delta)
        history = self._history_with(additional_steps, noise_multiplier, sample_rate)
        if not history:
            return 0.0
        return float(self._epsilon(history, delta))

    @abc.abstractmethod
    def _epsilon(self, history: Sequence[HistoryEntry], delta: float) -> float:
        """The epsilon of a non-empty, validated ``history`` at ``delta``."""

    def _history_with(
        self,
        additional_steps: int,
        noise_multiplier: Optional[float],
        sample_rate: Optional[float],
    ) -> List[HistoryEntry]:
        """A copy of the history with ``additional_steps`` hypothetical steps appended."""
        extra = _check_int(additional_steps, "additional_steps", 0)
        if noise_multiplier is not None:
            noise_multiplier = _check_noise_multiplier(noise_multiplier)
        if sample_rate is not None:
            sample_rate = _check_sample_rate(sample_rate)
        history = list(self.history)
        if extra == 0:
            return history
        if noise_multiplier is None or sample_rate is None:
            if not history:
                raise ValueError(
                    "additional_steps > 0 on an empty history needs both noise_multiplier and "
                    f"sample_rate, got noise_multiplier={noise_multiplier!r}, "
                    f"sample_rate={sample_rate!r}"
                )
            last_sigma, last_q, _ = history[-1]
            noise_multiplier = last_sigma if noise_multiplier is None else noise_multiplier
            sample_rate = last_q if sample_rate is None else sample_rate
        _append(history, noise_multiplier, sample_rate, extra)
        return history

    # -- checkpointing -----------------------------------------------------------------------------
    def fresh(self) -> "Accountant":
        """An accountant of the same kind and parameters with an empty history (what calibration
        composes candidate plans in). Subclasses with constructor parameters override it."""
        return make_accountant(self.mechanism)

    def state_dict(self) -> Dict[str, Any]:
        """The whole privacy state as plain Python types (picklable, JSON-able):
        ``{"mechanism": str, "history": [(noise_multiplier, sample_rate, num_steps), ...]}``."""
        return {"mechanism": self.mechanism, "history": [tuple(e) for e in self.history]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replaces the history by the one in ``state`` (from :meth:`state_dict`).

        Raises:
            ValueError: ``state`` was written by a different mechanism, or is malformed.
        """
        if not isinstance(state, dict) or "mechanism" not in state or "history" not in state:
            raise ValueError(
                "state must be a dict with keys 'mechanism' and 'history' (from "
                f"Accountant.state_dict()), got {state!r}"
            )
        if state["mechanism"] != self.mechanism:
            raise ValueError(
                f"state was written by a {state['mechanism']!r} accountant and cannot be loaded "
                f"into a {self.mechanism!r} accountant ({type(self).__name__}); create the "
                f"accountant with make_accountant({state['mechanism']!r}) instead"
            )
        history: List[HistoryEntry] = []
        for i, entry in enumerate(state["history"]):
            try:
                sigma, q, n = entry
            except (TypeError, ValueError):
                raise ValueError(
                    f"state['history'][{i}] must be (noise_multiplier, sample_rate, num_steps), "
                    f"got {entry!r}"
                ) from None
            _append(
                history,
                _check_noise_multiplier(sigma, f"state['history'][{i}] noise_multiplier"),
                _check_sample_rate(q, f"state['history'][{i}] sample_rate"),
                _check_int(n, f"state['history'][{i}] num_steps", 1),
            )
        self.history = history

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mechanism={self.mechanism!r}, total_steps={self.total_steps}, "
            f"history_entries={len(self.history)})"
        )


def _append(history: List[HistoryEntry], sigma: float, q: float, n: int) -> None:
    """Appends ``n`` steps at ``(sigma, q)``, merging with the last entry when it matches."""
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = (sigma, q, history[-1][2] + n)
    else:
        history.append((float(sigma), float(q), int(n)))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def register_accountant(name: str) -> Callable[[_A], _A]:
    """Class decorator: makes an :class:`Accountant` subclass available as ``make_accountant(name)``
    and sets its ``mechanism`` to ``name``."""

    def decorator(cls: _A) -> _A:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:  # reloads are fine
            raise ValueError(f"an accountant named {name!r} is already registered: {_REGISTRY[name]}")
        cls.mechanism = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def make_accountant(kind: str = DEFAULT_ACCOUNTANT, **kwargs: Any) -> Accountant:
    """Creates an accountant by name (``"prv"``, the default, or ``"rdp"``); ``kwargs`` go to its
    constructor.

    Example:
        >>> from lightning_dp.accounting import make_accountant
        >>> make_accountant()
        PRVAccountant(mechanism='prv', total_steps=0, history_entries=0)
        >>> make_accountant("rdp")
        RDPAccountant(mechanism='rdp', total_steps=0, history_entries=0)

    Raises:
        ValueError: ``kind`` is not a registered accountant.
    """
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be one of {sorted(_REGISTRY)}, got {kind!r}")
    return _REGISTRY[kind](**kwargs)
