"""Per-rank peak memory and step time of DPFSDPStrategy next to DPDDPStrategy, for W = 1, 2, 4 processes.

    python benchmarks/scaling.py [--world-sizes 1,2,4] [--strategies dp_ddp,dp_fsdp] [--blocks 6]
                                 [--steps 6] [--out benchmarks/results/scaling_cpu.md]

The model is a residual MLP of ``--blocks`` blocks (Linear 1024→2048, LayerNorm, Linear 2048→1024; 25.3M
parameters with 6 blocks), trained with SGD + momentum (one state tensor per parameter) and DP-SGD
(σ = 1, C = 1, clipping_mode "auto"), 16 examples per rank and micro-batch (weak scaling: the global
batch grows with W). Each configuration is one job of W CPU processes (gloo, one thread each) started
with Lightning's cluster environment variables, and runs two fits in those processes:

* **time**: ``--steps`` optimizer steps after one warm-up step; a step is timed from
  ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, clipping, reduction, noise,
  optimizer step) on every rank; the table shows the median over steps of the slowest rank;
* **memory**: every tensor allocation and free is tracked from before the model is built
  (``torch.profiler`` with ``profile_memory``, as ``benchmarks/step_time.py`` does); "peak" is the most
  tensor memory live at once on a rank during 2 steps after a warm-up step (parameters, gradients,
  optimizer state, activations, per-sample factors, clipped sums, noise: what
  ``torch.cuda.max_memory_allocated`` counts on a GPU), "state" what was live just before them
  (parameters, gradients, optimizer state). The largest rank's figures are shown.

Under DPDDPStrategy every rank holds the whole model, its gradient and optimizer state; under
DPFSDPStrategy (``auto_wrap_policy`` = the block) each rank holds ``1/W`` of them, plus one block's
unsharded parameters and one layer's full-size clipped sum at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

warnings.filterwarnings("ignore")

D, HIDDEN, FEATURES, CLASSES, BATCH = 1024, 2048, 64, 10, 16


def child(strategy_name: str, world_size: int, blocks: int, steps: int, out: str) -> None:
    """One rank: a timed fit, then a memory-profiled fit; writes ``out.rank<r>.json``."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch as L
    import torch.nn.functional as F
    from torch import nn
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dp.lightning import DPDDPStrategy, DPFSDPStrategy

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.norm, self.down = nn.Linear(D, HIDDEN), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.tanh(self.norm(self.up(x))))

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(FEATURES, D), *[Block() for _ in range(blocks)], nn.Linear(D, CLASSES))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Clock(L.Callback):
        def __init__(self, measured_from: int, profiled: bool) -> None:
            self.measured_from, self.profiled = measured_from, profiled
            self.times: List[float] = []
            self._window: Any = None

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if self.profiled and trainer.global_step == self.measured_from:
                self._window = record_function("measured_steps")
                self._window.__enter__()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step > self.measured_from:
                self.times.append(time.perf_counter() - self._start)

        def on_train_end(self, trainer: Any, *args: Any) -> None:
            if self._window is not None:
                self._window.__exit__(None, None, None)

    def fit(max_steps: int, clock: Clock) -> Any:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        n = 256 * world_size
        data = TensorDataset(torch.randn(n, FEATURES, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator))
        dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
        strategy = DPDDPStrategy(**dp) if strategy_name == "dp_ddp" else DPFSDPStrategy(auto_wrap_policy={Block}, **dp)
        trainer = L.Trainer(
            accelerator="cpu", devices=world_size, strategy=strategy, max_steps=max_steps, logger=False,
            default_root_dir=os.path.dirname(out),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
        )
        model = Net()
        trainer.fit(model, DataLoader(data, batch_size=BATCH))
        return trainer, model

    timed = Clock(measured_from=1, profiled=False)
    trainer, model = fit(1 + steps, timed)
    params = sum(p.numel() for p in model.parameters())
    rank = trainer.global_rank
    del trainer, model
    clock = Clock(measured_from=1, profiled=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fit(3, clock)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    window = next(e for e in events if e.get("name") == "measured_steps" and "dur" in e)
    start, end = window["ts"], window["ts"] + window["dur"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events if e.get("name") == "[memory]")
    before = next((total for ts, total in reversed(memory) if ts < start), 0)
    peak = max([total for ts, total in memory if start <= ts <= end] + [before])
    result = {"times": timed.times, "peak_mb": peak / 2**20, "state_mb": before / 2**20, "params": params}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))


def run(strategy: str, world_size: int, blocks: int, steps: int) -> Dict[str, Any]:
    """Launch ``world_size`` ranks of one configuration and gather their results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        port = str(random.randint(20000, 40000))
        procs = []
        for rank in range(world_size):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world_size),
                       NODE_RANK="0", LOCAL_RANK=str(rank), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
            command = [sys.executable, __file__, "--child", strategy, str(world_size), str(blocks), str(steps), out]
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errors = [p.communicate()[1] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{strategy} W={world_size} failed:\n" + "\n".join(e[-2000:] for e in errors))
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world_size)]
    slowest = [max(times) for times in zip(*(r["times"] for r in ranks))]
    return {
        "step_s": statistics.median(slowest),
        "peak_mb": max(r["peak_mb"] for r in ranks),
        "state_mb": max(r["state_mb"] for r in ranks),
        "params": ranks[0]["params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--strategies", default="dp_ddp,dp_fsdp")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--child", nargs=5)
    args = parser.parse_args()
    if args.child:
        strategy, world_size, blocks, steps, out = args.child
        child(strategy, int(world_size), int(blocks), int(steps), out)
        return
    import torch

    rows = []
    for world_size in [int(w) for w in args.world_sizes.split(",")]:
        for strategy in args.strategies.split(","):
            result = run(strategy, world_size, args.blocks, args.steps)
            rows.append((strategy, world_size, result))
            print(strategy, world_size, result, flush=True)
    params = rows[0][2]["params"]
    lines = [
        f"torch {torch.__version__}, CPU (gloo), one thread per rank, {os.cpu_count()} cores; residual MLP, "
        f"{params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MB in fp32), SGD with momentum, {BATCH} examples "
        f"per rank; median of {args.steps} steps of the slowest rank; peak/state = most tensor memory live on the "
        "largest rank (allocator-tracked)",
        "",
        "| strategy | W | step time | peak MB per rank | state MB per rank (params + grads + optimizer) |",
        "|---|---|---|---|---|",
    ]
    for strategy, world_size, r in rows:
        lines.append(f"| {strategy} | {world_size} | {r['step_s'] * 1000:.0f} ms | {r['peak_mb']:.0f} | {r['state_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
