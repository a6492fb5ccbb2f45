"""Inside Lightning: samples with a non-finite gradient are dropped exactly (every clipping mode, with
accumulation and physical batches), counted next to ε and in the report; what ε does not cover is said."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import clipped_mean_reference, microbatch_grads
from tests.lightning_helpers import MemoryLogger, TinyClassifier, trainer_kwargs
from tests.namespace import DPStrategy, PrivacyBudgetCallback, pl

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore:secure_mode=False")


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradient it receives at every step (the DP gradient, before any weight moves)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.received = []

    def step(self, closure=None):
        self.received.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


class Recording(TinyClassifier):
    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=self.lr)


def _loader_with_bad_samples(bad: list, value: float = float("nan"), n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    x[bad, 2] = value
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("clipping_mode", ["auto", "ghost", "materialize"])
def test_update_is_the_reference_over_finite_samples(tmp_path, clipping_mode, clipping):
    model = Recording(lr=0.5)
    initial = copy.deepcopy(model)
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, seed=2, clipping_mode=clipping_mode,
                          clipping=clipping, max_physical_batch_size=3)
    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=2, strategy=strategy, **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=_loader_with_bad_samples(list(range(0, 64, 3))))
    x = torch.cat([b[0] for b in model.seen_batches])
    y = torch.cat([b[1] for b in model.seen_batches])
    finite = torch.isfinite(x).all(dim=1)
    assert (~finite).sum() >= 1 and finite.sum() >= 1, "the step must mix finite and non-finite samples"
    assert strategy.dropped_samples == int((~finite).sum())
    xs, ys = x[finite], y[finite]
    grads = microbatch_grads(initial, xs, lambda out, i: F.cross_entropy(out, ys[i : i + 1], reduction="sum"))
    expected = clipped_mean_reference(grads, 0.05, 16, clipping)  # q·N = 2·8/64·64: not the kept count
    step_grads = trainer.strategy.dp_optimizer.original_optimizer.received
    assert len(step_grads) == 1
    for (name, _), got in zip(initial.named_parameters(), step_grads[0]):
        torch.testing.assert_close(got.double(), expected[name], rtol=1e-4, atol=1e-7)


def test_all_samples_dropped_is_a_noise_only_step_counted_and_logged(tmp_path):
    model = Recording(lr=0.5)
    logger = MemoryLogger()
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    kwargs = trainer_kwargs(tmp_path, logger=logger)
    trainer = pl.Trainer(max_steps=3, strategy=strategy, callbacks=[PrivacyBudgetCallback(epsilon_budget=100.0)],
                         **kwargs)
    trainer.fit(model, train_dataloaders=_loader_with_bad_samples(list(range(64)), value=float("inf")))
    assert strategy.accountant.total_steps == 3 == trainer.global_step
    seen = sum(len(b[0]) for b in model.seen_batches)
    assert strategy.dropped_samples == seen > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for grads in strategy.dp_optimizer.original_optimizer.received:
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)  # pure noise, finite
    logged = [value for _, value in logger.history["dropped_samples"]]
    assert logged[-1] == seen and logged == sorted(logged)
    report = strategy.privacy_report()
    assert report.dropped_samples == seen
    assert "Samples dropped (non-finite gradient; not covered by ε)" in report.to_table()


def test_report_and_callback_say_what_epsilon_does_not_cover(tmp_path):
    def run(warn):
        model = TinyClassifier()  # logs train_loss from training_step
        trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, seed=0),
                             callbacks=[PrivacyBudgetCallback(epsilon_budget=50.0, warn_uncovered_metrics=warn)],
                             **trainer_kwargs(tmp_path, logger=MemoryLogger()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, train_dataloaders=_loader_with_bad_samples([]))
        return trainer, [str(w.message) for w in caught if "not covered by ε" in str(w.message)]

    trainer, messages = run(True)
    assert len(messages) == 1 and "train_loss" in messages[0]
    markdown = trainer.strategy.privacy_report().to_markdown()
    assert "Not covered by ε" in markdown and "training_step" in markdown
    _, silenced = run(False)
    assert silenced == []
