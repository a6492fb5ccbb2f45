"""Mechanisms for more accuracy at the same ε (issue 17): automatic clipping, iterate averaging (EMA),
adaptive clipping — each against an independent float64 computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dp import DPConfig, DPOptimizer, make_private
from lightning_dp.averaging import ExponentialMovingAverage
from lightning_dp.clipping import AUTOMATIC_STABILITY
from tests.test_clipping import B, _build, dp_update
from tests.test_grad_sample import reference_grads, smooth_loss

C = 0.3
pytestmark = pytest.mark.filterwarnings("ignore:secure_mode=False", "ignore:noise_multiplier=0")


def _automatic_reference(name: str, clipping: str):
    model, inputs = _build(name)
    grads = reference_grads(model, list(inputs), smooth_loss, [0] * len(inputs))
    if clipping == "automatic":
        norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
        factors = {n: C / (norms + AUTOMATIC_STABILITY) for n in grads}
    else:
        bound = C / math.sqrt(len(grads))
        factors = {n: bound / (g.flatten(1).norm(dim=1) + AUTOMATIC_STABILITY) for n, g in grads.items()}
    return model, inputs, grads, factors


@pytest.mark.parametrize("name", ["linear2d", "conv2d_groups_reflect", "tied_embedding_head", "fallback_custom_layer"])
@pytest.mark.parametrize("clipping", ["automatic", "automatic_per_layer"])
def test_automatic_clipping_equals_the_float64_reference(name, clipping):
    """``c_b = C/(‖g_b‖ + γ)`` (Bu et al. 2023), every clipping mode, against per-sample gradients computed
    one sample at a time."""
    model, inputs, grads, factors = _automatic_reference(name, clipping)
    for mode in ("materialize", "auto", "ghost"):
        got = dp_update(model, inputs, mode, clipping, "mean")
        for n, g in grads.items():
            want = torch.einsum("b,b...->...", factors[n], g) / B
            torch.testing.assert_close(got[n], want, rtol=1e-7, atol=1e-10, msg=f"{mode} {n}")


@pytest.mark.parametrize("clipping", ["automatic", "automatic_per_layer"])
def test_automatic_clipping_keeps_the_sensitivity_below_c(clipping):
    """Each sample's normalised gradient has norm ``C‖g‖/(‖g‖+γ) < C``, small gradients included (they
    are scaled *up*, never past C)."""
    model, inputs, grads, factors = _automatic_reference("linear2d", clipping)
    contributions = torch.cat([(factors[n].view(-1, *[1] * (g.dim() - 1)) * g).flatten(1) for n, g in grads.items()], 1)
    norms = contributions.norm(dim=1)
    assert bool((norms < C).all()) and bool((norms > 0.5 * C).all())
    tiny = torch.tensor([0.0, 1e-6, 1e6], dtype=torch.float64)
    from lightning_dp.clipping import automatic_factors

    assert bool((automatic_factors(tiny, C) * tiny < C).all())


def test_automatic_clipping_drops_non_finite_samples():
    """A NaN sample adds exactly nothing; the others are normalised as without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    x_nan = x.clone()
    x_nan[2, 0] = float("nan")

    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    m.load_state_dict(model.state_dict())
    opt = make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
                       expected_batch_size=4, clipping="automatic")
    m(x_nan).pow(2).sum().div(4).backward()
    opt.pre_step()
    got, dropped = [p.grad.clone() for p in m.parameters()], opt.dropped_in_step
    assert dropped == 1
    reference = reference_grads(model, [x[[0, 1, 3]]], lambda out: out.pow(2).sum(), [0])
    norms = torch.cat([g.flatten(1) for g in reference.values()], 1).norm(dim=1)
    for g, ref in zip(got, reference.values()):
        want = torch.einsum("b,b...->...", C / (norms + AUTOMATIC_STABILITY), ref) / 4
        torch.testing.assert_close(g, want, rtol=1e-7, atol=1e-12)


def test_config_accepts_automatic_clipping_and_names_the_choices():
    assert DPConfig(noise_multiplier=1.0, clipping="automatic").clipping == "automatic"
    with pytest.raises(ValueError, match="automatic"):
        DPConfig(noise_multiplier=1.0, clipping="auto-clip")


# --- iterate averaging ------------------------------------------------------------------------------


def test_ema_follows_the_recursion():
    """``θ̄ ← d_t θ̄ + (1 − d_t) θ`` with ``d_t = min(d, (1+t)/(10+t))``, computed by hand in float64."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ema = ExponentialMovingAverage(model, decay=0.9)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        for n, p in model.named_parameters():
            reference[n] = d * reference[n] + (1 - d) * p.detach()
    for n, value in reference.items():
        torch.testing.assert_close(ema.shadow[n], value, rtol=1e-12, atol=1e-12)
    no_warmup = ExponentialMovingAverage(model, decay=0.5, warmup=False)
    assert no_warmup.current_decay() == 0.5


def test_ema_swaps_in_and_restores_and_round_trips():
    model = nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model, decay=0.0)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # decay 0: the average is the current weights
    with torch.no_grad():
        model.weight.add_(1.0)
    with ema.average_parameters() as averaged:
        torch.testing.assert_close(averaged.weight, trained["weight"] + 1.0)
    torch.testing.assert_close(model.weight, trained["weight"] + 2.0)
    other = ExponentialMovingAverage(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and other.decay == 0.0
    fresh = nn.Linear(3, 2)
    other.copy_to(fresh)
    torch.testing.assert_close(fresh.weight, trained["weight"] + 1.0)
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(model, decay=1.0)


def test_ema_with_make_private_costs_no_privacy():
    """The average is post-processing: the accountant's history is the same with and without it."""
    histories = []
    for use_ema in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=8, sample_rate=0.1, seed=0)
        ema = ExponentialMovingAverage(model, decay=0.9) if use_ema else None
        for _ in range(5):
            nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
            opt.step()
            opt.zero_grad()
            if ema is not None:
                ema.update()
        histories.append((list(opt.accountant.history), opt.get_epsilon(1e-5)))
    assert histories[0] == histories[1]


# --- adaptive clipping ------------------------------------------------------------------------------


def _delta_2d(mu, q: float, eps: float) -> float:
    """δ(ε) of the Poisson-subsampled 2-D Gaussian mechanism with normalised sensitivities ``mu`` (one per
    coordinate, unit noise), both orders of add/remove, by numerical integration on a grid (float64)."""
    axes = [torch.linspace(-14.0, 14.0 + m, 3001, dtype=torch.float64) for m in mu]
    x, y = torch.meshgrid(*axes, indexing="ij")
    base = torch.exp(-(x**2 + y**2) / 2) / (2 * math.pi)
    shifted = torch.exp(-((x - mu[0]) ** 2 + (y - mu[1]) ** 2) / 2) / (2 * math.pi)
    p, qq = (1 - q) * base + q * shifted, base
    cell = float((axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0]))
    one = float((p - math.exp(eps) * qq).clamp(min=0).sum()) * cell
    other = float((qq - math.exp(eps) * p).clamp(min=0).sum()) * cell
    return max(one, other)


@pytest.mark.parametrize("sigma, count_std", [(1.0, 2.0), (2.0, 7.5)])
def test_adaptive_clipping_step_costs_what_sigma_costs(sigma, count_std):
    """Gradient (multiplier σ_Δ, sensitivity C) and centred count (std σ_b, sensitivity ½) on one Poisson
    sample are one 2-D Gaussian mechanism; its δ(ε), integrated numerically in 2-D, equals dp-accounting's
    δ(ε) of the 1-D subsampled Gaussian at σ (Andrew et al. 2021, Thm. 1)."""
    from lightning_dp.adaptive_clipping import AdaptiveClipping
    from tests.dp_accounting_reference import import_dp_accounting

    import_dp_accounting()  # skipped without the reference on a developer's machine, failed in CI
    from dp_accounting.pld import privacy_loss_distribution

    rule = AdaptiveClipping(count_noise_multiplier=count_std)
    sigma_grad = rule.gradient_noise_multiplier(sigma, expected_batch_size=100.0)
    assert sigma_grad > sigma
    torch.testing.assert_close(sigma_grad**-2 + (2 * count_std) ** -2, sigma**-2, rtol=1e-12, atol=0)
    q = 0.1
    pld = privacy_loss_distribution.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=1e-5)
    for eps in (0.1, 0.5):
        want = pld.get_delta_for_epsilon(eps)
        got = _delta_2d((1.0 / sigma_grad, 0.5 / count_std), q, eps)
        assert got == pytest.approx(want, rel=2e-3), (eps, got, want)


class _Recording:
    """A noise source that records the stds asked for and adds nothing."""

    def __init__(self):
        self.stds = []

    def add_normal_(self, tensors, std):
        self.stds.append(std)


def _norms_model(norms):
    """A bias-free linear model whose per-sample gradient of ``sum(model(x))`` is ``x_b`` (norm ``norms[b]``)."""
    model = nn.Linear(4, 1, bias=False).double()
    directions = torch.nn.functional.normalize(torch.randn(len(norms), 4, dtype=torch.float64), dim=1)
    return model, directions * torch.as_tensor(norms, dtype=torch.float64)[:, None]


def test_adaptive_clipping_noises_gradient_with_sigma_grad_and_accounts_sigma():
    from lightning_dp.accounting import make_accountant

    model, x = _norms_model([1.0, 2.0, 3.0, 4.0])
    noise = _Recording()
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.5, max_grad_norm=1.0,
                       expected_batch_size=4, sample_rate=0.5, loss_reduction="sum",
                       adaptive_clipping=dict(count_noise_multiplier=3.0))
    opt.noise = noise
    model(x).sum().backward()
    opt.step()
    sigma_grad = (1.5**-2 - 6.0**-2) ** -0.5
    assert noise.stds == pytest.approx([sigma_grad * 1.0 / 4, 3.0])
    assert opt.accountant.history == make_accountant("prv").history + [(1.5, 0.5, 1)]


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clipping_norm_follows_the_quantile_without_noise(quantile):
    """Noise off, weights frozen: C converges to the target quantile of the per-sample norms 1 … 100."""
    torch.manual_seed(0)
    model, x = _norms_model(torch.arange(1.0, 101.0))
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
                       expected_batch_size=100, loss_reduction="sum",
                       adaptive_clipping=dict(target_quantile=quantile, learning_rate=0.2))
    for _ in range(300):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert abs(opt.max_grad_norm - 100 * quantile) <= 2.0, opt.max_grad_norm


def test_adaptive_clipping_arguments_are_checked():
    with pytest.raises(ValueError, match="target_quantile"):
        DPConfig(noise_multiplier=1.0, adaptive_clipping=dict(target_quantile=1.5))
    with pytest.raises(ValueError, match="unknown keys"):
        DPConfig(noise_multiplier=1.0, adaptive_clipping=dict(quantile=0.5))
    with pytest.raises(ValueError, match="automatic"):
        DPConfig(noise_multiplier=1.0, clipping="automatic", adaptive_clipping={})
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="count_noise_multiplier"):  # 2σ_b ≤ σ: refused before any step
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=3.0, max_grad_norm=1.0,
                     expected_batch_size=20, adaptive_clipping=dict(count_noise_multiplier=1.0))
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=20, adaptive_clipping=dict(count_noise_multiplier=1.0))
    with pytest.raises(ValueError, match="count_noise_multiplier"):  # also when σ changes later
        opt.configure(noise_multiplier=3.0)


# --- through the Lightning strategy ------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(clipping="automatic"), dict(adaptive_clipping=dict(count_noise_multiplier=2.0))],
                         ids=["automatic", "adaptive"])
def test_strategy_trains_with_the_utility_options_and_accounts_sigma(tmp_path, options):
    """The options reach the DPOptimizer; the accountant records the strategy's σ for every step."""
    from tests.namespace import DPStrategy
    from tests.lightning_helpers import TinyClassifier, make_loader
    from tests.test_trainer_features import fit

    trainer, _ = fit(tmp_path, model=TinyClassifier(), max_epochs=1, loader=make_loader(n=64, batch_size=8),
                     strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, **options))
    opt = trainer.strategy.dp_optimizer
    assert opt.clipping == options.get("clipping", "flat")
    assert [(s, q) for s, q, _ in opt.accountant.history] == [(1.0, 8 / 64)]
    if "adaptive_clipping" in options:
        assert opt.gradient_noise_multiplier > 1.0 and opt.max_grad_norm != 1.0


def test_adaptive_clipping_resumes_from_the_reached_norm_and_is_reported(tmp_path):
    """The norm adaptive clipping reached is in the checkpoint; a resumed run starts from it (not from
    ``max_grad_norm``), and the privacy report names adaptive clipping with its start and current norm."""
    from tests.namespace import DPStrategy, pl
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs

    options = dict(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, adaptive_clipping=dict(count_noise_multiplier=2.0))
    first = pl.Trainer(strategy=DPStrategy(**options), **trainer_kwargs(tmp_path, max_epochs=1))
    first.fit(TinyClassifier(), train_dataloaders=make_loader(n=64, batch_size=8))
    reached = first.strategy.dp_optimizer.max_grad_norm
    assert reached != 1.0
    path = tmp_path / "one_epoch.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["lightning_dp"]["adapted_max_grad_norm"] == pytest.approx(reached)
    report = first.strategy.privacy_report()
    assert "adaptive" in report.clipping_mode and "norm 1 at the start" in report.clipping_mode

    starts = []

    class StartingNorm(pl.Callback):
        def on_train_start(self, trainer, module):
            starts.append(trainer.strategy.dp_optimizer.max_grad_norm)

    resumed = pl.Trainer(strategy=DPStrategy(**options),
                         **trainer_kwargs(tmp_path, max_epochs=2, callbacks=[StartingNorm()]))
    resumed.fit(TinyClassifier(), train_dataloaders=make_loader(n=64, batch_size=8), ckpt_path=path)
    assert starts == [pytest.approx(reached)]
    plain = pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0),
                       **trainer_kwargs(tmp_path, max_epochs=2, callbacks=[StartingNorm()]))
    plain.fit(TinyClassifier(), train_dataloaders=make_loader(n=64, batch_size=8), ckpt_path=path)
    assert starts[-1] == 1.0  # without adaptive clipping the checkpoint's norm is not used
