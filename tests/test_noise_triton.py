"""The fused Triton kernels of secure CUDA noise (``lightning_dp/noise/_triton_chacha.py``), run on the CPU in
Triton's interpreter: the keystream against RFC 8439's vectors and OpenSSL's bytes, the normals against
the torch-ops device path, the law of a seeded draw, and the kernel choice.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel (triton 3.x's ``knobs.runtime.interpret``),
so it is set before ``_triton_chacha`` is imported (or the module is reloaded). Skipped without ``triton``.
"""
from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

from lightning_dp.noise import SecureRNG, secure_normal  # noqa: E402
from lightning_dp.noise.chacha import chacha20_keystream  # noqa: E402

from .test_noise_chacha import (  # noqa: E402
    RFC_2_3_2_BLOCK,
    RFC_2_3_2_KEY,
    RFC_2_3_2_NONCE,
    RFC_2_4_2_CIPHERTEXT,
    RFC_2_4_2_NONCE,
    RFC_2_4_2_PLAINTEXT,
    RFC_A_1,
    _hex,
)


_MODULE = "lightning_dp.noise._triton_chacha"
_ENV = os.environ.get("TRITON_INTERPRET")


def _restore_environment() -> None:
    if _ENV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _ENV


# An interpreted copy of the module for this file's tests only, imported at collection and taken out of
# sys.modules and of the environment at once: other test modules (collected and run before this one's
# fixture) must get the ordinary module, which never runs the interpreter on a device's tensors.
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, and again when they run
_BEFORE = sys.modules.pop(_MODULE, None)
tc = importlib.import_module(_MODULE)
sys.modules.pop(_MODULE, None)
if _BEFORE is not None:
    sys.modules[_MODULE] = _BEFORE
_restore_environment()
_CPU_FILL = secure_normal.fill


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """The interpreter for this module's tests only; afterwards the interpreted module is forgotten (a
    later CUDA draw in this process imports the compiled kernels)."""
    os.environ["TRITON_INTERPRET"] = "1"
    secure_normal._triton_module.cache_clear()
    yield
    _restore_environment()
    secure_normal._triton_module.cache_clear()


CPU = torch.device("cpu")
BIG_TILE = 65536  # the interpreter's cost is per operation: few, wide programs


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.tolist())


# ------------------------------------------------------------------------------------------ keystream
def test_rfc_2_3_2_block_function():
    assert _bytes(tc.keystream(RFC_2_3_2_KEY, RFC_2_3_2_NONCE, 1, 64, CPU)) == RFC_2_3_2_BLOCK


def test_rfc_2_4_2_encryption():
    stream = tc.keystream(RFC_2_3_2_KEY, RFC_2_4_2_NONCE, 1, len(RFC_2_4_2_PLAINTEXT), CPU)
    assert bytes(a ^ b for a, b in zip(stream.tolist(), RFC_2_4_2_PLAINTEXT)) == RFC_2_4_2_CIPHERTEXT


@pytest.mark.parametrize("index", range(len(RFC_A_1)))
def test_rfc_appendix_a_1(index):
    key, nonce, counter, block = RFC_A_1[index]
    assert _bytes(tc.keystream(key, nonce, counter, 64, CPU)) == _hex(block)


@pytest.mark.parametrize(
    "counter, num_bytes",
    [(0, 1), (1, 63), (7, 4096 + 5), (12345, 70_000), ((1 << 32) - 1200, 70_000), ((1 << 32) - 2, 128)],
)
def test_keystream_equals_openssl(counter, num_bytes):
    generator = torch.Generator().manual_seed(counter % 1000 + num_bytes)
    key = bytes(torch.randint(0, 256, (32,), generator=generator).tolist())
    nonce = bytes(torch.randint(0, 256, (12,), generator=generator).tolist())
    ours = tc.keystream(key, nonce, counter, num_bytes, CPU)
    assert ours.dtype == torch.uint8 and ours.shape == (num_bytes,)
    assert torch.equal(ours, chacha20_keystream(key, nonce, counter, num_bytes, backend="openssl"))


# ------------------------------------------------------------------------------------------- normals
def _torch_path(key, nonce, k, pairs, std, flats):
    """The torch-ops device path (``_fill_device`` with the tensor keystream), forced, on CPU tensors."""
    secure_normal._fill_device(secure_normal.Keystream("chacha20", key, nonce, "torch"), k, pairs, std,
                               secure_normal.Targets(flats))


def _flats(sizes, dtypes, adds, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=generator, dtype=torch.float64).to(dtype), add)
            for n, dtype, add in zip(sizes, dtypes, adds)]


def _close(ours, ref):
    if ref.dtype == torch.float64:
        torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    else:  # one rounding of float64 values that agree to ~1e-15: equal but for rare rounding ties
        ulp = torch.finfo(ref.dtype).eps * ref.abs().float().clamp_min(1.0)
        assert ((ours.float() - ref.float()).abs() <= ulp).all()


@pytest.mark.parametrize(
    "k, pairs, chunk, tile, sizes, dtypes, adds",
    [
        # chunks of 20 pairs: rows start at 64-bit offset 4 in a block (the shift), a short last chunk
        (2, 50, 20, 64, [100], [torch.float64], [False]),
        (3, 29, 20, 64, [7, 44, 7], [torch.float32, torch.float64, torch.bfloat16], [True, False, True]),
        # several tiles per chunk (tile 64: 56 pairs each), a 6-pair last chunk, an odd total
        (2, 130, 124, 64, [150, 109, 1], [torch.float32, torch.float32, torch.float64], [True, False, False]),
    ],
)
def test_fused_normals_equal_torch_path(monkeypatch, k, pairs, chunk, tile, sizes, dtypes, adds):
    monkeypatch.setattr(tc, "_TILE", tile)
    monkeypatch.setattr(secure_normal, "pairs_per_chunk", lambda _k: chunk)
    key, nonce = bytes(range(1, 33)), (12345).to_bytes(12, "little")
    ours, ref = _flats(sizes, dtypes, adds, 0), _flats(sizes, dtypes, adds, 0)
    tc.fill_normals(key, nonce, k, pairs, chunk, 1.7, ours)
    _torch_path(key, nonce, k, pairs, 1.7, ref)
    for (a, _), (b, _) in zip(ours, ref):
        _close(a, b)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """``SecureRNG`` draws on CPU tensors go through ``_fill_device`` with the Triton kernel chosen."""
    monkeypatch.setattr(tc, "_TILE", BIG_TILE)
    monkeypatch.setattr(secure_normal, "_triton_module", lambda: tc)
    monkeypatch.setattr(secure_normal, "device_kernel", lambda device: "triton")
    monkeypatch.setattr(secure_normal, "fill", secure_normal._fill_device)


def test_secure_rng_draw_equals_cpu_path(fused_on_cpu, monkeypatch):
    """A whole seeded draw (two chunks of the default layout, odd size, into two tensors) through
    ``SecureRNG`` equals the same generator's draw on the CPU path (torch keystream backend)."""
    def tensors():
        return [torch.zeros(40_000), torch.ones(30_001, dtype=torch.float64)]

    fused, ref = tensors(), tensors()
    SecureRNG(seed=b"triton", backend="torch").add_normal_(fused, std=0.5)
    monkeypatch.setattr(secure_normal, "fill", _CPU_FILL)
    SecureRNG(seed=b"triton", backend="torch").add_normal_(ref, std=0.5)
    for a, b in zip(fused, ref):
        _close(a, b)


def test_seeded_law(fused_on_cpu):
    n = 400_000
    x = SecureRNG(seed=b"law", backend="torch").normal((n,), std=1.0, dtype=torch.float64)
    mean, std = float(x.mean()), float(x.std())
    assert abs(mean) < 5 / math.sqrt(n) and abs(std - 1) < 5 / math.sqrt(2 * n)
    from scipy import stats

    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-3


# ----------------------------------------------------------------------------------------- selection
def test_kernel_choice(monkeypatch):
    monkeypatch.delenv(secure_normal.KERNEL_ENV, raising=False)
    assert secure_normal.device_kernel(CPU) == "torch"  # CPU draws never take the device path
    meta = torch.device("meta")
    monkeypatch.setattr(tc, "available", lambda device: True)
    monkeypatch.setattr(secure_normal, "_triton_module", lambda: tc)
    assert secure_normal.device_kernel(meta) == "triton"
    monkeypatch.setenv(secure_normal.KERNEL_ENV, "torch")
    assert secure_normal.device_kernel(meta) == "torch"
    monkeypatch.setenv(secure_normal.KERNEL_ENV, "nope")
    with pytest.raises(ValueError, match="LIGHTNING_DP_SECURE_KERNEL"):
        secure_normal.device_kernel(meta)
    monkeypatch.setattr(secure_normal, "_triton_module", lambda: None)  # triton missing
    monkeypatch.setenv(secure_normal.KERNEL_ENV, "auto")
    assert secure_normal.device_kernel(meta) == "torch"
    monkeypatch.setenv(secure_normal.KERNEL_ENV, "triton")
    with pytest.raises(RuntimeError, match="triton"):
        secure_normal.device_kernel(meta)
