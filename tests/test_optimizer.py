"""DPOptimizer / make_private: the DP-SGD step vs the textbook reference, noise law, arguments."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from lightning_dp import DPOptimizer, compute_epsilon, make_private
from tests.conftest import clipped_mean_reference, microbatch_grads


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.Tanh(), nn.Linear(4, 3))


def _data(batch: int = 8):
    return torch.randn(batch, 1, 6, 6), torch.randint(0, 3, (batch,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.5, 1e3])
def test_noise_free_step_equals_mean_of_clipped_gradients(reduction, max_grad_norm):
    model = _model()
    x, y = _data()
    reference_grads = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"))
    expected_batch_size = 10  # deliberately not the realised batch size (8): Poisson batches vary
    update = clipped_mean_reference(reference_grads, max_grad_norm, expected_batch_size)
    before = copy.deepcopy(model.state_dict())

    lr = 0.7
    opt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction=reduction,
    )
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    opt.step()
    for name, p in model.named_parameters():
        moved = (before[name] - p.detach()).double() / lr
        torch.testing.assert_close(moved, update[name], rtol=1e-4, atol=1e-7)


def test_step_runs_closure_before_clipping():
    """Lightning calls step(closure): gradients must come from the closure, then be clipped."""
    model = _model()
    x, y = _data()
    reference_grads = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"))
    update = clipped_mean_reference(reference_grads, 1e-2, 8)
    before = copy.deepcopy(model.state_dict())
    opt = make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1e-2, expected_batch_size=8
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close((before[name] - p.detach()).double(), update[name], rtol=1e-4, atol=1e-8)


def test_noise_has_std_sigma_c_and_gaussian_law():
    layer = nn.Linear(200, 100)
    sigma, clip, batch = 1.3, 0.7, 32
    opt = make_private(
        layer,
        torch.optim.SGD(layer.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        seed=1234,
    )
    opt.zero_grad()
    opt.pre_step()  # no per-sample gradients (an empty batch): the gradient is pure noise
    noise = torch.cat([p.grad.flatten() for p in opt.params]).double() * batch
    assert noise.numel() == 200 * 100 + 100
    assert abs(noise.mean().item()) < 4 * sigma * clip / math.sqrt(noise.numel())
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert stats.kstest(noise.numpy() / (sigma * clip), "norm").pvalue > 0.01
    assert stats.kurtosis(noise.numpy()) == pytest.approx(0.0, abs=0.1)


def test_seeded_noise_is_reproducible_and_unseeded_differs():
    def draw(seed):
        layer = nn.Linear(10, 10)
        opt = make_private(layer, torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=4, seed=seed)
        opt.pre_step()
        return layer.weight.grad.clone()

    torch.testing.assert_close(draw(7), draw(7))
    assert not torch.equal(draw(None), draw(None))


def test_unused_parameters_still_get_noise():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                       max_grad_norm=1.0, expected_batch_size=4, seed=0)
    model["used"](torch.randn(4, 3)).sum().backward()
    opt.step()
    assert model["unused"].weight.grad is not None and model["unused"].weight.grad.abs().sum() > 0


def test_accountant_records_each_step():
    model = nn.Linear(3, 2)
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.1,
                       max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.01, seed=0)
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.accountant.total_steps == 3
    assert opt.get_epsilon(1e-5) == pytest.approx(compute_epsilon(1.1, 0.01, 3, 1e-5))


def test_zero_grad_clears_per_sample_gradients_and_state_dict_is_plain():
    model = nn.Linear(3, 2)
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = make_private(model, inner, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    model(torch.randn(4, 3)).sum().backward()
    assert hasattr(model.weight, "grad_parts") and hasattr(model.bias, "grad_parts")  # factored (no copies)
    opt.step()
    opt.zero_grad()
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "grad_parts") and p.grad is None
    assert opt.state_dict() == inner.state_dict()
    assert opt.param_groups is inner.param_groups


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(expected_batch_size=0), "expected_batch_size"),
        (dict(loss_reduction="avg"), "loss_reduction"),
        (dict(sample_rate=1.5), "sample_rate"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    model = nn.Linear(3, 2)
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **args)
    assert not model._forward_hooks


def test_zero_noise_warns_once():
    model = nn.Linear(3, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                     max_grad_norm=1.0, expected_batch_size=4)
    assert sum("NOT private" in str(w.message) for w in caught) == 1


def test_wrapping_twice_is_refused():
    model = nn.Linear(3, 2)
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                       max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="already a DPOptimizer"):
        DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_unseeded_noise_state_is_never_written():
    from lightning_dp.noise import GaussianNoise

    noise = GaussianNoise()
    noise.normal((3,), std=1.0)
    assert noise.state_dict() == {}
    seeded = GaussianNoise(seed=5)
    seeded.normal((3,), std=1.0)
    state = seeded.state_dict()
    replay = GaussianNoise(seed=99)
    replay.load_state_dict(state)
    torch.testing.assert_close(replay.normal((4,), std=1.0), seeded.normal((4,), std=1.0))


def test_seeds_differing_only_in_high_bits_give_different_noise():
    """torch's CPU generator keeps 32 bits of ``manual_seed``; every bit of our seed must count."""
    from lightning_dp.noise import GaussianNoise

    a = GaussianNoise(seed=5).normal((8,), std=1.0)
    assert not torch.equal(a, GaussianNoise(seed=5 + 2**40).normal((8,), std=1.0))
    assert torch.equal(a, GaussianNoise(seed=5).normal((8,), std=1.0))
    out = torch.empty(8)
    assert GaussianNoise(seed=5).normal((8,), std=1.0, out=out) is out and torch.equal(out, a)


@pytest.mark.parametrize("with_clipped_sums", [False, True])
def test_noise_is_independent_across_parameters_and_pieces_with_the_right_std(with_clipped_sums):
    """N(0, σ²C²) per coordinate: drawn for a parameter without samples, and added into a clipped sum;
    no two parameters or pieces of the stream alike."""
    from lightning_dp.noise.adding import NOISE_PIECE

    model = nn.Sequential(nn.Linear(400, 300), nn.Linear(300, 400))  # weights span two noise pieces
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=2.0,
                       max_grad_norm=0.5, expected_batch_size=4, seed=3)
    opt.zero_grad()
    if with_clipped_sums:  # zero clipped sums: what is left after add_noise is the noise alone
        for p in model.parameters():
            p.summed_grad = torch.zeros_like(p)
    opt.add_noise()  # divided by the expected batch size
    grads = [p.grad for p in model.parameters()]
    assert [g.shape for g in grads] == [p.shape for p in model.parameters()]
    everything = torch.cat([g.reshape(-1) for g in grads]) * 4
    assert abs(everything.std().item() - 1.0) < 0.01 and abs(everything.mean().item()) < 0.01
    w0, w1 = grads[0].reshape(-1), grads[2].reshape(-1)
    assert abs(torch.corrcoef(torch.stack([w0, w1[: w0.numel()]]))[0, 1].item()) < 0.01
    first, second = w0[:50_000], w0[NOISE_PIECE : NOISE_PIECE + 50_000]
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.02


class _PlainNoise:
    """A user's noise source with only ``normal`` (no ``add_normal_``): drawn ``NOISE_PIECE`` at a time."""

    def __init__(self):
        self.calls = 0
        self.generator = torch.Generator().manual_seed(0)

    def normal(self, shape, std, device="cpu", dtype=torch.float32):
        self.calls += 1
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=device) * std


def test_noise_source_without_add_normal_and_batch_size_changed_mid_step():
    """Any object with ``normal`` is a noise source; the clipped sums, made with the expected batch size
    of the time, are rescaled when it changes before the step (the update is Σ clipped / B_now)."""
    from lightning_dp.grad_sample import attach_grad_sample_hooks
    from lightning_dp.noise.adding import NOISE_PIECE

    torch.manual_seed(0)
    model = nn.Linear(300, 300)
    x = torch.randn(6, 300)
    reference = copy.deepcopy(model)
    source = _PlainNoise()
    hooks = attach_grad_sample_hooks(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1e-3,
                      expected_batch_size=3, noise=source)
    model(x).sum().backward()
    opt.accumulate_micro_batch()
    opt.expected_batch_size = 12
    opt.add_noise()
    ref_opt = make_private(reference, torch.optim.SGD(reference.parameters(), lr=1.0), noise_multiplier=0.0,
                           max_grad_norm=1e-3, expected_batch_size=12)
    reference(x).sum().backward()
    ref_opt.pre_step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    hooks.remove()
    assert source.calls == 0  # σ = 0: nothing drawn
    opt.noise_multiplier = 1.0
    opt.add_noise()  # no clipped sums: pure noise from the plain source, a piece at a time
    assert source.calls == -(-300 * 300 // NOISE_PIECE) + 1
    assert 0.9e-3 < (model.weight.grad * 12).std().item() < 1.1e-3  # σC / B
