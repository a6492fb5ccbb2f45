"""ChaCha20 and the secure Gaussian stream fused in Triton kernels (CUDA; ``triton`` is optional).

Imported only when a draw runs on a CUDA device that passes :func:`available` (and by the tests, in
Triton's interpreter: ``TRITON_INTERPRET=1`` must be in the environment when this module is *imported*,
because ``triton.jit`` reads it when it decorates the kernels, and while they run). The kernels call only
Triton builtins, no ``@triton.jit`` function of ``triton.language.standard`` (``tl.zeros``, ``tl.cdiv``...,
decorated when ``triton`` was imported): so the interpreter works even where ``triton`` was imported
before the variable was set.

**Kernel design.** One program computes ChaCha20 blocks in registers, one block per lane: lane ``g`` of a
row pass runs RFC 8439's block function (uint32 adds that wrap, rotations as two shifts, 10 double
rounds unrolled) at block counter ``counter + B + g`` and gives 8 little-endian 64-bit words; the
``TILE // 8`` lanes' words are interleaved into one ``TILE``-long vector (``tl.join`` + ``tl.reshape``),
word ``8·g + m`` of the row. :func:`_keystream_kernel` stores that vector (the keystream entry the tests
check against RFC 8439 and OpenSSL). :func:`_normals_kernel` is the whole draw of
:mod:`.secure_normal` in one launch per destination tensor: program ``(chunk c, tile t)`` owns the pairs
``j0 .. j0 + TILE - 9`` of chunk ``c`` (``j0 = t·(TILE - 8)``); for each of the ``2k`` rows of the chunk's
``(2, k, s)`` word layout it computes the ``TILE // 8`` blocks from the one holding the row's word for
pair ``j0`` (at 64-bit offset ``off < 8`` in it), shifts the vector by ``off`` (``tl.gather``), and turns
the words into float64 uniforms ``(2·(w mod 2⁵²) + 1)·2⁻⁵³`` (exact, as the torch path's bit trick),
radius ``sqrt(-2 ln u)·std/√k`` and angle ``2π v``; the ``k`` cosine and sine terms are summed in the
torch path's order, rounded once to the destination's dtype and written or added (rounded, then added in
float32 for 16-bit types, as ``torch.add_`` does) at the stream positions ``2cC + j0 + j`` (cosines)
and ``2cC + s + j0 + j`` (sines). The last 8 pairs of a tile are not output (the next tile starts there),
so every block is computed by one program except 1 in ``TILE // 8``. The keystream never leaves the
registers (and shared memory, for the shift).

Only one destination per launch: a draw into several tensors launches once per tensor, each program
skipping tiles with no output in that tensor's range of positions; a pair whose cosine and sine fall in
two tensors is computed twice.
"""
from __future__ import annotations

import math
import os
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRET)
_TILE = 4096 if INTERPRET else 1024  # 64-bit words per row pass (the interpreter: fewer, larger programs)
_NUM_WARPS = 4
_MANTISSA = (1 << 52) - 1
_MASK32 = 0xFFFFFFFF

if not INTERPRET:  # pragma: no cover (needs a GPU)
    from triton.language.extra import libdevice


@triton.jit
def _rotl(x, r: tl.constexpr):
    return (x << r) | (x >> (32 - r))


@triton.jit
def _quarter(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _word64(lo, hi):
    return lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)


@triton.jit
def _row(params_ptr, first_block, TILE: tl.constexpr):
    """64-bit keystream words ``8·first_block ..`` (``TILE`` of them, uint64) of the key/nonce in
    ``params_ptr`` (int64: 8 key words, 3 nonce words, the draw's first block counter)."""
    g = tl.arange(0, TILE // 8).to(tl.int64)
    counter = (tl.load(params_ptr + 11) + first_block + g).to(tl.uint32)  # < 2**32 where used
    zero = tl.full([TILE // 8], 0, tl.uint32)
    i0 = zero + 0x61707865
    i1 = zero + 0x3320646E
    i2 = zero + 0x79622D32
    i3 = zero + 0x6B206574
    i4 = zero + tl.load(params_ptr + 0).to(tl.uint32)
    i5 = zero + tl.load(params_ptr + 1).to(tl.uint32)
    i6 = zero + tl.load(params_ptr + 2).to(tl.uint32)
    i7 = zero + tl.load(params_ptr + 3).to(tl.uint32)
    i8 = zero + tl.load(params_ptr + 4).to(tl.uint32)
    i9 = zero + tl.load(params_ptr + 5).to(tl.uint32)
    i10 = zero + tl.load(params_ptr + 6).to(tl.uint32)
    i11 = zero + tl.load(params_ptr + 7).to(tl.uint32)
    i12 = counter
    i13 = zero + tl.load(params_ptr + 8).to(tl.uint32)
    i14 = zero + tl.load(params_ptr + 9).to(tl.uint32)
    i15 = zero + tl.load(params_ptr + 10).to(tl.uint32)
    x0, x1, x2, x3, x4, x5, x6, x7 = i0, i1, i2, i3, i4, i5, i6, i7
    x8, x9, x10, x11, x12, x13, x14, x15 = i8, i9, i10, i11, i12, i13, i14, i15
    for _ in tl.static_range(10):  # 20 rounds: column round, diagonal round
        x0, x4, x8, x12 = _quarter(x0, x4, x8, x12)
        x1, x5, x9, x13 = _quarter(x1, x5, x9, x13)
        x2, x6, x10, x14 = _quarter(x2, x6, x10, x14)
        x3, x7, x11, x15 = _quarter(x3, x7, x11, x15)
        x0, x5, x10, x15 = _quarter(x0, x5, x10, x15)
        x1, x6, x11, x12 = _quarter(x1, x6, x11, x12)
        x2, x7, x8, x13 = _quarter(x2, x7, x8, x13)
        x3, x4, x9, x14 = _quarter(x3, x4, x9, x14)
    w0 = _word64(x0 + i0, x1 + i1)
    w1 = _word64(x2 + i2, x3 + i3)
    w2 = _word64(x4 + i4, x5 + i5)
    w3 = _word64(x6 + i6, x7 + i7)
    w4 = _word64(x8 + i8, x9 + i9)
    w5 = _word64(x10 + i10, x11 + i11)
    w6 = _word64(x12 + i12, x13 + i13)
    w7 = _word64(x14 + i14, x15 + i15)
    # (TILE//8, 2, 2, 2) with word m = 4·m2 + 2·m1 + m0 at [g, m2, m1, m0]: tl.join adds the last axis.
    even = tl.join(tl.join(w0, w4), tl.join(w2, w6))  # m0 = 0: [g, m2, m1]
    odd = tl.join(tl.join(w1, w5), tl.join(w3, w7))  # m0 = 1
    return tl.reshape(tl.join(even, odd), (TILE,))


@triton.jit(do_not_specialize=["num_words"])
def _keystream_kernel(out_ptr, params_ptr, num_words, TILE: tl.constexpr):
    """64-bit words ``TILE·pid ..`` of the keystream from the params' block counter, into ``out_ptr``."""
    pid = tl.program_id(0).to(tl.int64)
    words = _row(params_ptr, pid * (TILE // 8), TILE)
    index = pid * TILE + tl.arange(0, TILE)
    tl.store(out_ptr + index, words.to(tl.int64, bitcast=True), mask=index < num_words)


@triton.jit
def _log(x):
    if _INTERPRET:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def _cos(x):
    if _INTERPRET:
        return tl.cos(x)
    else:
        return libdevice.cos(x)


@triton.jit
def _sin(x):
    if _INTERPRET:
        return tl.sin(x)
    else:
        return libdevice.sin(x)


@triton.jit
def _uniform(words):
    """(2·(w mod 2⁵²) + 1)·2⁻⁵³, exactly: the torch path's ``uniform_from_words_``."""
    return ((words & 0xFFFFFFFFFFFFF) * 2 + 1).to(tl.float64) * 1.1102230246251565e-16  # 2**-53, exact


# Long on purpose: a Triton kernel is one body in registers; helpers would be inlined into it anyway.
@triton.jit(do_not_specialize=["pairs", "chunk", "first_chunk", "lo", "hi"])
def _normals_kernel(
    out_ptr, params_ptr, consts_ptr, pairs, chunk, first_chunk, lo, hi,
    K: tl.constexpr, ADD: tl.constexpr, TILE: tl.constexpr,
):
    """Stream positions ``lo .. hi - 1`` of the draw (``pairs`` pairs, chunks of ``chunk`` pairs) into
    ``out_ptr[0 .. hi - lo - 1]``; program ``(c - first_chunk, t)``: pairs ``t·(TILE - 8) ..`` of chunk ``c``."""
    c = first_chunk + tl.program_id(0).to(tl.int64)
    j0 = tl.program_id(1).to(tl.int64) * (TILE - 8)
    chunk_pair = c * chunk
    s = tl.minimum(pairs - chunk_pair, chunk)  # this chunk's pairs
    count = tl.minimum(s - j0, TILE - 8)  # this tile's pairs
    cos_at = 2 * chunk_pair + j0
    sin_at = cos_at + s
    needed = (count > 0) & (((cos_at < hi) & (cos_at + count > lo)) | ((sin_at < hi) & (sin_at + count > lo)))
    if needed:
        lane = tl.arange(0, TILE).to(tl.int64)
        base = 2 * K * chunk_pair + j0  # 64-bit word of pair j0 in row 0
        scale = tl.load(consts_ptr)  # std / sqrt(k), float64
        two_pi = tl.load(consts_ptr + 1)
        cos_sum = tl.full([TILE], 0.0, tl.float64)
        sin_sum = tl.full([TILE], 0.0, tl.float64)
        for i in tl.static_range(K):
            at_u = base + i * s
            at_v = base + (K + i) * s
            u = tl.gather(_row(params_ptr, at_u // 8, TILE), tl.minimum(lane + at_u % 8, TILE - 1), 0)
            v = tl.gather(_row(params_ptr, at_v // 8, TILE), tl.minimum(lane + at_v % 8, TILE - 1), 0)
            radius = tl.sqrt(_log(_uniform(u)) * -2.0) * scale
            angle = _uniform(v) * two_pi
            if i == 0:
                cos_sum = _cos(angle) * radius
                sin_sum = _sin(angle) * radius
            else:
                cos_sum = cos_sum + _cos(angle) * radius
                sin_sum = sin_sum + _sin(angle) * radius
        valid = lane < count
        for half in tl.static_range(2):
            if half == 0:
                position = cos_at + lane
                value = cos_sum
            else:
                position = sin_at + lane
                value = sin_sum
            mask = valid & (position >= lo) & (position < hi)
            ptrs = out_ptr + (position - lo)
            dtype = out_ptr.dtype.element_ty
            if dtype == tl.float64:
                rounded = value
            else:
                rounded = value.to(tl.float32).to(dtype)  # torch rounds float64 → float32 → 16-bit
            if ADD:
                current = tl.load(ptrs, mask=mask)
                if dtype == tl.float64:
                    rounded = current + rounded
                else:
                    rounded = (current.to(tl.float32) + rounded.to(tl.float32)).to(dtype)
            tl.store(ptrs, rounded, mask=mask)


# ---------------------------------------------------------------------------------------------- host
def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: in Triton's interpreter (``TRITON_INTERPRET=1`` when this
    module was imported: tests) only on CPU tensors, which it runs in host memory; else CUDA (not ROCm) of
    compute capability 8.0 or newer (Triton's supported NVIDIA GPUs)."""
    if INTERPRET:
        return device.type == "cpu"
    if device.type != "cuda" or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _words_le(data: bytes) -> List[int]:
    return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)]


def _params(key: bytes, nonce: bytes, counter: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(_words_le(key) + _words_le(nonce) + [counter], dtype=torch.int64, device=device)


def keystream(key: bytes, nonce: bytes, counter: int, num_bytes: int, device: torch.device) -> torch.Tensor:
    """``num_bytes`` of the RFC 8439 keystream from block ``counter`` (``uint8`` on ``device``), from
    :func:`_keystream_kernel`. The caller checks the lengths and the 32-bit counter range
    (:func:`~lightning_dp.noise.chacha.chacha20_keystream` does)."""
    num_words = -(-num_bytes // 8)
    out = torch.empty(num_words, dtype=torch.int64, device=device)
    if num_words:
        grid = (triton.cdiv(num_words, _TILE),)
        _keystream_kernel[grid](out, _params(key, nonce, counter, device), num_words, TILE=_TILE,
                                num_warps=_NUM_WARPS)
    return out.view(torch.uint8)[:num_bytes]


def fill_normals(
    key: bytes, nonce: bytes, k: int, pairs: int, chunk: int, std: float,
    flats: Sequence[Tuple[torch.Tensor, bool]],
) -> None:
    """The ``2·pairs`` outputs of a draw (keystream from block 0 of ``(key, nonce)``, chunks of ``chunk``
    pairs) into ``flats``: contiguous 1-D tensors on one device, in order, ``(tensor, add)``."""
    device = flats[0][0].device
    params = _params(key, nonce, 0, device)
    consts = torch.tensor([std / math.sqrt(k), 2.0 * math.pi], dtype=torch.float64, device=device)
    tiles = triton.cdiv(min(chunk, pairs), _TILE - 8)
    lo = 0
    for flat, add in flats:
        hi = lo + flat.numel()
        if hi > lo:
            first, last = lo // (2 * chunk), (hi - 1) // (2 * chunk)
            _normals_kernel[(last - first + 1, tiles)](
                flat, params, consts, pairs, chunk, first, lo, hi, K=k, ADD=bool(add), TILE=_TILE,
                num_warps=_NUM_WARPS,
            )
        lo = hi


__all__ = ["available", "fill_normals", "keystream"]
