"""SecureRNG: law of its draws, backends, nonce schedule, and that the key never leaves the object."""
from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import pickle
from fractions import Fraction

import pytest
import torch
from scipy import stats

from lightning_dp.noise import GaussianNoise, SecureRNG, chacha20_keystream
from lightning_dp.noise.secure import (
    _KEY_DOMAIN,
    _binary_words,
    _pairs_per_chunk,
    bernoulli_from_words,
)

SEED = b"lightning_dp tests"


def _rng(**kwargs) -> SecureRNG:
    return SecureRNG(SEED, **kwargs)


# ------------------------------------------------------------------------------------------------- law
@pytest.mark.parametrize("num_normals", [2, 4])
def test_normal_law_ks_moments_tails(num_normals):
    std = 2.5
    z = _rng(num_normals=num_normals).normal((1_000_000,), std=std, dtype=torch.float64) / std
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


def test_normal_pairs_are_uncorrelated():
    chunk = _pairs_per_chunk(2)
    z = _rng().normal((20 * chunk,), std=1.0, dtype=torch.float64).view(10, 2, chunk)
    cos_part, sin_part = z[:, 0].flatten(), z[:, 1].flatten()  # outputs sharing their uniforms
    bound = 5 / math.sqrt(10 * chunk)
    assert abs(torch.corrcoef(torch.stack([cos_part, sin_part]))[0, 1].item()) < bound
    assert abs(torch.corrcoef(torch.stack([cos_part**2, sin_part**2]))[0, 1].item()) < bound


def test_normal_matches_documented_construction():
    """Keystream words → uniforms (2j+1)·2⁻⁵³ → sum of k Box–Muller normals / √k, layout (2, k, pairs)."""
    n, k, std = 5, 2, 3.0
    z = _rng().normal((n,), std=std, dtype=torch.float64)
    key = hashlib.sha256(_KEY_DOMAIN + SEED).digest()
    pairs = 3
    stream = chacha20_keystream(key, (0).to_bytes(12, "little"), 0, 8 * 2 * k * pairs, backend="openssl")
    words = [int.from_bytes(bytes(stream[8 * i : 8 * i + 8].tolist()), "little") for i in range(2 * k * pairs)]
    uniforms = [((w & ((1 << 52) - 1)) * 2 + 1) / 2.0**53 for w in words]
    u = [uniforms[i * pairs : (i + 1) * pairs] for i in range(k)]
    v = [uniforms[(k + i) * pairs : (k + i + 1) * pairs] for i in range(k)]
    expected = []
    for trig in (math.cos, math.sin):
        for j in range(pairs):
            expected.append(sum(math.sqrt(-2 * math.log(u[i][j])) * trig(2 * math.pi * v[i][j]) for i in range(k)))
    expected = torch.tensor(expected[:n], dtype=torch.float64) * std / math.sqrt(k)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)


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
def test_openssl_and_torch_backends_give_the_same_draws(n, num_normals, monkeypatch):
    from lightning_dp.noise import secure

    monkeypatch.setattr(secure, "_CHUNK_WORDS", 64)  # several chunks, threads and a partial chunk at small n
    a = _rng(num_normals=num_normals, backend="openssl")
    b = _rng(num_normals=num_normals, backend="torch")
    assert torch.equal(a.normal((n,), std=1.7), b.normal((n,), std=1.7))
    assert torch.equal(a.uniform((n,)), b.uniform((n,)))
    assert torch.equal(a.bernoulli(n, 0.25), b.bernoulli(n, 0.25))
    assert torch.equal(_rng().normal((n,), std=1.7), _rng(backend="auto").normal((n,), std=1.7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_normal_shapes_dtypes_and_std(dtype):
    rng = _rng()
    z = rng.normal(torch.Size([3, 4, 5]), std=0.5, device="cpu", dtype=dtype)
    assert z.shape == (3, 4, 5) and z.dtype == dtype and z.is_contiguous()
    assert rng.normal(7, 1.0).shape == (7,)
    assert torch.equal(rng.normal((2, 2), 0.0), torch.zeros(2, 2))
    assert rng.normal((0, 3), 1.0).shape == (0, 3)
    reference = _rng().normal((3, 4, 5), std=0.5, dtype=torch.float64)
    torch.testing.assert_close(z.double(), reference, rtol=1e-2, atol=1e-2)  # one rounding of the same draw


def test_same_call_as_gaussian_noise():
    for noise in (GaussianNoise(seed=0), SecureRNG()):
        z = noise.normal(torch.Size([4, 3]), std=2.0, device=torch.device("cpu"), dtype=torch.float32)
        assert z.shape == (4, 3) and z.dtype == torch.float32


# ------------------------------------------------------------------------------------ nonce schedule
def test_no_key_nonce_pair_is_used_twice(monkeypatch):
    rng = _rng()
    seen = []
    original = rng._reserve
    monkeypatch.setattr(rng, "_reserve", lambda nbytes: seen.append(original(nbytes)) or seen[-1])
    rng.normal((10,), 1.0)
    rng.normal((3 * _pairs_per_chunk(2) + 1,), 1.0)
    rng.uniform((5,))
    rng.bernoulli(100, 0.5)
    rng.normal((10,), 1.0)
    assert len(seen) == 5 and len(set(seen)) == 5
    assert rng.state_dict() == {"calls": 5}


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
        assert generator._key not in dumped
    assert SEED not in _serialised(state)


def test_pickle_and_deepcopy_drop_an_os_key():
    rng = SecureRNG()
    assert rng._key not in pickle.dumps(rng) and rng._key.hex() not in repr(rng)
    clone = copy.deepcopy(rng)
    assert clone._key != rng._key and not torch.equal(clone.normal((20,), 1.0), rng.normal((20,), 1.0))
    seeded_clone = pickle.loads(pickle.dumps(_rng()))
    assert torch.equal(seeded_clone.normal((20,), 1.0), _rng().normal((20,), 1.0))


def test_load_state_dict_rekeys_from_the_os_or_resumes_seeded_schedule():
    rng = SecureRNG()
    key = rng._key
    rng.load_state_dict({})
    assert rng._key != key
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
    from lightning_dp.noise import secure

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(secure, "_CHUNK_WORDS", 64)
        rng = _rng()
        rng.normal((1000,), 1.0)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(secure, "_box_muller_sum_", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            rng.normal((1000,), 1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
