"""Private training on scikit-learn's digits (ships offline): an MLP trained with DP-SGD in Lightning.

    python examples/train_digits.py            # budget ε=3 at δ=1e-5, ε live in the progress bar

The LightningModule below is ordinary Lightning code; privacy is the `strategy=` and `callbacks=`
arguments of the Trainer. TensorBoard logs (ε per step as the scalar ``epsilon``) go to ``--log-dir``.
"""
from __future__ import annotations

import argparse
import math

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy, PrivacyBudgetCallback


class DigitsMLP(L.LightningModule):
    """A small MLP for 8×8 digit images; nothing in it knows about privacy."""

    def __init__(self, hidden: int = 128, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.test_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_accuracy", self.test_accuracy)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def digits_loaders(batch_size: int, seed: int = 0):
    """Standardised digits, a fixed 80/20 split, as (train, test) DataLoaders."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1.0
    to_tensor = lambda a, b: TensorDataset(  # noqa: E731
        torch.tensor((a - mean) / std, dtype=torch.float32), torch.tensor(b, dtype=torch.long)
    )
    train = DataLoader(to_tensor(x_train, y_train), batch_size=batch_size, shuffle=True)
    test = DataLoader(to_tensor(x_test, y_test), batch_size=512)
    return train, test


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget ε")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    parser.add_argument("--secure", action="store_true", help="cryptographically secure noise (no seed)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--no-progress-bar", action="store_true", help="hide the live progress bar")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, workers=True)
    train, test = digits_loaders(args.batch_size, seed=args.seed)
    model = DigitsMLP(hidden=args.hidden, lr=args.lr, momentum=args.momentum)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        strategy=DPStrategy(
            target_epsilon=args.epsilon,
            delta=args.delta,
            max_grad_norm=args.max_grad_norm,
            accountant=args.accountant,
            secure_mode=args.secure,
            seed=None if args.secure else args.seed,
        ),
        callbacks=[PrivacyBudgetCallback(epsilon_budget=args.epsilon, delta=args.delta)],
        logger=TensorBoardLogger(args.log_dir, name="digits_dp"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        accelerator="cpu",
        enable_progress_bar=not args.no_progress_bar,
        enable_model_summary=not args.no_progress_bar,
    )
    trainer.fit(model, train_dataloaders=train)
    epsilon = trainer.strategy.get_epsilon(args.delta)
    accuracy = trainer.test(model, dataloaders=test, verbose=False)[0]["test_accuracy"]
    sigma = trainer.strategy.noise_multiplier
    report = trainer.strategy.privacy_report()
    print(f"\n{report.to_table()}")
    print(
        f"\nFinal: ε = {epsilon:.3f} (δ = {args.delta}, budget {args.epsilon}), noise multiplier σ = {sigma:.3f}, "
        f"steps = {trainer.global_step}, test accuracy = {accuracy:.4f}"
    )
    print(f"TensorBoard logs and privacy_report.json: {trainer.logger.log_dir}")
    assert math.isfinite(epsilon) and epsilon <= args.epsilon
    return {"epsilon": epsilon, "accuracy": accuracy, "noise_multiplier": sigma}


if __name__ == "__main__":
    main()
