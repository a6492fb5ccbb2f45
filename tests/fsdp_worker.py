"""Run by tests/test_fsdp.py and tests/test_num_nodes.py: one process of a 2-process CPU (gloo) job.

Usage::

    python tests/fsdp_worker.py JOB OUT_DIR

The test starts both processes itself with Lightning's cluster environment variables (``MASTER_ADDR``,
``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``), as a cluster launcher (torchrun, SLURM)
would: ``LOCAL_RANK=0/1`` on one node (``devices=2``), or ``NODE_RANK=0/1`` for two nodes
(``num_nodes=2, devices=1``). Each process imports Lightning once and runs every fit of the job; each
fit writes ``OUT_DIR/<name>.rank<r>.pt`` with what the test needs (full weights before each optimizer
step and at the end, the batches each rank trained on, ε, local shard sizes).

FSDP2's raw-gradient reduce-scatter (``foreach_reduce``) is replaced by a counter: the result records how
often it ran (it must be 0: raw gradients never leave a rank).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from tests.lightning_helpers import make_loader  # noqa: E402
from tests.namespace import DPDDPStrategy, DPFSDPStrategy, PrivacyBudgetCallback, pl  # noqa: E402

RAW_REDUCES = {"count": 0}
_foreach_reduce = fsdp_param_group.foreach_reduce


def _counting_reduce(*args, **kwargs):
    RAW_REDUCES["count"] += 1
    return _foreach_reduce(*args, **kwargs)


class Block(nn.Module):
    """A residual block: Linear (factored), LayerNorm (materialised per-sample rule), Linear. Odd widths
    give uneven shards over 2 ranks."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(d, 2 * d + 1)
        self.norm = nn.LayerNorm(2 * d + 1)
        self.lin2 = nn.Linear(2 * d + 1, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin2(torch.tanh(self.norm(self.lin1(x))))


def build_net(d: int = 7, blocks: int = 2) -> nn.Module:
    """The plain network (also the test's float64 reference)."""
    return nn.Sequential(nn.Linear(6, d), *[Block(d) for _ in range(blocks)], nn.Linear(d, 3))


def full_weights(module: nn.Module) -> dict:
    """Every parameter at full size (DTensor shards all-gathered: a collective)."""
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().float()
        for n, p in module.named_parameters()
    }


class ShardedNet(pl.LightningModule):
    """Ordinary Lightning code; records its batches and the full weights before every optimizer step."""

    def __init__(self, lr: float = 0.5, momentum: float = 0.0, zero_loss: bool = False, wide: bool = False) -> None:
        super().__init__()
        self.net = build_net(d=601 if wide else 7, blocks=1 if wide else 2)
        self.lr, self.momentum, self.zero_loss = lr, momentum, zero_loss
        self.batches: list = []
        self.before_steps: list = []
        self.val_losses: list = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append((x.detach().clone(), y.clone()))
        loss = F.cross_entropy(self(x), y)
        return loss * 0.0 if self.zero_loss else loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_losses.append(float(F.cross_entropy(self(x), y)))

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            self.before_steps.append(full_weights(self.net))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class UserShardedNet(ShardedNet):
    """Shards itself in configure_model, as Lightning's ModelParallelStrategy docs show."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for block in self.net[1:-1]:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


class LeafShardedNet(ShardedNet):
    """Gives single layers to fully_shard in configure_model (FSDP2 turns each into an ``FSDPLinear``)."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        for block in self.net[1:-1]:
            fully_shard(block.lin1, mesh=mesh)
            fully_shard(block.norm, mesh=mesh)
        fully_shard(self, mesh=mesh)


def _trainer(strategy, out_dir: str, num_nodes: int, **overrides):
    kwargs = dict(
        accelerator="cpu",
        devices=1 if num_nodes > 1 else 2,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=1,
        logger=False,
        default_root_dir=out_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def _fsdp(**kwargs):
    kwargs.setdefault("auto_wrap_policy", {Block})
    return DPFSDPStrategy(**kwargs)


def fit(name: str, out_dir: str, strategy, *, num_nodes: int = 1, model=None, loader=None, val_loader=None,
        ckpt_path=None, save_to=None, **trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = model if model is not None else ShardedNet()
    initial = {k: v.detach().clone() for k, v in model.net.named_parameters()}
    trainer = _trainer(strategy, out_dir, num_nodes, **trainer_kwargs)
    before = RAW_REDUCES["count"]
    trainer.fit(model, train_dataloaders=loader if loader is not None else make_loader(n=64, batch_size=8),
                val_dataloaders=val_loader, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    strategy = trainer.strategy
    shard = {}
    optimizer = strategy.optimizers[0]
    for n, p in model.net.named_parameters():
        if isinstance(p, DTensor):
            state = optimizer.state.get(p, {})
            buffer = state.get("momentum_buffer")
            shard[n] = {
                "local": p.to_local().numel(),
                "full": p.numel(),
                "grad_local": p.grad.to_local().numel() if p.grad is not None else None,
                "buffer_local": buffer.to_local().numel() if isinstance(buffer, DTensor) else None,
            }
    torch.save(
        {
            "initial": initial,
            "before_steps": model.before_steps,
            "final": full_weights(model.net),
            "batches": model.batches,
            "val_losses": model.val_losses,
            "accumulate": trainer.accumulate_grad_batches,
            "sample_rate": strategy.sample_rate,
            "expected_batch_size": strategy.expected_batch_size,
            "steps": strategy.accountant.total_steps,
            "epsilon": strategy.get_epsilon(1e-5) if strategy.noise_multiplier else None,
            "noise_multiplier": strategy.noise_multiplier,
            "shards": shard,
            "raw_reduces": RAW_REDUCES["count"] - before,
            "world_size": strategy.world_size,
            "global_rank": strategy.global_rank,
        },
        os.path.join(out_dir, f"{name}.rank{trainer.global_rank}.pt"),
    )


def job_fsdp(out_dir: str) -> None:
    exact = dict(noise_multiplier=0.0, max_grad_norm=0.05, seed=11)
    fit("auto", out_dir, _fsdp(**exact), max_steps=2)
    fit("materialize", out_dir, _fsdp(clipping_mode="materialize", **exact),  # validation: sharded forward
        val_loader=make_loader(n=16, batch_size=4, shuffle=False), val_check_interval=1, limit_val_batches=2)
    fit("user_sharded", out_dir, _fsdp(noise_multiplier=0.0, max_grad_norm=0.05, seed=11), model=UserShardedNet())
    fit("accumulate_physical", out_dir, _fsdp(max_physical_batch_size=2, **exact), accumulate_grad_batches=2,
        loader=make_loader(n=64, batch_size=6))
    fit("empty_batches", out_dir, _fsdp(**exact), max_steps=4, loader=make_loader(n=64, batch_size=1))
    fit("secure_per_layer", out_dir, _fsdp(noise_multiplier=0.0, max_grad_norm=0.05, secure_mode=True,
                                           clipping="per_layer"))
    fit("budget_bf16_mixed", out_dir, _fsdp(target_epsilon=2.0, max_grad_norm=0.05, clipping_mode="ghost"),
        max_steps=6, precision="bf16-mixed", callbacks=[PrivacyBudgetCallback(epsilon_budget=1.6, delta=1e-5)])
    fit("bf16", out_dir, _fsdp(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16), **exact))
    fit("noise", out_dir, _fsdp(noise_multiplier=1.5, max_grad_norm=0.05, seed=11),
        model=ShardedNet(lr=1.0, momentum=0.9, zero_loss=True, wide=True))
    # Resume: 4 steps at once, or 2 steps, a checkpoint (distributed or full), 2 more steps.
    noisy = dict(noise_multiplier=1.0, max_grad_norm=0.05, seed=5)
    loader = dict(loader=make_loader(n=64, batch_size=4))  # SGD with momentum: sharded optimizer state
    fit("uninterrupted", out_dir, _fsdp(**noisy), max_steps=4, model=ShardedNet(momentum=0.9), **loader)
    for kind, distributed in (("distributed", True), ("full", False)):
        path = os.path.join(out_dir, f"{kind}.ckpt")
        fit(f"first_{kind}", out_dir, _fsdp(save_distributed_checkpoint=distributed, **noisy), max_steps=2,
            model=ShardedNet(momentum=0.9), save_to=path, **loader)
        fit(f"resumed_{kind}", out_dir, _fsdp(save_distributed_checkpoint=distributed, **noisy), max_steps=4,
            model=ShardedNet(momentum=0.9), ckpt_path=path, **loader)
    # Single layers sharded on their own: by the user in configure_model, and every Linear by the policy.
    fit("leaf_sharded", out_dir, _fsdp(**exact), model=LeafShardedNet(), max_steps=2)
    fit("leaf_policy", out_dir, _fsdp(**dict(exact, auto_wrap_policy={nn.Linear})), max_steps=2)


def job_num_nodes(out_dir: str) -> None:
    exact = dict(noise_multiplier=0.0, max_grad_norm=0.05, seed=11)
    fit("ddp_nodes", out_dir, DPDDPStrategy(**exact), num_nodes=2)
    fit("fsdp_nodes", out_dir, _fsdp(**exact), num_nodes=2)
    # DDP resume, seeded: every rank's own generator states are saved and restored (not rank 0's for all).
    noisy = dict(noise_multiplier=1.0, max_grad_norm=0.05, seed=5)
    loader = dict(loader=make_loader(n=64, batch_size=4))
    fit("ddp_uninterrupted", out_dir, DPDDPStrategy(**noisy), num_nodes=2, max_steps=4, **loader)
    path = os.path.join(out_dir, "ddp.ckpt")
    fit("ddp_first", out_dir, DPDDPStrategy(**noisy), num_nodes=2, max_steps=2, save_to=path, **loader)
    fit("ddp_resumed", out_dir, DPDDPStrategy(**noisy), num_nodes=2, max_steps=4, ckpt_path=path, **loader)
    # The same with secure aggregation: its seeded rounding and noise stream continues too.
    secure = dict(noisy, secure_aggregation=True)
    fit("sa_uninterrupted", out_dir, DPDDPStrategy(**secure), num_nodes=2, max_steps=4, **loader)
    path = os.path.join(out_dir, "sa.ckpt")
    fit("sa_first", out_dir, DPDDPStrategy(**secure), num_nodes=2, max_steps=2, save_to=path, **loader)
    fit("sa_resumed", out_dir, DPDDPStrategy(**secure), num_nodes=2, max_steps=4, ckpt_path=path, **loader)


if __name__ == "__main__":
    fsdp_param_group.foreach_reduce = _counting_reduce
    {"fsdp": job_fsdp, "num_nodes": job_num_nodes}[sys.argv[1]](sys.argv[2])
