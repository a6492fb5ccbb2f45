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
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from images_task import (  # noqa: E402,F401  (the task's data and model)
    BATCH, CLASSES, DATA_SEED, DELTA, EPOCHS, PIXEL_NOISE, SIZE, TEST, TRAIN, build_model, make_data,
)


def main() -> None:
    from tasks import TASKS, report_recipe_cells  # noqa: E402

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seeds", default="2,3,4,5,6", help="comma-separated seeds")
    parser.add_argument("--recipe", default=None, help="JSON dict overriding fields of the default recipe")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    report_recipe_cells(TASKS["images"], args.epsilons, args.seeds, args.recipe, args.json)


if __name__ == "__main__":
    main()
