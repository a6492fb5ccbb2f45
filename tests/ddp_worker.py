"""Run by tests/test_ddp.py: a 2-process CPU DDP fit with DPDDPStrategy (Lightning re-launches this
script for rank 1). Each rank saves what it trained on and its final weights to OUT_DIR."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.namespace import pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_dp.centering import PrivateMean  # noqa: E402
from tests.namespace import DPDDPStrategy  # noqa: E402
from tests.lightning_helpers import TinyClassifier, make_loader  # noqa: E402


class WideZeroLoss(TinyClassifier):
    """Many parameters and a loss with zero gradient: one step's update is pure noise."""

    def __init__(self) -> None:
        super().__init__(lr=1.0)
        self.net = nn.Sequential(nn.Linear(6, 1200), nn.Linear(1200, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_batches.append((x.clone(), y.clone()))
        return F.cross_entropy(self(x), y) * 0.0


def main(mode: str, out_dir: str) -> None:
    torch.manual_seed(0)
    model = WideZeroLoss() if mode in ("noise", "bandmf") else TinyClassifier(lr=0.5)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    sigma = 1.5 if mode in ("noise", "bandmf") else 0.0
    bands = 2 if mode == "bandmf" else 1  # "bandmf": rank 0 adds the whole correlated noise
    # "adaptive": noise-free adaptive clipping, so the norm after the step is a function of the union batch
    adaptive = dict(target_quantile=0.5, learning_rate=0.7) if mode == "adaptive" else None
    # "centering": noise-free steps in the geometry of a centred first layer whose centre is a private mean
    # released by rank 0 (noised: the ranks' own draws would differ) and shared with rank 1
    loader = make_loader(n=64, batch_size=8)
    centering = None
    if mode == "centering":
        centering = {"net.0": PrivateMean(loader.dataset.tensors[0], max_norm=3.0, noise_multiplier=2.0)}
    clipping = dict(max_grad_norm=1.7 if adaptive else 0.05)
    if mode == "recipe":  # noise-free: the recipe's SGD at its learning rate (σ = 0), its EMA released
        clipping = dict(recipe=dict(clipping="flat", max_grad_norm=0.05, learning_rate=0.25))  # module: lr 0.5
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DPDDPStrategy(noise_multiplier=sigma, seed=11, adaptive_clipping=adaptive, centering=centering,
                               bands=bands, **clipping),
        max_steps=1,
        logger=False,
        default_root_dir=out_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=loader)
    strategy = trainer.strategy
    torch.save(
        {
            "initial": initial,
            "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "batches": model.seen_batches,
            "sample_rate": strategy.sample_rate,
            "expected_batch_size": strategy.expected_batch_size,
            "steps": strategy.accountant.total_steps,
            "epsilon": strategy.get_epsilon(1e-5) if sigma > 0 else None,
            "max_grad_norm": strategy.dp_optimizer.max_grad_norm,
            "history": list(strategy.accountant.history),
            "center": (strategy._centering_state() or {}).get("net.0"),
            "labels": strategy._bandmf_labels,
            "coefficients": getattr(strategy.dp_optimizer.noise, "coefficients", None),
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
