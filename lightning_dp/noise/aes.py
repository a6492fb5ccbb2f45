"""The AES-256-CTR keystream (NIST SP 800-38A) from OpenSSL, through ``cryptography``: the CPU cipher of
:class:`~lightning_dp.noise.SecureRNG` on processors with AES instructions.

Why a second cipher: on a CPU with AES instructions (x86 AES-NI/VAES, ARMv8 AES) OpenSSL's AES-CTR is
faster than its ChaCha20 (7.7 against 5.0 GB/s per core on the development machine, where the keystream
was half of the secure noise's time), and constant-time; without them ChaCha20 is both faster and the
constant-time choice. This is the rule TLS libraries follow when they pick a cipher suite. Nothing here
is our own cryptography: the bytes are OpenSSL's, checked against SP 800-38A's published vectors in
``tests/test_noise_aes.py``.

The counter block of a draw is its 8-byte nonce followed by a 64-bit big-endian block counter from 0.
"""
from __future__ import annotations

import functools
import platform
from typing import Any, Union

import torch

from .._checks import check_int
from ._zero_stream import encrypt_zeros_into

KEY_BYTES = 32
NONCE_BYTES = 8
BLOCK_BYTES = 16

DeviceLike = Union[torch.device, str, None]


@functools.lru_cache(maxsize=1)
def cpu_has_aes() -> bool:
    """Whether the CPU has AES instructions (read from ``/proc/cpuinfo``; ``False`` where it cannot tell)."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip().lower() in ("flags", "features"):  # x86 "flags", ARM "Features"
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def aes_encryptor(key: bytes, nonce: bytes, counter: int = 0) -> Any:
    """An OpenSSL AES-256-CTR context positioned at block ``counter`` of the draw ``(key, nonce)``;
    encrypting zeros with it yields the keystream."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError(f"AES-256-CTR takes a {KEY_BYTES}-byte key and an {NONCE_BYTES}-byte nonce, "
                         f"got {len(key)} and {len(nonce)} bytes.")
    counter = check_int("counter", counter, 0)
    if counter >= 1 << 64:
        raise ValueError(f"`counter` must be below 2**64 (the block counter's 64 bits), got {counter}.")
    return Cipher(algorithms.AES(key), modes.CTR(nonce + counter.to_bytes(8, "big"))).encryptor()


def aes256_ctr_keystream(
    key: bytes, nonce: bytes, counter: int, num_bytes: int, device: DeviceLike = None
) -> torch.Tensor:
    """``num_bytes`` bytes of the AES-256-CTR keystream of ``(key, nonce)`` from block ``counter``, as a
    ``uint8`` tensor on ``device`` (computed on the CPU by OpenSSL, then copied there)."""
    num_bytes = check_int("num_bytes", num_bytes, 0)
    out = torch.empty(num_bytes, dtype=torch.uint8)
    if num_bytes:
        encrypt_zeros_into(aes_encryptor(key, nonce, counter), out.numpy())
    device = torch.device(device) if device is not None else torch.device("cpu")
    return out if device.type == "cpu" else out.to(device)


__all__ = ["aes256_ctr_keystream", "cpu_has_aes"]
