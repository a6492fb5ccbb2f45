"""Paired check of the noise generator on the transformer task of ``benchmarks/utility_text.py``: the same
model initialisation (seed 2) and the same Poisson batches (sampler seed 10_002) for every run, 15 epochs at
σ = 1.26 (ε = 3), lr 2, flat C = 1; only the Gaussian noise differs between runs::

    python benchmarks/utility_paired_noise.py ours 0         # lightning-dp, GaussianNoise(seed=0)
    python benchmarks/utility_paired_noise.py opacus 0       # Opacus 1.6, torch.manual_seed(0)
    python benchmarks/utility_paired_noise.py ours_torch 0   # lightning-dp fed torch.normal like Opacus

``ours_torch`` draws exactly Opacus's noise (``torch.normal`` per parameter, in parameter order, after
``torch.manual_seed``), so its accuracy must equal Opacus's run of the same seed digit for digit if the two
pipelines (clipping, sampling, scaling, step) are the same; ``ours`` and ``opacus`` over many noise seeds
then compare the generators alone. Prints ``which seed accuracy``.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import utility_text as ut  # noqa: E402
from lightning_dp import PoissonBatchSampler, make_private  # noqa: E402


class TorchNormal:
    """A noise source drawing ``torch.normal`` from the global generator, as Opacus does."""

    def normal(self, shape, std, device=None, dtype=None):
        return torch.normal(mean=0.0, std=std, size=tuple(shape), device=device, dtype=dtype)


def main(which: str, noise_seed: int) -> float:
    torch.set_num_threads(1)
    x, y = ut.make_data()
    xs, ys, xt, yt = x[: ut.TRAIN], y[: ut.TRAIN], x[ut.TRAIN:], y[ut.TRAIN:]
    sigma, q = 1.26, ut.BATCH / ut.TRAIN
    model = ut.build_model(2)
    if which in ("ours", "ours_torch"):
        opt = make_private(model, torch.optim.SGD(model.parameters(), lr=2.0), noise_multiplier=sigma,
                           max_grad_norm=1.0, expected_batch_size=ut.BATCH, seed=noise_seed)
        forward = model
        if which == "ours_torch":
            torch.manual_seed(noise_seed)
            opt.noise = TorchNormal()
    elif which == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        torch.manual_seed(noise_seed)
        forward = GradSampleModule(model)
        opt = DPOptimizer(torch.optim.SGD(forward.parameters(), lr=2.0), noise_multiplier=sigma, max_grad_norm=1.0,
                          expected_batch_size=ut.BATCH)
    else:
        raise SystemExit(f"unknown run {which!r}: ours, opacus or ours_torch")
    loss = nn.CrossEntropyLoss()
    sampler = PoissonBatchSampler(ut.TRAIN, q, generator=torch.Generator().manual_seed(10_002))
    for _ in range(ut.EPOCHS):
        for batch in sampler:
            idx = torch.tensor(batch, dtype=torch.long)
            opt.zero_grad()
            if len(idx):
                loss(forward(xs[idx]), ys[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    print(which, noise_seed, accuracy)
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
