"""Keystream bytes out of an OpenSSL counter-mode context: encrypt zeros into the caller's buffer.

A counter-mode (or stream) cipher's encryption of zeros is its keystream. ``update_into(data, buf)`` writes
it straight into ``buf`` with no copy, but ``data`` and ``buf`` must be different memory: ``cryptography``
51 refuses overlapping buffers (``ValueError: data and buf must not overlap``), and earlier releases only
allowed it by accident. The zeros come from one read-only buffer per size, allocated once and never
written, so the hot path neither zero-fills the output nor copies it.
"""
from __future__ import annotations

import functools
from typing import Any

ZERO_CHUNK_BYTES = 1 << 20  # the zeros one update_into call reads at most (1 MiB: cache-sized, allocated once)


@functools.lru_cache(maxsize=4)
def zero_bytes(num_bytes: int) -> memoryview:
    """``num_bytes`` zero bytes, read-only (``bytes``), allocated once per size: the plaintext whose
    counter-mode encryption is the keystream. Slice it for shorter reads."""
    return memoryview(bytes(num_bytes))


def encrypt_zeros_into(encryptor: Any, out: Any) -> None:
    """Fill ``out`` (a writable uint8 buffer: numpy array, ``bytearray``, memoryview) with the next
    ``len(out)`` keystream bytes of ``encryptor``, a ``cryptography`` CipherContext in a stream mode.

    Reads the zeros in chunks of at most :data:`ZERO_CHUNK_BYTES`, so any size costs one MiB of zeros.
    """
    view = memoryview(out).cast("B")
    total = view.nbytes
    zeros = zero_bytes(ZERO_CHUNK_BYTES)
    for start in range(0, total, ZERO_CHUNK_BYTES):
        stop = min(start + ZERO_CHUNK_BYTES, total)
        written = encryptor.update_into(zeros[: stop - start], view[start:stop])
        if written != stop - start:  # a stream mode writes what it reads; anything else is a misuse
            raise RuntimeError(f"the cipher wrote {written} of {stop - start} keystream bytes")


__all__ = ["ZERO_CHUNK_BYTES", "encrypt_zeros_into", "zero_bytes"]
