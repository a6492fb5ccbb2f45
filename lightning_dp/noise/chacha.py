"""The ChaCha20 keystream of RFC 8439 as a ``uint8`` tensor, from OpenSSL or from tensor ops.

Two backends give the same bytes for the same ``(key, nonce, counter)``:

- ``"openssl"``: OpenSSL's ChaCha20 through the ``cryptography`` package (vetted, maintained, a few
  GB/s per core with AVX2/AVX-512). The keystream is computed on the CPU.
- ``"torch"``: the block function written as vectorised tensor ops (uint32 arithmetic emulated on
  ``int64`` tensors: add then mask, rotate = two shifts, xor), so the keystream is computed on the
  device that asks for it (CUDA or CPU) with nothing compiled at install time. It is trusted only
  because it reproduces OpenSSL's bytes and RFC 8439's published vectors in ``tests/test_noise_chacha.py``.

RFC 8439 fixes the block counter at 32 bits; a request that would run past block ``2**32 - 1`` is
refused (OpenSSL would silently carry into the nonce, which is a different stream).
"""
from __future__ import annotations

from typing import List, Union

import torch

from .._checks import check_choice, check_int
from ._zero_stream import encrypt_zeros_into

BACKENDS = ("auto", "openssl", "torch")
KEY_BYTES = 32
NONCE_BYTES = 12
BLOCK_BYTES = 64
MAX_BLOCKS = 1 << 32  # the 32-bit block counter of RFC 8439
_MASK32 = 0xFFFFFFFF
_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_TORCH_BATCH_BLOCKS = 1 << 18  # blocks per tensor pass (bounds the working memory to ~100 MB)

DeviceLike = Union[torch.device, str, None]


def _check_bytes(name: str, value: object, length: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != length:
        shown = f"{type(value).__name__} of length {len(value)}" if hasattr(value, "__len__") else repr(value)
        raise ValueError(f"`{name}` must be {length} bytes, got {shown}.")
    return bytes(value)


def _check_counter_range(counter: object, num_bytes: object) -> tuple:
    counter = check_int("counter", counter, 0)
    num_bytes = check_int("num_bytes", num_bytes, 0)
    blocks = -(-num_bytes // BLOCK_BYTES)
    if counter >= MAX_BLOCKS or counter + blocks > MAX_BLOCKS:
        raise ValueError(
            f"ChaCha20's block counter is 32 bits (RFC 8439): counter={counter} plus {blocks} block(s) for "
            f"num_bytes={num_bytes} would pass block {MAX_BLOCKS - 1}. Use a fresh nonce for more keystream."
        )
    return counter, num_bytes


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` → ``"openssl"`` on CPU, ``"torch"`` on any other device."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "openssl" if device.type == "cpu" else "torch"
    return backend


def openssl_encryptor(key: bytes, nonce: bytes, counter: int = 0):  # type: ignore[no-untyped-def]
    """An OpenSSL ChaCha20 context positioned at block ``counter``.

    ``cryptography`` takes a 16-byte nonce: the 4-byte little-endian block counter, then RFC 8439's
    12-byte nonce. Encrypting zeros with it yields the keystream.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    return Cipher(algorithms.ChaCha20(key, counter.to_bytes(4, "little") + nonce), mode=None).encryptor()


def _keystream_openssl(key: bytes, nonce: bytes, counter: int, num_bytes: int) -> torch.Tensor:
    out = torch.empty(num_bytes, dtype=torch.uint8)
    if num_bytes:
        encrypt_zeros_into(openssl_encryptor(key, nonce, counter), out.numpy())
    return out


def _words_le(data: bytes) -> List[int]:
    return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)]


def _rotl(v: torch.Tensor, r: int) -> torch.Tensor:
    return ((v << r) & _MASK32) | (v >> (32 - r))


def _quarter_rounds(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> tuple:
    """RFC 8439 §2.1 on four quarter-rounds at once: rows ``i`` of ``a, b, c, d`` are one quarter-round."""
    a = (a + b) & _MASK32
    d = _rotl(d ^ a, 16)
    c = (c + d) & _MASK32
    b = _rotl(b ^ c, 12)
    a = (a + b) & _MASK32
    d = _rotl(d ^ a, 8)
    c = (c + d) & _MASK32
    b = _rotl(b ^ c, 7)
    return a, b, c, d


def _blocks_torch(
    key_words: List[int], nonce_words: List[int], counter: int, blocks: int, device: torch.device
) -> torch.Tensor:
    """RFC 8439 §2.3: ``blocks`` consecutive 64-byte blocks from ``counter``, as ``uint8`` of ``64 * blocks``."""
    fixed = torch.tensor(list(_CONSTANTS) + key_words + [0] + nonce_words, dtype=torch.int64, device=device)
    state = fixed.unsqueeze(1).repeat(1, blocks)  # (16, blocks): one column per block
    state[12] = torch.arange(counter, counter + blocks, dtype=torch.int64, device=device)
    a, b, c, d = state[0:4], state[4:8], state[8:12], state[12:16]
    for _ in range(10):  # 20 rounds = 10 × (column round, diagonal round)
        a, b, c, d = _quarter_rounds(a, b, c, d)
        # Diagonal round: rotate rows so (0,5,10,15), (1,6,11,12), ... line up as columns, then back.
        a, b, c, d = _quarter_rounds(a, b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0))
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    words = (torch.cat([a, b, c, d]) + state) & _MASK32  # (16, blocks)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
    little_endian = (words.t().unsqueeze(-1) >> shifts) & 0xFF  # (blocks, 16, 4)
    return little_endian.to(torch.uint8).reshape(-1)


def _keystream_torch(key: bytes, nonce: bytes, counter: int, num_bytes: int, device: torch.device) -> torch.Tensor:
    blocks = -(-num_bytes // BLOCK_BYTES)
    key_words, nonce_words = _words_le(key), _words_le(nonce)
    parts = [
        _blocks_torch(key_words, nonce_words, counter + start, min(_TORCH_BATCH_BLOCKS, blocks - start), device)
        for start in range(0, blocks, _TORCH_BATCH_BLOCKS)
    ]
    if not parts:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(parts)[:num_bytes] if len(parts) > 1 else parts[0][:num_bytes]


def chacha20_keystream(
    key: bytes,
    nonce: bytes,
    counter: int,
    num_bytes: int,
    device: DeviceLike = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``num_bytes`` bytes of the RFC 8439 ChaCha20 keystream, starting at block ``counter``.

    Args:
        key: 32-byte key.
        nonce: 12-byte nonce (RFC 8439 §2.3). Never use a ``(key, nonce, counter)`` twice for secrets.
        counter: 32-bit block counter of the first block; each 64-byte block increments it.
        num_bytes: number of keystream bytes (the last block is truncated).
        device: where the returned tensor lives (default CPU).
        backend: ``"openssl"`` (through ``cryptography``, computed on the CPU), ``"torch"`` (tensor ops on
            ``device``) or ``"auto"`` (OpenSSL on CPU, tensor ops elsewhere). Both give the same bytes.

    Returns:
        A ``uint8`` tensor of shape ``(num_bytes,)`` on ``device``.

    Raises:
        ValueError: wrong key/nonce length, negative counter or size, unknown backend, or a request
            that would pass block ``2**32 - 1`` (the counter would wrap).

    Example::

        >>> ks = chacha20_keystream(bytes(32), bytes(12), counter=0, num_bytes=4)
        >>> ks.tolist()  # RFC 8439 A.1, test vector #1
        [118, 184, 224, 173]
    """
    key = _check_bytes("key", key, KEY_BYTES)
    nonce = _check_bytes("nonce", nonce, NONCE_BYTES)
    counter, num_bytes = _check_counter_range(counter, num_bytes)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if resolve_backend(backend, device) == "openssl":
        out = _keystream_openssl(key, nonce, counter, num_bytes)
        return out if device.type == "cpu" else out.to(device)
    return _keystream_torch(key, nonce, counter, num_bytes, device)


__all__ = ["chacha20_keystream"]
