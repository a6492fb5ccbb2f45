r"""Accounting of banded matrix-factorization noise (BandMF) with cyclic Poisson sampling.

The result used is the amplification theorem of Choquette-Choo, Ganesh, McKenna, McMahan, Rush,
Thakurta, Xu, "(Amplified) Banded Matrix Factorization: A unified approach to private training"
(NeurIPS 2023, arXiv:2306.08153): Theorem 1 (informal), made formal by its Theorems 4 and 5 with
Poisson sampling as the per-group mechanism. For a lower-triangular strategy ``C`` with ``b`` bands
and every column norm at most 1, and the data split into ``b`` groups of which group ``t mod b`` is
Poisson-sampled with probability ``p`` at step ``t`` (each example takes part only in steps ``b`` apart,
so its columns of ``C`` never overlap), ``T`` steps of ``g_t + σ·(C^{-1} z)_t`` are as private as
DP-SGD with sampling probability ``p``, noise multiplier ``σ`` and ``ceil(T / b)`` steps. In
dp_accounting terms: ``SelfComposedDpEvent(PoissonSampledDpEvent(p, GaussianDpEvent(σ)), ceil(T/b))``,
which is also what JAX Privacy's ``accounting.amplified_bandmf_event`` returns. ``b = 1`` is DP-SGD.

For the add/remove neighbouring relation our accountants report, the groups must be drawn
independently per example (:class:`~lightning_dp.correlated.CyclicPoissonBatchSampler` does):
adding or removing one example then changes no other example's group.

So the privacy state is an ordinary accountant's history of ``(σ, p, rounds)``;
:class:`BandMFAccountant` records one round per cycle of ``b`` steps into it. Pure Python.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from lightning_dp.accounting.base import (
    DEFAULT_ACCOUNTANT,
    Accountant,
    HistoryEntry,
    _check_delta,
    _check_int,
    _check_positive,
    _check_sample_rate,
    make_accountant,
)
from lightning_dp.accounting.calibration import get_noise_multiplier

__all__ = ["BandMFAccountant", "bandmf_epsilon", "bandmf_noise_multiplier", "bandmf_rounds", "bandmf_sample_rate"]


def bandmf_rounds(steps: int, bands: int) -> int:
    """``ceil(steps / bands)``: the most steps one example can take part in, the rounds accounted."""
    return -(-_check_int(steps, "steps", 0) // _check_int(bands, "bands", 1))


def bandmf_sample_rate(sample_rate: float, bands: int) -> float:
    """``p = bands · q``: the inclusion probability within a group that keeps the expected batch size
    ``q·N``. Raises ``ValueError`` when it exceeds 1 (fewer bands, or a smaller batch)."""
    q = _check_sample_rate(sample_rate, allow_zero=False)
    b = _check_int(bands, "bands", 1)
    if b * q > 1 + 1e-12:
        raise ValueError(
            f"`bands` × `sample_rate` must be at most 1 (each step samples one of `bands` groups of about "
            f"N/bands examples with probability bands·q), got bands={b}, sample_rate={q!r} (product {b * q:g}). "
            f"Use at most {int(1 / q + 1e-9)} bands, or a smaller expected batch size."
        )
    return min(1.0, b * q)


class BandMFAccountant(Accountant):
    """An accountant for BandMF with cyclic Poisson sampling, over any registered accountant.

    :meth:`step` is called once per training step with ``sample_rate = p`` (the within-group
    probability, ``bands·q``), as :class:`~lightning_dp.DPOptimizer` does; the wrapped accountant records
    one round at the first step of every cycle of ``bands`` steps (steps ``0, b, 2b, …``), so after ``T``
    steps it holds ``ceil(T / b)`` rounds at ``(σ, p)`` and reports their ε (module docstring). ``σ`` and
    ``p`` must stay the same for the whole run (the theorem is for one strategy matrix and one rate).

    Args:
        accountant: the name of the wrapped accountant (``"prv"``, default, or ``"rdp"``).
        bands: ``b``, the number of bands of the strategy (and of sampling groups).

    Example:
        >>> acc = BandMFAccountant("prv", bands=4)
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.4, num_steps=10)
        >>> acc.steps_taken, acc.rounds
        (10, 3)
    """

    def __init__(self, accountant: str = DEFAULT_ACCOUNTANT, bands: int = 1) -> None:
        self.inner = make_accountant(accountant)  # a fresh one: its history is ours
        self.bands = _check_int(bands, "bands", 1)
        self.mechanism = f"{self.inner.mechanism}+bandmf"
        self.steps_taken = 0
        super().__init__()  # (sets the history, i.e. the wrapped accountant's, to [])

    @property
    def history(self) -> List[HistoryEntry]:  # type: ignore[override]
        """The wrapped accountant's history: ``(σ, p, rounds)`` entries."""
        return self.inner.history

    @history.setter
    def history(self, value: List[HistoryEntry]) -> None:
        self.inner.history = value

    @property
    def rounds(self) -> int:
        """Rounds recorded so far: ``ceil(steps_taken / bands)``."""
        return self.inner.total_steps

    @property
    def total_steps(self) -> int:  # type: ignore[override]
        """Training steps taken (not rounds)."""
        return self.steps_taken

    def _extra_rounds(self, steps: int) -> int:
        return bandmf_rounds(self.steps_taken + steps, self.bands) - bandmf_rounds(self.steps_taken, self.bands)

    def _check_same(self, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and (self.history[-1][0], self.history[-1][1]) != (float(noise_multiplier), float(sample_rate)):
            raise ValueError(
                f"BandMF accounting needs one noise_multiplier and sample_rate for the whole run, got "
                f"noise_multiplier={noise_multiplier!r}, sample_rate={sample_rate!r} after "
                f"{self.history[-1][:2]!r}: the amplification theorem covers one strategy at one rate."
            )

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` training steps at ``(noise_multiplier, p = sample_rate)``: the rounds that
        start among them go to the wrapped accountant."""
        n = _check_int(num_steps, "num_steps", 1)
        self._check_same(noise_multiplier, sample_rate)
        rounds = self._extra_rounds(n)
        if rounds:
            self.inner.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=rounds)
        self.steps_taken += n

    def get_epsilon(
        self,
        delta: float,
        *,
        additional_steps: int = 0,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
    ) -> float:
        """ε after the steps taken (and ``additional_steps`` more training steps, turned into rounds)."""
        extra = self._extra_rounds(_check_int(additional_steps, "additional_steps", 0))
        return self.inner.get_epsilon(
            delta, additional_steps=extra, noise_multiplier=noise_multiplier, sample_rate=sample_rate
        )

    def _epsilon(self, history: Sequence[HistoryEntry], delta: float) -> float:
        return self.inner._epsilon(history, delta)

    def fresh(self) -> "BandMFAccountant":
        """A BandMF accountant over the same wrapped kind and bands, with nothing recorded."""
        return BandMFAccountant(self.inner.mechanism, self.bands)

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped accountant's state, the number of bands and the steps taken (plain types)."""
        return {"mechanism": self.mechanism, "inner": self.inner.state_dict(), "bands": self.bands,
                "steps_taken": self.steps_taken}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; refuses another mechanism or another number of bands."""
        if not isinstance(state, dict) or state.get("mechanism") != self.mechanism:
            raise ValueError(f"state was not written by a {self.mechanism!r} accountant: {state!r}")
        if state.get("bands") != self.bands:
            raise ValueError(
                f"state was written with bands={state.get('bands')!r}, this accountant has bands={self.bands}."
            )
        steps = _check_int(state.get("steps_taken"), "state['steps_taken']", 0)
        self.inner.load_state_dict(state["inner"])
        if self.inner.total_steps != bandmf_rounds(steps, self.bands):
            raise ValueError(f"state holds {self.inner.total_steps} rounds for {steps} steps of {self.bands} bands.")
        self.steps_taken = steps

    def __repr__(self) -> str:
        return f"BandMFAccountant(inner={self.inner!r}, bands={self.bands}, steps_taken={self.steps_taken})"


def bandmf_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, bands: int, delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """ε of ``steps`` BandMF steps with ``bands`` bands at overall rate ``q = sample_rate`` (expected
    batch ``q·N``): DP-SGD's ε at rate ``bands·q`` for ``ceil(steps / bands)`` steps."""
    p = bandmf_sample_rate(sample_rate, bands)
    acc = make_accountant(accountant)
    rounds = bandmf_rounds(steps, bands)
    if rounds:
        acc.step(noise_multiplier=noise_multiplier, sample_rate=p, num_steps=rounds)
    return acc.get_epsilon(_check_delta(delta))


def bandmf_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, bands: int,
    accountant: str = DEFAULT_ACCOUNTANT, epsilon_tolerance: float = 0.01,
) -> float:
    """The σ at which ``steps`` BandMF steps (``bands`` bands, overall rate ``q = sample_rate``) spend
    ``target_epsilon`` at ``delta``: :func:`~lightning_dp.accounting.get_noise_multiplier` at rate
    ``bands·q`` for ``ceil(steps / bands)`` steps (same search and guarantee: never above the target)."""
    _check_positive(target_epsilon, "target_epsilon")
    p = bandmf_sample_rate(sample_rate, bands)
    rounds = bandmf_rounds(_check_int(steps, "steps", 1), bands)
    return get_noise_multiplier(target_epsilon, delta, p, steps=rounds, accountant=accountant,
                                epsilon_tolerance=epsilon_tolerance)
