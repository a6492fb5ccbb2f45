"""Lightning features under DP on real Trainers: accumulation, physical batches, resume, precision,
manual optimization, multiple optimizers, LightningCLI."""
from __future__ import annotations

import copy

import pytest
from tests.namespace import pl
import torch
import torch.nn.functional as F
from tests.namespace import ModelCheckpoint
from tests.namespace import MisconfigurationException

from lightning_dp import compute_epsilon, make_accountant
from tests.namespace import DPStrategy
from tests.conftest import clipped_mean_reference, microbatch_grads
from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore::UserWarning")


def _reference_step(model, batches, max_grad_norm, expected_batch_size, lr):
    """Apply one textbook noise-free DP-SGD step over the union of ``batches`` to a copy of ``model``."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    grads = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"))
    update = clipped_mean_reference(grads, max_grad_norm, expected_batch_size)
    replay = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in replay.named_parameters():
            p -= lr * update[name].float()
    return replay


def _assert_same_weights(a, b, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("poisson", [True, False])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, poisson):
    model = TinyClassifier(lr=0.5)
    initial = copy.deepcopy(model)
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=poisson, seed=0)
    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=2, strategy=strategy, **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=8, shuffle=not poisson))
    assert len(model.seen_batches) == 2, "one optimizer step = two micro-batches"
    assert strategy.sample_rate == pytest.approx(2 * 8 / 64)
    assert strategy.expected_batch_size == 16
    assert strategy.accountant.total_steps == 1 == trainer.global_step
    reference = _reference_step(initial, model.seen_batches, 0.05, 16, 0.5)
    _assert_same_weights(reference, model)


def test_accumulation_draws_one_poisson_sample_per_step(tmp_path):
    model = TinyClassifier()
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=4, strategy=DPStrategy(noise_multiplier=1.0, seed=1),
                         **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=4))
    assert trainer.global_step == 4 and trainer.strategy.accountant.history[0][1:] == (0.25, 4)
    ids = [tuple(map(tuple, b[0].tolist())) for b in model.seen_batches]
    for step in range(0, len(ids), 4):  # micro-batches of one logical batch are disjoint
        rows = [r for chunk in ids[step : step + 4] for r in chunk]
        assert len(rows) == len(set(rows))


def test_physical_batches_give_the_unchunked_update(tmp_path):
    def run(limit):
        model = TinyClassifier(lr=0.5)
        torch.manual_seed(0)
        model = TinyClassifier(lr=0.5)
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.1, seed=4, max_physical_batch_size=limit)
        trainer = pl.Trainer(max_steps=3, strategy=strategy, **trainer_kwargs(tmp_path))
        trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=32))
        return model, trainer

    chunked, chunked_trainer = run(5)
    whole, _ = run(None)
    assert max(len(b[0]) for b in chunked.seen_batches) <= 5
    assert len(chunked.seen_batches) > len(whole.seen_batches) == 3
    assert chunked_trainer.strategy.accountant.total_steps == 3
    _assert_same_weights(whole, chunked)


def test_resume_gives_the_uninterrupted_epsilon(tmp_path):
    def run(max_epochs, ckpt_path=None, **strategy_kwargs):
        kwargs = dict(noise_multiplier=1.1, seed=0)
        kwargs.update(strategy_kwargs)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = pl.Trainer(max_epochs=max_epochs, strategy=DPStrategy(**kwargs),
                             **trainer_kwargs(tmp_path, enable_checkpointing=True, callbacks=[checkpoint]))
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader(), ckpt_path=ckpt_path)
        return trainer

    uninterrupted = pl.Trainer(max_epochs=4, strategy=DPStrategy(noise_multiplier=1.1, seed=0), **trainer_kwargs(tmp_path))
    uninterrupted.fit(TinyClassifier(), train_dataloaders=make_loader())
    run(2)
    resumed = run(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.strategy.get_epsilon(1e-5) == pytest.approx(uninterrupted.strategy.get_epsilon(1e-5), rel=1e-12)

    # resuming with other settings warns and composes both segments
    with pytest.warns(UserWarning, match="different DP settings.*noise_multiplier: 1.1 → 2.0"):
        changed = run(6, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), noise_multiplier=2.0)
    expected = make_accountant()
    expected.step(noise_multiplier=1.1, sample_rate=0.25, num_steps=16)
    expected.step(noise_multiplier=2.0, sample_rate=0.25, num_steps=8)
    assert changed.strategy.get_epsilon(1e-5) == pytest.approx(expected.get_epsilon(1e-5), rel=1e-12)


def _bf16_reference_update(model, batches, max_grad_norm, expected_batch_size, dtype=torch.bfloat16):
    """The noise-free DP-SGD gradient of the mixed-precision model: each sample's gradient from its own forward
    and backward under ``dtype`` autocast (the roundings the trained model's forward and backward make), clipped
    and averaged in float64. Also ``Σ_b |clip_b·g_b| / B`` per element, the scale of the sum's rounding errors."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    per_sample = {name: [] for name in params}
    for i in range(x.shape[0]):
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1], reduction="sum")
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            per_sample[name].append(g.double())
    grads = {name: torch.stack(gs) for name, gs in per_sample.items()}
    magnitudes = {name: g.abs() for name, g in grads.items()}  # same norms, so the same clip factors
    return (clipped_mean_reference(grads, max_grad_norm, expected_batch_size),
            clipped_mean_reference(magnitudes, max_grad_norm, expected_batch_size))


BF16_ROUNDINGS = 6
"""Tolerance of the bf16 update, in bf16 ulps (2⁻⁸) of ``Σ_b |clip_b·g_b| / B``. The trained model and the
one-sample reference round the same forward, but the backward (the loss gradient cast to bf16 — the batch's is
divided by B —, each matmul's and tanh's gradient) rounds different values, each by up to half an ulp, the
per-sample weight gradient is a float32 product in the strategy and a bf16 one in the reference, and the
clip factor's norm inherits the gradients' errors. Measured over 6 seeds: at most 3.2 ulps (1.5 at the test's
seed 0). A 5 % error in the update is 12.8 ulps wherever the samples agree in sign (10–12.8 in each tensor)."""


def _assert_matches_reference(initial, model, update, magnitude, lr, ulp):
    for (name, p0), p in zip(initial.named_parameters(), model.parameters()):
        applied = (p0.double() - p.double()) / lr  # the update SGD applied, in gradient units
        # + the float32 rounding of p0 − lr·g (half an ulp of the parameter), in the same units
        tolerance = BF16_ROUNDINGS * ulp * magnitude[name] + 2.0**-24 * p0.double().abs() / lr
        excess = ((applied - update[name]).abs() / tolerance).max().item()
        assert excess <= 1.0, (name, excess)


def test_bf16_mixed_precision_matches_a_bf16_reference(tmp_path):
    lr, max_grad_norm, batch_size = 0.5, 0.05, 16
    model = TinyClassifier(lr=lr)
    initial = copy.deepcopy(model)
    trainer = pl.Trainer(max_steps=1, precision="bf16-mixed",
                         strategy=DPStrategy(noise_multiplier=0.0, max_grad_norm=max_grad_norm, seed=0),
                         **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader(batch_size=batch_size))
    update, magnitude = _bf16_reference_update(initial, model.seen_batches, max_grad_norm, batch_size)
    _assert_matches_reference(initial, model, update, magnitude, lr, ulp=2.0**-8)


def _fp16_plugin():
    """16-mixed with a real GradScaler on CPU (Lightning only creates one on CUDA by itself)."""
    from tests.namespace import submodule

    MixedPrecision = submodule("plugins.precision").MixedPrecision

    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(2, 2)(torch.randn(1, 2))
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    except Exception as err:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"fp16 autocast with a GradScaler is not available on this CPU build: {err}")


class OverflowOnSecondBatch(TinyClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == 1 else loss


def test_fp16_loss_scale_is_undone_and_skipped_steps_are_accounted(tmp_path):
    model = TinyClassifier(lr=0.5)
    initial = copy.deepcopy(model)
    # C = 10 clips nothing unless the loss scale (1024) were left in the per-sample gradients
    trainer = pl.Trainer(max_steps=1, plugins=[_fp16_plugin()],
                         strategy=DPStrategy(noise_multiplier=0.0, max_grad_norm=10.0, seed=0), **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader())
    scale = trainer.precision_plugin.scaler.get_scale()
    assert scale > 1, "the GradScaler did scale the loss"
    # against a per-sample fp16-autocast reference, in fp16 ulps (2⁻¹¹) of Σ_b |clip_b·g_b| / B: the same
    # rounding argument as the bf16 case (a 5 % error is ~100 ulps)
    update, magnitude = _bf16_reference_update(initial, model.seen_batches, 10.0, 16, dtype=torch.float16)
    _assert_matches_reference(initial, model, update, magnitude, 0.5, ulp=2.0**-11)

    overflowing = OverflowOnSecondBatch()
    trainer = pl.Trainer(max_steps=3, plugins=[_fp16_plugin()], strategy=DPStrategy(noise_multiplier=1.0, seed=0),
                         **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="skipped a step"):
        trainer.fit(overflowing, train_dataloaders=make_loader())
    assert trainer.strategy.accountant.total_steps == len(overflowing.seen_batches) == 3


class ManualClassifier(TinyClassifier):
    def __init__(self, steps_per_batch: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.steps_per_batch = steps_per_batch

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.seen_batches.append((x.clone(), y.clone()))
        for _ in range(self.steps_per_batch):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            opt.step()


def test_manual_optimization_one_step_per_batch_is_exact(tmp_path):
    model = ManualClassifier(lr=0.5)
    initial = copy.deepcopy(model)
    trainer = pl.Trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, seed=0),
                         **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader())
    assert trainer.strategy.accountant.total_steps == 1
    _assert_same_weights(_reference_step(initial, model.seen_batches, 0.05, 16, 0.5), model)


def test_manual_optimization_two_steps_on_one_batch_is_refused(tmp_path):
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0), **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match="at most once per training batch"):
        trainer.fit(ManualClassifier(steps_per_batch=2), train_dataloaders=make_loader())
    assert trainer.strategy.accountant.total_steps == 1


class TwoOptimizers(TinyClassifier):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_multiple_optimizers_are_refused_at_setup(tmp_path):
    model = ManualClassifier()
    model.configure_optimizers = TwoOptimizers.configure_optimizers.__get__(model)
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0), **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="exactly one optimizer.*parameter groups"):
        trainer.fit(model, train_dataloaders=make_loader())
    assert model.seen_batches == []


def test_lightning_cli_configures_the_strategy(tmp_path):
    pytest.importorskip("jsonargparse")
    from tests.namespace import submodule

    LightningCLI = submodule("cli").LightningCLI

    cli = LightningCLI(
        TinyClassifier,
        run=False,
        save_config_callback=None,
        args=[
            f"--trainer.strategy={DPStrategy.__module__}.DPStrategy",  # lightning_dp.lightning or .pytorch_lightning
            "--trainer.strategy.noise_multiplier=1.3",
            "--trainer.strategy.max_grad_norm=0.7",
            "--trainer.strategy.max_physical_batch_size=8",
            "--trainer.max_steps=2",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DPStrategy)
    assert (strategy.noise_multiplier, strategy.max_grad_norm, strategy.max_physical_batch_size) == (1.3, 0.7, 8)
    cli.trainer.fit(cli.model, train_dataloaders=make_loader())
    assert strategy.get_epsilon(1e-5) == pytest.approx(compute_epsilon(1.3, 0.25, 2, 1e-5))
