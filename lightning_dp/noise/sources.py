"""The noise sources a run draws from: :func:`make_noise` (secure or seeded), the one warning of zero noise,
and :class:`NoNoise` (BandMF's ranks other than 0)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch

from .gaussian import GaussianNoise
from .secure import SecureRNG

__all__ = ["NoNoise", "make_noise", "warn_if_no_noise"]

_warned_not_secure = False


def make_noise(secure_mode: bool, seed: Optional[int]) -> "GaussianNoise | SecureRNG":
    """The noise source for ``secure_mode``: :class:`SecureRNG` (ChaCha20, keyed from the OS) or the
    seeded, fast, **not** secure :class:`GaussianNoise` (warned once per process)."""
    global _warned_not_secure
    if secure_mode:
        return SecureRNG()
    if not _warned_not_secure:
        _warned_not_secure = True
        warnings.warn(
            "secure_mode=False: noise and sampling come from fast, reproducible seeded generators that are "
            "not secret (the seed regenerates the noise); the privacy guarantee assumes an unpredictable "
            "generator. Use secure_mode=True for a run whose guarantee matters.",
            UserWarning,
            stacklevel=4,
        )
    return GaussianNoise(seed)


def warn_if_no_noise(noise_multiplier: float) -> None:
    """The one warning a zero noise multiplier gets: the run has no privacy at all."""
    if noise_multiplier == 0:
        warnings.warn(
            "noise_multiplier=0: no noise is added, so the training is NOT private (ε is infinite). "
            "Use this only for tests and debugging.",
            UserWarning,
            stacklevel=4,
        )


class NoNoise:
    """The noise source of ranks other than 0 under BandMF: rank 0 adds the whole correlated noise."""

    seeded = False

    def add_normal_(self, tensors: List[torch.Tensor], std: float) -> None:
        """Add nothing."""

    def state_dict(self) -> Dict[str, Any]:
        """Nothing to keep."""
        return {}
