"""Accuracy against ε for each mechanism on the digits task of ``benchmarks/utility.py``.

Run: ``python benchmarks/utility_sweep.py --json benchmarks/results/utility_digits_sweep.json``
(about 2 minutes on one CPU thread); ``benchmarks/plot_utility.py`` draws the figure from the JSON.

Every row is ``utility.run`` (same task, data split, model, Poisson sampling, σ calibration and
certified ε) with the recipe below overriding ``utility.RECIPE``; seeds 0-4 by default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utility  # noqa: E402

PLAIN = {"lr": 2.0, "lr_per_sigma": False, "clipping": "flat", "schedule": None, "ema": 0, "centering": None}
BEFORE_CENTRING = {"schedule": "cosine", "centering": None}  # the recipe of 2026-12-02 (cosine, no centring)
MECHANISMS = {
    "DP-SGD (lr 2, flat C 1)": PLAIN,
    "+ automatic clipping": dict(PLAIN, clipping="automatic"),
    "+ automatic clipping + EMA 0.9": dict(PLAIN, clipping="automatic", ema=0.9),
    "DP-SGD + adaptive clipping (quantile 0.5)": dict(
        PLAIN, adaptive_clipping={"target_quantile": 0.5, "learning_rate": 0.2}),
    "adaptive clipping + cosine + EMA 0.9 (lr 2)": dict(
        PLAIN, adaptive_clipping={"target_quantile": 0.5, "learning_rate": 0.2}, schedule="cosine", ema=0.9),
    "automatic, lr 6/σ, cosine, EMA 0.9": BEFORE_CENTRING,
    "the same with BandMF b = 2 (lr 8/σ)": dict(BEFORE_CENTRING, bands=2, lr=8.0),
    "the same with input centring (private mean)": {"schedule": "cosine"},
    "full recipe (+ centring, linear decay)": {},
}
"""Name → override of ``utility.RECIPE``."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,2,3,5,8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="secure_mode=False")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = list(range(args.seeds))
    out = {"task": "digits (benchmarks/utility.py)", "seeds": seeds, "delta": utility.DELTA, "mechanisms": {}}
    for name, override in MECHANISMS.items():
        start = time.time()
        recipe = dict(utility.RECIPE, **override)
        out["mechanisms"][name] = utility.run(epsilons, seeds, recipe)
        cells = "  ".join(f"{e}: {r['mean']:.3f}±{r['std']:.3f}" for e, r in out["mechanisms"][name].items())
        print(f"{name:50s} {cells}  ({time.time() - start:.0f} s)", flush=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
