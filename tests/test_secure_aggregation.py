"""Secure aggregation with the distributed discrete Gaussian (lightning_dp.secure_aggregation): the sampler's
law, masks that cancel and hide, exact modular sums, the accounting, and DPDDPStrategy(secure_aggregation=True)
on 2 CPU processes (gloo)."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import special, stats

from lightning_dp import make_private
from lightning_dp.accounting.rdp import _epsilon_from_rdp, _rdp_int, _rdp_vector
from lightning_dp.config import DPConfig
from lightning_dp.noise import SecureRNG
from lightning_dp.secure_aggregation import (
    PairwiseMasks,
    SecureAggregator,
    ddg_epsilon,
    ddg_noise_multiplier,
    discrete_gaussian_pmf,
    rounded_l2_norm_bound,
    sample_discrete_gaussian,
)
from lightning_dp.accounting.ddg import DDG_ORDERS, ddg_rdp, ddg_tau, subsampled_rdp


def _ranks(world_size: int, seed: int = 0):
    """World_size ranks' masks with fixed keys, agreed in one process."""
    masks = [PairwiseMasks(r, world_size, private_key=bytes([seed + r + 1]) * 32) for r in range(world_size)]
    for m in masks:
        m.agree([k.public_key for k in masks])
    return masks


def _aggregators(world_size: int, **kwargs):
    return [SecureAggregator(r, world_size, torch.Generator().manual_seed(100 + r), masks=m, **kwargs)
            for r, m in enumerate(_ranks(world_size))]


# ------------------------------------------------------------------------------------ discrete Gaussian
@pytest.mark.parametrize("variance", [0.7, 2.5, 30.0])
def test_discrete_gaussian_matches_the_exact_pmf(variance):
    n = 200_000
    x = sample_discrete_gaussian(variance, n, torch.Generator().manual_seed(1))
    support = int(4 * math.sqrt(variance)) + 1
    pmf = discrete_gaussian_pmf(variance, support).numpy()
    observed = np.array([(x == k).sum().item() for k in range(-support, support + 1)], dtype=np.float64)
    expected = pmf * n
    tail_obs, tail_exp = n - observed.sum(), n * (1 - pmf.sum())
    keep = expected >= 5
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum())
    if tail_exp >= 5:
        chi2 += (tail_obs - tail_exp) ** 2 / tail_exp
        dof += 1
    assert stats.chi2.sf(chi2, dof - 1) > 1e-3
    xs = np.arange(-support, support + 1)
    exact_var = float((pmf * xs**2).sum() / pmf.sum())
    assert x.double().mean().item() == pytest.approx(0.0, abs=5 * math.sqrt(exact_var / n))
    assert x.double().var().item() == pytest.approx(exact_var, rel=0.02)
    # the continuous Gaussian rounded is a different law: the test tells them apart
    rounded = torch.round(torch.randn(n, generator=torch.Generator().manual_seed(2)) * math.sqrt(variance))
    obs_r = np.array([(rounded == k).sum().item() for k in range(-support, support + 1)], dtype=np.float64)
    chi2_r = ((obs_r[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert variance > 5 or stats.chi2.sf(chi2_r, dof - 1) < 1e-6


def test_discrete_gaussian_large_scale_and_secure_generator():
    x = sample_discrete_gaussian(1e12, 200_000, SecureRNG(seed=b"ddg"))
    assert x.dtype == torch.int64
    assert x.double().std().item() == pytest.approx(1e6, rel=0.01)
    assert stats.kstest(x.double().numpy() / 1e6, "norm").pvalue > 1e-3  # σ = 10⁶: the lattice is invisible
    assert torch.equal(sample_discrete_gaussian(0.0, 5, SecureRNG()), torch.zeros(5, dtype=torch.int64))


# ------------------------------------------------------------------------- discrete Gaussian, native kernel
from lightning_dp.secure_aggregation import discrete_gaussian as ddg_module  # noqa: E402

native_only = pytest.mark.skipif(not ddg_module.native_kernel(), reason="lightning_dp.noise._boxmuller not built")


def _chi2_pvalue(x, variance, law="discrete_gaussian"):
    """Chi-square p-value of the draws ``x`` against the discrete Gaussian (or ``law="rounded_normal"``:
    round(N(0, variance))) on ``|k| <= 4σ + 1`` plus the tail."""
    n = x.numel()
    support = int(4 * math.sqrt(variance)) + 1
    if law == "rounded_normal":
        ks, sigma = np.arange(-support, support + 1), math.sqrt(variance)
        pmf = stats.norm.cdf((ks + 0.5) / sigma) - stats.norm.cdf((ks - 0.5) / sigma)
    else:
        pmf = discrete_gaussian_pmf(variance, support).numpy()
    observed = np.array([(x == k).sum().item() for k in range(-support, support + 1)], dtype=np.float64)
    expected = pmf * n
    keep = expected >= 5
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum())
    tail_obs, tail_exp = n - observed.sum(), n * (1 - pmf.sum())
    if tail_exp >= 5:
        chi2 += (tail_obs - tail_exp) ** 2 / tail_exp
        dof += 1
    return stats.chi2.sf(chi2, dof - 1)


@native_only
@pytest.mark.parametrize("variance", [0.7, 2.5, 30.0])
def test_native_discrete_gaussian_matches_the_exact_pmf(variance):
    n = 200_000
    x = torch.zeros(n, dtype=torch.int64)
    ddg_module.add_discrete_gaussian_(x, variance, torch.Generator().manual_seed(11))
    assert _chi2_pvalue(x, variance) > 1e-3
    # and the torch path's draws are the same law: a two-sample chi-square on the common support
    y = torch.zeros(n, dtype=torch.int64)
    ddg_module._sample_torch(y, variance, torch.Generator().manual_seed(12))
    assert _chi2_pvalue(y, variance) > 1e-3
    support = int(3 * math.sqrt(variance)) + 1
    table = np.array([[((z == k).sum().item()) for k in range(-support, support + 1)] for z in (x, y)], dtype=float)
    table = np.concatenate([table, n - table.sum(1, keepdims=True)], axis=1)
    table = table[:, table.min(0) >= 5]
    assert stats.chi2_contingency(table)[1] > 1e-3


@native_only
def test_native_discrete_gaussian_large_scale_and_secure_generator():
    x = sample_discrete_gaussian(1e12, 200_000, SecureRNG(seed=b"ddg-native"))  # the native path on CPU
    assert x.double().std().item() == pytest.approx(1e6, rel=0.01)
    assert stats.kstest(x.double().numpy() / 1e6, "norm").pvalue > 1e-3
    y = torch.zeros(200_000, dtype=torch.int64)
    ddg_module._sample_torch(y, 1e12, SecureRNG(seed=b"ddg-torch"))
    assert stats.ks_2samp(x.numpy(), y.numpy()).pvalue > 1e-3


def _kernel_words(method, variance, candidates):
    """The words the native kernel takes for ``candidates``: two each (CKS) or the rounded sampler's layout."""
    return 2 * candidates if method == 0 else ddg_module._native.dg_rounded_words(variance, candidates)[0]


def _kernel_draws(method, variance, count, threads, add_to=None, candidates=80_000):
    """The native kernel over the same words (seed 5) for ``candidates``: (filled, used, out, words)."""
    words = _kernel_words(method, variance, candidates)
    u = ddg_module.uniform_words(torch.Generator().manual_seed(5), words).numpy()
    out = np.zeros(count, dtype=np.int64) if add_to is None else add_to
    extra = () if method == 0 else (candidates,)
    filled, used = ddg_module._native.discrete_gaussian_(u, out, variance, int(add_to is not None), threads, method,
                                                         *extra)
    return filled, used, out, words


@native_only
@pytest.mark.parametrize("method,variance,count", [(0, 9.0, 40_000), (1, 30.0, 20_000), (1, 2.0**40, 40_000)])
def test_native_discrete_gaussian_draws_do_not_depend_on_the_thread_count(method, variance, count):
    outs = [_kernel_draws(method, variance, count, threads) for threads in (1, 2, 3, 8)]
    for filled, used, out, _ in outs:
        assert filled == count and used == outs[0][1] and np.array_equal(out, outs[0][2])
    assert outs[0][1] < outs[0][3]  # only the chunks it needed


@native_only
@pytest.mark.parametrize("method", ["cks", "rounded"])
def test_native_acceptance_rate_is_the_samplers(method):
    """The acceptance rate used to size the buffer of uniforms is the sampler's."""
    kind = 0 if method == "cks" else 1
    for variance in ((0.7, 30.0, 2.0**40) if method == "cks" else (9.0, 30.0, 2.0**40)):
        filled, _, _, _ = _kernel_draws(kind, variance, 400_000, 1, candidates=400_000)
        rate = ddg_module.acceptance_rate(variance, method)
        assert abs(filled - 400_000 * rate) < 5 * math.sqrt(400_000 * rate * (1 - rate)) + 1


@native_only
def test_native_discrete_gaussian_kernel_buffers():
    native = ddg_module._native
    _, _, first, _ = _kernel_draws(0, 9.0, 40_000, 1)
    # short of uniforms: fills what it can, reports all of them used; adds (add=1) to what is there
    filled, used, out, _ = _kernel_draws(0, 9.0, 200_000, 2, add_to=np.full(200_000, 7, dtype=np.int64))
    rate = ddg_module.acceptance_rate(9.0)
    assert used == 160_000 and abs(filled - 80_000 * rate) < 5 * math.sqrt(80_000 * rate * (1 - rate))
    assert np.all(out[filled:] == 7) and np.array_equal(out[:40_000] - 7, first)
    with pytest.raises(ValueError):
        native.discrete_gaussian_(np.zeros(4), np.zeros(2, dtype=np.int64), 0.0, 0, 1)
    words = native.dg_rounded_words(30.0, 5000)[0]
    with pytest.raises(ValueError, match="dg_rounded_words"):  # the rounded sampler's layout needs its words
        native.discrete_gaussian_(np.zeros(words - 1, dtype=np.int64), np.zeros(2, dtype=np.int64), 30.0, 0, 1, 1, 5000)
    # every word all ones: every candidate is a top-layer wedge that fails, one reserve uniform each, so the
    # reserve runs out: an error, and nothing written
    out, words = np.full(10, 3, dtype=np.int64), native.dg_rounded_words(2.0**40, 5000)[0]
    with pytest.raises(RuntimeError, match="reserve"):
        native.discrete_gaussian_(np.full(words, -1, dtype=np.int64), out, 2.0**40, 1, 1, 1, 5000)
    assert np.all(out == 3)


@native_only
@pytest.mark.parametrize("variance", [9.0, 2.0**40, 0.0])
def test_writing_draws_over_a_buffer_equals_adding_them_to_zeros(variance):
    added = ddg_module.add_discrete_gaussian_(torch.zeros(50_000, dtype=torch.int64), variance,
                                              torch.Generator().manual_seed(4))
    garbage = torch.full((50_000,), -123456789, dtype=torch.int64)
    written = ddg_module.add_discrete_gaussian_(garbage, variance, torch.Generator().manual_seed(4), accumulate=False)
    assert written is garbage and torch.equal(written, added)


@native_only
def test_ziggurat_layers_have_equal_area():
    x, f, r, v, zmax = ddg_module._native.ziggurat_table()
    assert r == pytest.approx(3.6541528853610088, rel=1e-15)  # Marsaglia & Tsang (2000), 256 layers
    assert v == pytest.approx(r * math.exp(-r * r / 2) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2)), rel=1e-15)
    areas = np.array([x[i] * (f[i + 1] - f[i]) for i in range(1, 256)])
    assert np.abs(areas / v - 1).max() < 1e-12 and x[0] * f[0] == pytest.approx(v, rel=1e-15)
    assert x[256] == 0.0 and f[256] == 1.0 and np.all(np.diff(x) < 0)
    assert zmax >= r + 53 * math.log(2) / r  # the largest |Z| the tail can give on the 2^-53 grid


@native_only
def test_rounded_sampler_at_large_scale_is_the_normal():
    """At σ = 1000 the rounding and the rejection are invisible; the ziggurat's shape is not."""
    x = torch.zeros(300_000, dtype=torch.int64)
    ddg_module.add_discrete_gaussian_(x, 1e6, torch.Generator().manual_seed(11), method="rounded")
    assert stats.kstest(x.double().numpy() / 1000.0, "norm").pvalue > 1e-3


@native_only
def test_rounded_sampler_tail_branch_has_the_exact_mass():
    """The ziggurat's tail branch (|Z| > R = 3.654…, left by the base layer) gives 2.6·10⁻⁴ of the draws: a KS
    test cannot see it wrong, so its mass is counted. Draws X at σ = 1000 with |X| > Rσ, i.e. |X| ≥ 3655, have
    probability p from the exact pmf of the target law; over n = 4·10⁷ draws E = np ≈ 10 307 (√E ≈ 101.5,
    the count is Binomial(n, p)). The tolerance ±5 % of E is 5.1 standard deviations: a correct sampler
    passed it on each of 40 seeds tried (the worst at 2.5σ), and a tail 10 % too light or too heavy misses
    it by another 5.1σ (0.1·E ≥ 5√E needs E ≥ 2500; both margins at 5σ need E ≈ 10⁴). The draws come 4·10⁶
    at a time into one buffer (the same generator continues: one stream of 4·10⁷)."""
    sigma, radius = 1000.0, 3.6541528853610088  # Marsaglia & Tsang's R for 256 layers (see the table test)
    n, chunk = 40_000_000, 4_000_000
    threshold = int(radius * sigma)  # |X| > Rσ  ⇔  |X| ≥ threshold + 1
    p = 1.0 - float(discrete_gaussian_pmf(sigma**2, threshold).sum())
    expected = n * p
    generator, buffer, count = torch.Generator().manual_seed(11), torch.empty(chunk, dtype=torch.int64), 0
    for _ in range(n // chunk):
        ddg_module.add_discrete_gaussian_(buffer, sigma**2, generator, method="rounded", accumulate=False)
        count += int((buffer.abs() > threshold).sum())
    assert 5 * math.sqrt(expected) <= 0.05 * expected  # the tolerance is at least 5σ of the count
    assert abs(count - expected) <= 0.05 * expected, (count, expected, (count - expected) / math.sqrt(expected))


@native_only
def test_auto_takes_the_rounded_sampler_from_its_threshold():
    """"auto" takes the rounded sampler from σ = ROUNDED_MIN_SIGMA on, CKS's below."""
    for variance, method in ((ddg_module.ROUNDED_MIN_SIGMA**2, "rounded"), (ddg_module.ROUNDED_MIN_SIGMA**2 / 2, "cks")):
        a, b = torch.zeros(1000, dtype=torch.int64), torch.zeros(1000, dtype=torch.int64)
        ddg_module.add_discrete_gaussian_(a, variance, torch.Generator().manual_seed(3))
        ddg_module.add_discrete_gaussian_(b, variance, torch.Generator().manual_seed(3), method=method)
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="method"):
        ddg_module.add_discrete_gaussian_(a, 9.0, torch.Generator(), method="karney")


@native_only
@pytest.mark.parametrize("variance", [4.0, 9.0])
def test_rounded_gaussian_sampler_matches_the_exact_pmf(variance):
    """The rounded-Gaussian sampler at small σ, where its rejection step matters: its draws follow the
    discrete Gaussian, and not the law of a rounded normal (which a missing rejection would give)."""
    n = 400_000
    x = torch.zeros(n, dtype=torch.int64)
    ddg_module.add_discrete_gaussian_(x, variance, torch.Generator().manual_seed(21), method="rounded")
    assert _chi2_pvalue(x, variance) > 1e-3
    if variance == 4.0:
        assert _chi2_pvalue(x, variance, law="rounded_normal") < 1e-8


@native_only
@pytest.mark.parametrize("bits", [48, 30])  # 30 at 2 ranks: the kernel adds the peer's raw 32-bit keystream
def test_native_and_torch_aggregation_paths_agree(monkeypatch, bits):
    """Without noise both paths draw the same rounding uniforms: the messages and the decoded sums are equal."""
    g = torch.Generator().manual_seed(8)
    xs = [[torch.randn(300, 7, generator=g) * 0.01, torch.randn(50, generator=g, dtype=torch.float64) * 0.01,
           torch.randn(40, 30, generator=g).t()] for _ in range(2)]  # float32, float64, non-contiguous

    def run():
        aggs = _aggregators(2, scale=2.0**16, bits=bits)
        messages = [a._encode(x, sum(t.numel() for t in x), torch.device("cpu"), 0.0, 0.05) for a, x in zip(aggs, xs)]
        outs = [[t.clone() for t in x] for x in xs]
        summed = messages[0] + messages[1]
        for a, out in zip(aggs, outs):
            a._all_reduce = lambda t: t.copy_(summed)
            a.steps = 0
            a(out, std=0.0, sensitivity=0.05)
        return messages, outs

    native_messages, native_outs = run()
    monkeypatch.setattr(ddg_module, "_native", None)
    torch_messages, torch_outs = run()
    for a, b in zip(native_messages, torch_messages):
        assert torch.equal(a, b)
    for a, b in zip(native_outs, torch_outs):
        for ta, tb in zip(a, b):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    expected = [a.double() + b.double() for a, b in zip(*xs)]
    for out, e in zip(native_outs[0], expected):
        assert (out.double() - e).abs().max().item() < 2 * 0.05 / 2**16 + 1e-6


# ----------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("bits", [8, 48, 62])
def test_masks_cancel_exactly(bits):
    masks = _ranks(3)
    for step in (0, 1, 7):
        total = sum(m.mask(step, 10_000, bits) for m in masks)
        assert torch.equal(total.bitwise_and((1 << bits) - 1), torch.zeros(10_000, dtype=torch.int64))
    assert not torch.equal(masks[0].mask(0, 100, bits), masks[0].mask(1, 100, bits))  # fresh per step
    pair = masks[0].pair_mask(2, 3, 100, bits)
    assert torch.equal(pair, masks[2].pair_mask(0, 3, 100, bits))


def test_masked_message_is_uniform_modulo_2_to_the_b():
    aggs = _aggregators(3, bits=20, scale=2.0**10)
    x = torch.full((64_000,), 0.25)  # a constant, very non-uniform contribution
    message = aggs[0].encode(x, std=0.0, sensitivity=1.0)
    assert message.min() >= 0 and message.max() < 2**20
    counts = torch.bincount(message >> 14, minlength=64).double().numpy()  # top 6 bits: 64 bins
    assert stats.chisquare(counts).pvalue > 1e-3
    low = torch.bincount(message & 63, minlength=64).double().numpy()  # low 6 bits
    assert stats.chisquare(low).pvalue > 1e-3
    unmasked = aggs[1].quantize(x, 1.0).bitwise_and((1 << 20) - 1)  # the same data without a mask is not
    assert stats.chisquare(torch.bincount(unmasked >> 14, minlength=64).double().numpy()).pvalue < 1e-6


def test_keys_are_never_pickled():
    import pickle

    masks = _ranks(2)[0]
    keys = list(masks._pair_keys.values())
    data = pickle.dumps(masks)
    assert all(k not in data for k in keys)
    with pytest.raises(RuntimeError, match="no pair keys"):
        pickle.loads(data).mask(0, 4, 16)


# ------------------------------------------------------------------------------ aggregation, in process
def _aggregate(aggs, xs, std, sensitivity):
    messages = [a.encode(x, std, sensitivity) for a, x in zip(aggs, xs)]
    return aggs[0].decode(sum(messages), sensitivity), messages


def test_noise_free_sum_within_the_quantisation_bound():
    aggs = _aggregators(3, scale=2.0**12)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5000, generator=g, dtype=torch.float64) * 0.01 for _ in range(3)]
    u = 0.05
    total, _ = _aggregate(aggs, xs, 0.0, u)
    bound = 3 * u / aggs[0].scale  # each rank rounds by less than one integer, u/s
    error = (total - sum(xs)).abs()
    assert error.max().item() < bound
    assert error.max().item() > bound / 20  # the rounding is real: the check can fail
    # unbiased: the rounding error averages out
    assert error.mean().item() < bound / 2


def test_noise_share_sizes_and_total_noise():
    aggs = _aggregators(3, min_honest_ranks=2)
    sigma, u = 1.5, 0.01
    total, _ = _aggregate(aggs, [torch.zeros(40_000, dtype=torch.float64)] * 3, sigma * u, u)
    # each rank adds (σs)²/h: the 3 shares together have variance 3/2·(σu)², any 2 of them (σu)²
    assert total.std().item() == pytest.approx(sigma * u * math.sqrt(3 / 2), rel=0.02)
    assert aggs[0].share_variance(sigma * u, u) == pytest.approx((sigma * aggs[0].scale) ** 2 / 2)


def test_modular_sum_never_wraps_in_the_documented_range():
    world, bits = 4, 40
    aggs = _aggregators(world, bits=bits, scale=1.0)
    limit = (1 << (bits - 1)) // world  # documented: every rank's |value| < 2^(b-1)/W
    for sign in (1, -1):
        xs = [torch.full((100,), float(sign * (limit - 1)), dtype=torch.float64) for _ in range(world)]
        total, _ = _aggregate(aggs, xs, 0.0, 1.0)
        assert torch.equal(total, torch.full((100,), float(sign * world * (limit - 1)), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="could wrap"):
        aggs[0].encode(torch.full((3,), float(limit), dtype=torch.float64), 0.0, 1.0)
    with pytest.raises(ValueError, match="bits"):
        SecureAggregator(0, 4, torch.Generator(), bits=62)  # 4·2^62 ≥ 2^63: the int64 sum could overflow


@pytest.mark.parametrize("world,bits,dtype", [(2, 30, torch.int32), (3, 29, torch.int32), (3, 30, torch.int64),
                                               (2, 31, torch.int64)])
def test_int32_messages_when_the_sum_fits(world, bits, dtype, monkeypatch):
    """W·2^b <= 2^31: the all-reduce gets int32 (half the bytes) and the result is the int64 exchange's, bit for
    bit, also near the largest values that may not wrap; otherwise int64."""
    g = torch.Generator().manual_seed(5)
    big = ((1 << (bits - 1)) // world - 10_000) / 2.0**10  # 10,000 below the limit: ~20 noise stds of room
    xs = [torch.cat([torch.randn(5000, generator=g, dtype=torch.float64) * 0.01,
                     torch.tensor([big, -big], dtype=torch.float64)]) for _ in range(world)]

    def run():
        aggs = _aggregators(world, bits=bits, scale=2.0**10)
        messages = [a._encode([x], x.numel(), torch.device("cpu"), 0.5, 1.0) for a, x in zip(aggs, xs)]
        summed, seen, outs = sum(messages), [], [x.clone() for x in xs]
        for a, out in zip(aggs, outs):
            a._all_reduce = lambda t: (seen.append(t.dtype), t.copy_(summed))
            a.steps = 0
            a([out], std=0.5, sensitivity=1.0)
        return outs, set(seen), aggs[0].bytes_sent

    outs, seen, sent = run()
    assert seen == {dtype} and sent == 5002 * (4 if dtype == torch.int32 else 8)
    monkeypatch.setattr(SecureAggregator, "message_dtype", property(lambda self: torch.int64))
    reference, seen, _ = run()
    assert seen == {torch.int64}
    for a, b in zip(outs, reference):
        assert torch.equal(a, b)
    assert outs[0][-2].item() > 0.99 * world * big and outs[0][-1].item() < -0.99 * world * big  # not wrapped


@native_only
@pytest.mark.parametrize("bits", [30, 48])
def test_step_buffers_are_reused_and_hold_nothing_over(bits):
    """A step's work buffers (the noise share; the int32 message) are kept for the next steps, and what the
    last step left in them does not change the next step's result: the same steps with the buffers dropped
    before every step give the same bits."""
    g = torch.Generator().manual_seed(7)
    steps = [[torch.randn(3000, generator=g) * 0.01 for _ in range(2)] for _ in range(3)]
    results, pointers = {}, []
    for keep in (True, False):
        aggs = _aggregators(2, bits=bits, scale=2.0**12)
        results[keep] = []
        for xs in steps:
            if not keep:
                for a in aggs:
                    a._buffers.clear()
            # every rank's message (its step's masks), their sum, then each rank's step decodes that sum
            messages = [a._encode([x], x.numel(), torch.device("cpu"), 0.02, 0.05, in_place=True).clone()
                        for a, x in zip(aggs, xs)]
            summed = sum(m.to(torch.int64) for m in messages).to(messages[0].dtype)
            outs = [x.clone() for x in xs]
            for a, out in zip(aggs, outs):
                a.steps -= 1
                a._all_reduce = lambda t, s=summed: t.copy_(s)
                a([out], std=0.02, sensitivity=0.05)
            results[keep].append(outs[0])
            if keep:
                pointers.append({name: b.data_ptr() for name, b in aggs[0]._buffers.items()})
    assert pointers[0] == pointers[1] == pointers[2]
    assert set(pointers[0]) == ({"share", "message"} if bits == 30 else {"share"})
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


def _gloo_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        agg = SecureAggregator(rank, world_size, torch.Generator().manual_seed(rank))
        agg.setup()  # public keys through all_gather_object
        x = torch.randn(3000, generator=torch.Generator().manual_seed(50 + rank)) * 0.01
        tensors = [x[:1000].clone().view(10, 100), x[1000:].clone()]
        sent = []
        agg._all_reduce = lambda t: (sent.append(t.clone()), dist.all_reduce(t))  # record what leaves the rank
        agg(tensors, std=0.0, sensitivity=0.05)
        noisy = [torch.zeros(20_000)]
        agg(noisy, std=0.05 * 2.0, sensitivity=0.05)
        torch.save({"x": x, "out": torch.cat([t.reshape(-1) for t in tensors]), "sent": sent[0],
                    "noisy": noisy[0], "steps": agg.steps}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_three_processes_over_gloo(tmp_path):
    world = 3
    mp.start_processes(_gloo_worker, args=(world, random.randint(20000, 40000), str(tmp_path)), nprocs=world,
                       start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    expected = sum(r["x"].double() for r in ranks)
    for r in ranks:
        assert r["steps"] == 2
        assert (r["out"].double() - expected).abs().max().item() < world * 0.05 / 2**20 + 1e-6
        torch.testing.assert_close(r["noisy"], ranks[0]["noisy"])  # every rank holds the same result
        # what left the rank is nothing like its contribution
        assert (r["sent"].double() - r["x"].double() * 2**20 / 0.05).abs().median() > 2**30
    # noise: each of the 3 ranks adds (σs)²/2 (default h = W − 1 = 2): total std σ·u·sqrt(3/2)
    assert ranks[0]["noisy"].double().std().item() == pytest.approx(2.0 * 0.05 * math.sqrt(1.5), rel=0.03)


# ---------------------------------------------------------------------------------------------- accounting
def test_unsampled_ddg_is_the_gaussian_at_the_inflated_sensitivity():
    """No sampling: 50 steps are one Gaussian mechanism at μ = √50·(s + √d)/(σs), whose ε at δ has a closed
    form (Balle & Wang 2018); the accountant gives it (never below, within 1 %), tighter than the RDP
    route's conversion."""
    from scipy import optimize, stats

    dim, scale, sigma = 10_000, 2.0**20, 1.3
    eps = ddg_epsilon(sigma, 1.0, 50, 1e-5, dim=dim, scale=scale, num_shares=3)
    sigma_eff = sigma * scale / (scale + math.sqrt(dim))  # τ ≈ 0 at these scales
    mu = math.sqrt(50) / sigma_eff
    exact = optimize.brentq(lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)
                            - 1e-5, 0.0, 200.0)
    assert exact * (1 - 1e-6) <= eps <= exact * 1.01
    rdp = 50 * _rdp_vector(sigma_eff, 1.0, tuple(float(o) for o in DDG_ORDERS))
    assert eps < _epsilon_from_rdp(np.asarray(DDG_ORDERS, dtype=float), rdp, 1e-5)[0]


def test_zhu_wang_bound_upper_bounds_the_exact_subsampled_gaussian():
    sigma, q = 1.1, 0.01
    orders = np.arange(2, 65)
    base = orders / (2 * sigma**2)
    general = subsampled_rdp(list(orders), q, base)
    exact = _rdp_int(q, sigma, orders.astype(float))
    assert np.all(general >= exact * (1 - 1e-9))
    assert general[:10].max() < 3 * exact[:10].max()  # and not absurdly loose where ε is decided
    assert np.allclose(subsampled_rdp([2, 5], 1.0, base), base[[0, 3]])


def _reference_rdp(q, l1_scale, l2_scale, tau, dim, order):
    """The paper's reference code's formulas (google-research/federated, distributed_dp/accounting_utils.py,
    compute_rdp_dgaussian and _compute_rdp_subsampled(upper_bound=True)), written out with scalars."""
    def eps(a):
        return min(a / 2 * l2_scale**2 + tau * dim, a / 2 * (l2_scale**2 + 2 * l1_scale * tau + tau**2 * dim),
                   a / 2 * (l2_scale + math.sqrt(dim) * tau) ** 2)
    if q == 1:
        return eps(order)
    terms, weights = [0.0, eps(2)], [(1 - q) ** (order - 1) * (order * q - q + 1),
                                     special.comb(order, 2) * q**2 * (1 - q) ** (order - 2)]
    for ell in range(3, order + 1):
        terms.append((ell - 1) * eps(ell) + math.log(special.comb(order, ell)) + (order - ell) * math.log(1 - q)
                     + ell * math.log(q))
        weights.append(3)
    return min(special.logsumexp(terms, b=weights) / (order - 1), eps(order))


@pytest.mark.parametrize("share_std,num_shares", [(0.6, 4), (2.0, 2), (50.0, 3)])
def test_accounting_matches_the_reference_code_formulas(share_std, num_shares):
    dim, q = 1000, 0.02
    total = share_std * math.sqrt(num_shares)
    l2 = rounded_l2_norm_bound(4.0, dim)
    l1 = l2 * min(math.sqrt(dim), l2)
    tau = 10 * sum(math.exp(-2 * (math.pi * share_std) ** 2 * k / (k + 1)) for k in range(1, num_shares))
    assert ddg_tau(share_std, num_shares) == pytest.approx(tau, rel=1e-12)
    base = ddg_rdp(range(2, 33), l2 / total, l1 / total, tau, dim)
    ours = subsampled_rdp(list(range(2, 33)), q, base)
    ref = [_reference_rdp(q, l1 / total, l2 / total, tau, dim, a) for a in range(2, 33)]
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    if share_std < 1:
        assert tau > 1e-3  # the τ terms matter in this case


def test_rounded_bound_and_calibration():
    assert rounded_l2_norm_bound(100.0, 400) == 120.0
    assert rounded_l2_norm_bound(100.0, 400, beta=math.exp(-0.5)) < 120.0  # the paper's conditional bound
    kwargs = dict(dim=50_000, scale=2.0**20, num_shares=2)
    sigma = ddg_noise_multiplier(2.0, 1e-5, 0.01, 500, **kwargs)
    assert ddg_epsilon(sigma, 0.01, 500, 1e-5, **kwargs) <= 2.0
    assert ddg_epsilon(sigma * 0.99, 0.01, 500, 1e-5, **kwargs) > 2.0 * 0.99


# -------------------------------------------------------------------------------------------- refusals
def test_secure_aggregation_is_refused_where_it_cannot_apply():
    from tests.namespace import DPDDPStrategy, DPFSDPStrategy, DPStrategy

    with pytest.raises(ValueError, match="DPStrategy does not take `secure_aggregation`.*nothing to aggregate"):
        DPStrategy(noise_multiplier=1.0, secure_aggregation=True)
    with pytest.raises(ValueError, match="DPFSDPStrategy does not take `secure_aggregation`.*reduce-scattered"):
        DPFSDPStrategy(noise_multiplier=1.0, secure_aggregation=True)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="make_private does not take `secure_aggregation`"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=4, secure_aggregation=True)
    with pytest.raises(ValueError, match="`min_honest_ranks`=2 needs secure_aggregation=True"):
        DPConfig(noise_multiplier=1.0, min_honest_ranks=2)
    with pytest.raises(ValueError, match="`secure_aggregation_bits`=30 needs secure_aggregation=True"):
        DPDDPStrategy(noise_multiplier=1.0, secure_aggregation_bits=30)
    with pytest.raises(ValueError, match=r"`secure_aggregation_bits` must be in \[2, 62\], got 63"):
        DPDDPStrategy(noise_multiplier=1.0, secure_aggregation=True, secure_aggregation_bits=63)
    with pytest.raises(ValueError, match=r"DPStrategy does not take `secure_aggregation` \(got secure_aggregation_bits=30\)"):
        DPStrategy(noise_multiplier=1.0, secure_aggregation_bits=30)
    with pytest.raises(ValueError, match=r"DPFSDPStrategy does not take `secure_aggregation` \(got secure_aggregation_bits=30\)"):
        DPFSDPStrategy(noise_multiplier=1.0, secure_aggregation_bits=30)
    assert DPDDPStrategy(noise_multiplier=1.0, secure_aggregation=True).accountant.mechanism == "ddg"


# --------------------------------------------------------------------------------- Lightning, 2 processes
WORKER = Path(__file__).with_name("secure_aggregation_worker.py")


@pytest.mark.parametrize("bits", [None, 30])
def test_two_processes_with_secure_aggregation_update_checkpoint_and_report(tmp_path, bits):
    """The default b = 48 (int64 messages) and ``secure_aggregation_bits=30`` (int32 messages at 2 ranks):
    the same update, within the rounding bound."""
    from tests.distributed_helpers import reference_update, run_launching_script
    from tests.lightning_helpers import TinyClassifier

    run_launching_script(WORKER, tmp_path, *([bits] if bits else []))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["message_dtype"] == ("torch.int32" if bits == 30 else "torch.int64")
    assert ranks[0]["steps"] == 1
    x = torch.cat([r["batches"][0][0] for r in ranks])
    y = torch.cat([r["batches"][0][1] for r in ranks])
    update = reference_update(ranks[0]["initial"], x, y, 0.05, 16, model=TinyClassifier())
    bound = 0.5 * 2 * (0.05 / 16) / ranks[0]["scale"]  # lr · W · u/s: each rank rounds by < u/s
    for name, value in ranks[0]["initial"].items():
        expected = value.double() - 0.5 * update[name]
        for r in ranks:
            assert (r["final"][name].double() - expected).abs().max().item() <= bound + 1e-7  # float32 weights
    # keys: never in the checkpoint, nor in the report
    blob = (tmp_path / "model.ckpt").read_bytes()
    for r in ranks:
        assert len(r["pair_keys"]) == 1 and len(r["pair_keys"][0]) == 32
        assert r["pair_keys"][0] not in blob and r["pair_keys"][0] not in r["table"].encode()
    assert ranks[0]["pair_keys"] == ranks[1]["pair_keys"]
    report = ranks[0]["report"]
    assert report["accountant"] == "ddg"
    agg = report["secure_aggregation"]
    assert agg["bits"] == (bits or 48) and agg["scale"] == 2.0**20 and agg["min_honest_ranks"] == 1
    assert "at most 1 of the 2 ranks are corrupt" in agg["threat_model"]
    assert "Threat model" in ranks[0]["table"] and "discrete Gaussian" in ranks[0]["table"]
