"""An empty Poisson micro-batch after a non-empty one in the same step (accumulation) is a noise-only part of
the step, also for layers served by the ``torch.func`` fallback, whose parameters get an ordinary ``.grad``
too: the empty pass's zero loss adds zeros to it in place, which is no use of the data (it was refused as one,
found with LitGPT's LoRA layers)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_helpers import trainer_kwargs
from tests.namespace import DPStrategy, pl


class Scale(torch.nn.Module):
    """A layer without a per-sample rule: the torch.func fallback computes its per-sample gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(Scale(), torch.nn.Linear(6, 3))
        self.sizes: list = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.sizes.append(x.shape[0])
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.lightning
def test_an_empty_micro_batch_after_a_full_one_is_a_noise_only_part_of_the_step(tmp_path):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(3, (40,))), batch_size=1)
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=2), strategy=strategy)
    trainer.fit(Module(), train_dataloaders=loader)
    assert strategy.privacy.steps_taken == 40  # 2 epochs of 20 draws (each 2 micro-batches), every one accounted
