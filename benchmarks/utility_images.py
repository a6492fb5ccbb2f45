"""A third utility task, of another model family: a small CNN on generated images.

Run: ``python benchmarks/utility_images.py --epsilons 1,3,8 --seeds 2,3,4,5,6 --json images.json`` (our
default recipe, the keys of ``benchmarks/utility.py``); the comparison with Opacus and the accounted search is
``benchmarks/hyperparameters.py``.

Neither our default recipe nor the digits or text recipes were chosen on this task.

The task is fixed (only the training recipe changes). Data, generated once from
``torch.Generator().manual_seed(4321)`` (the same for every seed): 16×16 grey images of 8 classes of strokes
(horizontal bar, vertical bar, two diagonals, plus, cross, square outline, filled square), each of a random
size (3-6 pixels from the centre), at a random offset (up to ±4 pixels), of random brightness (0.5-1), with
Gaussian pixel noise of std 0.3 on top (non-private, Adam lr 3e-3 for 20 epochs reaches 0.92 on the test
set: the noise makes some images ambiguous). 4000 training and 2000 test examples, classes balanced in expectation.

Model (``torch.manual_seed(seed)`` right before it is built): Conv 1→16 (3×3, padding 1) – ReLU – max-pool 2 –
Conv 16→32 (3×3, padding 1) – ReLU – max-pool 2 – Linear 512→8; no normalisation layer (BatchNorm is not DP),
8,904 parameters.

Training: 20 epochs at expected batch size 200 (Poisson sampling, ``q = 1/20``, 400 steps), δ = 1e-5,
cross-entropy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


def main() -> None:
    from tasks import TASKS, parse_list, run_recipe_cells  # noqa: E402

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seeds", default="2,3,4,5,6", help="comma-separated seeds")
    parser.add_argument("--recipe", default=None, help="JSON dict overriding fields of the default recipe")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = run_recipe_cells(TASKS["images"], parse_list(args.epsilons, float), parse_list(args.seeds, int),
                               json.loads(args.recipe) if args.recipe else {})
    for eps, r in results.items():
        print(f"ε={eps:>4} (certified {r['epsilon']:.3f}): {r['mean']:.4f} ± {r['std']:.4f}   [{r['recipe']}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
