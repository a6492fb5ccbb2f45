"""A cryptographically secure generator for DP noise and Poisson sampling, built on ChaCha20 and, on CPUs
with AES instructions, AES-256-CTR.

Keystream → 64-bit words → uniforms → Gaussians (Box–Muller, summed) or Bernoullis (exact threshold).
The keystream is OpenSSL's on CPU and ChaCha20's tensor implementation on CUDA (see :mod:`.chacha`,
:mod:`.aes`), so noise is generated on the device where the gradients live; the Gaussian stream's
layout and its CPU kernels are in :mod:`.secure_normal`.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import defaultdict
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import check_choice, check_int, check_non_negative, check_rate
from . import secure_normal
from .aes import cpu_has_aes
from .chacha import BACKENDS, BLOCK_BYTES, MAX_BLOCKS, resolve_backend
from .secure_normal import Keystream, Targets, stage, uniform_from_words_

DeviceLike = Union[torch.device, str]
ShapeLike = Union[torch.Size, Sequence[int], int]

_MAX_BYTES_PER_CALL = MAX_BLOCKS * BLOCK_BYTES  # per draw, whatever the cipher (ChaCha20's 32-bit counter)
CIPHERS = ("auto", "chacha20", "aes256-ctr")
# Seeded keys: SHA-256(domain ‖ seed), one domain per cipher (the ChaCha20 one is the original, v1).
_KEY_DOMAINS = {
    "chacha20": b"lightning_dp.SecureRNG/v1\x00",
    "aes256-ctr": b"lightning_dp.SecureRNG/aes256-ctr/v1\x00",
}
_KEY_DOMAIN = _KEY_DOMAINS["chacha20"]


def _shape_of(shape: ShapeLike) -> torch.Size:
    return torch.Size((shape,) if isinstance(shape, int) else tuple(shape))


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


def _window(flats: List[Tuple[torch.Tensor, bool]], start: int, count: int) -> List[Tuple[torch.Tensor, bool]]:
    """Views of ``flats`` (concatenated) covering positions ``start .. start + count - 1``."""
    window, position = [], 0
    for flat, add in flats:
        lo, hi = max(start - position, 0), min(start + count - position, flat.numel())
        if lo < hi:
            window.append((flat[lo:hi], add))
        position += flat.numel()
    return window


class SecureRNG:
    """Cryptographically secure Gaussian, uniform and Bernoulli draws from a ChaCha20 or AES-256-CTR keystream.

    The keys (one per cipher) come from ``os.urandom(32)``; every call takes a fresh nonce (a call
    counter) and walks that nonce's block counter from 0, so no ``(key, nonce, counter)`` is ever used
    twice. The cipher of a draw (:meth:`cipher_for`): AES-256-CTR from OpenSSL for CPU draws on a CPU with
    AES instructions, where it is the faster constant-time cipher (:mod:`lightning_dp.noise.aes`);
    ChaCha20 (RFC 8439) otherwise, from OpenSSL on CPU and from the tensor implementation of
    :func:`~lightning_dp.noise.chacha20_keystream` on CUDA (the same bytes). Both are OpenSSL's or tested
    byte for byte against it and the standards' vectors; the rest of the construction is the same.

    **Gaussian.** :meth:`normal` resists the floating-point inversion attack of Holohan & Braghin (2021),
    *Secure Random Sampling in Differential Privacy* (ESORICS 2021, arXiv:2107.10138), which recovers the
    uniforms behind a naive sample and, with a predictable generator, the noise itself (Jin et al. 2021
    carry it to DP-SGD). Three layers: (1) the uniforms come from a CSPRNG; (2) they are high-precision,
    52 random bits each on the grid ``(2j + 1)·2⁻⁵³`` (never 0 or 1), and Box–Muller runs in float64;
    (3) the mitigation of Holohan & Braghin §5: each output is the sum of ``num_normals = k ≥ 2``
    independent Box–Muller normals scaled by ``1/√k``, so an output no longer determines the uniforms it
    came from. The result is rounded once to the requested dtype.

    **Speed.** :meth:`add_normal_` (the optimizer's call) draws all of a step's noise at once, straight
    into the tensors. On CPU the keystream is generated chunk by chunk on ``torch.get_num_threads()``
    threads, each at its own block-counter offset, and turned into normals by a native float64 kernel
    (:func:`~lightning_dp.noise.secure_normal.native_kernel`; float64 torch ops where it was not built).
    The bits do not depend on the thread count; the two kernels agree to a few float64 ulp. See
    :mod:`lightning_dp.noise.secure_normal` for the stream's exact layout.

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
        backend: ChaCha20's keystream backend, ``"auto"`` (OpenSSL on CPU, tensor ops on CUDA),
            ``"openssl"`` or ``"torch"``. The draws are the same for all three on CPU.
        cipher: ``"auto"`` (default: see above), ``"chacha20"`` (the original stream, on every device) or
            ``"aes256-ctr"`` (OpenSSL on the CPU, copied to other devices).

    Example::

        >>> rng = SecureRNG()
        >>> rng.normal((2, 3), std=1.5).shape
        torch.Size([2, 3])
        >>> grads = [torch.zeros(4, 5), torch.zeros(5)]
        >>> rng.add_normal_(grads, std=0.5)  # in place, one draw for all tensors
        >>> rng.bernoulli(5, 0.5).dtype
        torch.bool
    """

    def __init__(
        self, seed: Optional[bytes] = None, *, num_normals: int = 2, backend: str = "auto", cipher: str = "auto"
    ) -> None:
        if seed is not None and (not isinstance(seed, (bytes, bytearray)) or len(seed) == 0):
            raise ValueError(
                f"`seed` must be non-empty bytes (tests only) or None (key from the OS), got {seed!r}. "
                "A secure run takes no seed."
            )
        self.num_normals = check_int("num_normals", num_normals, 2)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.cipher = check_choice("cipher", cipher, CIPHERS)
        if self.cipher == "aes256-ctr" and self.backend == "torch":
            raise ValueError(
                "`cipher`='aes256-ctr' needs OpenSSL's keystream, got backend='torch' (the tensor keystream "
                "is ChaCha20's): use cipher='chacha20' or 'auto', or backend='auto'."
            )
        self.seeded = seed is not None
        self._seed = bytes(seed) if seed is not None else None
        self._lock = threading.Lock()
        self._rekey()

    # ----------------------------------------------------------------------------------------- keying
    def _rekey(self) -> None:
        """One key per cipher (never the same key under two ciphers): from the seed, or from the OS."""
        if self._seed is not None:
            self._keys = {name: hashlib.sha256(domain + self._seed).digest() for name, domain in _KEY_DOMAINS.items()}
        else:
            self._keys = {name: os.urandom(32) for name in _KEY_DOMAINS}
        self._calls = 0
        self._pid = os.getpid()

    @property
    def _key(self) -> bytes:
        """The key of CPU draws (of :meth:`cipher_for` ``"cpu"``); ``_keys`` holds one per cipher."""
        return self._keys[self.cipher_for("cpu")]

    def cipher_for(self, device: DeviceLike = "cpu") -> str:
        """The cipher of draws on ``device``: ``cipher`` when it was given, else (``"auto"``) AES-256-CTR
        for CPU draws on a CPU with AES instructions (:func:`~lightning_dp.noise.aes.cpu_has_aes`) and
        ChaCha20 otherwise (other devices, CPUs without them, ``backend="torch"``)."""
        if self.cipher != "auto":
            return self.cipher
        device = torch.device(device)
        if device.type == "cpu" and self.backend != "torch" and cpu_has_aes():
            return "aes256-ctr"
        return "chacha20"

    def _reserve(self, num_bytes: int) -> int:
        """A call number used by nobody before: the nonce of a draw, which reads blocks ``0, 1, ...``."""
        if num_bytes > _MAX_BYTES_PER_CALL:
            raise ValueError(
                f"One draw may use at most {_MAX_BYTES_PER_CALL} keystream bytes (ChaCha20's 32-bit block "
                f"counter), this one needs {num_bytes}: split the request into smaller tensors."
            )
        with self._lock:
            if os.getpid() != self._pid and not self.seeded:
                self._rekey()  # a forked child must not replay its parent's stream
            call = self._calls
            self._calls += 1
            return call

    def _stream(self, num_bytes: int, device: torch.device) -> Keystream:
        """A fresh draw's keystream for ``device``: the cipher's key and the next call number as nonce
        (ChaCha20: 12 bytes little-endian; AES-256-CTR: 8 bytes big-endian, then the block counter)."""
        call = self._reserve(num_bytes)
        cipher = self.cipher_for(device)
        if cipher == "aes256-ctr":
            return Keystream(cipher, self._keys[cipher], call.to_bytes(8, "big"))
        return Keystream(cipher, self._keys[cipher], call.to_bytes(12, "little"), resolve_backend(self.backend, device))

    def _words(self, count: int, device: torch.device) -> torch.Tensor:
        """``count`` fresh 64-bit keystream words (little-endian) as ``int64`` on ``device``."""
        return self._stream(8 * count, device).read(0, 8 * count, device=device).view(torch.int64)

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
        out = torch.empty(_shape_of(shape), dtype=dtype, device=torch.device(device))
        if std == 0 or out.numel() == 0:
            return out.zero_()
        self._draw([out], std, add=False)
        return out

    @torch.no_grad()
    def add_normal_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        """Add i.i.d. ``N(0, std²)`` to every element of every tensor, in place: one draw (one nonce) per
        device for all of them, their concatenation in order being the stream :meth:`normal` would give
        for its total size. Each noise value is rounded once to its tensor's dtype, then added.

        This is the optimizer's noise call: on CPU the keystream and the float64 Box–Muller sums run on
        ``torch.get_num_threads()`` threads, straight into the tensors (no parameter-sized temporary).
        """
        std = check_non_negative("std", std)
        if std == 0:
            return
        by_device: Dict[torch.device, List[torch.Tensor]] = defaultdict(list)
        for tensor in tensors:
            if tensor.numel():
                by_device[tensor.device].append(tensor)
        for group in by_device.values():
            self._draw(group, std, add=True)

    def _draw(self, tensors: List[torch.Tensor], std: float, add: bool) -> None:
        """The stream for the concatenation of ``tensors`` (one device), written or added into them: one
        nonce, or one per ``2³²`` keystream blocks for (very) large draws."""
        flats, finish = stage(tensors, add)
        total = sum(flat.numel() for flat, _ in flats)
        k = self.num_normals
        max_outputs = 2 * (_MAX_BYTES_PER_CALL // (16 * k))
        for start in range(0, total, max_outputs):
            count = min(max_outputs, total - start)
            pairs = -(-count // 2)
            window = _window(flats, start, count)
            if 2 * pairs > count:  # an odd count: the last output of the last pair is dropped
                window.append((torch.empty(1, dtype=torch.float64, device=flats[0][0].device), False))
            stream = self._stream(16 * k * pairs, window[0][0].device)
            secure_normal.fill(stream, k, pairs, std, Targets(window))
        finish()

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
        return uniform_from_words_(self._words(n, device)).view(shape).to(dtype)

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
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_keys")}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        calls = state["_calls"]
        state.setdefault("cipher", "chacha20")  # pickled before there was a choice: the v1 stream
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._rekey()  # OS-keyed: a fresh key, so a copy never replays the original's stream
        if self.seeded:
            self._calls = calls

    def __repr__(self) -> str:
        return (f"SecureRNG(seeded={self.seeded}, num_normals={self.num_normals}, backend={self.backend!r}, "
                f"cipher={self.cipher!r})")


__all__ = ["SecureRNG", "bernoulli_from_words"]
