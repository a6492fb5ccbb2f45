"""Run by tests/test_fabric.py: a Fabric loop with lightning_dp's Fabric strategies (Fabric re-launches this
script for rank 1 with ``devices=2``). Each rank saves what it trained on, the weights before every step and
its final weights to OUT_DIR/rank{r}.pt.

Modes: ``ddp`` and ``fsdp`` (2 processes, noise 0, accumulate 2, ``no_backward_sync`` on the accumulating
micro-batch; FSDP2 shards every ``Block`` and the root) and ``single`` (1 process, the same loop)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_dp.fabric import DPDDPStrategy, DPFSDPStrategy, DPStrategy  # noqa: E402
from tests.fsdp_worker import Block, build_net, full_weights  # noqa: E402
from tests.lightning_helpers import make_loader  # noqa: E402

STEPS, ACCUMULATE = 2, 2


def _step(fabric, model, optimizer, batches) -> None:
    for i, (x, y) in enumerate(batches):
        with fabric.no_backward_sync(model, enabled=(i + 1) % ACCUMULATE != 0):
            fabric.backward(F.cross_entropy(model(x), y))
    optimizer.step()
    optimizer.zero_grad()


def resume(out_dir: str) -> None:
    """``fsdp_resume``: one step, a (distributed) checkpoint, a second step; then the checkpoint loaded into the
    same objects and the second step again: the same weights and privacy history (noise on, seeded)."""
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=DPFSDPStrategy(
        auto_wrap_policy={Block}, noise_multiplier=1.0, max_grad_norm=0.05, seed=11, accumulate_grad_batches=ACCUMULATE))
    fabric.launch()
    model = fabric.setup(build_net())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    loader = fabric.setup_dataloaders(make_loader(n=64, batch_size=8))
    batches = iter(loader)
    _step(fabric, model, optimizer, [next(batches) for _ in range(ACCUMULATE)])
    path = os.path.join(out_dir, "ckpt")
    fabric.save(path, {"model": model, "optimizer": optimizer})
    _step(fabric, model, optimizer, [next(batches) for _ in range(ACCUMULATE)])
    straight, history = full_weights(model.module), list(fabric.strategy.accountant.history)
    fabric.load(path, {"model": model, "optimizer": optimizer})
    loaded_history = list(fabric.strategy.accountant.history)
    batches = iter(loader)
    _step(fabric, model, optimizer, [next(batches) for _ in range(ACCUMULATE)])
    record = {"straight": straight, "resumed": full_weights(model.module), "history": history,
              "resumed_history": list(fabric.strategy.accountant.history), "loaded_history": loaded_history}
    torch.save(record, os.path.join(out_dir, f"rank{fabric.global_rank}.pt"))


def main(mode: str, out_dir: str) -> None:
    if mode == "fsdp_resume":
        return resume(out_dir)
    torch.manual_seed(0)
    options = dict(noise_multiplier=0.0, max_grad_norm=0.05, seed=11, accumulate_grad_batches=ACCUMULATE)
    if mode == "fsdp":
        strategy = DPFSDPStrategy(auto_wrap_policy={Block}, **options)
    else:
        strategy = DPDDPStrategy(**options) if mode == "ddp" else DPStrategy(**options)
    fabric = L.Fabric(accelerator="cpu", devices=1 if mode == "single" else 2, strategy=strategy)
    fabric.launch()
    model = build_net()
    if mode == "fsdp":  # FSDP2 replaces the parameters: the optimizer is made for the sharded ones (Fabric's rule)
        model = fabric.setup(model)
        optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.5))
    else:
        model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.5))
    loader = fabric.setup_dataloaders(make_loader(n=64, batch_size=8))
    record = {"batches": [], "before_steps": [], "steps": 0}
    for i, (x, y) in enumerate(loader):
        if i % ACCUMULATE == 0:
            record["before_steps"].append(full_weights(model.module))
        record["batches"].append((x.clone(), y.clone()))
        with fabric.no_backward_sync(model, enabled=(i + 1) % ACCUMULATE != 0):
            fabric.backward(F.cross_entropy(model(x), y))
        if (i + 1) % ACCUMULATE == 0:
            optimizer.step()
            optimizer.zero_grad()
            record["steps"] += 1
            if record["steps"] == STEPS:
                break
    record["final"] = full_weights(model.module)
    record["expected_batch_size"] = fabric.strategy.privacy.expected_batch_size
    record["sample_rate"] = fabric.strategy.sample_rate
    torch.save(record, os.path.join(out_dir, f"rank{fabric.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
