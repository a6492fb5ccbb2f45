"""Fast, reproducible Gaussian noise from ``torch.Generator`` (not cryptographically secure).

A Mersenne Twister / Philox stream can be predicted from its outputs, and the privacy guarantee assumes
noise an adversary cannot predict: use :class:`~lightning_dp.noise.SecureRNG` when it matters.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional

import torch


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def _generator_seed(seed: int) -> int:
    """A 64-bit generator seed that depends on every bit of ``seed``.

    torch's CPU Mersenne Twister keeps only the low 32 bits of ``manual_seed``: seeds that differ only in
    their high bits would otherwise give the same noise.
    """
    digest = hashlib.sha256(f"lightning_dp.GaussianNoise:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class GaussianNoise:
    """Gaussian noise from a seeded ``torch.Generator`` (one per device); fast and reproducible, **not**
    cryptographically secure.

    Args:
        seed: integer seed for reproducible runs; ``None`` draws one from the OS.

    Example::

        >>> noise = GaussianNoise(seed=0)
        >>> noise.normal((3,), std=2.0).shape
        torch.Size([3])
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.seeded = seed is not None
        self.seed = _random_seed() if seed is None else seed
        self._generators: Dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(_generator_seed(self.seed))
            self._generators[key] = generator
        return self._generators[key]

    def normal(
        self,
        shape: torch.Size | tuple,
        std: float,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """A tensor of i.i.d. ``N(0, std²)`` draws (written into ``out`` when given, else a new tensor)."""
        device = torch.device(device)
        if out is None:
            out = torch.empty(shape, device=device, dtype=dtype)
        if std == 0:
            return out.zero_()
        return out.normal_(mean=0.0, std=std, generator=self._generator(out.device))

    def state_dict(self) -> Dict[str, Any]:
        """Seed and generator states when the user seeded the generator (reproducible mode), else ``{}``.

        An OS-drawn seed is never written out: with it and the checkpoints, anyone could regenerate the
        noise and subtract it. A resumed unseeded run draws a fresh seed instead.
        """
        if not self.seeded:
            return {}
        return {"seed": self.seed, "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty state keeps the current OS-drawn seed)."""
        if not state:
            return
        self.seeded = True
        self.seed = int(state["seed"])
        self._generators = {}
        for key, generator_state in state.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(generator_state)


__all__ = ["GaussianNoise"]
