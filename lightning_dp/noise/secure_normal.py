"""The Gaussian stream of :class:`~lightning_dp.noise.SecureRNG`: keystream chunks → sums of Box–Muller
normals, in float64, written or added into a list of tensors.

**Construction** (unchanged since the first release; ``tests/test_noise_secure.py`` rebuilds it from
OpenSSL's keystream in plain Python). A draw of ``n`` outputs takes one nonce and reads its keystream
(:class:`Keystream`: ChaCha20, or AES-256-CTR for CPU draws on CPUs with AES instructions, see
:meth:`SecureRNG.cipher_for <lightning_dp.noise.SecureRNG.cipher_for>`) from byte 0 as little-endian
64-bit words, ``2k`` words per pair of outputs (``k = num_normals``, ``pairs = ⌈n/2⌉``). The pairs are
cut into chunks of :func:`pairs_per_chunk` pairs (the last one shorter); a chunk of ``s`` pairs
starting at pair ``p`` holds words ``2k·p .. 2k·(p + s) - 1`` laid out as ``(2, k, s)``: radius uniforms
``u_ij`` then angle uniforms ``v_ij``, each ``(2·(w mod 2⁵²) + 1)·2⁻⁵³``. Its outputs are stream positions ``2p .. 2p + 2s - 1``: first the ``s`` cosine sums
``std/√k · Σ_i sqrt(-2 ln u_ij)·cos(2π v_ij)``, then the ``s`` sine sums; each output is rounded once to
its tensor's dtype. Position ``2·pairs - 1`` is dropped when ``n`` is odd. A chunk is a multiple of 4
pairs, so it starts on a 64-byte boundary of the keystream (ChaCha20 block ``16k·p / 64``, AES block
``16k·p / 16``).

**CPU** (keystream from OpenSSL through ``cryptography``, or from ChaCha20's tensor backend when
asked): the chunks are shared out to ``torch.get_num_threads()`` threads (torch's OpenMP team, or the
calling thread and the pool of :mod:`._parallel`), each taking the next chunk when it is done with one;
a thread generates a chunk's
keystream with its own context positioned at the chunk's block (counter offset) into a cache-sized
buffer (1 MiB) and turns it into normals with the native kernel ``_boxmuller.sum_normals_`` (float64,
GIL released), which writes or adds them straight into the destination tensors. Without the kernel the
same formulas run as float64 torch ops (:func:`box_muller_sum_`). A chunk's outputs do not depend on
which thread computes it, so the result does not depend on the thread count or the schedule.

**Other devices** (CUDA): with ChaCha20's tensor backend (the default there) and a device kernel
:func:`device_kernel` picks ``"triton"`` for, the fused Triton kernel of :mod:`._triton_chacha`: keystream and
Box–Muller in one launch per destination tensor, the keystream never written to memory. Otherwise
(``triton`` not installed, a GPU older than compute capability 8.0, ROCm, or
``LIGHTNING_DP_SECURE_KERNEL=torch``) the tensor ChaCha20 on the device (an AES keystream, when asked
for, is made on the CPU and copied), a group of chunks at a time (about 64 MiB of keystream), and the
torch-ops transform. Both give the same normals (the same words, the same float64 formulas in the same
order; tested to float64 rounding in Triton's interpreter, ``tests/test_noise_triton.py``).
"""
from __future__ import annotations

import bisect
import functools
import itertools
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._parallel import load_native, run_parallel
from ._zero_stream import encrypt_zeros_into
from .aes import BLOCK_BYTES as AES_BLOCK_BYTES
from .aes import aes256_ctr_keystream, aes_encryptor
from .chacha import BLOCK_BYTES, chacha20_keystream, openssl_encryptor

CIPHERS = ("chacha20", "aes256-ctr")

# Uniforms: 52 random bits of a 64-bit word become the mantissa of x in [1, 2); x - (1 - 2**-53) is then
# exactly (2j + 1) * 2**-53, j in [0, 2**52): the midpoints of a 2**-52 grid, never 0 nor 1.
_MANTISSA = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000  # bit pattern of the double 1.0
_TO_MIDPOINT = 1.0 - 2.0**-53
# Box–Muller pairs per chunk (the stream's layout unit): a multiple of 4 (so every chunk starts at a
# 64-byte block boundary) with 2·k·pairs < _CHUNK_WORDS words, about 1 MiB of keystream: cache-sized.
_CHUNK_WORDS = 1 << 17
_CPU_WORKERS: Optional[int] = None  # threads for CPU normals (None: torch.get_num_threads())
_DEVICE_GROUP_CHUNKS = 64  # chunks per tensor-op pass off the CPU (about 64 MiB of keystream)


def _load_kernel() -> Any:
    native = load_native()
    return native if native is not None and hasattr(native, "sum_normals_") else None


_native = _load_kernel()
"""``lightning_dp.noise._boxmuller`` when it was built with ``sum_normals_`` (see :func:`native_kernel`)."""


def native_kernel() -> bool:
    """Whether :class:`~lightning_dp.noise.SecureRNG` turns CPU keystream into normals in the native
    kernel (else in float64 torch ops)."""
    return _native is not None


KERNEL_ENV = "LIGHTNING_DP_SECURE_KERNEL"
"""Environment variable: ``"auto"`` (default), ``"triton"`` or ``"torch"``: the device kernel of secure
normals off the CPU (:func:`device_kernel`)."""


@functools.lru_cache(maxsize=None)
def _triton_module() -> Any:
    """:mod:`._triton_chacha`, or ``None`` where ``triton`` cannot be imported."""
    try:
        from . import _triton_chacha
    except Exception:  # ImportError, or a broken triton install: the torch path still works
        return None
    return _triton_chacha


def device_kernel(device: torch.device) -> str:
    """The kernel of secure normals on ``device`` off the CPU, the one place it is chosen: ``"triton"``
    (the fused ChaCha20 + Box–Muller kernel of :mod:`._triton_chacha`) where ``triton`` imports and the
    device is CUDA of compute capability 8.0 or newer, else ``"torch"`` (tensor ops). The environment
    variable ``LIGHTNING_DP_SECURE_KERNEL`` (read at each draw) forces ``"torch"``, or ``"triton"`` (an
    error where it cannot run). Both give the same normals."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{KERNEL_ENV} must be 'auto', 'triton' or 'torch', got {choice!r}.")
    if choice == "torch" or device.type == "cpu":
        return "torch"
    module = _triton_module()
    if module is not None and module.available(device):
        return "triton"
    if choice == "triton":
        raise RuntimeError(
            f"{KERNEL_ENV}=triton, but the Triton kernel cannot run on {device}: it needs `triton` "
            "(pip install lightning-dp[gpu]) and a CUDA GPU of compute capability 8.0 or newer."
        )
    return "torch"


def pairs_per_chunk(k: int) -> int:
    """Box–Muller output pairs per chunk of the stream for ``k`` summed normals (a multiple of 4)."""
    return max(4, 4 * ((_CHUNK_WORDS // (2 * k) - 1) // 4))


def uniform_from_words_(words: torch.Tensor) -> torch.Tensor:
    """In place: int64 words → float64 uniforms ``(2j + 1)·2⁻⁵³`` in (0, 1); returns the float64 view."""
    return words.bitwise_and_(_MANTISSA).bitwise_or_(_ONE_BITS).view(torch.float64).sub_(_TO_MIDPOINT)


def box_muller_sum_(words: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Gaussians from ``words`` of shape ``(C, 2, k, s)`` (destroyed) into ``out`` of shape ``(C, 2, s)``.

    For each of the ``C·s`` pairs, ``k`` independent Box–Muller pairs ``r_i (cos θ_i, sin θ_i)`` with
    ``r_i = sqrt(-2 ln u_i)`` and ``θ_i = 2π v_i`` (``u_i = words[:, 0, i]``, ``v_i = words[:, 1, i]``) are
    summed and scaled by ``scale / sqrt(k)``: ``out[:, 0]`` gets the cosine sums, ``out[:, 1]`` the sine sums.
    All arithmetic is float64; ``out`` (any floating dtype) is rounded once at the end. The torch path,
    and the reference the native kernel is tested against.
    """
    uniforms = uniform_from_words_(words)
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


# ---------------------------------------------------------------------------------------- keystream
class Keystream:
    """The keystream of one draw: ``cipher`` (``"chacha20"``: RFC 8439, 12-byte nonce; ``"aes256-ctr"``:
    SP 800-38A, 8-byte nonce) under ``key`` and ``nonce``, read from byte offsets that are multiples of
    64. ``backend`` (ChaCha20 only): ``"openssl"``, or ``"torch"`` for the tensor implementation."""

    def __init__(self, cipher: str, key: bytes, nonce: bytes, backend: str = "openssl") -> None:
        if cipher not in CIPHERS or (cipher == "aes256-ctr" and backend != "openssl"):
            raise ValueError(f"no keystream {cipher!r} with backend {backend!r}")
        self.cipher, self.key, self.nonce, self.backend = cipher, key, nonce, backend

    @property
    def openssl(self) -> bool:
        """Whether the bytes come from OpenSSL (on the CPU)."""
        return self.backend == "openssl"

    def encryptor(self, offset: int) -> Any:
        """An OpenSSL context positioned at byte ``offset``: encrypting zeros with it yields the keystream."""
        if self.cipher == "aes256-ctr":
            return aes_encryptor(self.key, self.nonce, offset // AES_BLOCK_BYTES)
        return openssl_encryptor(self.key, self.nonce, offset // BLOCK_BYTES)

    def read(self, offset: int, num_bytes: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Bytes ``offset .. offset + num_bytes - 1`` as a ``uint8`` tensor on ``device``."""
        if self.cipher == "aes256-ctr":
            return aes256_ctr_keystream(self.key, self.nonce, offset // AES_BLOCK_BYTES, num_bytes, device=device)
        return chacha20_keystream(self.key, self.nonce, offset // BLOCK_BYTES, num_bytes, device=device,
                                  backend=self.backend)


# ------------------------------------------------------------------------------------- destinations
_NATIVE_DTYPES = (torch.float32, torch.float64)
_KINDS = {(torch.float32, False): 0, (torch.float32, True): 1, (torch.float64, False): 2, (torch.float64, True): 3}


class Targets:
    """Positions ``0 .. total - 1`` of a draw, spread in order over 1-D tensors (``(flat, add)``: add
    into ``flat`` or overwrite it)."""

    def __init__(self, flats: Sequence[Tuple[torch.Tensor, bool]]) -> None:
        self.flats = [(flat, add) for flat, add in flats if flat.numel()]
        self.ends = list(itertools.accumulate(flat.numel() for flat, _ in self.flats))
        self.device = self.flats[0][0].device if self.flats else torch.device("cpu")
        self._arrays: List[Tuple[Any, int]] = []
        if self.device.type == "cpu" and all(flat.dtype in _NATIVE_DTYPES for flat, _ in self.flats):
            self._arrays = [(flat.numpy(), _KINDS[flat.dtype, add]) for flat, add in self.flats]  # kernel buffers

    @property
    def native_ready(self) -> bool:
        """Whether the native kernel can write every destination (CPU float32/float64)."""
        return len(self._arrays) == len(self.flats)

    def _segments(self, start: int, stop: int):  # type: ignore[no-untyped-def]
        """``(index, lo, hi, offset)``: elements ``lo .. hi - 1`` of flat ``index`` receive positions
        ``start + offset ..``, for positions ``start .. stop - 1``."""
        index = bisect.bisect_right(self.ends, start)
        position = start
        while position < stop:
            begin = self.ends[index] - self.flats[index][0].numel()
            high = min(stop, self.ends[index])
            yield index, position - begin, high - begin, position - start
            position = high
            index += 1

    def native_spec(self, start: int, stop: int) -> List[Tuple[Any, int]]:
        """``(buffer, kind)`` pairs for ``_boxmuller.sum_normals_`` covering positions ``start .. stop - 1``."""
        return [(self._arrays[i][0][lo:hi], self._arrays[i][1]) for i, lo, hi, _ in self._segments(start, stop)]

    def emit(self, values: torch.Tensor, start: int) -> None:
        """Positions ``start ..`` get ``values`` (float64), each rounded once to its tensor's dtype."""
        for i, lo, hi, offset in self._segments(start, start + values.numel()):
            flat, add = self.flats[i]
            part = values[offset : offset + hi - lo]
            if add:
                flat[lo:hi].add_(part.to(flat.dtype))
            else:
                flat[lo:hi].copy_(part)


def stage(tensors: Sequence[torch.Tensor], add: bool) -> Tuple[List[Tuple[torch.Tensor, bool]], Callable[[], None]]:
    """The flat destinations of a draw into ``tensors`` (all on one device), and what to run after it.

    Contiguous tensors are written in place. A non-contiguous one, and on CPU one whose dtype is not
    float32/float64 (the native kernel writes those two), gets a float64 scratch instead; ``finish()`` then
    rounds it once to the tensor's dtype and adds or copies it in.
    """
    flats: List[Tuple[torch.Tensor, bool]] = []
    pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for tensor in tensors:
        tensor = tensor.detach()
        if tensor.is_contiguous() and (tensor.device.type != "cpu" or tensor.dtype in _NATIVE_DTYPES):
            flats.append((tensor.view(-1), add))
        else:
            scratch = torch.empty(tensor.numel(), dtype=torch.float64, device=tensor.device)
            flats.append((scratch, False))
            pending.append((tensor, scratch))

    def finish() -> None:
        for tensor, scratch in pending:
            values = scratch.view(tensor.shape)
            if add:
                tensor.add_(values.to(tensor.dtype))
            else:
                tensor.copy_(values)

    return flats, finish


# ------------------------------------------------------------------------------------------ filling
_buffers = threading.local()


def _thread_buffer(num_bytes: int) -> Any:
    """This thread's keystream buffer (a uint8 array of at least ``num_bytes``), reused across draws."""
    buffer = getattr(_buffers, "words", None)
    if buffer is None or buffer.nbytes < num_bytes:
        buffer = torch.empty(num_bytes, dtype=torch.uint8).numpy()
        _buffers.words = buffer
    return buffer


def fill(stream: Keystream, k: int, pairs: int, std: float, targets: Targets) -> None:
    """The ``2·pairs`` outputs of the draw ``stream`` into ``targets`` (which hold exactly that many)."""
    if targets.device.type == "cpu":
        _fill_cpu(stream, k, pairs, std, targets)
    else:
        _fill_device(stream, k, pairs, std, targets)


def _fill_cpu(stream: Keystream, k: int, pairs: int, std: float, targets: Targets) -> None:
    """Chunks on ``torch.get_num_threads()`` threads, each chunk's keystream generated at its own counter
    offset; the threads take the next chunk when done with one (not a fixed share each). A thread reuses
    its keystream context when its next chunk follows its last one, else opens one at the chunk's first
    block (a few µs).

    With the native kernel built with OpenMP (Linux, GCC) the whole draw is one call, ``fill_``, whose
    threads are torch's own OpenMP team: right after the backward pass torch's idle OpenMP workers spin
    for a while before they sleep, and a thread of ours would have to share a core with one (measured in
    the MLP's training step: 5.3–5.8 ms on our threads, 3.2–4.2 ms on torch's). Otherwise the chunks go
    to the noise pool (:func:`~._parallel.run_parallel`).

    Threads that run torch ops (the torch-ops transform, the tensor keystream backend) do so with torch's
    intra-op thread count set to 1 meanwhile (restored after): hundreds of short OpenMP regions stall
    badly on shared cores, while single-threaded ops on our own threads degrade gracefully. The native
    kernel with OpenSSL's keystream runs no torch op and leaves the setting alone.
    """
    chunk = pairs_per_chunk(k)
    bytes_per_pair = 16 * k  # 2k words of 8 bytes
    starts = list(range(0, pairs, chunk))
    intra_op_threads = torch.get_num_threads()
    workers = max(1, min(_CPU_WORKERS or intra_op_threads, len(starts)))
    native = _native if targets.native_ready else None
    uses_torch = native is None or not stream.openssl
    scale = std / math.sqrt(k)
    contexts: Dict[int, Tuple[Any, int]] = {}  # per thread: its keystream context and the pair it reached

    def keystream_into(first: int, size: int, buffer: Any) -> None:
        """Chunk ``first ..``'s keystream into ``buffer`` (exactly its size), from the chunk's offset."""
        nbytes = bytes_per_pair * size
        if stream.openssl:
            thread = threading.get_ident()
            encryptor, position = contexts.get(thread, (None, -1))
            if first != position:
                encryptor = stream.encryptor(first * bytes_per_pair)
            encrypt_zeros_into(encryptor, buffer)
            contexts[thread] = (encryptor, first + size)
        else:
            memoryview(buffer).cast("B")[:] = stream.read(first * bytes_per_pair, nbytes).numpy().data

    if native is not None and getattr(native, "openmp", 0):
        # One call for the whole draw: the chunks on torch's OpenMP threads, the keystream from the
        # callback above (under the GIL, which OpenSSL releases), the rest without the GIL.
        native.fill_(keystream_into, k, pairs, chunk, scale, targets.native_spec(0, 2 * pairs), workers)
        return

    def one_chunk(start: int) -> None:
        size = min(chunk, pairs - start)
        buffer = _thread_buffer(bytes_per_pair * chunk)[: bytes_per_pair * size]
        keystream_into(start, size, buffer)
        if native is not None:
            native.sum_normals_(buffer, k, size, scale, targets.native_spec(2 * start, 2 * (start + size)))
        else:
            values = torch.empty(2 * size, dtype=torch.float64)
            chunk_words = torch.from_numpy(buffer).view(torch.int64).view(1, 2, k, size)  # destroyed
            box_muller_sum_(chunk_words, std, values.view(1, 2, size))
            targets.emit(values, 2 * start)

    if uses_torch and intra_op_threads > 1:
        torch.set_num_threads(1)
    try:
        run_parallel(one_chunk, starts, workers)
    finally:
        if uses_torch and intra_op_threads > 1:
            torch.set_num_threads(intra_op_threads)


def _fill_device(stream: Keystream, k: int, pairs: int, std: float, targets: Targets) -> None:
    """The fused Triton kernel where :func:`device_kernel` says so (ChaCha20's tensor backend only); else
    groups of chunks in tensor ops on the targets' device (the keystream too, with ChaCha20's torch
    backend; else made on the CPU and copied)."""
    chunk = pairs_per_chunk(k)
    device = targets.device
    if stream.cipher == "chacha20" and stream.backend == "torch" and device_kernel(device) == "triton":
        _triton_module().fill_normals(stream.key, stream.nonce, k, pairs, chunk, std, targets.flats)
        return
    group = chunk * _DEVICE_GROUP_CHUNKS
    bytes_per_pair = 16 * k
    for first in range(0, pairs, group):
        size = min(group, pairs - first)
        words = stream.read(first * bytes_per_pair, bytes_per_pair * size, device=device).view(torch.int64)
        values = torch.empty(2 * size, dtype=torch.float64, device=device)
        full, rest = divmod(size, chunk)
        split = full * chunk
        if full:
            head = words[: 2 * k * split].view(full, 2, k, chunk)
            box_muller_sum_(head, std, values[: 2 * split].view(full, 2, chunk))
        if rest:
            box_muller_sum_(words[2 * k * split :].view(1, 2, k, rest), std, values[2 * split :].view(1, 2, rest))
        targets.emit(values, 2 * first)


__all__ = ["Keystream", "Targets", "box_muller_sum_", "device_kernel", "fill", "native_kernel", "pairs_per_chunk",
           "stage"]
