"""Fast, reproducible Gaussian noise (seeded; **not** cryptographically secure).

On CPU, float32/float16/bfloat16 noise comes from an AES-128-CTR keystream (OpenSSL with AES-NI, over
10 GB/s on one core) keyed by a hash of the seed, turned into normals by Box–Muller in float32: by the
native kernel ``_boxmuller`` (one fused pass, vectorised through glibc's libmvec; built on Linux at
install) when it is there, else by the same formulas in vectorised torch ops on all intra-op threads.
Both give the same stream (to float32 rounding). This is two to three times as fast as
``Tensor.normal_`` (one Mersenne Twister draw per element, single-threaded), which matters in DP-SGD:
every step draws one normal per parameter. Other devices and dtypes (CUDA, float64) use a seeded
``torch.Generator``.

The generator is reproducible from its seed, so anyone with the seed can regenerate the noise and
subtract it, and float32 Box–Muller is open to the floating-point attacks :class:`SecureRNG` resists:
use :class:`~lightning_dp.noise.SecureRNG` (OS-keyed ChaCha20, float64, summed normals) when the
guarantee matters.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .._checks import check_non_negative
from ._parallel import load_native, run_parallel
from ._zero_stream import encrypt_zeros_into


_native = load_native()
"""``lightning_dp.noise._boxmuller`` when available (see :func:`native_kernel`)."""


def native_kernel() -> bool:
    """Whether :class:`GaussianNoise` runs its CPU Box–Muller in the native kernel (else in torch ops)."""
    return _native is not None


_MIN_PAIRS_PER_THREAD = 1 << 14
_KERNEL_BLOCK = 512  # BLOCK in _boxmuller.c


def _native_box_muller(kernel: Any, raw: Any, half: int, std: float) -> None:
    """Run the native ``kernel`` over the ``half`` pairs of a piece on ``torch.get_num_threads()`` threads
    (the kernel releases the GIL; each range of pairs gives the same bits on any thread, so the result
    does not depend on the thread count)."""
    threads = max(1, min(torch.get_num_threads(), half // _MIN_PAIRS_PER_THREAD))
    # Four ranges per thread, taken as the threads come free. Ranges start on multiples of the kernel's
    # block (512 pairs): each pair then goes through the same vector or scalar code path whatever the
    # thread count, so the bits do not depend on it.
    parts = 4 * threads if threads > 1 else 1
    bounds = [half * k // parts // _KERNEL_BLOCK * _KERNEL_BLOCK for k in range(parts)] + [half]
    run_parallel(lambda k: kernel.box_muller_(raw, half, bounds[k], bounds[k + 1], std), range(parts), threads)


_STREAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PIECE = 1 << 18
"""Normals per Box–Muller pass (1 MB of keystream words, plus 0.5 MB of angles on the torch path; freed
after the draw)."""
_KEY_DOMAIN = b"lightning_dp.GaussianNoise/aes128-ctr/v1\x00"
# Radius uniforms: 23 random bits of a 32-bit word become the mantissa of x in [1, 2); then
# x - (1 - 2**-24) = (2j + 1)·2**-24 exactly: the midpoints of a 2**-23 grid, never 0 nor 1.
_MANTISSA32 = (1 << 23) - 1
_ONE_BITS32 = 0x3F800000  # bit pattern of the float32 1.0
_TO_MIDPOINT32 = 1.0 - 2.0**-24
_FLOAT32_MAX = 3.4e38


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def _generator_seed(seed: int) -> int:
    """A 64-bit generator seed that depends on every bit of ``seed``.

    torch's CPU Mersenne Twister keeps only the low 32 bits of ``manual_seed``: seeds that differ only in
    their high bits would otherwise give the same noise.
    """
    digest = hashlib.sha256(f"lightning_dp.GaussianNoise:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@functools.lru_cache(maxsize=1)
def _aes_classes() -> tuple:
    """``cryptography``'s cipher classes, imported on first use (the package imports without them)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher, algorithms, modes


def _box_muller_factors_(words: torch.Tensor, std: float, angles: torch.Tensor) -> tuple:
    """Box–Muller from ``2m`` int32 keystream ``words`` (destroyed, reused as storage; ``angles``: float32
    scratch of at least ``m`` elements).

    Radii ``r = std·sqrt(-2 ln u)`` from the first ``m`` words, ``u`` uniform on the ``(2j + 1)·2⁻²⁴``
    grid (never 0); angles ``θ = w·π/2³¹`` from the last ``m`` words read as signed integers, uniform on
    ``[-π, π)`` (rounded to float32). Returns ``(r, cos θ, sin θ)``: normal ``i < m`` of the piece is
    ``r[i]·cos θ[i]``, normal ``m + i`` is ``r[i]·sin θ[i]``.
    """
    m = words.numel() // 2
    radius = words[:m].bitwise_and_(_MANTISSA32).bitwise_or_(_ONE_BITS32).view(torch.float32).sub_(_TO_MIDPOINT32)
    if 2.0 * std * std < _FLOAT32_MAX:
        radius.log_().mul_(-2.0 * std * std).sqrt_()
    else:  # std² would overflow float32
        radius.log_().mul_(-2.0).sqrt_().mul_(std)
    angle = torch.mul(words[m:], math.pi / 2**31, out=angles[:m])  # int32 → float32, scaled, in one pass
    cos = torch.cos(angle, out=words[m:].view(torch.float32))  # the angle words are spent: reuse them
    return radius, cos, angle.sin_()


def _emit(target: torch.Tensor, radius: torch.Tensor, trig: torch.Tensor, add: bool) -> None:
    """``target += radius·trig`` (``add``) or ``target = radius·trig``."""
    if add:
        if target.dtype == torch.float32:
            target.addcmul_(radius, trig)
        else:
            target.add_(radius * trig)
    elif target.dtype == torch.float32:
        torch.mul(radius, trig, out=target)
    else:
        target.copy_(radius * trig)


def _emit_normals(normals: torch.Tensor, add: bool, segment: torch.Tensor, first: int, size: int) -> None:
    """Native path: the piece's normals ``first .. first + size - 1`` into ``segment``."""
    if add:
        segment.add_(normals[first : first + size])
    else:
        segment.copy_(normals[first : first + size])


def _emit_factors(
    radius: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int, add: bool,
    segment: torch.Tensor, first: int, size: int,
) -> None:
    """Torch path: normals ``first .. first + size - 1`` of a piece (``r·cos θ`` below ``half``, ``r·sin θ``
    from it on) into ``segment``: a cosine run, then maybe a sine run."""
    if first < half:
        run = min(size, half - first)
        _emit(segment[:run], radius[first : first + run], cos[first : first + run], add)
        if size > run:
            _emit(segment[run:], radius[: size - run], sin[: size - run], add)
    else:
        lo = first - half
        _emit(segment, radius[lo : lo + size], sin[lo : lo + size], add)


def _hand_out(flats: List[torch.Tensor], index: int, offset: int, count: int, emit: Callable[..., None]) -> tuple:
    """Walk ``count`` normals of a piece over ``flats`` from position ``(index, offset)`` on, in order:
    ``emit(segment, first, size)`` gets each tensor segment and the piece's normals it receives
    (``first .. first + size - 1``). Returns the position after them."""
    used = 0
    while used < count:
        target = flats[index]
        size = min(target.numel() - offset, count - used)
        emit(target[offset : offset + size], used, size)
        used += size
        offset += size
        if offset == target.numel():
            index, offset = index + 1, 0
    while index < len(flats) and flats[index].numel() == 0:
        index += 1
    return index, offset


class GaussianNoise:
    """Seeded Gaussian noise, fast and reproducible; **not** cryptographically secure.

    CPU float32/float16/bfloat16: an AES-128-CTR keystream (OpenSSL) keyed by ``SHA-256(seed)``, each
    call on its own counter range (so calls are independent and the state is just a call count), and
    float32 Box–Muller, one 32-bit word per normal. Each radius uniform has 23 random bits, so
    ``|noise| ≤ sqrt(48 ln 2)·std ≈ 5.77·std`` (the mass beyond, ``2⁻²⁴`` per pair, sits on the largest
    grid point), as with ``torch.randn`` in float32. Box–Muller runs in the native kernel when it was
    built (:func:`native_kernel`; on ``torch.get_num_threads()`` threads), else in torch ops; the two
    agree to float32 rounding (a few ulp), and a seed replays the same bits on the same kernel and CPU
    family. Other devices and dtypes: a ``torch.Generator`` per device seeded from ``seed``. A restored
    state (:meth:`load_state_dict`) is rebuilt on the device it was saved from when noise is first drawn
    there; noise on another device of the same kind (``cuda:1`` for a state saved on ``cuda:0``) is refused,
    since a freshly seeded generator there would replay the noise already added.

    Args:
        seed: integer seed for reproducible runs; ``None`` draws one from the OS.

    Example::

        >>> noise = GaussianNoise(seed=0)
        >>> noise.normal((3,), std=2.0).shape
        torch.Size([3])
        >>> grads = [torch.zeros(4, 5), torch.zeros(5)]
        >>> noise.add_normal_(grads, std=0.5)  # in place, one stream for all tensors
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.seeded = seed is not None
        self.seed = _random_seed() if seed is None else seed
        self._generators: Dict[str, torch.Generator] = {}
        self._key = hashlib.sha256(_KEY_DOMAIN + str(self.seed).encode()).digest()[:16]  # CPU stream's key
        self._calls = 0  # calls of the CPU stream so far (each has its own counter range)
        self._lock = threading.Lock()
        # Generator states of a checkpoint by device ("cuda:0"), made into generators when first used there
        # (a CPU-only machine can load a CUDA run's state); None: not restored.
        self._restored_states: Optional[Dict[str, torch.Tensor]] = None

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            restored = self._restored_states or {}
            same_kind = sorted(k for k in restored if torch.device(k).type == device.type)
            if key not in restored and same_kind:
                # Generators of one kind seeded alike give the same draws on every index: a generator seeded
                # afresh on cuda:1 would replay the noise the run already added on cuda:0.
                raise RuntimeError(
                    f"This seeded noise source was restored from a checkpoint whose {device.type} generator "
                    f"states belong to {same_kind}, and is now asked for noise on {key}: a generator seeded "
                    f"afresh there would replay noise the run already added. Resume with the model on "
                    f"{' or '.join(same_kind)} (e.g. CUDA_VISIBLE_DEVICES, or the Trainer's devices=[index]), "
                    "or start a new run with a new seed."
                )
            generator = torch.Generator(device=device)
            if key in restored:
                generator.set_state(restored[key])
            else:  # a kind of device this run never drew noise on: a stream of its own, nothing replayed
                generator.manual_seed(_generator_seed(self.seed))
            self._generators[key] = generator
        return self._generators[key]

    @staticmethod
    def _streamed(tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.dtype in _STREAM_DTYPES and tensor.is_contiguous()

    def normal(
        self,
        shape: torch.Size | tuple,
        std: float,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """A tensor of i.i.d. ``N(0, std²)`` draws (written into ``out`` when given, else a new tensor)."""
        std = check_non_negative("std", std)
        if out is None:
            out = torch.empty(shape, device=torch.device(device), dtype=dtype)
        if std == 0:
            return out.zero_()
        if self._streamed(out):
            self._stream([out], std, add=False)
        elif out.dtype.is_floating_point:
            out.normal_(mean=0.0, std=std, generator=self._generator(out.device))
        else:
            raise ValueError(f"Gaussian noise needs a floating-point dtype, got {out.dtype}.")
        return out

    @torch.no_grad()
    def add_normal_(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        """Add i.i.d. ``N(0, std²)`` to every element of every tensor, in place.

        CPU float tensors share one keystream call (their concatenation is one stream of normals, drawn a
        piece at a time: no tensor-sized temporary); others get draws from their device's generator.
        """
        std = check_non_negative("std", std)
        if std == 0:
            return
        streamed, others = [], []
        for tensor in tensors:
            (streamed if self._streamed(tensor) else others).append(tensor)
        if streamed:
            self._stream(streamed, std, add=True)
        for tensor in others:
            tensor.add_(self.normal(tensor.shape, std, device=tensor.device, dtype=tensor.dtype))

    def _encryptor(self) -> Any:
        """AES-128-CTR positioned at a counter block used by no earlier call: the call number in the high
        64 bits, the block counter (from 0) in the low 64, so calls never overlap."""
        cipher, algorithms, modes = _aes_classes()
        with self._lock:
            call = self._calls
            self._calls += 1
        return cipher(algorithms.AES(self._key), modes.CTR(call.to_bytes(8, "big") + bytes(8))).encryptor()

    def _stream(self, tensors: List[torch.Tensor], std: float, add: bool) -> None:
        """Normals for the concatenation of ``tensors``, added to them (``add``) or written into them."""
        flats = [t.view(-1) for t in tensors]
        total = sum(f.numel() for f in flats)
        if total == 0:
            return
        piece = min(_PIECE, total + total % 2)
        encryptor = self._encryptor()
        native = _native
        # keystream words, then (torch path only) the angles
        scratch = torch.empty(piece + (0 if native is not None else piece // 2), dtype=torch.int32)
        words, angles = scratch[:piece], scratch[piece:].view(torch.float32)
        raw = words.view(torch.uint8).numpy()
        index, offset = 0, 0  # position in flats
        for start in range(0, total, piece):
            count = min(piece, total - start)
            half = (count + 1) // 2  # normals 0..half-1 are r·cos θ, the rest r·sin θ
            encrypt_zeros_into(encryptor, raw[: 8 * half])
            if native is not None:
                _native_box_muller(native, raw, half, std)  # words → the piece's normals, in order
                emit = functools.partial(_emit_normals, words[:count].view(torch.float32), add)
            else:
                radius, cos, sin = _box_muller_factors_(words[: 2 * half], std, angles)
                emit = functools.partial(_emit_factors, radius, cos, sin, half, add)
            index, offset = _hand_out(flats, index, offset, count, emit)

    def state_dict(self) -> Dict[str, Any]:
        """Seed, stream position and generator states when the user seeded the generator (reproducible
        mode), else ``{}``.

        An OS-drawn seed is never written out: with it and the checkpoints, anyone could regenerate the
        noise and subtract it. A resumed unseeded run draws a fresh seed instead.
        """
        if not self.seeded:
            return {}
        states = dict(self._restored_states or {})  # restored but not used since: kept for the next resume
        states.update({k: g.get_state() for k, g in self._generators.items()})
        return {"seed": self.seed, "calls": self._calls, "generators": states}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty state keeps the current OS-drawn seed)."""
        if not state:
            return
        self.seeded = True
        self.seed = int(state["seed"])
        self._key = hashlib.sha256(_KEY_DOMAIN + str(self.seed).encode()).digest()[:16]
        self._calls = int(state.get("calls", 0))
        self._generators = {}
        # Each generator is rebuilt on its own device when noise is first drawn there; noise on any other
        # non-CPU-stream device is refused (see _generator): never a fresh generator that replays noise.
        self._restored_states = {str(torch.device(k)): v for k, v in state.get("generators", {}).items()}

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GaussianNoise(seeded={self.seeded})"


__all__ = ["GaussianNoise", "native_kernel"]
