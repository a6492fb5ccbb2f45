"""BandMF inside the Lightning strategies (lightning_dp.adapter.bandmf): cyclic Poisson groups by optimizer
step, correlated noise that follows the strategy's recursion, BandMF accounting and calibration, resume
equal to the uninterrupted run, and the refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dp.accounting.bandmf import bandmf_epsilon, bandmf_noise_multiplier
from tests.dp_accounting_reference import poisson_gaussian_epsilon
from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
from tests.namespace import DPDDPStrategy, DPFSDPStrategy, DPStrategy, pl

pytestmark = pytest.mark.filterwarnings("ignore:secure_mode=False")

N, B = 64, 8  # q = 1/8: 8 steps per epoch


def _indices(loader, batch_x):
    """Dataset indices of a batch's rows (the rows of make_loader are distinct)."""
    data = loader.dataset.tensors[0]
    return [int((data == row).all(1).nonzero()) for row in batch_x]


def test_each_step_samples_its_group_and_examples_are_b_steps_apart(tmp_path):
    loader = make_loader(n=N, batch_size=B)
    model = TinyClassifier()
    strategy = DPStrategy(noise_multiplier=1.0, seed=0, bands=4)
    pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, max_epochs=3)).fit(model, train_dataloaders=loader)
    labels = strategy._bandmf_labels
    assert labels.shape == (N,) and set(labels.tolist()) <= {0, 1, 2, 3}
    last_seen = {}
    for step, (x, _) in enumerate(model.seen_batches):
        for i in _indices(loader, x):
            assert labels[i] == step % 4
            assert step - last_seen.get(i, -4) >= 4
            last_seen[i] = step
    sizes = [len(x) for x, _ in model.seen_batches]
    assert sum(sizes) / len(sizes) == pytest.approx(N / 4 * 4 / 8 * 1, rel=0.35)  # Binomial(N/b, b·q): mean q·N
    acc = strategy.accountant
    assert acc.total_steps == 24 and acc.rounds == 6 and acc.history == [(1.0, 0.5, 6)]
    assert strategy.get_epsilon(1e-5) == pytest.approx(bandmf_epsilon(1.0, 1 / 8, 24, 4, 1e-5), rel=1e-12)
    # dp-accounting fed the true per-step law: 6 rounds, each group Poisson-sampled at b·q = 0.5
    reference = poisson_gaussian_epsilon(1.0, 0.5, 6, 1e-5)
    assert reference <= strategy.get_epsilon(1e-5) <= reference * 1.01
    assert strategy.privacy_report().steps == 24


class _ZeroLoss(TinyClassifier):
    """A loss with zero gradient: every update is the noise alone."""

    def training_step(self, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in self.parameters()]))
        return F.cross_entropy(self(batch[0]), batch[1]) * 0.0

    def on_train_end(self):
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in self.parameters()]))


def test_noise_follows_the_banded_recursion_with_target_epsilon(tmp_path):
    """σ calibrated by BandMF's rule; the updates u_t = −lr·σC·w_t/B satisfy Σ_j c_j w_{t−j} = z_t with
    z i.i.d. N(0, 1) (reconstructed from the weights), while w itself is correlated."""
    model = _ZeroLoss(lr=1.0)
    model.net = nn.Sequential(nn.Linear(6, 300), nn.Linear(300, 3))
    model.weights = []
    strategy = DPStrategy(target_epsilon=2.0, seed=3, bands=2)
    pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, max_epochs=2)).fit(
        model, train_dataloaders=make_loader(n=N, batch_size=B))
    sigma = strategy.noise_multiplier
    assert sigma == pytest.approx(bandmf_noise_multiplier(2.0, 1e-5, 1 / 8, 16, 2), rel=1e-9)
    assert strategy.get_epsilon(1e-5) <= 2.0
    weights = torch.stack(model.weights).double()
    w = -(weights[1:] - weights[:-1]) * B / sigma  # w_t = C^{-1} z (C = 1, lr = 1)
    c = strategy.dp_optimizer.noise.coefficients
    assert len(c) == 2 and len(w) == 16
    z = torch.stack([c[0] * w[t] + (c[1] * w[t - 1] if t else 0.0) for t in range(len(w))])
    assert z.std().item() == pytest.approx(1.0, rel=0.02)
    lag = (z[1:] * z[:-1]).mean() / z.var()
    assert abs(lag.item()) < 0.02
    w_lag = (w[1:] * w[:-1]).mean() / w.var()
    assert w_lag.item() < -0.1  # the noise of a step cancels part of the previous step's


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Seeded: groups, sampling, cycle position and the past noise buffers all come back from the
    checkpoint, so two epochs + two resumed epochs give the four-epoch run's weights bit for bit."""
    from tests.namespace import ModelCheckpoint

    def run(max_epochs, ckpt_path=None, root="a"):
        torch.manual_seed(0)
        model = TinyClassifier()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = pl.Trainer(max_epochs=max_epochs, strategy=DPStrategy(noise_multiplier=1.0, seed=0, bands=2),
                             **trainer_kwargs(tmp_path / root, enable_checkpointing=True, callbacks=[checkpoint]))
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=B), ckpt_path=ckpt_path)
        return trainer, model

    straight, straight_model = run(4, root="straight")
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["lightning_dp"]["bandmf"]
    assert saved["labels"].shape == (N,) and len(saved["noise"]["history"]) == 1
    run(2, root="first")
    resumed, resumed_model = run(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), root="second")
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(resumed.strategy._bandmf_labels, straight.strategy._bandmf_labels)
    assert resumed.strategy.accountant.rounds == straight.strategy.accountant.rounds == 16
    assert resumed.strategy.get_epsilon(1e-5) == straight.strategy.get_epsilon(1e-5)


def test_resumed_target_epsilon_run_keeps_sigma_and_refuses_a_longer_plan(tmp_path):
    from tests.namespace import ModelCheckpoint

    def run(max_epochs, ckpt_path=None):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = pl.Trainer(max_epochs=max_epochs, strategy=DPStrategy(target_epsilon=2.0, seed=0, bands=2),
                             **trainer_kwargs(tmp_path, enable_checkpointing=True, callbacks=[checkpoint]))
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader(n=N, batch_size=B), ckpt_path=ckpt_path)
        return trainer

    first = run(2)
    sigma, spent = first.strategy.noise_multiplier, first.strategy.get_epsilon(1e-5)
    assert spent <= 2.0
    with pytest.warns(UserWarning, match=r"bands=2: resuming at the checkpoint's σ"):
        longer = run(6, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert longer.strategy.noise_multiplier == sigma  # one σ for the run: not recalibrated
    assert spent <= longer.strategy.get_epsilon(1e-5) <= 2.0  # stopped before the target
    assert longer.strategy.accountant.total_steps < 6 * 8


def test_bandmf_refusals_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        DPStrategy(noise_multiplier=1.0, bands=2, poisson_sampling=False)
    with pytest.raises(ValueError, match="`centering` cannot be combined with bands=2"):
        DPStrategy(noise_multiplier=1.0, bands=2, centering={"net.0": torch.zeros(6)})
    with pytest.raises(ValueError, match="does not take `bands`.*FSDP"):
        DPFSDPStrategy(noise_multiplier=1.0, bands=2)
    with pytest.raises(ValueError, match="bands"):
        DPDDPStrategy(noise_multiplier=1.0, bands=2, secure_aggregation=True)
    DPDDPStrategy(noise_multiplier=1.0, bands=2)  # accepted
    # b·q > 1: the groups cannot be sampled at rate b·q
    trainer = pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, bands=16), **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match=r"`bands` × `sample_rate` must be at most 1.*bands=16"):
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader(n=N, batch_size=B))
    # an accumulation schedule changes the rate between epochs
    from tests.namespace import callbacks

    trainer = pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, bands=2),
                         **trainer_kwargs(tmp_path, max_epochs=2,
                                          callbacks=[callbacks.GradientAccumulationScheduler({0: 1, 1: 2})]))
    with pytest.raises(Exception, match="one sampling rate for the whole run"):
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader(n=N, batch_size=B))

    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            opt.step()
            opt.zero_grad()

    trainer = pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, bands=2), **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(Exception, match="bands=2 needs automatic optimization"):
        trainer.fit(Manual(), train_dataloaders=make_loader(n=N, batch_size=B))
