"""Run by tests/test_user_level_more.py: one process of a 2-process CPU (gloo) FSDP job with
``DPFSDPStrategy(privacy_unit="user")``.

Usage::

    python tests/user_level_fsdp_worker.py user_fsdp OUT_DIR

Started like ``tests/fsdp_worker.py`` (``tests/distributed_helpers.run_job``: Lightning's cluster environment
variables, ``LOCAL_RANK=0/1``). Every user is sampled (q = 1: 3 expected users per rank, 2 ranks, 6 users) and
the noise is 0, so each optimizer step is the per-user clipped mean of the union of the ranks' records. Each fit
writes ``OUT_DIR/<name>.rank<r>.pt``: the full weights before each step and at the end, and every
``training_step`` pass (its step, the records' dataset indices, the unit ids the strategy gave the pass).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from tests.fsdp_worker import RAW_REDUCES, ShardedNet, _counting_reduce, _fsdp, _trainer, full_weights  # noqa: E402

# users numbered by first appearance: a(0) 4 records (k = 3 caps it), b(1) 1, c(2) 3, d(3) 1, e(4) 2, f(5) 1.
# Rank 0 decides for users 0, 2, 4 (8 records at q = 1), rank 1 for users 1, 3, 5 (3 records): with
# max_physical_batch_size=3 rank 0 runs 3 chunks (one per user) and rank 1 one chunk and 2 padding passes.
USER_IDS = ["a", "b", "a", "c", "d", "c", "e", "a", "f", "c", "e", "a"]
K = 3
NORM = 4.0  # users' mean-gradient norms are about 2 to 8 here: some users are clipped, some are not
LR = 0.5
FITS = {  # name: (clipping_mode, clipping, max_physical_batch_size)
    "whole": ("auto", "flat", None),
    "physical": ("ghost", "flat", 3),
    "physical_per_layer": ("materialize", "per_layer", 3),
}


def dataset() -> TensorDataset:
    """12 records (x, y, dataset index)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(USER_IDS), 6, generator=g)
    y = torch.randint(0, 3, (len(USER_IDS),), generator=g)
    return TensorDataset(x, y, torch.arange(len(USER_IDS)))


class UserNet(ShardedNet):
    """The FSDP worker's net on ``(x, y, index)`` batches; records every pass with the units it was given."""

    def __init__(self) -> None:
        super().__init__(lr=LR)
        self.passes: list = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        units = self.trainer.strategy._units_now
        self.passes.append((len(self.before_steps) - 1, index.clone(), units.clone(), bool(x.abs().sum() == 0)))
        return F.cross_entropy(self(x), y)


def fit(name: str, out_dir: str) -> None:
    clipping_mode, clipping, limit = FITS[name]
    torch.manual_seed(0)
    model = UserNet()
    strategy = _fsdp(noise_multiplier=0.0, max_grad_norm=NORM, seed=11, privacy_unit="user", user_ids=USER_IDS,
                     max_records_per_user=K, clipping_mode=clipping_mode, clipping=clipping,
                     max_physical_batch_size=limit)
    trainer = _trainer(strategy, out_dir, 1, max_steps=2)
    before = RAW_REDUCES["count"]
    trainer.fit(model, train_dataloaders=DataLoader(dataset(), batch_size=3))
    torch.save(
        {
            "before_steps": model.before_steps,
            "final": full_weights(model.net),
            "passes": model.passes,
            "sample_rate": strategy.sample_rate,
            "expected_batch_size": strategy.expected_batch_size,
            "dataset_size": strategy.dataset_size,
            "steps": strategy.privacy.steps_taken,
            "raw_reduces": RAW_REDUCES["count"] - before,
        },
        os.path.join(out_dir, f"{name}.rank{trainer.global_rank}.pt"),
    )


def job_user_fsdp(out_dir: str) -> None:
    for name in FITS:
        fit(name, out_dir)


if __name__ == "__main__":
    fsdp_param_group.foreach_reduce = _counting_reduce
    {"user_fsdp": job_user_fsdp}[sys.argv[1]](sys.argv[2])
