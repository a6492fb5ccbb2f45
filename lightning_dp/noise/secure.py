"""A cryptographically secure generator for DP noise and Poisson sampling, built on ChaCha20.

Keystream → 64-bit words → uniforms → Gaussians (Box–Muller, summed) or Bernoullis (exact threshold).
The keystream is OpenSSL's on CPU and the tensor implementation on CUDA (see :mod:`.chacha`), so noise is
generated on the device where the gradients live.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import check_choice, check_int, check_non_negative, check_rate
from .chacha import (
    BACKENDS,
    BLOCK_BYTES,
    MAX_BLOCKS,
    chacha20_keystream,
    openssl_encryptor,
    resolve_backend,
)

DeviceLike = Union[torch.device, str]
ShapeLike = Union[torch.Size, Sequence[int], int]

# Uniforms: 52 random bits of a 64-bit word become the mantissa of x in [1, 2); x - (1 - 2**-53) is then
# exactly (2j + 1) * 2**-53, j in [0, 2**52): the midpoints of a 2**-52 grid, never 0 nor 1.
_MANTISSA = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000  # bit pattern of the double 1.0
_TO_MIDPOINT = 1.0 - 2.0**-53
# Box–Muller pairs per chunk (the stream's layout unit): a multiple of 4 (so every chunk starts at a
# 64-byte block boundary) with 2·k·pairs < _CHUNK_WORDS words, about 1 MiB of keystream: cache-sized.
_CHUNK_WORDS = 1 << 17
_CPU_WORKERS: Optional[int] = None  # threads for CPU normals (None: torch.get_num_threads())


def _pairs_per_chunk(k: int) -> int:
    return max(4, 4 * ((_CHUNK_WORDS // (2 * k) - 1) // 4))
_MAX_BYTES_PER_CALL = MAX_BLOCKS * BLOCK_BYTES
_KEY_DOMAIN = b"lightning_dp.SecureRNG/v1\x00"


def _shape_of(shape: ShapeLike) -> torch.Size:
    return torch.Size((shape,) if isinstance(shape, int) else tuple(shape))


def _uniform_from_words_(words: torch.Tensor) -> torch.Tensor:
    """In place: int64 words → float64 uniforms ``(2j + 1)·2⁻⁵³`` in (0, 1); returns the float64 view."""
    return words.bitwise_and_(_MANTISSA).bitwise_or_(_ONE_BITS).view(torch.float64).sub_(_TO_MIDPOINT)


def _box_muller_sum_(words: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Gaussians from ``words`` of shape ``(C, 2, k, s)`` (destroyed) into ``out`` of shape ``(C, 2, s)``.

    For each of the ``C·s`` pairs, ``k`` independent Box–Muller pairs ``r_i (cos θ_i, sin θ_i)`` with
    ``r_i = sqrt(-2 ln u_i)`` and ``θ_i = 2π v_i`` (``u_i = words[:, 0, i]``, ``v_i = words[:, 1, i]``) are
    summed and scaled by ``scale / sqrt(k)``: ``out[:, 0]`` gets the cosine sums, ``out[:, 1]`` the sine sums.
    All arithmetic is float64; ``out`` (any floating dtype) is rounded once at the end.
    """
    uniforms = _uniform_from_words_(words)
    k = words.shape[2]
    radius, angle = uniforms[:, 0], uniforms[:, 1]  # (C, k, s) views
    radius.log_().mul_(-2.0).sqrt_().mul_(scale / math.sqrt(k))
    angle.mul_(2.0 * math.pi)
    for part, trig in ((0, torch.cos), (1, torch.sin)):
        terms = trig(angle).mul_(radius)
        if k == 2:
            torch.add(terms[:, 0], terms[:, 1], out=out[:, part])
        else:
            total = terms[:, 0].clone()
            for i in range(1, k):
                total.add_(terms[:, i])
            out[:, part].copy_(total)


def _binary_words(p: float) -> List[int]:
    """The exact binary expansion of ``p`` in [0, 1), as 64-bit words (most significant first)."""
    frac = Fraction(p)
    exponent = frac.denominator.bit_length() - 1  # p = numerator / 2**exponent (a double is dyadic)
    num_words = max(1, -(-exponent // 64))
    scaled = frac.numerator << (64 * num_words - exponent)
    return [(scaled >> (64 * (num_words - 1 - i))) & ((1 << 64) - 1) for i in range(num_words)]


def bernoulli_from_words(
    words: torch.Tensor, p: float, more_words: Callable[[int], torch.Tensor]
) -> torch.Tensor:
    """``U < p`` for uniforms ``U = 0.w₀w₁w₂…`` (binary) whose first 64 bits are ``words`` (int64).

    Compares ``U`` with the exact binary expansion of ``p`` word by word; only where the first word ties
    (probability ``2⁻⁶⁴`` each) are more words drawn with ``more_words(count)``. So ``P(True) = p`` exactly
    for every double ``p`` in [0, 1], not up to a 2⁻⁵³ rounding.
    """
    result = torch.zeros(words.shape, dtype=torch.bool, device=words.device)
    if p <= 0.0:
        return result
    if p >= 1.0:
        return result.fill_(True)
    sign = -(1 << 63)  # x ^ sign maps unsigned 64-bit order onto signed int64 order
    undecided = torch.arange(words.numel(), device=words.device)
    current = words.reshape(-1)
    p_words = _binary_words(p)
    for index, p_word in enumerate(p_words):
        flipped = current ^ sign
        threshold = p_word - (1 << 63)
        result.view(-1)[undecided[flipped < threshold]] = True
        undecided = undecided[flipped == threshold]
        if undecided.numel() == 0 or index + 1 == len(p_words):
            break
        current = more_words(int(undecided.numel())).reshape(-1)
    # Ties past p's last non-zero bit mean U >= p: those stay False.
    return result


class SecureRNG:
    """Cryptographically secure Gaussian, uniform and Bernoulli draws from a ChaCha20 keystream.

    The key comes from ``os.urandom(32)``; every call takes a fresh 96-bit nonce (a call counter) and
    walks that nonce's block counter from 0, so no ``(key, nonce, counter)`` is ever used twice. The
    keystream is OpenSSL's (through ``cryptography``) on CPU and the tensor implementation of
    :func:`~lightning_dp.noise.chacha20_keystream` on CUDA; both give the same bytes.

    **Gaussian.** :meth:`normal` resists the floating-point inversion attack of Holohan & Braghin (2021),
    *Secure Random Sampling in Differential Privacy* (ESORICS 2021, arXiv:2107.10138), which recovers the
    uniforms behind a naive sample and, with a predictable generator, the noise itself (Jin et al. 2021
    carry it to DP-SGD). Three layers: (1) the uniforms come from a CSPRNG; (2) they are high-precision,
    52 random bits each on the grid ``(2j + 1)·2⁻⁵³`` (never 0 or 1), and Box–Muller runs in float64;
    (3) the mitigation of Holohan & Braghin §5: each output is the sum of ``num_normals = k ≥ 2``
    independent Box–Muller normals scaled by ``1/√k``, so an output no longer determines the uniforms it
    came from. The result is rounded once to the requested dtype.

    **Known remaining weaknesses** (read before claiming more than the accountant's ε):

    - *Floating-point addition.* Adding noise to a gradient in floating point leaks through rounding:
      the set of reachable ``g + z`` depends on ``g`` (Mironov 2012 for Laplace; Haney et al. 2022,
      *Precision-based attacks and interval refining*, for Gaussians and many libraries). Summing normals
      does not fix this; only discretised or interval-refined mechanisms do, which DP-SGD libraries do not
      use. The leak is at the level of the last bits of each coordinate.
    - *Discrete uniforms.* Each Box–Muller radius is at most ``sqrt(106 ln 2) ≈ 8.57``, so ``|noise| ≤
      8.57·√k·std``; the law is that of the 2⁻⁵³ grid, not of the continuum (tail mass beyond 8.57σ per
      normal is about 10⁻¹⁷).
    - *Side channels and state.* Transcendental functions are not constant-time; the key lives in process
      memory (and in GPU memory when drawing on CUDA); the OS entropy source is trusted.

    **Seeded mode** (``seed=b"..."``) derives the key as ``SHA-256(domain ‖ seed)``: the stream is then
    reproducible and **not secret** (anyone with the seed can regenerate the noise). It exists for tests;
    never use it for a release.

    Args:
        seed: bytes for a reproducible, insecure generator (tests only); ``None`` (default) keys from the OS.
        num_normals: ``k``, the number of normals summed per Gaussian output (``>= 2``; Opacus uses 4).
        backend: keystream backend, ``"auto"`` (OpenSSL on CPU, tensor ops on CUDA), ``"openssl"`` or
            ``"torch"``. The draws are the same for all three on CPU.

    Example::

        >>> rng = SecureRNG()
        >>> rng.normal((2, 3), std=1.5).shape
        torch.Size([2, 3])
        >>> rng.bernoulli(5, 0.5).dtype
        torch.bool
    """

    def __init__(self, seed: Optional[bytes] = None, *, num_normals: int = 2, backend: str = "auto") -> None:
        if seed is not None and (not isinstance(seed, (bytes, bytearray)) or len(seed) == 0):
            raise ValueError(
                f"`seed` must be non-empty bytes (tests only) or None (key from the OS), got {seed!r}. "
                "A secure run takes no seed."
            )
        self.num_normals = check_int("num_normals", num_normals, 2)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.seeded = seed is not None
        self._seed = bytes(seed) if seed is not None else None
        self._lock = threading.Lock()
        self._rekey()

    # ----------------------------------------------------------------------------------------- keying
    def _rekey(self) -> None:
        if self._seed is not None:
            self._key = hashlib.sha256(_KEY_DOMAIN + self._seed).digest()
        else:
            self._key = os.urandom(32)
        self._calls = 0
        self._pid = os.getpid()

    def _reserve(self, num_bytes: int) -> Tuple[bytes, bytes]:
        """A ``(key, nonce)`` used by nobody before; the caller reads blocks ``0, 1, ...`` of it."""
        if num_bytes > _MAX_BYTES_PER_CALL:
            raise ValueError(
                f"One draw may use at most {_MAX_BYTES_PER_CALL} keystream bytes (ChaCha20's 32-bit block "
                f"counter), this one needs {num_bytes}: split the request into smaller tensors."
            )
        with self._lock:
            if os.getpid() != self._pid and not self.seeded:
                self._rekey()  # a forked child must not replay its parent's stream
            nonce = self._calls.to_bytes(12, "little")
            self._calls += 1
            return self._key, nonce

    def _backend_for(self, device: torch.device) -> str:
        return resolve_backend(self.backend, device)

    def _words(self, count: int, device: torch.device) -> torch.Tensor:
        """``count`` fresh 64-bit keystream words (little-endian) as ``int64`` on ``device``."""
        key, nonce = self._reserve(8 * count)
        stream = chacha20_keystream(key, nonce, 0, 8 * count, device=device, backend=self._backend_for(device))
        return stream.view(torch.int64)

    # ------------------------------------------------------------------------------------------ draws
    def normal(
        self,
        shape: ShapeLike,
        std: float,
        device: DeviceLike = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A tensor of i.i.d. ``N(0, std²)`` draws (sum of ``num_normals`` Box–Muller normals, float64
        arithmetic, one rounding to ``dtype``). Same call as :meth:`GaussianNoise.normal
        <lightning_dp.noise.GaussianNoise.normal>`.
        """
        std = check_non_negative("std", std)
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating-point dtype, got {dtype}.")
        shape = _shape_of(shape)
        device = torch.device(device)
        n = shape.numel()
        if std == 0 or n == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        pairs = -(-n // 2)
        k = self.num_normals
        words_per_pair = 2 * k
        key, nonce = self._reserve(8 * words_per_pair * pairs)
        flat = torch.empty(2 * pairs, dtype=dtype, device=device)
        chunk = _pairs_per_chunk(k)
        if self._backend_for(device) == "openssl" and device.type == "cpu":
            self._normal_cpu(key, nonce, pairs, chunk, std, flat)
        else:
            stream = chacha20_keystream(
                key, nonce, 0, 8 * words_per_pair * pairs, device=device, backend=self._backend_for(device)
            )
            words = stream.view(torch.int64)
            full, rest = divmod(pairs, chunk)
            split = full * chunk
            if full:
                _box_muller_sum_(
                    words[: words_per_pair * split].view(full, 2, k, chunk), std, flat[: 2 * split].view(full, 2, chunk)
                )
            if rest:
                tail = words[words_per_pair * split :].view(1, 2, k, rest)
                _box_muller_sum_(tail, std, flat[2 * split :].view(1, 2, rest))
        return flat[:n].view(shape)

    def _normal_cpu(self, key: bytes, nonce: bytes, pairs: int, chunk: int, std: float, flat: torch.Tensor) -> None:
        """OpenSSL keystream chunk by chunk into cache-sized buffers, converted in place.

        The chunks are split into contiguous runs, one per thread (``torch.get_num_threads()`` of them),
        each with its own OpenSSL context positioned at its first block. Meanwhile torch's intra-op
        thread count is set to 1 (and restored): hundreds of short OpenMP regions stall badly when the
        cores are shared (DataLoader workers, other jobs), while single-threaded ops on our own threads
        degrade gracefully. The cost: another Python thread's torch ops run single-threaded meanwhile.
        """
        k = self.num_normals
        starts = list(range(0, pairs, chunk))
        intra_op_threads = torch.get_num_threads()
        workers = max(1, min(_CPU_WORKERS or intra_op_threads, len(starts)))
        per_worker = -(-len(starts) // workers)
        runs = [starts[i : i + per_worker] for i in range(0, len(starts), per_worker)]
        errors: List[BaseException] = []

        def work(run: List[int]) -> None:
            try:
                size = min(chunk, pairs - run[0])
                words = torch.empty(2 * k * size, dtype=torch.int64)
                buffer = words.view(torch.uint8).numpy()
                zeros = memoryview(bytes(buffer.nbytes))
                encryptor = openssl_encryptor(key, nonce, run[0] * 16 * k // BLOCK_BYTES)
                for start in run:
                    size = min(chunk, pairs - start)
                    nbytes = 16 * k * size
                    encryptor.update_into(zeros[:nbytes], buffer[:nbytes])
                    target = flat[2 * start : 2 * (start + size)].view(1, 2, size)
                    _box_muller_sum_(words[: 2 * k * size].view(1, 2, k, size), std, target)
            except BaseException as err:  # re-raised in the calling thread
                errors.append(err)

        if intra_op_threads > 1:
            torch.set_num_threads(1)
        try:
            threads = [threading.Thread(target=work, args=(run,), daemon=True) for run in runs[1:]]
            for thread in threads:
                thread.start()
            work(runs[0])
            for thread in threads:
                thread.join()
        finally:
            if intra_op_threads > 1:
                torch.set_num_threads(intra_op_threads)
        if errors:
            raise errors[0]

    def uniform(self, shape: ShapeLike, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """I.i.d. uniforms ``(2j + 1)·2⁻⁵³`` (``j`` uniform on ``[0, 2⁵²)``), in (0, 1) in float64.

        Rounded to ``dtype`` when it is not float64 (float32 may then round the largest values to 1.0).
        """
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating-point dtype, got {dtype}.")
        shape = _shape_of(shape)
        device = torch.device(device)
        n = shape.numel()
        if n == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        return _uniform_from_words_(self._words(n, device)).view(shape).to(dtype)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent Bernoulli(``p``) draws as a CPU ``BoolTensor``, with probability exactly ``p``.

        Each draw compares a 64-bit keystream word (and more words in the ``2⁻⁶⁴``-likely case of a tie)
        with the exact binary expansion of ``p``. For Poisson sampling: ``mask = rng.bernoulli(N, q)``.
        """
        n = check_int("n", n, 0)
        p = check_rate("p", p, allow_zero=True)
        cpu = torch.device("cpu")
        if n == 0 or p in (0.0, 1.0):
            return torch.full((n,), p == 1.0, dtype=torch.bool)
        return bernoulli_from_words(self._words(n, cpu), p, lambda count: self._words(count, cpu))

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """``{}`` for an OS-keyed generator; ``{"calls": int}`` (nonces used) in seeded mode.

        The key is never written out: with it and the checkpoints, the noise could be regenerated and
        subtracted. Neither is the seed.
        """
        return {"calls": self._calls} if self.seeded else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: an OS-keyed generator re-keys from the OS (whatever ``state`` holds); a seeded one
        continues its nonce schedule from ``state["calls"]`` (reproducible test runs)."""
        with self._lock:
            if not self.seeded:
                self._rekey()
            elif "calls" in state:
                self._calls = check_int("state['calls']", state["calls"], 0)

    def __getstate__(self) -> Dict[str, Any]:
        # Pickles (deepcopy, spawn-based workers, whole-object checkpoints) never carry an OS-drawn key.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_key")}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        calls = state["_calls"]
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._rekey()  # OS-keyed: a fresh key, so a copy never replays the original's stream
        if self.seeded:
            self._calls = calls

    def __repr__(self) -> str:
        return f"SecureRNG(seeded={self.seeded}, num_normals={self.num_normals}, backend={self.backend!r})"


__all__ = ["SecureRNG", "bernoulli_from_words"]
