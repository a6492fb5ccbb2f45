r"""Banded matrix-factorization noise (BandMF) with cyclic Poisson sampling.

DP-SGD adds independent noise ``σC·z_t`` to every step's clipped gradient sum. BandMF adds correlated
noise ``σC·w_t`` with ``w = C^{-1} z`` for a lower-triangular Toeplitz strategy ``C`` with ``b`` bands
(coefficients ``c_0 > 0, c_1, …, c_{b-1}``, column norm ``‖c‖ = 1``): ``w_t = (z_t − Σ_{j=1}^{b-1} c_j
w_{t-j}) / c_0``. The model is a prefix sum of the noisy gradients, so what reaches it is ``A C^{-1} z``
(``A`` the prefix-sum matrix); coefficients chosen to make ``‖A C^{-1}‖_F`` small let part of each step's
noise cancel the previous steps' (McKenna 2024, "Scaling up the Banded Matrix Factorization Mechanism
for Differentially Private ML", arXiv:2405.15913, for the Toeplitz strategies).

The price is the sampling: the data are split once into ``b`` groups and step ``t`` Poisson-samples
group ``t mod b`` with probability ``p = b·q`` (:class:`CyclicPoissonBatchSampler`), so each example
takes part at most once every ``b`` steps. Choquette-Choo et al. 2023 ("(Amplified) Banded Matrix
Factorization", NeurIPS) prove that such a run is as private as DP-SGD at rate ``p`` for ``ceil(T/b)``
steps (:mod:`lightning_dp.accounting.bandmf`). ``b = 1`` is DP-SGD exactly.

Use it through ``make_private(..., bands=b, num_steps=T)`` with a :class:`CyclicPoissonBatchSampler`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ._checks import check_int, check_positive_int, check_rate
from .accounting.bandmf import bandmf_sample_rate
from .sampling import PoissonBatchSampler, poisson_mask

__all__ = ["CorrelatedNoise", "CyclicPoissonBatchSampler", "banded_toeplitz_coefficients", "workload_error"]


# ------------------------------------------------------------------------------------- coefficients
def _workload_denominator(workload: str) -> np.ndarray:
    """``d`` with the workload's Toeplitz coefficients ``a(x) = 1 / d(x)``: prefix sums ``1/(1 − x)``,
    SGD with heavy-ball momentum ``m`` ``1/((1 − x)(1 − m x))``."""
    if workload == "prefix":
        return np.array([1.0, -1.0])
    if isinstance(workload, str) and workload.startswith("momentum:"):
        try:
            m = float(workload.split(":", 1)[1])
        except ValueError:
            m = math.nan
        if 0 <= m < 1:
            return np.array([1.0, -(1.0 + m), m])
    raise ValueError(f"`workload` must be 'prefix' or 'momentum:<m>' with 0 <= m < 1, got {workload!r}.")


def _loss_and_grad(c: np.ndarray, n: int, den: np.ndarray) -> tuple:
    """``‖c‖²·Σ_k (n − k)·β_k²`` (``β`` the coefficients of ``A C^{-1}``) and its gradient in ``c``."""
    from scipy.signal import lfilter

    impulse = np.zeros(n)
    impulse[0] = 1.0
    with np.errstate(all="ignore"):
        beta = lfilter([1.0], np.convolve(c, den), impulse)  # a(x) / c(x)
        weights = np.arange(n, 0, -1, dtype=np.float64)
        error = float(np.sum(weights * beta**2))
        if not math.isfinite(error) or error > 1e250:
            return math.inf, np.zeros_like(c)
        t = lfilter([1.0], c, beta)  # ∂β_k/∂c_j = −t_{k−j}
        u = 2.0 * weights * beta
        grad_error = -np.array([np.dot(u[j:], t[: n - j]) for j in range(len(c))])
    norm2 = float(np.dot(c, c))
    return norm2 * error, 2.0 * c * error + norm2 * grad_error


def workload_error(coefficients: Sequence[float], num_steps: int, workload: str = "prefix") -> float:
    """``‖A C^{-1}‖_F² · (max column norm of C)²``: the expected squared error that BandMF with strategy
    ``coefficients`` adds to the ``num_steps`` outputs of ``workload`` (``"prefix"``: the prefix sums of
    plain SGD; ``"momentum:<m>"``: the iterates of heavy-ball momentum ``m``), per unit noise std.
    ``b = 1`` (``[1.0]``) gives DP-SGD's ``‖A‖_F²`` (``n(n+1)/2`` for prefix sums)."""
    n = check_positive_int("num_steps", num_steps)
    c = np.asarray(torch.as_tensor(coefficients, dtype=torch.float64).flatten(), dtype=np.float64)[:n]
    if c.size == 0 or not np.all(np.isfinite(c)) or c[0] <= 0:
        raise ValueError(f"`coefficients` must be finite with coefficients[0] > 0, got {list(c)!r}.")
    return _loss_and_grad(c, n, _workload_denominator(workload))[0]


def banded_toeplitz_coefficients(num_steps: int, bands: int, workload: str = "prefix") -> torch.Tensor:
    """The ``bands`` coefficients of the lower-triangular Toeplitz strategy ``C`` that minimise
    :func:`workload_error` for a run of ``num_steps`` steps, normalised to ``‖c‖ = 1`` (the max column
    norm the accounting assumes), with ``c_0 > 0``: a float64 tensor, the same for the same arguments.

    ``c_0`` is fixed to 1 (the error does not depend on the scale) and ``c_1 … c_{b-1}`` are found by
    L-BFGS with the exact gradient, from the coefficients of ``(1 − x)^{-1/2}`` (the optimal infinite
    strategy for prefix sums); the Toeplitz structure makes one evaluation ``O(n·b)``.

    Example::

        >>> c = banded_toeplitz_coefficients(100, 4)
        >>> round(float(c.norm()), 6), workload_error(c, 100) < workload_error([1.0], 100)
        (1.0, True)
    """
    n = check_positive_int("num_steps", num_steps)
    b = check_positive_int("bands", bands)
    if b > n:
        raise ValueError(f"`bands` must be at most num_steps={n} (a band past the last step is unused), got {b}.")
    den = _workload_denominator(workload)
    start = np.ones(b)
    for j in range(1, b):
        start[j] = start[j - 1] * (2 * j - 1) / (2 * j)  # binom(2j, j) / 4^j
    best = start
    if b > 1:
        from scipy.optimize import minimize

        scale = _loss_and_grad(start, n, den)[0]

        def objective(x: np.ndarray) -> tuple:
            value, grad = _loss_and_grad(np.concatenate(([1.0], x)), n, den)
            return value / scale, grad[1:] / scale

        result = minimize(objective, start[1:], jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14})
        candidate = np.concatenate(([1.0], result.x))
        if objective(result.x)[0] < 1.0:  # never worse than the starting point
            best = candidate
    c = torch.tensor(best, dtype=torch.float64)
    return c / c.norm()


# --------------------------------------------------------------------------------------------- noise
class CorrelatedNoise:
    """BandMF noise: ``add_normal_(tensors, std)`` adds ``std·w_t`` with ``w = C^{-1} z``, ``z`` drawn from
    ``noise``; a drop-in noise source for :class:`~lightning_dp.DPOptimizer`.

    Each call is one step ``t``: the wrapped source draws ``std·z_t`` (the same draw DP-SGD would make,
    one call of ``noise.add_normal_``) into a buffer already holding ``−Σ_{j≥1} c_j·std·w_{t−j}``; the
    buffer is divided by ``c_0`` and added to ``tensors``, and kept as the newest of the ``b − 1`` past
    noise buffers (the oldest one is reused for the next step: ``b − 1`` buffers of the tensors' size and
    dtype in all). With one coefficient (``b = 1``) the source adds its noise directly: DP-SGD bit for bit.

    One run is one stream: every call must pass tensors of the same shapes and dtypes and the same
    ``std`` (the strategy is for a fixed noise scale); anything else raises ``ValueError``.

    Args:
        noise: a source with ``add_normal_(tensors, std)`` (:class:`~lightning_dp.noise.GaussianNoise`,
            :class:`~lightning_dp.noise.SecureRNG`).
        coefficients: ``c_0 … c_{b-1}`` (``c_0 > 0``), e.g. from :func:`banded_toeplitz_coefficients`;
            divided by their norm here, so the strategy's column norm is 1 as the accounting assumes.

    **Checkpoints.** :meth:`state_dict` holds the past noise buffers: with them and the released model,
    the noise of past steps can be subtracted. Keep such checkpoints as private as the training data.
    """

    def __init__(self, noise: Any, coefficients: Sequence[float]) -> None:
        if not callable(getattr(noise, "add_normal_", None)):
            raise ValueError(f"`noise` must have add_normal_(tensors, std), got {type(noise).__name__}.")
        c = torch.as_tensor(coefficients, dtype=torch.float64).flatten()
        if c.numel() == 0 or not bool(torch.isfinite(c).all()) or float(c[0]) <= 0:
            raise ValueError(f"`coefficients` must be finite with coefficients[0] > 0, got {c.tolist()!r}.")
        self.noise = noise
        self.coefficients = c / c.norm()
        self._c: List[float] = self.coefficients.tolist()
        self.steps = 0
        self._history: List[List[torch.Tensor]] = []  # std·w_{t−1}, std·w_{t−2}, … (newest first)
        self._signature: Optional[List[tuple]] = None  # [(shape, dtype)] of the stream's tensors
        self._std: Optional[float] = None

    @property
    def bands(self) -> int:
        """``b``, the number of coefficients."""
        return len(self._c)

    @property
    def seeded(self) -> bool:
        """Whether the wrapped source is seeded (reproducible, not secure)."""
        return bool(getattr(self.noise, "seeded", False))

    def _check(self, tensors: List[torch.Tensor], std: float) -> None:
        signature = [(tuple(t.shape), t.dtype) for t in tensors]
        if self._signature is None:
            self._signature, self._std = signature, std
            return
        if signature != self._signature:
            raise ValueError(
                f"CorrelatedNoise adds one correlated stream to the same tensors every step, got shapes/dtypes "
                f"{signature} after {self._signature}. Use one CorrelatedNoise per optimizer and no other noise "
                "draw through it (adaptive clipping's count, for one, is refused with bands > 1)."
            )
        if not math.isclose(std, self._std, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(
                f"CorrelatedNoise needs the same `std` every step (σ·max_grad_norm/expected_batch_size fixed for "
                f"the run), got std={std!r} after std={self._std!r}."
            )

    @torch.no_grad()
    def add_normal_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        """Add step ``t``'s correlated noise ``std·w_t`` to ``tensors`` in place (see the class)."""
        tensors = list(tensors)
        std = float(std)
        self._check(tensors, std)
        c = self._c
        if len(c) == 1:
            self.noise.add_normal_(tensors, std)
            self.steps += 1
            return
        if self._history and self._history[0][0].device != tensors[0].device:  # resumed on another device
            self._history = [[h.to(t.device) for h, t in zip(past, tensors)] for past in self._history]
        if len(self._history) == len(c) - 1:
            buffers = self._history.pop()  # std·w_{t−b+1}: its last use, then it becomes std·w_t
            torch._foreach_mul_(buffers, -c[-1])
        else:
            buffers = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        for j, past in enumerate(self._history, start=1):
            torch._foreach_add_(buffers, past, alpha=-c[j])
        self.noise.add_normal_(buffers, std)
        torch._foreach_div_(buffers, c[0])
        torch._foreach_add_(tensors, buffers)
        self._history.insert(0, buffers)
        self.steps += 1

    def state_dict(self) -> Dict[str, Any]:
        """Steps taken, coefficients, ``std``, shapes, the past noise buffers (copies) and the wrapped
        source's own state (which never holds a key: see its ``state_dict``)."""
        inner = self.noise.state_dict() if hasattr(self.noise, "state_dict") else {}
        return {
            "steps": self.steps,
            "coefficients": list(self._c),
            "std": self._std,
            "signature": None if self._signature is None else [(list(s), str(d)) for s, d in self._signature],
            "history": [[h.clone() for h in past] for past in self._history],
            "noise": inner,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output: the next call continues the same noise stream."""
        if not isinstance(state, dict) or not {"steps", "coefficients", "history"} <= set(state):
            raise ValueError("state must come from CorrelatedNoise.state_dict() (keys steps, coefficients, history).")
        if len(state["coefficients"]) != len(self._c) or not np.allclose(state["coefficients"], self._c, rtol=1e-12):
            raise ValueError(f"state was written with coefficients {state['coefficients']!r}, these are {self._c!r}.")
        history = [[torch.as_tensor(h).clone() for h in past] for past in state["history"]]
        if len(history) > len(self._c) - 1:
            raise ValueError(f"state holds {len(history)} past buffers, at most {len(self._c) - 1} expected.")
        self.steps = check_int("state['steps']", state["steps"], 0)
        self._history = history
        self._std = None if state.get("std") is None else float(state["std"])
        signature = state.get("signature")
        self._signature = None if signature is None else [
            (tuple(s), getattr(torch, d.replace("torch.", ""))) for s, d in signature
        ]
        if hasattr(self.noise, "load_state_dict") and state.get("noise") is not None:
            self.noise.load_state_dict(state["noise"])

    def __repr__(self) -> str:
        return f"CorrelatedNoise(bands={self.bands}, steps={self.steps}, noise={self.noise!r})"


# ------------------------------------------------------------------------------------------ sampling
def draw_partition(generator: Any, num_samples: int, bands: int) -> torch.Tensor:
    """Each of ``num_samples`` examples' group, independent and uniform on ``0 … bands − 1`` (a CPU long
    tensor), from a ``torch.Generator`` or a source with ``uniform(shape)`` (:class:`~lightning_dp.noise.SecureRNG`)."""
    if hasattr(generator, "uniform"):
        u = generator.uniform((num_samples,)).to("cpu")
        return (u * bands).floor().long().clamp_(max=bands - 1)
    return torch.randint(bands, (num_samples,), generator=generator)


class CyclicGroups:
    """The cyclic half of cyclic Poisson sampling, for :class:`CyclicPoissonBatchSampler` and the Lightning
    strategy's sampler: the ``bands`` groups of a sampler's candidates (this rank's examples) from each
    example's group label, and the draw of step ``t``: each example of group ``t mod bands`` independently
    with probability ``bands·q``.

    Args:
        candidates: the example indices this sampler draws from (a long tensor).
        labels: every example's group, ``0 … bands − 1`` (indexed by example, not by candidate).
        bands: b, the number of groups.
    """

    def __init__(self, candidates: torch.Tensor, labels: torch.Tensor, bands: int) -> None:
        self.bands = bands
        self.groups = [candidates[labels[candidates] == g] for g in range(bands)]

    def draw(self, generator: Any, step: int, sample_rate: float) -> torch.Tensor:
        """Step ``step``'s batch at overall rate ``q = sample_rate`` (``b·q`` within the group, refused above 1)."""
        group = self.groups[step % self.bands]
        return group[poisson_mask(generator, len(group), bandmf_sample_rate(sample_rate, self.bands))]


class CyclicPoissonBatchSampler(PoissonBatchSampler):
    """Cyclic Poisson sampling for BandMF: the ``N`` examples are split once into ``bands`` groups, and
    step ``t`` includes each example of group ``t mod bands`` independently with probability
    ``p = bands·q``; the expected batch size stays ``q·N``.

    Each example's group is drawn independently and uniformly (from ``generator``, when the sampler is
    built), so adding or removing an example moves no other one: the add/remove neighbouring relation the
    accountants use (Choquette-Choo et al. 2023; JAX Privacy's ``PartitionType.INDEPENDENT``). Groups
    then hold about ``N/bands`` examples each and a step's batch size is Binomial(group size, ``p``). The
    step count carries over from one pass (epoch) to the next, so the cycle never restarts. With
    ``bands=1`` no partition is drawn and the batches are :class:`PoissonBatchSampler`'s, draw for draw.

    Args:
        num_samples: dataset size N.
        sample_rate: q, the overall rate (expected batch size ``q·N``); needs ``bands·q ≤ 1``.
        bands: b, the number of groups (the strategy's bands).
        num_batches: steps per pass (default ``round(1 / q)``).
        generator: a ``torch.Generator`` or an object with ``bernoulli(n, p)`` and ``uniform(shape)``
            (:class:`~lightning_dp.noise.SecureRNG`), for the partition and the inclusion draws.
        micro_batches: chunks per logical batch, as in :class:`PoissonBatchSampler`.

    Example::

        >>> sampler = CyclicPoissonBatchSampler(100, 0.1, bands=4, generator=torch.Generator().manual_seed(0))
        >>> sampler.inclusion_rate, len(sampler.groups)
        (0.4, 4)
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        bands: int,
        num_batches: Optional[int] = None,
        generator: Optional[Any] = None,
        *,
        micro_batches: int = 1,
    ) -> None:
        super().__init__(num_samples, sample_rate, num_batches, generator, micro_batches=micro_batches)
        self.bands = check_positive_int("bands", bands)
        self.inclusion_rate = check_rate("inclusion rate", bandmf_sample_rate(sample_rate, self.bands))
        self.step = 0
        self.labels = self._partition()
        self._cyclic = CyclicGroups(self._candidates, self.labels, self.bands)

    @property
    def groups(self) -> List[torch.Tensor]:
        """The examples of each group, in index order."""
        return self._cyclic.groups

    def _partition(self) -> torch.Tensor:
        """Each example's group, uniform on ``0 … bands − 1`` (all zeros, no draw, for one band)."""
        if self.bands == 1:
            return torch.zeros(self.num_samples, dtype=torch.long)
        return draw_partition(self.generator, self.num_samples, self.bands)

    def _draw(self) -> torch.Tensor:
        indices = self._cyclic.draw(self.generator, self.step, self.sample_rate)
        self.step += 1
        return indices

    def state_dict(self) -> Dict[str, Any]:
        """The step count and the partition (each example's group), to resume the cycle."""
        return {"step": self.step, "bands": self.bands, "labels": self.labels.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output (same dataset size and number of bands)."""
        labels = torch.as_tensor(state["labels"], dtype=torch.long)
        if state.get("bands") != self.bands or labels.shape != (self.num_samples,):
            raise ValueError(f"state is for bands={state.get('bands')!r} and {labels.numel()} examples, "
                             f"this sampler has bands={self.bands} and {self.num_samples}.")
        self.step = check_int("state['step']", state["step"], 0)
        self.labels = labels.clone()
        self._cyclic = CyclicGroups(self._candidates, self.labels, self.bands)
