"""SecureRNG: law of its draws (both ciphers, both Box–Muller kernels: native and torch ops), the
documented stream, backends and thread counts, add_normal_, the nonce schedule, and that the keys never
leave the object. AES-256-CTR itself and the cipher choice: tests/test_noise_aes.py."""
from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import pickle
import sys
import types
from fractions import Fraction

import pytest
import torch
from scipy import stats

from lightning_dp.noise import GaussianNoise, SecureRNG, chacha20_keystream, secure_normal
from lightning_dp.noise.secure import _KEY_DOMAINS, _binary_words, bernoulli_from_words
from lightning_dp.noise.secure_normal import pairs_per_chunk

SEED = b"lightning_dp tests"
NATIVE = secure_normal._native


def _rng(**kwargs) -> SecureRNG:
    return SecureRNG(SEED, **kwargs)


@pytest.fixture(params=["chacha20", "aes256-ctr"])
def cipher(request):
    """The test runs with both keystreams: ChaCha20 (the original stream) and AES-256-CTR."""
    return request.param


@pytest.fixture(params=["native", "native-pool", "torch"])
def kernel(request, monkeypatch):
    """The test runs with the native float64 kernel (the whole draw in one call on torch's OpenMP threads,
    and chunk by chunk on the Python thread pool, as where it was built without OpenMP) and with the
    torch-ops one."""
    if request.param.startswith("native") and NATIVE is None:
        pytest.skip("native kernel not built")
    if request.param == "native-pool":
        kernel = types.SimpleNamespace(sum_normals_=NATIVE.sum_normals_, openmp=0)
    else:
        kernel = NATIVE if request.param == "native" else None
    monkeypatch.setattr(secure_normal, "_native", kernel)
    return request.param


# ------------------------------------------------------------------------------------------------- law
@pytest.mark.parametrize("num_normals", [2, 4])
def test_normal_law_ks_moments_tails(num_normals, kernel, cipher):
    std = 2.5
    z = _rng(num_normals=num_normals, cipher=cipher).normal((1_000_000,), std=std, dtype=torch.float64) / std
    n = z.numel()
    assert stats.kstest(z[:200_000].numpy(), "norm").pvalue > 1e-3
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    kurtosis = (z**4).mean().item() / z.var().item() ** 2
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)
    for threshold in (1.0, 2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(threshold)
        observed = (z.abs() > threshold).double().mean().item()
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / n) + 1 / n, threshold
    assert z.abs().max().item() <= math.sqrt(106 * math.log(2)) * math.sqrt(num_normals)  # 2⁻⁵³ grid bound


def test_add_normal_law_float32(kernel, cipher):
    """The optimizer's path: noise added in place into float32 tensors (several, a chunk straddling them)."""
    std = 0.7
    tensors = [torch.zeros(300_001), torch.zeros(7), torch.zeros(400, 500)]
    _rng(cipher=cipher).add_normal_(tensors, std=std)
    z = torch.cat([t.reshape(-1) for t in tensors]).double() / std
    n = z.numel()
    assert stats.kstest(z[::3].numpy(), "norm").pvalue > 1e-3
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(z.numpy())) < 5 * math.sqrt(24 / n)
    for threshold in (2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(threshold)
        observed = (z.abs() > threshold).double().mean().item()
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / n) + 1 / n, threshold


def test_normal_pairs_are_uncorrelated(kernel):
    chunk = pairs_per_chunk(2)
    z = _rng().normal((20 * chunk,), std=1.0, dtype=torch.float64).view(10, 2, chunk)
    cos_part, sin_part = z[:, 0].flatten(), z[:, 1].flatten()  # outputs sharing their uniforms
    bound = 5 / math.sqrt(10 * chunk)
    assert abs(torch.corrcoef(torch.stack([cos_part, sin_part]))[0, 1].item()) < bound
    assert abs(torch.corrcoef(torch.stack([cos_part**2, sin_part**2]))[0, 1].item()) < bound


def _keystream(cipher: str, nonce: int, num_bytes: int) -> bytes:
    """Draw ``nonce``'s keystream as documented: ChaCha20 (RFC 8439, 12-byte little-endian nonce, block
    counter from 0) or AES-256-CTR (counter block: 8-byte big-endian nonce, 8-byte counter from 0), under
    SHA-256(domain ‖ seed), straight from OpenSSL through ``cryptography``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = hashlib.sha256(_KEY_DOMAINS[cipher] + SEED).digest()
    if cipher == "chacha20":
        return bytes(chacha20_keystream(key, nonce.to_bytes(12, "little"), 0, num_bytes, backend="openssl").tolist())
    encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce.to_bytes(8, "big") + bytes(8))).encryptor()
    return encryptor.update(bytes(num_bytes))


def _documented(k: int, n: int, std: float, nonce: int = 0, chunk: int = 0, cipher: str = "chacha20") -> list:
    """The first ``n`` outputs of draw ``nonce`` in plain Python, from the documented construction and in
    exact arithmetic (mpmath, 40 digits): keystream → little-endian 64-bit words → uniforms (2j+1)·2⁻⁵³ →
    per chunk of ``chunk`` pairs (default: one chunk) words laid out (2, k, size), cosine sums then sine
    sums of k Box–Muller normals, times std/√k."""
    import mpmath

    mpmath.mp.dps = 40
    pairs = -(-n // 2)
    chunk = chunk or pairs
    raw = _keystream(cipher, nonce, 16 * k * pairs)
    words = [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(2 * k * pairs)]
    uniforms = [mpmath.mpf((w & ((1 << 52) - 1)) * 2 + 1) / 2**53 for w in words]
    out = []
    for start in range(0, pairs, chunk):
        size = min(chunk, pairs - start)
        block = uniforms[2 * k * start : 2 * k * (start + size)]
        u = [block[i * size : (i + 1) * size] for i in range(k)]
        v = [block[(k + i) * size : (k + i + 1) * size] for i in range(k)]
        for trig in (mpmath.cos, mpmath.sin):
            for j in range(size):
                total = sum(mpmath.sqrt(-2 * mpmath.log(u[i][j])) * trig(2 * mpmath.pi * v[i][j]) for i in range(k))
                out.append(total * std / mpmath.sqrt(k))
    return out[:n]


@pytest.mark.parametrize("k, n", [(2, 5), (2, 300), (3, 41)])
def test_normal_matches_documented_construction(kernel, cipher, k, n):
    """Both kernels reproduce the construction to a few ulp of the exact values (float64): measured at most
    2 (native) and 5 (torch ops) units of 2⁻⁵²·(std + |z|), median under 0.5; allowed 16, median 2."""
    std = 3.0
    rng = _rng(num_normals=k, cipher=cipher)
    rng.normal((3,), std=std)  # the second draw: nonce 1
    z = rng.normal((n,), std=std, dtype=torch.float64)
    expected = torch.tensor([float(e) for e in _documented(k, n, std, nonce=1, cipher=cipher)], dtype=torch.float64)
    errors = (z - expected).abs() / (2.0**-52 * std * (1 + expected.abs() / std))
    assert errors.max().item() <= 16 and errors.median().item() <= 2, errors.max().item()


def test_chunk_layout_matches_documented_construction(kernel, cipher, monkeypatch):
    monkeypatch.setattr(secure_normal, "_CHUNK_WORDS", 64)  # 12-pair chunks (k = 2): 5 chunks, the last short
    chunk = pairs_per_chunk(2)
    assert chunk == 12
    n, std = 105, 1.0
    z = _rng(cipher=cipher).normal((n,), std=std, dtype=torch.float64)
    expected = torch.tensor([float(e) for e in _documented(2, n, std, chunk=chunk, cipher=cipher)], dtype=torch.float64)
    torch.testing.assert_close(z, expected, rtol=2.0**-48, atol=2.0**-48)


def test_native_and_torch_kernels_agree(monkeypatch):
    """The native kernel against the torch-ops path it replaces, on the same stream: float64 to a few
    ulp; float32 outputs (rounded once from float64) identical but for rare last-bit ties."""
    if NATIVE is None:
        pytest.skip("native kernel not built")
    count = 3 * pairs_per_chunk(2) * 2 + 12345
    results = {}
    for name, kernel in (("native", NATIVE), ("torch", None)):
        monkeypatch.setattr(secure_normal, "_native", kernel)
        results[name] = (
            _rng().normal((count,), std=1.3, dtype=torch.float64),
            _rng().normal((count,), std=1.3, dtype=torch.float32),
        )
    (native64, native32), (torch64, torch32) = results["native"], results["torch"]
    torch.testing.assert_close(native64, torch64, rtol=0, atol=1e-14)
    assert (native32 != torch32).double().mean().item() < 1e-4
    torch.testing.assert_close(native32, torch32, rtol=2**-23, atol=0)


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_cpu_draw_does_not_depend_on_the_thread_count(kernel, cipher, workers, monkeypatch):
    """Chunks are split over threads at keystream counter offsets: the bits are those of one thread."""
    monkeypatch.setattr(secure_normal, "_CHUNK_WORDS", 256)  # 60-pair chunks: many chunks, uneven runs
    monkeypatch.setattr(secure_normal, "_CPU_WORKERS", 1)
    single = _rng(cipher=cipher).normal((2345,), std=1.0)
    single_added = [torch.ones(1000), torch.ones(33, 41)]
    _rng(cipher=cipher).add_normal_(single_added, std=1.0)
    monkeypatch.setattr(secure_normal, "_CPU_WORKERS", workers)
    assert torch.equal(_rng(cipher=cipher).normal((2345,), std=1.0), single)
    added = [torch.ones(1000), torch.ones(33, 41)]
    _rng(cipher=cipher).add_normal_(added, std=1.0)
    assert all(torch.equal(a, b) for a, b in zip(added, single_added))


def test_uniform_law_and_grid():
    u = _rng().uniform((300_000,))
    assert u.dtype == torch.float64
    assert 0 < u.min().item() and u.max().item() < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    scaled = u * 2.0**53
    assert torch.equal(scaled, scaled.round()) and bool((scaled.long() % 2 == 1).all())
    assert _rng().uniform((2, 3), dtype=torch.float32).shape == (2, 3)


@pytest.mark.parametrize("p", [0.3, 0.004, 0.999])
def test_bernoulli_rate(p):
    n = 400_000
    mask = _rng().bernoulli(n, p)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert abs(mask.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_bernoulli_edge_probabilities():
    rng = _rng()
    assert not rng.bernoulli(100, 0.0).any() and rng.bernoulli(100, 1.0).all()
    assert rng.bernoulli(0, 0.5).shape == (0,)
    assert not rng.bernoulli(10_000, 1e-300).any()


@pytest.mark.parametrize("p", [0.5, 0.3, 1e-3, 2.0**-100 + 2.0**-140, 5e-324, 1 - 2.0**-53])
def test_binary_words_are_exact(p):
    words = _binary_words(p)
    assert sum(Fraction(w, 2 ** (64 * (i + 1))) for i, w in enumerate(words)) == Fraction(p)


def _int64(*unsigned: int) -> torch.Tensor:
    return torch.tensor([u - (1 << 64) if u >= 1 << 63 else u for u in unsigned], dtype=torch.int64)


def test_bernoulli_compares_unsigned_words_with_p():
    p = 0.5 + 2.0**-53  # one word: 2**63 + 2**11
    assert _binary_words(p) == [(1 << 63) + (1 << 11)]
    w = (1 << 63) + (1 << 11)
    asked = []
    out = bernoulli_from_words(_int64(w - 1, w, w + 1, 0, (1 << 64) - 1), p, lambda c: asked.append(c) or _int64())
    assert out.tolist() == [True, False, False, True, False]  # a tie past p's last bit means U >= p
    assert asked == []


def test_bernoulli_ties_draw_more_words():
    q = 2.0**-100 + 2.0**-140  # three words: 0, 2**28, 2**52
    assert _binary_words(q) == [0, 1 << 28, 1 << 52]
    follow_ups = [_int64(0, (1 << 28) + 1, 1 << 28), _int64(1 << 52)]
    asked = []

    def more(count):
        asked.append(count)
        return follow_ups.pop(0)

    out = bernoulli_from_words(_int64(0, 0, 0, 5), q, more)
    assert out.tolist() == [True, False, False, False]
    assert asked == [3, 1]


# --------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("n", [1, 2, 7, 16, 37, 1000])
@pytest.mark.parametrize("num_normals", [2, 3])
def test_openssl_and_torch_backends_give_the_same_draws(n, num_normals, kernel, monkeypatch):
    monkeypatch.setattr(secure_normal, "_CHUNK_WORDS", 64)  # several chunks, threads and a partial chunk at small n
    a = _rng(num_normals=num_normals, backend="openssl", cipher="chacha20")
    b = _rng(num_normals=num_normals, backend="torch")  # "auto": ChaCha20, the only tensor keystream
    assert torch.equal(a.normal((n,), std=1.7), b.normal((n,), std=1.7))
    assert torch.equal(a.uniform((n,)), b.uniform((n,)))
    assert torch.equal(a.bernoulli(n, 0.25), b.bernoulli(n, 0.25))
    assert torch.equal(_rng().normal((n,), std=1.7), _rng(backend="auto").normal((n,), std=1.7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_normal_shapes_dtypes_and_std(dtype, kernel):
    rng = _rng()
    z = rng.normal(torch.Size([3, 4, 5]), std=0.5, device="cpu", dtype=dtype)
    assert z.shape == (3, 4, 5) and z.dtype == dtype and z.is_contiguous()
    assert rng.normal(7, 1.0).shape == (7,)
    assert torch.equal(rng.normal((2, 2), 0.0), torch.zeros(2, 2))
    assert rng.normal((0, 3), 1.0).shape == (0, 3)
    reference = _rng().normal((3, 4, 5), std=0.5, dtype=torch.float64)
    assert torch.equal(z, reference.to(dtype))  # one rounding of the same draw


# ------------------------------------------------------------------------------------------ add_normal_
def test_add_normal_is_one_draw_over_the_concatenation(kernel, monkeypatch):
    """One nonce for all tensors; their concatenation (in order, each in its logical element order) is the
    stream ``normal`` gives for the total, each value rounded once to its tensor's dtype and then added."""
    monkeypatch.setattr(secure_normal, "_CHUNK_WORDS", 256)  # chunks straddle tensor boundaries
    shapes_dtypes = [
        ((5,), torch.float32), ((0,), torch.float32), ((70, 3), torch.float64), ((3, 1), torch.float32),
        ((301,), torch.bfloat16), ((8,), torch.float16), ((1,), torch.float32),
    ]
    base = [torch.randn(shape).to(dtype) for shape, dtype in shapes_dtypes]
    base.append(torch.randn(40, 30).t())  # not contiguous
    tensors = [t.clone() for t in base]
    rng = _rng()
    rng.add_normal_(tensors, std=2.0)
    assert rng.state_dict() == {"calls": 1}
    total = sum(t.numel() for t in tensors)
    stream = _rng().normal((total,), std=2.0, dtype=torch.float64)
    position = 0
    for before, after in zip(base, tensors):
        noise = stream[position : position + before.numel()].view(before.shape)
        position += before.numel()
        assert after.dtype == before.dtype and after.shape == before.shape
        assert torch.equal(after, before + noise.to(before.dtype)), before.dtype


def test_add_normal_std_zero_empty_and_errors():
    rng = _rng()
    tensors = [torch.ones(3), torch.zeros(0)]
    rng.add_normal_(tensors, std=0.0)
    rng.add_normal_([torch.zeros(0)], std=1.0)
    rng.add_normal_([], std=1.0)
    assert torch.equal(tensors[0], torch.ones(3)) and rng.state_dict() == {"calls": 0}
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="std"):
            rng.add_normal_([torch.zeros(3)], std=bad)


def test_add_normal_tensors_requiring_grad():
    weight = torch.zeros(4, 3, requires_grad=True)
    _rng().add_normal_([weight], std=1.0)
    assert weight.requires_grad and weight.grad_fn is None and bool((weight != 0).all())


def test_optimizer_noise_call_is_one_draw_per_step():
    """``add_noise_`` (the optimizer's noise call) uses ``add_normal_``: one nonce per step, not one per piece."""
    from lightning_dp.noise.adding import NOISE_PIECE, add_noise_

    rng = _rng()
    grads = [torch.zeros(3 * NOISE_PIECE + 5), torch.zeros(300, 300)]
    add_noise_(rng, grads, std=1.5)
    assert rng.state_dict() == {"calls": 1}
    expected = _rng().normal((sum(g.numel() for g in grads),), std=1.5)
    assert torch.equal(torch.cat([g.reshape(-1) for g in grads]), expected)


def test_large_draws_take_one_nonce_per_counter_range(monkeypatch):
    """A draw past ChaCha20's 2³² blocks continues on the next nonce (here with the limit made small)."""
    from lightning_dp.noise import secure

    monkeypatch.setattr(secure, "_MAX_BYTES_PER_CALL", 64 * 100)  # 200 pairs, 400 outputs per nonce (k = 2)
    rng = _rng()
    tensors = [torch.zeros(250), torch.zeros(731)]
    rng.add_normal_(tensors, std=1.0)
    assert rng.state_dict() == {"calls": 3}
    reference = _rng()
    parts = [reference.normal((400,), 1.0), reference.normal((400,), 1.0), reference.normal((181,), 1.0)]
    assert torch.equal(torch.cat([t.reshape(-1) for t in tensors]), torch.cat(parts))


def test_device_path_groups_chunks_like_the_cpu_path(cipher, monkeypatch):
    """The off-CPU path (CUDA: a group of chunks at a time in torch ops; ChaCha20's keystream from the tensor
    implementation, AES-256-CTR's from OpenSSL then copied), run here on CPU tensors: the same outputs as
    the CPU path, groups and chunks cut where the stream's layout says."""
    monkeypatch.setattr(secure_normal, "_CHUNK_WORDS", 64)
    monkeypatch.setattr(secure_normal, "_DEVICE_GROUP_CHUNKS", 3)
    monkeypatch.setattr(secure_normal, "_native", None)
    pairs, k = 12 * 7 + 5, 2
    key = bytes(range(32))
    nonce = (4).to_bytes(12, "little") if cipher == "chacha20" else (4).to_bytes(8, "big")
    expected = torch.zeros(2 * pairs, dtype=torch.float64)
    cpu_stream = secure_normal.Keystream(cipher, key, nonce)
    secure_normal.fill(cpu_stream, k, pairs, 1.5, secure_normal.Targets([(expected, False)]))
    out = [torch.ones(100), torch.ones(2 * pairs - 100)]
    device_stream = secure_normal.Keystream(cipher, key, nonce, "torch" if cipher == "chacha20" else "openssl")
    secure_normal._fill_device(device_stream, k, pairs, 1.5, secure_normal.Targets([(t, True) for t in out]))
    assert torch.equal(torch.cat(out), 1 + expected.float())  # rounded once to float32, then added


def test_keystream_errors_reach_the_caller(kernel, monkeypatch):
    """An error while making a chunk's keystream (on any thread) is raised by the draw, once."""
    monkeypatch.setattr(secure_normal, "_CHUNK_WORDS", 256)
    calls = []

    def broken(self, offset):
        calls.append(offset)
        raise RuntimeError("no keystream")

    monkeypatch.setattr(secure_normal.Keystream, "encryptor", broken)
    with pytest.raises(RuntimeError, match="no keystream"):
        _rng().add_normal_([torch.zeros(5000)], std=1.0)
    assert 1 <= len(calls) <= 5000 // 120 + 1
    monkeypatch.undo()
    assert _rng().normal((10,), 1.0).abs().sum() > 0  # and the next draw works


def test_native_kernel_uses_torchs_openmp_runtime():
    """Built with OpenMP on Linux, the kernel shares torch's libgomp (one OpenMP runtime in the process)."""
    if NATIVE is None or not sys.platform.startswith("linux"):
        pytest.skip("native kernel (Linux) only")
    assert NATIVE.openmp == 1
    # A fresh interpreter with torch and the kernel only: other packages of the test session (scikit-learn)
    # bring their own OpenMP runtimes, which say nothing about the kernel's.
    code = (
        "import torch\nfrom lightning_dp.noise import secure_normal\nassert secure_normal._native is not None\n"
        "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l or 'libiomp' in l}))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    runtimes = eval(out.stdout.strip().splitlines()[-1])  # a list literal printed by the child
    assert len(runtimes) == 1, runtimes


def test_native_kernel_checks_its_arguments():
    if NATIVE is None:
        pytest.skip("native kernel not built")
    words = torch.zeros(16 * 2 * 4, dtype=torch.uint8).numpy()
    out = torch.zeros(8).numpy()
    NATIVE.sum_normals_(words, 2, 4, 1.0, [(out, 0)])
    assert bool((out != 0).all())
    with pytest.raises(ValueError, match="exactly 2\\*size"):
        NATIVE.sum_normals_(words, 2, 4, 1.0, [(out[:7], 0)])
    with pytest.raises(ValueError, match="16\\*k\\*size bytes"):
        NATIVE.sum_normals_(words, 2, 5, 1.0, [(torch.zeros(10).numpy(), 0)])
    with pytest.raises(ValueError, match="kind must be"):
        NATIVE.sum_normals_(words, 2, 4, 1.0, [(out, 4)])
    with pytest.raises(BufferError):
        NATIVE.sum_normals_(words, 2, 4, 1.0, [(bytes(32), 0)])  # not writable


def test_same_call_as_gaussian_noise():
    for noise in (GaussianNoise(seed=0), SecureRNG()):
        z = noise.normal(torch.Size([4, 3]), std=2.0, device=torch.device("cpu"), dtype=torch.float32)
        assert z.shape == (4, 3) and z.dtype == torch.float32


# ------------------------------------------------------------------------------------ nonce schedule
def test_no_key_nonce_pair_is_used_twice(monkeypatch):
    rng = _rng()
    seen = []
    original = rng._stream

    def record(num_bytes, device):
        stream = original(num_bytes, device)
        seen.append((stream.cipher, stream.key, stream.nonce))
        return stream

    monkeypatch.setattr(rng, "_stream", record)
    rng.normal((10,), 1.0)
    rng.normal((3 * pairs_per_chunk(2) + 1,), 1.0)
    rng.uniform((5,))
    rng.bernoulli(100, 0.5)
    rng.add_normal_([torch.zeros(10), torch.zeros(3)], 1.0)
    rng.cipher = "chacha20"  # the other cipher continues the same call counter, under its own key
    rng.normal((10,), 1.0)
    rng.uniform((5,))
    assert len(seen) == 7 and len(set(seen)) == 7
    assert len({key for _, key, _ in seen}) == 2  # one key per cipher, never shared
    assert rng.state_dict() == {"calls": 7}


def test_consecutive_draws_differ_and_stream_advances():
    rng = _rng()
    a, b = rng.normal((100,), 1.0), rng.normal((100,), 1.0)
    assert not torch.equal(a, b)
    assert not torch.equal(rng.uniform((100,)), rng.uniform((100,)))
    assert torch.equal(_rng().normal((100,), 1.0), a)  # seeded mode: reproducible from the start


def test_unseeded_generators_differ():
    assert not torch.equal(SecureRNG().normal((50,), 1.0), SecureRNG().normal((50,), 1.0))
    assert not SecureRNG().seeded and _rng().seeded


def test_too_large_request_is_refused():
    with pytest.raises(ValueError, match="split the request"):
        _rng()._reserve(2**38 + 1)


# ---------------------------------------------------------------------------------------- key secrecy
def _serialised(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue() + pickle.dumps(obj) + repr(obj).encode()


def test_state_dict_never_contains_the_key():
    rng = SecureRNG()
    rng.normal((10,), 1.0)
    assert rng.state_dict() == {}
    seeded = _rng()
    seeded.normal((10,), 1.0)
    state = seeded.state_dict()
    assert state == {"calls": 1}
    for generator, dumped in ((rng, _serialised(rng.state_dict())), (seeded, _serialised(state))):
        assert len(generator._keys) == 2 and all(key not in dumped for key in generator._keys.values())
    assert SEED not in _serialised(state)


def test_pickle_and_deepcopy_drop_an_os_key():
    rng = SecureRNG()
    for key in rng._keys.values():
        assert key not in pickle.dumps(rng) and key.hex() not in repr(rng)
    clone = copy.deepcopy(rng)
    assert all(clone._keys[name] != key for name, key in rng._keys.items())
    assert not torch.equal(clone.normal((20,), 1.0), rng.normal((20,), 1.0))
    seeded_clone = pickle.loads(pickle.dumps(_rng()))
    assert torch.equal(seeded_clone.normal((20,), 1.0), _rng().normal((20,), 1.0))


def test_load_state_dict_rekeys_from_the_os_or_resumes_seeded_schedule():
    rng = SecureRNG()
    keys = dict(rng._keys)
    rng.load_state_dict({})
    assert all(rng._keys[name] != key for name, key in keys.items())
    rng.load_state_dict({"calls": 3})
    assert rng.state_dict() == {}

    first = _rng()
    first.normal((10,), 1.0)
    expected = first.normal((10,), 1.0)
    resumed = _rng()
    resumed.load_state_dict({"calls": 1})
    assert torch.equal(resumed.normal((10,), 1.0), expected)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_rekeys():
    rng = SecureRNG()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        os.write(write_end, rng.normal((8,), 1.0).numpy().tobytes())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 1024)
    os.waitpid(pid, 0)
    os.close(read_end)
    assert child != rng.normal((8,), 1.0).numpy().tobytes()


# ------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=0), "`seed` must be non-empty bytes"),
        (dict(seed=b""), "`seed` must be non-empty bytes"),
        (dict(num_normals=1), "`num_normals` must be an integer >= 2"),
        (dict(backend="mt"), "`backend` must be one of"),
        (dict(cipher="aes128"), "`cipher` must be one of"),
        (dict(cipher="aes256-ctr", backend="torch"), "needs OpenSSL's keystream"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SecureRNG(**kwargs)


def test_draw_argument_errors():
    rng = SecureRNG()
    with pytest.raises(ValueError, match="`std` must be"):
        rng.normal((3,), -1.0)
    with pytest.raises(ValueError, match="`dtype` must be a floating-point"):
        rng.normal((3,), 1.0, dtype=torch.int64)
    with pytest.raises(ValueError, match="`p` must be in"):
        rng.bernoulli(3, 1.5)
    with pytest.raises(ValueError, match="`n` must be an integer >= 0"):
        rng.bernoulli(-1, 0.5)


def test_cpu_draw_restores_torch_thread_count(monkeypatch):
    """The torch-ops path runs single-threaded torch ops on its own threads, and restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(secure_normal, "_CHUNK_WORDS", 64)
        monkeypatch.setattr(secure_normal, "_native", None)
        rng = _rng()
        rng.normal((1000,), 1.0)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(secure_normal, "box_muller_sum_", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            rng.normal((1000,), 1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
