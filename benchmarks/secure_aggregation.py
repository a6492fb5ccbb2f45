"""Cost of secure aggregation per DP-SGD step: DPDDPStrategy's plain exchange vs secure_aggregation=True.

    python benchmarks/secure_aggregation.py [--ranks 2] [--steps 20] [--batch 64] [--secure-mode] [--bits 48]

Each of ``--ranks`` CPU processes (gloo, one thread each) trains the MLP 784-512-512-10 (669 706 parameters)
with a :class:`~lightning_dp.DPOptimizer` on random data, exactly as the DDP strategy wires it: ``plain``
adds Gaussian noise of std σC/√W to its clipped sum and all-reduces float32 in one bucket
(``combine_clipped_sums``);
``secure`` hands the sum to a :class:`~lightning_dp.secure_aggregation.SecureAggregator` (stochastic rounding,
discrete Gaussian share, pairwise ChaCha20 masks, int64 all-reduce, int32 with ``--bits 30``). Both modes alternate step by step in the
same processes; the table gives the median step time (zero_grad, forward, backward, clip, noise, exchange,
optimizer step), the median time of the exchange alone (noise + combine) and the bytes each rank hands to the
all-reduce per step.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_dp import DPOptimizer
from lightning_dp.exchange import all_reduce_sum_coalesced
from lightning_dp.grad_sample import attach_grad_sample_hooks
from lightning_dp.noise import GaussianNoise, SecureRNG
from lightning_dp.secure_aggregation import SecureAggregator
from lightning_dp.secure_aggregation.discrete_gaussian import native_kernel


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    noise = SecureRNG() if args.secure_mode else GaussianNoise(seed=rank)
    # as DPDDPStrategy does: seeded runs key the same stream from the rank's seed (reproducible, not secret)
    generator = noise if args.secure_mode else SecureRNG(seed=f"lightning_dp.secure_aggregation:{rank}".encode())
    aggregator = SecureAggregator(rank, world, generator, bits=args.bits)
    aggregator.setup()
    expected = args.batch * world
    optimizers = {}
    for mode in ("plain", "secure"):
        model = _mlp()
        attach_grad_sample_hooks(model)
        combine = all_reduce_sum_coalesced if mode == "plain" else aggregator  # as DPDDPStrategy combines
        optimizers[mode] = (model, DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                               max_grad_norm=1.0, expected_batch_size=expected, noise=noise,
                                               combine=combine, noise_shares=world if mode == "plain" else 1))
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, 784, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    times = {m: [] for m in optimizers}
    exchange = {m: [] for m in optimizers}
    for step in range(args.steps + 3):
        for mode, (model, opt) in optimizers.items():
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.accumulate_micro_batch()
            t0 = time.perf_counter()
            opt.add_noise()
            t1 = time.perf_counter()
            opt.original_optimizer.step()
            opt.samples_in_step = 0
            elapsed = time.perf_counter() - start
            if step >= 3:
                times[mode].append(elapsed)
                exchange[mode].append(t1 - t0)
    d = sum(p.numel() for p in optimizers["plain"][0].parameters())
    if rank == 0:
        results.update({m: (statistics.median(times[m]), statistics.median(exchange[m])) for m in times})
        results["dim"] = d
        results["bytes"] = {"plain": 4 * d, "secure": aggregator.message_dtype.itemsize * d}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--secure-mode", action="store_true", help="noise and rounding from SecureRNG")
    parser.add_argument("--bits", type=int, default=48,
                        help="modular bits b (default 48); b <= 30 at 2 ranks sends int32 messages")
    args = parser.parse_args()
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(args.ranks, random.randint(20000, 40000), args, results), nprocs=args.ranks,
                       start_method="spawn", join=True)
    plain, secure = results["plain"], results["secure"]
    print(f"MLP 784-512-512-10 (d = {results['dim']}), {args.ranks} ranks, batch {args.batch}/rank, "
          f"{'SecureRNG' if args.secure_mode else 'seeded generators'}, bits {args.bits}, median of {args.steps} steps, "
          f"native secure-aggregation kernels: {'yes' if native_kernel() else 'no (torch ops)'}")
    print("| exchange | step ms | noise + exchange ms | bytes to all-reduce / rank / step |")
    print("|---|---|---|---|")
    for name, (step, exch) in (("plain DDP", plain), ("secure aggregation", secure)):
        key = "plain" if name == "plain DDP" else "secure"
        print(f"| {name} | {1000 * step:.1f} | {1000 * exch:.1f} | {results['bytes'][key]:,} |")
    print(f"step time ratio secure / plain: {secure[0] / plain[0]:.2f}x")


if __name__ == "__main__":
    main()
