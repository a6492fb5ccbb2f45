"""Quantile-based adaptive clipping (Andrew et al. 2021): :class:`AdaptiveClipping`, the rule and the
release of its noised count, for :class:`~lightning_dp.DPOptimizer` ``(adaptive_clipping=...)``."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch

from .noise.adding import add_noise_

__all__ = ["AdaptiveClipping"]


class AdaptiveClipping:
    """Quantile-based adaptive clipping norm (Andrew et al. 2021, "Differentially Private Learning with
    Adaptive Clipping", NeurIPS), for :class:`~lightning_dp.DPOptimizer` ``(adaptive_clipping=...)``.

    After each step the clipping norm follows a private estimate of the ``target_quantile`` of the
    per-sample gradient norms by the geometric update ``C ← C · exp(−η (b̃ − γ))``, where
    ``b̃ = (Σ_b (1[‖g_b‖ ≤ C] − ½) + N(0, σ_b²)) / B + ½`` is the noised fraction of samples that were not
    clipped (``B`` the expected batch size, ``γ`` the target quantile, ``η`` the learning rate). The
    centred indicators ``± ½`` make the count's sensitivity ½, so the count is a Gaussian mechanism of
    noise multiplier ``2σ_b`` on the same Poisson sample as the gradient.

    **Privacy, exactly.** The gradient (multiplier ``σ_Δ``) and the count (``2σ_b``) of one step are one
    Gaussian mechanism on the concatenated query, of multiplier ``σ`` with ``σ⁻² = σ_Δ⁻² + (2σ_b)⁻²``
    (Theorem 1 of the paper). So the optimizer keeps the accountant's record at ``σ = noise_multiplier``
    (calibrated or given as usual: the whole step costs what DP-SGD with ``σ`` costs) and noises the
    gradient with the larger ``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½)`` (:meth:`gradient_noise_multiplier`); this
    needs ``2σ_b > σ``. The paper's default ``σ_b = B/20`` makes ``σ_Δ`` only a little above ``σ``.

    Args:
        target_quantile: ``γ`` in ``[0, 1]``, the fraction of samples meant to be left unclipped.
        learning_rate: ``η > 0`` of the geometric update.
        count_noise_multiplier: ``σ_b > 0``, std of the noise on the count; ``None``: ``B/20``.
    """

    def __init__(
        self, target_quantile: float = 0.5, learning_rate: float = 0.2, count_noise_multiplier: Optional[float] = None
    ) -> None:
        if isinstance(target_quantile, bool) or not isinstance(target_quantile, (int, float)) or not (
            0.0 <= target_quantile <= 1.0
        ):
            raise ValueError(
                f"`target_quantile` of adaptive clipping must be a number in [0, 1], got {target_quantile!r}."
            )
        for name, value in (("learning_rate", learning_rate), ("count_noise_multiplier", count_noise_multiplier)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            ):
                raise ValueError(f"`{name}` of adaptive clipping must be a finite number > 0, got {value!r}.")
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_multiplier = None if count_noise_multiplier is None else float(count_noise_multiplier)

    @classmethod
    def from_config(cls, value: "AdaptiveClipping | Dict[str, float] | None") -> "Optional[AdaptiveClipping]":
        """``None``, an :class:`AdaptiveClipping`, or a dict of its arguments (as ``DPConfig`` holds it)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"`adaptive_clipping` must be None, a dict or an AdaptiveClipping, got {value!r}.")
        unknown = sorted(set(value) - {"target_quantile", "learning_rate", "count_noise_multiplier"})
        if unknown:
            raise ValueError(
                f"`adaptive_clipping` has unknown keys {unknown}; allowed: target_quantile, learning_rate, "
                "count_noise_multiplier."
            )
        return cls(**value)

    def count_std(self, expected_batch_size: float) -> float:
        """``σ_b``: the given one, or ``B/20``."""
        return self.count_noise_multiplier if self.count_noise_multiplier is not None else expected_batch_size / 20.0

    def gradient_noise_multiplier(self, noise_multiplier: float, expected_batch_size: float) -> float:
        """``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½)``: the gradient's noise multiplier that makes gradient and count
        together cost exactly what one Gaussian step of multiplier ``σ`` costs (``0`` stays ``0``)."""
        if noise_multiplier == 0:
            return 0.0
        count = 2.0 * self.count_std(expected_batch_size)
        if count <= noise_multiplier:
            raise ValueError(
                f"Adaptive clipping needs 2·count_noise_multiplier > noise_multiplier, got 2·{count / 2} <= "
                f"{noise_multiplier}: raise count_noise_multiplier (default expected_batch_size/20)."
            )
        return (noise_multiplier ** -2 - count ** -2) ** -0.5

    def next_norm(self, max_grad_norm: float, noised_centred_count: float, expected_batch_size: float) -> float:
        """``C · exp(−η (b̃ − γ))`` with ``b̃ = noised_centred_count / B + ½``."""
        unclipped = noised_centred_count / expected_batch_size + 0.5
        return max_grad_norm * math.exp(-self.learning_rate * (unclipped - self.target_quantile))

    def centred_count(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """``Σ_b (1[‖g_b‖ ≤ C] − ½)`` of one micro-batch's norms (a NaN norm counts −½), on their device."""
        return (norms <= max_grad_norm).sum(dtype=torch.float64) - 0.5 * norms.numel()

    def noised_count(self, count: "float | torch.Tensor", *, device: Any, noise: Any, noise_multiplier: float,
                     noise_shares: int, expected_batch_size: float,
                     combine: Callable[[List[torch.Tensor]], None]) -> torch.Tensor:
        """A step's centred ``count`` released with ``N(0, σ_b²)`` (shared over ``noise_shares`` ranks like the
        gradient noise, summed by ``combine``), as a 1-element tensor on ``device`` (no host sync here)."""
        released = torch.as_tensor(count, dtype=torch.float64, device=device).reshape(1).clone()
        if noise_multiplier > 0:
            add_noise_(noise, [released], self.count_std(expected_batch_size) / math.sqrt(noise_shares))
        combine([released])
        return released

    def __repr__(self) -> str:
        return (
            f"AdaptiveClipping(target_quantile={self.target_quantile}, learning_rate={self.learning_rate}, "
            f"count_noise_multiplier={self.count_noise_multiplier})"
        )
