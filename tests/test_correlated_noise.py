"""BandMF: banded Toeplitz correlated noise, cyclic Poisson sampling and their accounting."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_dp import DPConfig, DPOptimizer, PoissonBatchSampler, make_private
from lightning_dp.accounting.bandmf import BandMFAccountant, bandmf_epsilon, bandmf_noise_multiplier
from lightning_dp.correlated import (
    CorrelatedNoise,
    CyclicPoissonBatchSampler,
    banded_toeplitz_coefficients,
    workload_error,
)
from lightning_dp.grad_sample import attach_grad_sample_hooks
from lightning_dp.noise import GaussianNoise
from tests.dp_accounting_reference import import_dp_accounting

pytestmark = pytest.mark.filterwarnings("ignore:secure_mode=False")


def _toeplitz(c: torch.Tensor, n: int) -> torch.Tensor:
    """The n×n lower-triangular Toeplitz matrix with first column c (float64)."""
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for j, value in enumerate(c.tolist()[:n]):
        matrix += value * torch.diag(torch.ones(n - j, dtype=torch.float64), -j)
    return matrix


class _Recorder:
    """A noise source that adds known normals (float64, from its own generator) and records them."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = []

    def add_normal_(self, tensors, std):
        z = [torch.randn(t.shape, dtype=torch.float64, generator=self.generator) * std for t in tensors]
        self.draws.append([x.clone() for x in z])
        for t, x in zip(tensors, z):
            t.add_(x)


# ------------------------------------------------------------------------------------------ noise
def _train(noise, steps=6, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    attach_grad_sample_hooks(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=1.0,
                      expected_batch_size=8, noise=noise)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 5, generator=data)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_one_band_is_dp_sgd_bit_for_bit():
    plain = _train(GaussianNoise(seed=3))
    banded = _train(CorrelatedNoise(GaussianNoise(seed=3), [1.0]))
    other = _train(GaussianNoise(seed=4))
    assert all(torch.equal(a, b) for a, b in zip(plain, banded))
    assert not all(torch.equal(a, b) for a, b in zip(plain, other))


def test_make_private_with_one_band_is_unchanged():
    def run(**extra):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=8, sample_rate=0.1, seed=5, **extra)
        for _ in range(4):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return model.weight.detach().clone(), opt.get_epsilon(1e-5)

    (w0, e0), (w1, e1) = run(), run(bands=1, noise_coefficients=[1.0])
    assert torch.equal(w0, w1) and e0 == pytest.approx(e1, rel=1e-12)


def test_recursion_is_the_inverse_strategy_applied_to_z():
    c = torch.tensor([0.8, 0.45, 0.3, 0.25], dtype=torch.float64)
    recorder = _Recorder(seed=0)
    noise = CorrelatedNoise(recorder, c)
    steps, std = 9, 0.7
    added = []
    for _ in range(steps):
        tensors = [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
        noise.add_normal_(tensors, std)
        added.append(torch.cat([t.flatten() for t in tensors]))
    z = torch.stack([torch.cat([x.flatten() for x in d]) for d in recorder.draws])  # (steps, 11), std·z
    expected = torch.linalg.solve_triangular(_toeplitz(c / c.norm(), steps), z, upper=False)
    torch.testing.assert_close(torch.stack(added), expected, rtol=1e-12, atol=1e-12)
    assert len(noise._history) == len(c) - 1  # b − 1 buffers kept


def test_noise_covariance_is_inverse_strategy_gram():
    c = banded_toeplitz_coefficients(8, 3)
    steps, size = 8, 40_000
    noise = CorrelatedNoise(GaussianNoise(seed=11), c)
    rows = []
    for _ in range(steps):
        buffer = torch.zeros(size)
        noise.add_normal_([buffer], 1.0)
        rows.append(buffer.double())
    w = torch.stack(rows)  # (steps, size): each column one sample of w = C^{-1} z
    empirical = w @ w.T / size
    inverse = torch.linalg.inv(_toeplitz(c, steps))
    expected = inverse @ inverse.T
    # each entry is a mean of 40k products: std error ≤ sqrt(2·var²/size) ≈ 0.007·var
    assert (empirical - expected).abs().max() < 0.05 * expected.diagonal().max()
    assert expected[1, 0] < -0.1  # the test can see correlation: consecutive noises are anti-correlated


def test_changes_of_shape_or_std_are_refused():
    noise = CorrelatedNoise(GaussianNoise(seed=0), [0.9, 0.4])
    noise.add_normal_([torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="shapes/dtypes"):
        noise.add_normal_([torch.zeros(4)], 0.5)
    with pytest.raises(ValueError, match="same `std`"):
        noise.add_normal_([torch.zeros(3)], 0.6)
    with pytest.raises(ValueError, match="coefficients"):
        CorrelatedNoise(GaussianNoise(seed=0), [0.0, 1.0])
    with pytest.raises(ValueError, match="add_normal_"):
        CorrelatedNoise(object(), [1.0])


def test_checkpoint_resumes_the_identical_stream():
    c = banded_toeplitz_coefficients(20, 4)
    first = CorrelatedNoise(GaussianNoise(seed=7), c)
    for _ in range(5):
        first.add_normal_([torch.zeros(6), torch.zeros(2, 2)], 0.3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = CorrelatedNoise(GaussianNoise(seed=999), c)  # the state carries the stream's position
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.steps == 5
    for _ in range(6):
        a, b = [torch.zeros(6), torch.zeros(2, 2)], [torch.zeros(6), torch.zeros(2, 2)]
        first.add_normal_(a, 0.3)
        resumed.add_normal_(b, 0.3)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="coefficients"):
        CorrelatedNoise(GaussianNoise(seed=7), [1.0, 0.5, 0.2, 0.1]).load_state_dict(first.state_dict())


# ------------------------------------------------------------------------------------ coefficients
@pytest.mark.parametrize("workload", ["prefix", "momentum:0.9"])
def test_workload_error_matches_dense_computation(workload):
    n, c = 40, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    prefix = torch.tril(torch.ones(n, n, dtype=torch.float64))
    if workload == "prefix":
        a = prefix
    else:  # iterates of heavy-ball momentum: a_k = Σ_{i≤k} m^i
        m = 0.9
        a = _toeplitz(torch.tensor([(1 - m ** (k + 1)) / (1 - m) for k in range(n)], dtype=torch.float64), n)
    strategy = _toeplitz(c, n)
    dense = (a @ torch.linalg.inv(strategy)).pow(2).sum() * strategy.norm(dim=0).max() ** 2
    assert workload_error(c, n, workload) == pytest.approx(float(dense), rel=1e-10)
    assert workload_error([1.0], n) == pytest.approx(n * (n + 1) / 2)


def test_coefficients_normalised_deterministic_and_better_than_dp_sgd():
    n = 300
    errors = [workload_error([1.0], n)]
    for b in (2, 4, 8):
        c = banded_toeplitz_coefficients(n, b)
        assert c.dtype == torch.float64 and c.shape == (b,) and c[0] > 0
        assert float(c.norm()) == pytest.approx(1.0, abs=1e-12)
        assert torch.equal(c, banded_toeplitz_coefficients(n, b))
        errors.append(workload_error(c, n))
        # a small perturbation is never better: a (local) optimum
        for j in range(b):
            bumped = c.clone()
            bumped[j] += 1e-3
            assert workload_error(bumped, n) >= errors[-1] * (1 - 1e-9)
    assert errors == sorted(errors, reverse=True) and errors[1] < 0.6 * errors[0]
    assert torch.equal(banded_toeplitz_coefficients(n, 1), torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="bands"):
        banded_toeplitz_coefficients(3, 4)
    with pytest.raises(ValueError, match="workload"):
        banded_toeplitz_coefficients(30, 2, workload="cosine")


# ---------------------------------------------------------------------------------------- sampling
def test_cyclic_sampler_partitions_and_respects_the_cycle():
    n, q, b = 600, 0.05, 3
    sampler = CyclicPoissonBatchSampler(n, q, b, generator=torch.Generator().manual_seed(0))
    assert sampler.inclusion_rate == pytest.approx(0.15) and len(sampler) == 20
    together = torch.cat(sampler.groups).sort().values
    assert torch.equal(together, torch.arange(n))  # disjoint and complete
    assert all(abs(len(g) - n / b) < 4 * math.sqrt(n / b) for g in sampler.groups)
    group_of = sampler.labels
    sizes = {g: [] for g in range(b)}
    step = 0
    for _ in range(8):  # 160 steps: 20 per pass is not a multiple of 3, the cycle carries over
        for batch in sampler:
            idx = torch.tensor(batch, dtype=torch.long)
            assert bool((group_of[idx] == step % b).all())
            sizes[step % b].append(len(batch))
            step += 1
    p = sampler.inclusion_rate
    for g, observed in sizes.items():  # Binomial(|group|, p): mean and variance
        m = len(sampler.groups[g])
        counts = torch.tensor(observed, dtype=torch.float64)
        assert abs(counts.mean() - m * p) < 4 * math.sqrt(m * p * (1 - p) / len(observed))
        assert 0.6 < counts.var() / (m * p * (1 - p)) < 1.5


def test_cyclic_sampler_one_band_is_poisson_and_checks():
    plain = PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(2))
    cyclic = CyclicPoissonBatchSampler(100, 0.1, 1, generator=torch.Generator().manual_seed(2))
    assert list(plain) == list(cyclic)
    with pytest.raises(ValueError, match="bands"):
        CyclicPoissonBatchSampler(100, 0.3, 4)
    resumed = CyclicPoissonBatchSampler(100, 0.1, 4, generator=torch.Generator().manual_seed(3))
    original = CyclicPoissonBatchSampler(100, 0.1, 4, generator=torch.Generator().manual_seed(2))
    next(iter(original))
    resumed.load_state_dict(original.state_dict())
    assert resumed.step == 1 and all(torch.equal(a, b) for a, b in zip(resumed.groups, original.groups))


# -------------------------------------------------------------------------------------- accounting
# Same tolerance as tests/test_accounting_prv.py against dp-accounting's PLD accountant: both are upper bounds
# of the same ε, so ours may sit a little above the reference but never materially below it.
ABOVE_TOL = 0.01  # ε at most 1% above the reference ...
BELOW_TOL = 0.001  # ... and at most 0.1% below it (an ε below the reference under-reports privacy loss)


@pytest.mark.parametrize("sigma,q,steps,bands", [(1.0, 0.01, 1000, 4), (2.5, 0.1, 300, 8), (0.9, 0.05, 101, 3)])
def test_epsilon_matches_dp_accounting_pld(sigma, q, steps, bands):
    dp_accounting = import_dp_accounting()
    from dp_accounting.pld import pld_privacy_accountant

    rounds, p = math.ceil(steps / bands), bands * q
    reference = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(p, dp_accounting.GaussianDpEvent(sigma)), rounds))
    expected = reference.get_epsilon(1e-5)
    accountant = BandMFAccountant("prv", bands)
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=p)
    assert accountant.rounds == rounds and accountant.total_steps == steps
    for ours in (accountant.get_epsilon(1e-5), bandmf_epsilon(sigma, q, steps, bands, 1e-5)):
        assert expected * (1 - BELOW_TOL) <= ours <= expected * (1 + ABOVE_TOL), (ours, expected)
    restored = BandMFAccountant("prv", bands)
    restored.load_state_dict(accountant.state_dict())
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)


def test_calibration_and_make_private_run():
    q, steps, bands = 0.1, 40, 4
    sigma = bandmf_noise_multiplier(2.0, 1e-5, q, steps, bands)
    assert 1.99 <= bandmf_epsilon(sigma, q, steps, bands, 1e-5) <= 2.0
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=sigma,
                       max_grad_norm=1.0, expected_batch_size=10, sample_rate=q, seed=0, bands=bands,
                       num_steps=steps)
    assert isinstance(opt.noise, CorrelatedNoise) and opt.noise.bands == bands
    for _ in range(steps):
        model(torch.randn(10, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.get_epsilon(1e-5) == pytest.approx(bandmf_epsilon(sigma, q, steps, bands, 1e-5), rel=1e-9)


def test_configuration_errors_name_the_argument():
    model = nn.Linear(2, 2)
    common = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), bands=2, **common)
    with pytest.raises(ValueError, match="noise_coefficients"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), bands=2, noise_coefficients=[1.0], **common)
    with pytest.raises(ValueError, match="`bands` must be"):
        DPConfig(noise_multiplier=1.0, bands=0)
    with pytest.raises(ValueError, match="adaptive_clipping"):
        DPConfig(noise_multiplier=1.0, bands=2, adaptive_clipping={"target_quantile": 0.5})


def test_only_the_fsdp_strategy_refuses_bands():
    import lightning_dp

    if lightning_dp.LIGHTNING_NAMESPACE is None:
        pytest.skip("no Lightning installed")
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"does not take `bands`.*FSDP"):
        warnings.simplefilter("ignore")
        lightning_dp.DPFSDPStrategy(noise_multiplier=1.0, bands=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for strategy in (lightning_dp.DPStrategy, lightning_dp.DPDDPStrategy):
            assert strategy(noise_multiplier=1.0, bands=4).bands == 4  # tests/test_bandmf_strategy.py trains them
