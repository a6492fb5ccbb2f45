"""A small LightningModule and data used by the Lightning tests (nothing privacy-specific in it)."""
from __future__ import annotations

from typing import Any, List

from tests.namespace import pl
import torch
import torch.nn.functional as F
from tests.namespace import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    """Ordinary Lightning code; records the batches it trains on (for references) and its step count."""

    def __init__(self, norm: str | None = None, lr: float = 0.5) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Linear(6, 8)]
        if norm == "batch":
            layers.append(nn.BatchNorm1d(8))
        layers += [nn.Tanh(), nn.Linear(8, 3)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.seen_batches: List[Any] = []
        self.training_steps_run = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_batches.append((x.detach().clone(), y.clone()))
        self.training_steps_run += 1
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_loader(n: int = 64, batch_size: int = 16, shuffle: bool = True, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class MemoryLogger(Logger):
    """Keeps every logged metric in memory: ``history[name] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict = {}
        self.hparams: dict = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams.update(dict(params) if not isinstance(params, dict) else params)

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, float(value)))


def trainer_kwargs(tmp_path, **overrides):
    """Quiet CPU Trainer settings for tests."""
    kwargs = dict(
        accelerator="cpu",
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs
