"""Pairwise masks of secure aggregation: X25519 key agreement, masks expanded with ChaCha20.

Every rank ``i`` draws an ephemeral X25519 key pair (from the OS, through ``cryptography``) when the
aggregator is set up and publishes its public key (``all_gather_object``). For every other rank ``j`` it
computes the shared secret ``X25519(sk_i, pk_j)`` (the same on both sides) and derives the pair's mask key
with HKDF-SHA256 (salt: both public keys, in rank order; info: a label and the two ranks). At step ``s``
the pair's mask is the ChaCha20 keystream (:func:`lightning_dp.noise.chacha20_keystream`) under that key
with nonce ``s`` (12 bytes, little-endian) read as 64-bit words, modulo ``2^b``: rank ``min(i, j)`` adds it,
rank ``max(i, j)`` subtracts it, so the masks cancel in the sum of all ranks, exactly, modulo ``2^b``.

A rank's masked vector is uniform modulo ``2^b`` to anyone without one of its pair keys (one uniform mask
suffices), so a peer sees nothing of another rank's contribution except what the sum reveals.

Key material (private key, shared secrets, pair keys) lives in process memory only: it is never pickled
(a copy has no keys and refuses to mask), never returned by a state dict, never logged. Keys are fresh for
every set-up (every ``fit``), so the step nonce never repeats under one key. Dropouts (a rank that stops
mid-step) are not handled: the sum is then garbage and training must restart; nothing of a rank's
contribution is revealed by it.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .._checks import check_int
from ..noise import chacha20_keystream

__all__ = ["PairwiseMasks"]

_LABEL = b"lightning_dp.secure_aggregation/pairwise-mask/v1"
_MAX_STEPS = 1 << 96  # the 12-byte nonce


class PairwiseMasks:
    """One rank's side of the pairwise masks.

    Args:
        rank: this rank, in ``0 .. world_size - 1``.
        world_size: the number of ranks W.
        private_key: the 32 raw bytes of an X25519 private key (tests only); default: fresh from the OS.

    Example (three ranks in one process)::

        >>> ranks = [PairwiseMasks(r, 3) for r in range(3)]
        >>> keys = [m.public_key for m in ranks]
        >>> for m in ranks:
        ...     m.agree(keys)
        >>> total = sum(m.mask(step=0, numel=5, bits=16) for m in ranks) % 2**16
        >>> total.tolist()
        [0, 0, 0, 0, 0]
    """

    def __init__(self, rank: int, world_size: int, private_key: Optional[bytes] = None) -> None:
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"`rank` must be below world_size={world_size}, got {rank}.")
        secret = X25519PrivateKey.generate() if private_key is None else X25519PrivateKey.from_private_bytes(private_key)
        self._private: Optional[X25519PrivateKey] = secret
        self.public_key: bytes = secret.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._pair_keys: Optional[Dict[int, bytes]] = None

    @property
    def ready(self) -> bool:
        """Whether :meth:`agree` has derived the pair keys (and this object still holds them)."""
        return self._pair_keys is not None

    def agree(self, public_keys: Sequence[bytes]) -> None:
        """Derive the pair keys from every rank's public key (``public_keys[r]`` is rank ``r``'s), then drop
        the private key: it is needed for nothing else."""
        if len(public_keys) != self.world_size or bytes(public_keys[self.rank]) != self.public_key:
            raise ValueError(
                f"`public_keys` must hold the {self.world_size} ranks' public keys in rank order, this rank's "
                f"at index {self.rank}; got {len(public_keys)} key(s)."
            )
        if self._private is None:
            raise RuntimeError("The pair keys were already agreed: set up a new PairwiseMasks for new keys.")
        keys: Dict[int, bytes] = {}
        for other, public in enumerate(public_keys):
            if other == self.rank:
                continue
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(bytes(public)))
            low, high = sorted((self.rank, other))
            salt = bytes(public_keys[low]) + bytes(public_keys[high])
            info = _LABEL + low.to_bytes(4, "little") + high.to_bytes(4, "little")
            keys[other] = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)
        self._pair_keys = keys
        self._private = None

    def pair_mask(self, other: int, step: int, numel: int, bits: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """The mask this rank shares with rank ``other`` at ``step``: ``numel`` int64 values in ``[0, 2^bits)``
        (ChaCha20 keystream words, 32-bit for ``bits <= 32`` and 64-bit above, modulo ``2^bits``). Both ranks
        of the pair compute the same values."""
        if bits <= 32:  # 32-bit keystream words suffice: half the keystream
            return self.keystream32(other, step, numel, device).to(torch.int64).bitwise_and_((1 << bits) - 1)
        words = self._keystream(other, step, 8 * numel, device).view(torch.int64)
        return words.bitwise_and_((1 << bits) - 1)

    def keystream32(self, other: int, step: int, numel: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """The pair's raw 32-bit keystream words at ``step`` (``numel`` of them, int32): for ``bits <= 32``,
        :meth:`pair_mask` is these words modulo ``2^bits`` (the aggregator's kernel reduces them itself)."""
        return self._keystream(other, step, 4 * numel, device).view(torch.int32)

    def _keystream(self, other: int, step: int, num_bytes: int, device: torch.device) -> torch.Tensor:
        """``num_bytes`` of the pair's ChaCha20 keystream at ``step`` (the nonce), from block 0."""
        if self._pair_keys is None:
            raise RuntimeError(
                "PairwiseMasks has no pair keys: call agree() with every rank's public key first (a pickled "
                "copy never carries keys)."
            )
        step = check_int("step", step, 0)
        if step >= _MAX_STEPS:
            raise ValueError(f"`step` must be below 2**96 (the nonce), got {step}.")
        return chacha20_keystream(self._pair_keys[other], step.to_bytes(12, "little"), 0, num_bytes, device=device)

    def mask(self, step: int, numel: int, bits: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """This rank's total mask at ``step`` modulo ``2^bits``: ``Σ_{j > i} m_ij − Σ_{j < i} m_ji``, as int64
        values in ``[0, 2^bits)``. The masks of all ranks sum to 0 modulo ``2^bits``."""
        return self.signed_mask(step, numel, bits, device).bitwise_and_((1 << bits) - 1)

    def signed_mask(self, step: int, numel: int, bits: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """:meth:`mask` before its last reduction: int64 values congruent to it modulo ``2^bits``, of absolute
        value below ``(W − 1)·2^bits`` (no overflow while ``W·2^bits < 2^63``). One pass fewer than
        :meth:`mask` for a caller that reduces anyway (the aggregator's native ``encode_``)."""
        bits = check_int("bits", bits, 1)
        total: Optional[torch.Tensor] = None
        for other in range(self.world_size):
            if other == self.rank:
                continue
            piece = self.pair_mask(other, step, numel, bits, device)
            if other < self.rank:
                piece.neg_()
            total = piece if total is None else total.add_(piece)
        return total if total is not None else torch.zeros(numel, dtype=torch.int64, device=device)

    def __getstate__(self) -> Dict[str, object]:
        # Never pickle key material (deepcopy, spawn, a checkpoint holding the strategy): a copy cannot mask.
        return {"world_size": self.world_size, "rank": self.rank, "public_key": self.public_key,
                "_private": None, "_pair_keys": None}

    def __repr__(self) -> str:
        return f"PairwiseMasks(rank={self.rank}, world_size={self.world_size}, ready={self.ready})"

