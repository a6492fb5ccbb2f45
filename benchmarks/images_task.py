"""The data and model of the generated-image task (``benchmarks/utility_images.py`` describes the task).

Imported by ``benchmarks/utility_images.py`` and ``benchmarks/tasks.py``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

SIZE, CLASSES = 16, 8
TRAIN, TEST, EPOCHS, BATCH, DELTA = 4000, 2000, 20, 200, 1e-5
DATA_SEED, PIXEL_NOISE = 4321, 0.3


def _stroke(kind: int, r: int) -> torch.Tensor:
    """Class ``kind``'s stroke of half-size ``r`` on a (2r+1)² canvas."""
    n = 2 * r + 1
    canvas = torch.zeros(n, n)
    idx = torch.arange(n)
    if kind == 0:
        canvas[r, :] = 1
    elif kind == 1:
        canvas[:, r] = 1
    elif kind == 2:
        canvas[idx, idx] = 1
    elif kind == 3:
        canvas[idx, n - 1 - idx] = 1
    elif kind == 4:
        canvas[r, :] = 1
        canvas[:, r] = 1
    elif kind == 5:
        canvas[idx, idx] = 1
        canvas[idx, n - 1 - idx] = 1
    elif kind == 6:
        canvas[0, :] = canvas[-1, :] = canvas[:, 0] = canvas[:, -1] = 1
    else:
        canvas[:] = 0.5
    return canvas


def make_data() -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``TRAIN + TEST`` images ``(n, 1, 16, 16)`` and their labels, the same on every call."""
    g = torch.Generator().manual_seed(DATA_SEED)
    n = TRAIN + TEST
    y = torch.randint(0, CLASSES, (n,), generator=g)
    radius = torch.randint(3, 7, (n,), generator=g)
    offset = torch.randint(-4, 5, (n, 2), generator=g)
    brightness = 0.5 + 0.5 * torch.rand(n, generator=g)
    x = PIXEL_NOISE * torch.randn(n, 1, SIZE, SIZE, generator=g)
    for i in range(n):
        r = int(radius[i])
        stroke = _stroke(int(y[i]), r) * brightness[i]
        top = SIZE // 2 - r + int(offset[i, 0])
        left = SIZE // 2 - r + int(offset[i, 1])
        # clip the stroke to the image
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + 2 * r + 1, SIZE), min(left + 2 * r + 1, SIZE)
        x[i, 0, t0:t1, l0:l1] += stroke[t0 - top:t1 - top, l0 - left:l1 - left]
    return x, y


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, CLASSES),
    )
