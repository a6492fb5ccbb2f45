"""Run by tests/test_fabric.py: a Fabric loop with lightning_dp's Fabric strategies (Fabric re-launches this
script for rank 1 with ``devices=2``). Each rank saves what it trained on, the weights before every step and
its final weights to OUT_DIR/rank{r}.pt.

Modes: ``ddp`` (2 processes, noise 0, accumulate 2, ``no_backward_sync`` on the accumulating micro-batch) and
``single`` (1 process, the same loop)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_dp.fabric import DPDDPStrategy, DPStrategy  # noqa: E402
from tests.fsdp_worker import build_net  # noqa: E402
from tests.lightning_helpers import make_loader  # noqa: E402

STEPS, ACCUMULATE = 2, 2


def main(mode: str, out_dir: str) -> None:
    torch.manual_seed(0)
    options = dict(noise_multiplier=0.0, max_grad_norm=0.05, seed=11, accumulate_grad_batches=ACCUMULATE)
    strategy = DPDDPStrategy(**options) if mode == "ddp" else DPStrategy(**options)
    fabric = L.Fabric(accelerator="cpu", devices=2 if mode == "ddp" else 1, strategy=strategy)
    fabric.launch()
    model = build_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(make_loader(n=64, batch_size=8))
    record = {"batches": [], "before_steps": [], "steps": 0}
    for i, (x, y) in enumerate(loader):
        if i % ACCUMULATE == 0:
            record["before_steps"].append({n: p.detach().clone() for n, p in model.module.named_parameters()})
        record["batches"].append((x.clone(), y.clone()))
        with fabric.no_backward_sync(model, enabled=(i + 1) % ACCUMULATE != 0):
            fabric.backward(F.cross_entropy(model(x), y))
        if (i + 1) % ACCUMULATE == 0:
            optimizer.step()
            optimizer.zero_grad()
            record["steps"] += 1
            if record["steps"] == STEPS:
                break
    record["final"] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    record["expected_batch_size"] = fabric.strategy.privacy.expected_batch_size
    record["sample_rate"] = fabric.strategy.sample_rate
    torch.save(record, os.path.join(out_dir, f"rank{fabric.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
