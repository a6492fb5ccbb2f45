"""A second, harder utility task, side by side with Opacus: a small transformer on generated sequences.

Run: ``python benchmarks/utility_text.py --epsilons 1,3,8 --seeds 2,3,4 --json text.json``: lightning-dp's
default recipe (:data:`lightning_dp.recipes.DEFAULT_RECIPE`, ``--recipe '{"learning_rate": 4}'`` to override a
field), with the keys of ``benchmarks/utility.py`` (``mean``, ``std``, ``accs``, ``epsilon``, ``recipe``; and
``stderr``, ``seeds``). ``--compare --json benchmarks/results/utility_text.json`` is the side-by-side run of
docs/utility.rst (``--compare --only ours --recipe '{"lr": 4}'`` or ``--compare --only opacus --lr 1 --clip 1``
for one cell); the tables with Opacus tuned and our accounted search are ``benchmarks/hyperparameters.py``.

The task is fixed (only the training recipe changes). Data, generated once from
``torch.Generator().manual_seed(1234)`` (the same for every seed): sequences of ``T = 12`` tokens over
a vocabulary of ``V = 16``; the label says whether the *first* token occurs again in the other 11
positions. Half of the examples are positive (the first token is written at 1 or 2 random positions
among the other 11, which otherwise never hold it), half negative, so a bag of tokens without the
first token's identity is at chance and the model has to compare the first token with the others
(attention). 6000 training and 2000 test examples.

Model (``torch.manual_seed(seed)`` right before it is built): token and learned position embeddings
(``d = 64``; the positions are expanded to ``(B, T)`` so that Opacus's per-sample embedding gradients
apply), one pre-LayerNorm transformer block (2 heads of 32, attention written with ``nn.Linear``
projections so that both libraries compute its per-sample gradients with the same layers; MLP
64-128-64 with GELU), a final LayerNorm and a linear read-out of position 0; 35,778 parameters.

Training: 15 epochs at expected batch size 200 (Poisson sampling, ``q = 200/6000 = 1/30``, 450 steps),
δ = 1e-5, cross-entropy. σ is calibrated once with lightning-dp's PRV accountant for (q, 450 steps,
δ) and the *same* σ is given to both libraries; each run reports the ε its own library's PRV accountant
certifies at the end (lightning-dp's ``get_epsilon``; Opacus's ``PrivacyEngine(accountant="prv")``).
Opacus runs its default Poisson sampling (``DPDataLoader``, 30 batches an epoch, sampling generator
seeded by ``seed + 10000``) and flat clipping with ``grad_sample_mode="hooks"``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utility import RECIPE as DIGITS_RECIPE, released_accuracy, train_with_recipe  # noqa: E402
from utility import calibrated_sigma as _sigma_for  # noqa: E402

from tasks import TASKS, report_recipe_cells, summarise  # noqa: E402
from text_task import (  # noqa: E402,F401  (the task's data and model, re-exported)
    BATCH, D, DATA_SEED, DELTA, EPOCHS, HEADS, TEST, TRAIN, Block, Classifier, T, V, build_model, make_data,
)

RECIPE: Dict[str, Any] = dict(DIGITS_RECIPE, lr=3.0, centering=None)
"""For ``--compare``: the digits recipe of ``benchmarks/utility.py`` (same keys) before the default recipe, with
the learning rate re-tuned on seeds 0-1 at ε = 1 and 3 (lr/σ for lr in 2, 3, 4.5); no centring (the first
layer is an embedding)."""

BASELINE = {"lr": 2.0, "max_grad_norm": 1.0}
"""Plain DP-SGD, run in both libraries: SGD at a constant lr, flat clipping at C (issue 17's baseline
setting for digits)."""

OPACUS_GRID = {"lr": [1.0, 2.0, 4.0], "max_grad_norm": [1.0]}
"""The lr × C grid for "Opacus, tuned per ε" (best mean on seeds 0-1, then run on the report seeds)."""


def steps() -> int:
    return EPOCHS * round(TRAIN / BATCH)


def calibrated_sigma(epsilon: float, bands: int = 1) -> float:
    """σ for ``epsilon`` at this task's rate and length (``benchmarks/utility.py``'s calibration, cached)."""
    return _sigma_for(epsilon, BATCH / TRAIN, steps(), bands)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_ours(data: tuple, seed: int, epsilon: Optional[float], recipe: Dict[str, Any]) -> Tuple[float, float]:
    """lightning-dp's ``make_private`` with ``recipe`` (``benchmarks/utility.py``'s training loop);
    ``epsilon=None`` trains without privacy on the same Poisson batches."""
    x, y = data
    xs, ys, xt, yt = x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]
    model = build_model(seed)
    sigma = calibrated_sigma(epsilon, int(recipe.get("bands", 1))) if epsilon is not None else None
    opt, ema = train_with_recipe(model, xs, ys, sigma=sigma, q=BATCH / TRAIN, steps=steps(), epochs=EPOCHS,
                                 batch=BATCH, seed=seed, recipe=recipe)
    return released_accuracy(model, ema, xt, yt), (opt.get_epsilon(DELTA) if opt is not None else math.inf)


def train_opacus(data: tuple, seed: int, epsilon: float, lr: float, max_grad_norm: float) -> Tuple[float, float]:
    """Opacus 1.x: SGD at a constant ``lr``, flat clipping at ``max_grad_norm``, the σ of ``epsilon``."""
    from opacus import PrivacyEngine

    x, y = data
    xs, ys, xt, yt = x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]
    model = build_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=BATCH,
                                         generator=torch.Generator().manual_seed(seed + 10_000))
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=calibrated_sigma(epsilon),
                                                   max_grad_norm=max_grad_norm, poisson_sampling=True)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(EPOCHS):
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(xb):
                loss_fn(model(xb), yb).backward()
            optimizer.step()
    model.eval()
    return accuracy(model, xt, yt), engine.get_epsilon(DELTA)


def cell(data, kind: str, epsilon: Optional[float], seeds: List[int], **kw: Any) -> Dict[str, Any]:
    accs, spent = [], []
    for seed in seeds:
        if kind == "ours":
            acc, eps = train_ours(data, seed, epsilon, kw["recipe"])
        else:
            acc, eps = train_opacus(data, seed, epsilon, kw["lr"], kw["max_grad_norm"])
        accs.append(acc)
        spent.append(eps)
    return summarise(accs, spent, seeds=seeds, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seeds", default="2,3,4", help="report seeds (comma-separated)")
    parser.add_argument("--compare", action="store_true",
                        help="the side-by-side comparison of docs/utility.rst instead of the default recipe")
    parser.add_argument("--tune-seeds", default="0,1", help="seeds for the Opacus grid search")
    parser.add_argument("--only", choices=["ours", "opacus", "nonprivate", "grid"], default=None,
                        help="run one part only (for tuning); default: the whole comparison")
    parser.add_argument("--recipe", default=None, help="JSON dict overriding fields of the default recipe (with "
                                                       "--compare --only ours: entries of RECIPE)")
    parser.add_argument("--lr", type=float, default=BASELINE["lr"])
    parser.add_argument("--clip", type=float, default=BASELINE["max_grad_norm"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # secure_mode, Opacus's RNG and hook warnings
    if not args.compare:
        default_recipe(args)
        return
    data = make_data()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    tune_seeds = [int(s) for s in args.tune_seeds.split(",")]
    recipe = dict(RECIPE, **(json.loads(args.recipe) if args.recipe else {}))
    plain = dict(RECIPE, optimizer="sgd", lr=BASELINE["lr"], lr_per_sigma=False, clipping="flat",
                 max_grad_norm=BASELINE["max_grad_norm"], schedule=None, ema=0)
    out: Dict[str, Any] = {"task": __doc__.split("\n\n")[1], "epsilons": epsilons, "delta": DELTA,
                           "sigma": {str(e): calibrated_sigma(e) for e in epsilons}, "rows": {}}

    def record(name: str, results: Dict[str, Any]) -> None:
        out["rows"][name] = results
        cells = "  ".join(f"ε={e}: {r['mean']:.4f}±{r['std']:.4f} (cert. {r['epsilon']:.3f})"
                          for e, r in results.items())
        print(f"{name}\n    {cells}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)

    start = time.time()
    if args.only in (None, "nonprivate"):
        r = cell(data, "ours", None, seeds, recipe=dict(plain, optimizer="adam", lr=3e-3, schedule="cosine"))
        record("non-private Adam lr 3e-3, cosine", {"inf": r})
    if args.only == "ours":
        record(f"ours: {json.dumps(recipe)}", {str(e): cell(data, "ours", e, seeds, recipe=recipe) for e in epsilons})
    if args.only == "opacus":
        record(f"Opacus lr {args.lr} C {args.clip}",
               {str(e): cell(data, "opacus", e, seeds, lr=args.lr, max_grad_norm=args.clip) for e in epsilons})
    tuned: Dict[str, Any] = {}
    if args.only in (None, "grid"):
        grid: Dict[str, Any] = {}
        for e in epsilons:
            for lr in OPACUS_GRID["lr"]:
                for c in OPACUS_GRID["max_grad_norm"]:
                    grid[f"{e} lr {lr} C {c}"] = cell(data, "opacus", e, tune_seeds, lr=lr, max_grad_norm=c)
            best = max((k for k in grid if k.startswith(f"{e} ")), key=lambda k: grid[k]["mean"])
            tuned[str(e)] = grid[best]
            print(f"grid ε={e}: best {best} {grid[best]['mean']:.4f} ({time.time() - start:.0f} s)", flush=True)
        out["opacus_grid"] = grid
    if args.only is None:
        b = BASELINE
        record(f"Opacus, DP-SGD lr {b['lr']}, flat C {b['max_grad_norm']}",
               {str(e): cell(data, "opacus", e, seeds, lr=b["lr"], max_grad_norm=b["max_grad_norm"])
                for e in epsilons})
        record(f"Opacus, tuned per ε over lr × C ({len(OPACUS_GRID['lr']) * len(OPACUS_GRID['max_grad_norm'])}"
               " settings, seeds " + ",".join(map(str, tune_seeds)) + ")",
               {e: cell(data, "opacus", float(e), seeds, lr=t["lr"], max_grad_norm=t["max_grad_norm"])
                for e, t in tuned.items()})
        record(f"ours, DP-SGD lr {b['lr']}, flat C {b['max_grad_norm']}",
               {str(e): cell(data, "ours", e, seeds, recipe=plain) for e in epsilons})
        record(f"ours, DP-SGD lr {b['lr']}, flat C {b['max_grad_norm']}, + EMA 0.9",
               {str(e): cell(data, "ours", e, seeds, recipe=dict(plain, ema=0.9)) for e in epsilons})
        record("ours, recipe", {str(e): cell(data, "ours", e, seeds, recipe=recipe) for e in epsilons})
    print(f"total {time.time() - start:.0f} s")


def default_recipe(args: argparse.Namespace) -> None:
    """The default recipe on ``--seeds`` at ``--epsilons``, written with ``benchmarks/utility.py``'s keys."""
    report_recipe_cells(TASKS["text"], args.epsilons, args.seeds, args.recipe, args.json)


if __name__ == "__main__":
    main()
