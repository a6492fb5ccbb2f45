"""The three utility tasks of ``docs/hyperparameters.rst`` and one training loop per library for each.

``TASKS``: ``"digits"`` (``benchmarks/utility.py``: an MLP on scikit-learn's digits), ``"text"``
(``benchmarks/utility_text.py``: a one-block transformer on generated sequences) and ``"images"``
(``benchmarks/utility_images.py``: a small CNN on generated images); their data and models are in
``text_task.py`` and ``images_task.py``. Each task fixes the data, the model, the
sampling rate, the number of steps and δ; only the training recipe changes between rows.

* :func:`train_recipe`: lightning-dp's :func:`~lightning_dp.make_private` with a
  :class:`~lightning_dp.recipes.Recipe` (σ calibrated for ε, after the centre's release when the recipe centres).
* :func:`train_opacus`: Opacus 1.x, SGD at a constant learning rate, flat clipping at C, the σ of ε calibrated
  by lightning-dp's PRV accountant (the same σ our DP-SGD would get); each run reports the ε its own
  accountant certifies.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import images_task
import text_task
import utility
from lightning_dp import PoissonBatchSampler, make_private
from lightning_dp.recipes import DEFAULT_RECIPE, Recipe

Split = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """One utility task: data split by seed, model by seed, and the DP-SGD plan."""

    name: str
    split: Callable[[int], Split]
    model: Callable[[int], nn.Module]
    train: int
    batch: int
    epochs: int
    delta: float = 1e-5

    @property
    def sample_rate(self) -> float:
        return self.batch / self.train

    @property
    def steps(self) -> int:
        return self.epochs * round(self.train / self.batch)


@functools.lru_cache(maxsize=None)
def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    return utility.load_digits()


def _digits_split(seed: int) -> Split:
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:utility.TRAIN], perm[utility.TRAIN:]
    return x[train], y[train], x[test], y[test]


def _digits_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@functools.lru_cache(maxsize=None)
def _fixed(make: Callable[[], Tuple[torch.Tensor, torch.Tensor]], train: int) -> Split:
    x, y = make()
    return x[:train], y[:train], x[train:], y[train:]


TASKS: Dict[str, Task] = {
    "digits": Task("digits", _digits_split, _digits_model, utility.TRAIN, utility.BATCH, utility.EPOCHS),
    "text": Task("text", lambda seed: _fixed(text_task.make_data, text_task.TRAIN), text_task.build_model,
                 text_task.TRAIN, text_task.BATCH, text_task.EPOCHS),
    "images": Task("images", lambda seed: _fixed(images_task.make_data, images_task.TRAIN),
                   images_task.build_model, images_task.TRAIN, images_task.BATCH, images_task.EPOCHS),
}


def parse_list(text: str, kind: Callable[[str], Any]) -> List[Any]:
    """``"1,3,8"`` → ``[1.0, 3.0, 8.0]`` with ``kind=float``."""
    return [kind(item) for item in text.split(",") if item.strip()]


def sigma_for(task: Task, epsilon: float, centering_sigma: Optional[float] = None) -> float:
    """σ of the task's DP-SGD steps for ``epsilon`` (after the centre's release when ``centering_sigma``)."""
    return utility.calibrated_sigma(float(epsilon), task.sample_rate, task.steps, 1, centering_sigma)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_recipe(task: Task, seed: int, epsilon: float, recipe: Recipe = DEFAULT_RECIPE, *,
                 noise_multiplier: Optional[float] = None,
                 split: Optional[Split] = None) -> Tuple[nn.Module, Any]:
    """Train the task's model of ``seed`` with ``recipe`` at ``epsilon`` (or at ``noise_multiplier``, a search's
    trial: the caller accounts the centre's release, :func:`centring_releases`). Returns the released model (the
    EMA's average copied in) and the DP optimizer (its accountant and report)."""
    xs, ys, _, _ = split if split is not None else task.split(seed)
    model = task.model(seed)
    centring_layer = recipe.centring_layer(model)
    sigma = noise_multiplier if noise_multiplier is not None else sigma_for(
        task, epsilon, recipe.centering_noise_multiplier if centring_layer is not None else None)
    inner = recipe.optimizer(model.parameters(), sigma)
    private = make_private(model, inner, noise_multiplier=sigma, max_grad_norm=recipe.max_grad_norm,
                           expected_batch_size=task.batch, sample_rate=task.sample_rate, seed=seed,
                           clipping=recipe.clipping,
                           centering=recipe.centring(model, xs) if centring_layer is not None else None)
    schedule = recipe.scheduler(inner, task.steps)
    ema = recipe.averaging(model)
    sampler = PoissonBatchSampler(len(xs), task.sample_rate, generator=torch.Generator().manual_seed(seed + 10_000))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(task.epochs):
        for drawn in sampler:
            idx = torch.tensor(drawn, dtype=torch.long)
            if len(idx):
                loss_fn(model(xs[idx]), ys[idx]).backward()
            private.step()  # an empty batch is a noise-only step, accounted like any other
            private.zero_grad()
            schedule.step()
            if ema is not None:
                ema.update()
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return model, private


def centring_releases(task: Task, recipe: Recipe = DEFAULT_RECIPE) -> list:
    """The releases besides DP-SGD's steps a run of ``recipe`` makes on ``task``: ``[(σ_c, 1.0, 1)]`` for the centre
    where the recipe centres the model's first layer, else none."""
    if recipe.centring_layer(task.model(0)) is None:
        return []
    return [(recipe.centering_noise_multiplier, 1.0, 1)]


def recipe_accuracy(task: Task, seed: int, epsilon: float, recipe: Recipe = DEFAULT_RECIPE) -> Tuple[float, float]:
    """(test accuracy of the released model, ε certified by our accountant)."""
    split = task.split(seed)
    model, private = train_recipe(task, seed, epsilon, recipe, split=split)
    return _accuracy(model, split[2], split[3]), private.get_epsilon(task.delta)


def train_opacus(task: Task, seed: int, epsilon: float, lr: float, max_grad_norm: float) -> Tuple[float, float]:
    """Opacus 1.x: SGD at a constant ``lr``, flat clipping at ``max_grad_norm``, the σ of ``epsilon``.
    Returns (test accuracy, ε certified by Opacus's PRV accountant)."""
    from opacus import PrivacyEngine

    xs, ys, xt, yt = task.split(seed)
    model = task.model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=task.batch,
                                         generator=torch.Generator().manual_seed(seed + 10_000))
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=sigma_for(task, epsilon),
                                                   max_grad_norm=max_grad_norm, poisson_sampling=True)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(task.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(xb):
                loss_fn(model(xb), yb).backward()
            optimizer.step()
    model.eval()
    return _accuracy(model, xt, yt), engine.get_epsilon(task.delta)


def summarise(accs: List[float], spent: List[float], **extra: Any) -> Dict[str, Any]:
    """A cell: ``mean``, ``std``, ``stderr`` of the accuracies, each run's ``accs``, the largest certified ε."""
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return dict(mean=statistics.mean(accs), std=std, stderr=std / math.sqrt(len(accs)), accs=accs,
                epsilon=max(spent), **extra)


def run_recipe_cells(task: Task, epsilons: List[float], seeds: List[int],
                     override: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``{str(ε): cell}`` for the default recipe (with ``override``) on ``seeds``: ``benchmarks/utility.py``'s keys
    (``mean``, ``std``, ``accs``, ``epsilon``, ``recipe``) and ``stderr``, ``seeds``."""
    recipe = DEFAULT_RECIPE.replace(**(override or {}))
    out = {}
    for eps in epsilons:
        runs = [recipe_accuracy(task, seed, eps, recipe) for seed in seeds]
        out[str(float(eps))] = summarise([a for a, _ in runs], [e for _, e in runs], seeds=seeds,
                                         recipe=utility.describe(recipe.to_dict()))
    return out


def report_recipe_cells(task: Task, epsilons: str, seeds: str, override: Optional[str],
                        json_path: Optional[str]) -> Dict[str, Any]:
    """The command-line run of ``benchmarks/utility_text.py`` and ``utility_images.py``: :func:`run_recipe_cells`
    from the comma-separated ``epsilons`` and ``seeds`` and the JSON ``override``, printed, written to
    ``json_path``."""
    results = run_recipe_cells(task, parse_list(epsilons, float), parse_list(seeds, int),
                               json.loads(override) if override else {})
    for eps, r in results.items():
        print(f"ε={eps:>4} (certified {r['epsilon']:.3f}): {r['mean']:.4f} ± {r['std']:.4f}   [{r['recipe']}]")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results
