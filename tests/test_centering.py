"""Input centring (lightning_dp.centering): the gradients the inner optimizer receives are those of the
reparametrised layer y = W(x − c) + u (float64 reference), whole trajectories equal DP-SGD on that
layer, the private mean is the Gaussian mechanism it claims (statistics, accounting vs dp-accounting),
and the strategies release it once, before calibration, and keep it in checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dp import DPOptimizer, make_private
from lightning_dp.centering import CENTER_ATTRIBUTE, InputCentering, PrivateMean, build_centering
from lightning_dp.noise import GaussianNoise
from tests.dp_accounting_reference import release_then_poisson_gaussian_epsilon

pytestmark = [pytest.mark.filterwarnings("ignore:secure_mode=False"), pytest.mark.filterwarnings("ignore:noise_multiplier=0")]

N, D, H, K = 48, 6, 8, 3


def _data(seq: int = 0):
    g = torch.Generator().manual_seed(0)
    shape = (N, seq, D) if seq else (N, D)
    x = torch.rand(*shape, generator=g) * 2 + 1  # far from zero on average: what centring is for
    return x, torch.randint(0, K, (N,), generator=g)


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, K)).to(dtype)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == 3:
        out = out.mean(1)
    return nn.functional.cross_entropy(out, y)


def _centred_sums(params, x, y, c, max_grad_norm, clipping="flat"):
    """Float64, one sample at a time, on the reparametrised first layer of Linear-Tanh-Linear with parameters
    ``params = (W, b, W2, b2)``: ``Σ_b clip(∇_(W, u, W2, b2) L_b)`` with ``u = b + W c``."""
    w1, b1, w2, b2 = (p.detach().double().clone() for p in params)
    u = (b1 + w1 @ c.double()).requires_grad_()
    w1, w2, b2 = w1.requires_grad_(), w2.requires_grad_(), b2.requires_grad_()
    total = [torch.zeros_like(t) for t in (w1, u, w2, b2)]
    for i in range(len(x)):
        xi = x[i : i + 1].double()
        out = torch.tanh((xi - c.double()) @ w1.T + u) @ w2.T + b2
        grads = torch.autograd.grad(_loss(out, y[i : i + 1]), (w1, u, w2, b2))
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in grads))
        factor = max_grad_norm / (norm + 0.01) if clipping == "automatic" else min(1.0, max_grad_norm / norm)
        total = [a + factor * t for a, t in zip(total, grads)]
    return (w1.detach(), u.detach(), w2.detach(), b2.detach()), total


def centred_reference_update(state, x, y, c, *, max_grad_norm, batch, lr):
    """The weights of TinyClassifier (``state``) after one noise-free SGD step in the centred geometry:
    ``(W, u) ← (W, u) − lr·Σ clip(g)/batch``, then ``b = u − W c`` (float64)."""
    params = [state[f"net.{k}.{n}"] for k in (0, 2) for n in ("weight", "bias")]
    start, sums = _centred_sums(params, x, y, c, max_grad_norm)
    w1, u, w2, b2 = (p - lr * g / batch for p, g in zip(start, sums))
    return {"net.0.weight": w1, "net.0.bias": u - w1 @ c, "net.2.weight": w2, "net.2.bias": b2}


@pytest.mark.parametrize("clipping_mode", ["materialize", "ghost", "auto"])
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("seq", [0, 5])
def test_gradient_given_to_the_optimizer_is_that_of_the_centred_layer(clipping_mode, clipping, seq):
    x, y = _data(seq)
    c = torch.linspace(0.5, 2.5, D)
    model = _model()
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.3,
                       expected_batch_size=N, clipping_mode=clipping_mode, clipping=clipping, centering={model[0]: c})
    _loss(model(x), y).backward()
    opt.pre_step()
    got = [p.grad.double() for p in model.parameters()]
    ref = [t / N for t in _centred_sums(list(_model().parameters()), x, y, c, 0.3, clipping)[1]]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the uncentred gradient differs: the test would fail without centring
    assert (got[0] - ref[0] - ref[1][:, None] * c.double()[None, :]).abs().max() > 1e-3


class _Reparametrised(nn.Module):
    """The same network with its first layer written y = W(x − c) + u (parameters in the same order)."""

    def __init__(self, base: nn.Sequential, c: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(base[0].weight.detach().clone())
        self.u = nn.Parameter((base[0].bias + base[0].weight @ c.to(base[0].weight.dtype)).detach().clone())
        self.c = c.to(base[0].weight.dtype)
        self.head = nn.Sequential(nn.Tanh(), base[2])

    def forward(self, x):
        return self.head(nn.functional.linear(x - self.c, self.weight, self.u))


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_noisy_trajectory_equals_dp_sgd_on_the_reparametrised_layer(optimizer):
    """Five noisy steps (same seed, same noise draws): W equals and b = u − W·c after every step."""
    x, y = _data()
    c = torch.linspace(0.5, 2.5, D, dtype=torch.float64)

    def inner(params):
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=0.05)
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)

    centred = _model(torch.float64)
    reparam = _Reparametrised(_model(torch.float64), c)
    common = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=N, seed=7)
    opt_a = make_private(centred, inner(centred.parameters()), centering={"0": c}, **common)
    opt_b = make_private(reparam, inner(reparam.parameters()), **common)
    for step in range(5):
        rows = torch.arange(step * 8, step * 8 + 16) % N
        for model, opt in ((centred, opt_a), (reparam, opt_b)):
            _loss(model(x[rows].double()), y[rows]).backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(centred[0].weight, reparam.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(centred[0].bias, reparam.u - reparam.weight @ c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(centred[2].weight, reparam.head[1].weight, rtol=1e-10, atol=1e-12)


def test_private_mean_clips_counts_and_is_noised_as_claimed():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [6.0, 8.0]])  # norms 5, 0.5, 0, 10
    # without noise worth the name: the clipped mean (norm ≤ 1)
    quiet = PrivateMean(rows, max_norm=1.0, noise_multiplier=1e-9).release(GaussianNoise(0))
    torch.testing.assert_close(quiet, torch.tensor([0.6 + 0.3 + 0.6, 0.8 + 0.4 + 0.8]) / 4)
    # the noise: std σ·√(S² + κ²) on the sum and on κ·count (here N large, so the mean error ≈ sum noise / N)
    x = torch.full((2000, 3), 0.5)
    sigma, s = 4.0, 2.0
    errors = torch.stack([
        PrivateMean(x, max_norm=s, noise_multiplier=sigma).release(GaussianNoise(seed)) - 0.5 for seed in range(400)
    ])
    kappa = 0.5 * s  # the count's weight; a coordinate of mean m has error std σ·sens/N · √(1 + (m/κ)²)
    expected = sigma * s * math.sqrt(1 + 0.25) / 2000 * math.sqrt(1 + (0.5 / kappa) ** 2)
    std = float(errors.std())
    assert abs(std / expected - 1) < 0.06  # 1200 draws: the std's relative error is ~2 %
    assert abs(float(errors.mean())) < 4 * expected / math.sqrt(errors.numel())


def test_private_mean_reads_batches_and_releases_once():
    x = torch.rand(30, 2, 2)
    loader = [(x[i : i + 7], torch.zeros(len(x[i : i + 7]))) for i in range(0, 30, 7)]
    mean = PrivateMean(loader, max_norm=4.0, noise_multiplier=1e-9)
    value = mean.release(GaussianNoise(0))
    torch.testing.assert_close(value, x.reshape(30, 4).mean(0))
    assert mean.release(GaussianNoise(1)) is value  # released once: later calls return the same value
    assert mean.accounting_event == (1e-9, 1.0, 1)
    with pytest.raises(TypeError, match="select="):
        PrivateMean([{"x": x}], max_norm=1.0, noise_multiplier=1.0).release(GaussianNoise(0))
    picked = PrivateMean([{"x": x}], max_norm=4.0, noise_multiplier=1e-9, select=lambda b: b["x"])
    torch.testing.assert_close(picked.release(GaussianNoise(0)), value)
    with pytest.raises(ValueError, match="max_norm"):
        PrivateMean(x, max_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="no rows"):
        PrivateMean([], max_norm=1.0, noise_multiplier=1.0).release(GaussianNoise(0))


def test_make_private_accounts_the_release_before_the_steps_as_dp_accounting_does():
    x, _y = _data()
    model = _model()
    sigma_c, sigma, q, steps = 3.0, 1.2, 0.05, 200
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=sigma,
                       max_grad_norm=1.0, expected_batch_size=3, sample_rate=q, seed=0,
                       centering={model[0]: PrivateMean(x, max_norm=2.0, noise_multiplier=sigma_c)})
    assert opt.accountant.history == [(sigma_c, 1.0, 1)]
    opt.accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    ours = opt.get_epsilon(1e-5)
    reference = release_then_poisson_gaussian_epsilon(sigma_c, sigma, q, steps, 1e-5)
    assert reference <= ours <= reference * 1.01
    without = make_private(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), noise_multiplier=sigma,
                           max_grad_norm=1.0, expected_batch_size=3, sample_rate=q, seed=0)
    without.accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert ours > without.get_epsilon(1e-5) + 0.05  # the release is not free


def test_public_centre_costs_nothing_and_layers_are_restored():
    model = _model()
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=4, sample_rate=0.1, centering={"0": [1.0] * D})
    assert opt.accountant.history == []
    assert torch.equal(getattr(model[0], CENTER_ATTRIBUTE), torch.ones(D))
    opt.centering.detach()
    assert not hasattr(model[0], CENTER_ATTRIBUTE)
    assert set(model.state_dict()) == set(_model().state_dict())  # the model keeps its parameters and keys


@pytest.mark.parametrize("centering, match", [
    ({"1": torch.zeros(D)}, "nn.Linear layers; 1 is a Tanh"),
    ({"0": torch.zeros(D + 1)}, "in_features=6"),
    ({"0": torch.full((D,), float("nan"))}, "finite"),
    ({"nope": torch.zeros(D)}, "'nope', which is not a module"),
    ({nn.Linear(D, H): torch.zeros(D)}, "layers of the model"),
])
def test_bad_centering_is_refused_before_training(centering, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=4, centering=centering)


def test_centring_needs_a_trainable_bias_and_no_bands_or_shards():
    model = _model()
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable weight and bias"):
        build_centering(model, {"0": torch.zeros(D)}, GaussianNoise(0))
    no_bias = nn.Sequential(nn.Linear(D, H, bias=False))
    with pytest.raises(ValueError, match="trainable weight and bias"):
        InputCentering({no_bias[0]: torch.zeros(D)})
    model = _model()
    with pytest.raises(ValueError, match="bands=2"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=4, bands=2, num_steps=10, centering={"0": torch.zeros(D)})
    with pytest.raises(ValueError, match="shards"):
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                    expected_batch_size=4, shards=object(), centering=InputCentering({model[0]: torch.zeros(D)}))


# --- through the Lightning strategies ---------------------------------------------------------------


def test_strategy_releases_the_centre_before_calibrating_and_reports_it(tmp_path):
    """The private mean is recorded before σ is calibrated (the run still spends at most the target), the
    optimizer steps in the centred geometry, the report counts optimizer steps only and names the centre,
    and after fit the layer is an ordinary layer again."""
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    loader = make_loader(n=64, batch_size=8)
    mean = PrivateMean(loader.dataset.tensors[0], max_norm=3.0, noise_multiplier=4.0)
    model = TinyClassifier()
    strategy = DPStrategy(target_epsilon=2.0, seed=0, centering={"net.0": mean})
    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model, train_dataloaders=loader)
    history = strategy.accountant.history
    assert history[0] == (4.0, 1.0, 1) and [q for _, q, _ in history[1:]] == [8 / 64]
    assert 1.99 <= strategy.get_epsilon() <= 2.0
    reference = release_then_poisson_gaussian_epsilon(4.0, strategy.noise_multiplier, 8 / 64, history[1][2], 1e-5)
    assert reference <= strategy.get_epsilon() <= reference * 1.01
    assert strategy.noise_multiplier > _sigma_without_centre(tmp_path)
    assert strategy.dp_optimizer.centering is not None
    assert strategy._centering_state() == {"net.0": mean.value.tolist()}
    report = strategy.privacy_report()
    assert report.steps == history[1][2]
    assert "private mean" in report.centering["net.0"] and "Input centring of net.0" in report.to_table()
    assert not hasattr(model.net[0], CENTER_ATTRIBUTE)


def _sigma_without_centre(tmp_path) -> float:
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    strategy = DPStrategy(target_epsilon=2.0, seed=0)
    pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path / "plain", max_epochs=1)).fit(
        TinyClassifier(), train_dataloaders=make_loader(n=64, batch_size=8))
    return strategy.noise_multiplier


def test_resumed_run_keeps_the_checkpoints_centre_and_releases_nothing(tmp_path):
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    loader = make_loader(n=64, batch_size=8)
    x = loader.dataset.tensors[0]
    first_mean = PrivateMean(x, max_norm=3.0, noise_multiplier=4.0)
    first = pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, centering={"net.0": first_mean}),
                       **trainer_kwargs(tmp_path, max_epochs=1))
    first.fit(TinyClassifier(), train_dataloaders=loader)
    path = tmp_path / "one_epoch.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["lightning_dp"]["centering"] == {"net.0": first_mean.value.tolist()}

    second_mean = PrivateMean(x, max_norm=3.0, noise_multiplier=4.0)
    resumed_strategy = DPStrategy(noise_multiplier=1.0, seed=0, centering={"net.0": second_mean})
    resumed = pl.Trainer(strategy=resumed_strategy, **trainer_kwargs(tmp_path, max_epochs=2))
    resumed.fit(TinyClassifier(), train_dataloaders=loader, ckpt_path=path)
    assert second_mean.value is None  # never released: the checkpoint's centre is used
    assert resumed_strategy._centering_state() == {"net.0": first_mean.value.tolist()}
    history = resumed_strategy.accountant.history
    assert history[0] == (4.0, 1.0, 1) and sum(1 for s, q, n in history if q == 1.0) == 1
    assert resumed_strategy.privacy_report().steps == 2 * (64 // 8)


def test_strategies_refuse_centring_where_it_is_not_supported():
    from tests.namespace import DPDDPStrategy, DPFSDPStrategy, DPStrategy

    with pytest.raises(ValueError, match="secure aggregation keeps"):
        DPDDPStrategy(noise_multiplier=1.0, secure_aggregation=True, centering={"net.0": torch.zeros(6)})
    with pytest.raises(ValueError, match="DPFSDPStrategy does not take `centering`"):
        DPFSDPStrategy(noise_multiplier=1.0, centering={"net.0": torch.zeros(6)})
    with pytest.raises(ValueError, match="must be a dict"):
        DPStrategy(noise_multiplier=1.0, centering=[torch.zeros(6)])


def test_a_second_fit_recentres_without_a_second_release(tmp_path):
    """The strategy detaches the centres after fit; a second fit centres the layers again around the same
    values, releases nothing new and the optimizer steps in the centred geometry again."""
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    loader = make_loader(n=64, batch_size=8)
    mean = PrivateMean(loader.dataset.tensors[0], max_norm=3.0, noise_multiplier=4.0)
    strategy = DPStrategy(noise_multiplier=1.0, seed=0, centering={"net.0": mean})
    model = TinyClassifier()
    seen = []

    class Centred(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(getattr(module.net[0], CENTER_ATTRIBUTE, None) is not None
                        and trainer.strategy.dp_optimizer.centering is not None)

    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, max_epochs=1, callbacks=[Centred()]))
    for epochs in (1, 2):
        trainer.fit_loop.max_epochs = epochs
        trainer.fit(model, train_dataloaders=loader)
        assert not hasattr(model.net[0], CENTER_ATTRIBUTE)
    assert len(seen) == 2 * (64 // 8) and all(seen)
    assert sum(1 for _, q, _ in strategy.accountant.history if q == 1.0) == 1
    assert strategy._centering_state() == {"net.0": mean.value.tolist()}
