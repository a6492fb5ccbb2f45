"""The tables of ``docs/hyperparameters.rst``: our default recipe, our accounted search, Opacus untuned and Opacus
tuned (unaccounted), on the three tasks of ``benchmarks/tasks.py``.

Run: ``python benchmarks/hyperparameters.py --task text`` (one task, every row) or ``--part opacus-grid``
(one part); every finished run is appended to ``--runs`` (JSON lines, default
``benchmarks/results/hyperparameters_runs.jsonl``) and is not run again, so the work can be split between
processes (``--part``, ``--task``) and interrupted. ``--table`` prints the tables from the runs file.

Rows (seeds: ``REPORT_SEEDS``, never used for a choice):

* **default recipe**: :data:`lightning_dp.recipes.DEFAULT_RECIPE` at the target ε (one run per seed).
* **accounted search** (:class:`lightning_dp.tuning.PrivateHyperparameterSearch`): ``SEARCH_TRIALS`` trials of the
  default recipe with the learning rate drawn from ``SEARCH_CANDIDATES``, scored by ``PrivateAccuracy`` on the
  training set (released with noise multiplier ``max(σ, N·VALIDATION_PRECISION)``, accounted; the recipe's centre,
  where it centres, accounted too), σ calibrated so that the *whole search* spends the target ε. The released model
  is the best trial's; its test accuracy is the cell. One search per seed.
* **Opacus untuned**: Opacus 1.x, SGD lr 2, flat C 1 (``OPACUS_UNTUNED``, issue 17's fixed setting).
* **Opacus tuned (unaccounted)**: the best of ``OPACUS_GRID`` (4 learning rates × 4 clipping norms) by mean
  test accuracy on ``TUNE_SEEDS``, then run on the report seeds. The choice itself is not accounted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
from lightning_dp.metrics import PrivateAccuracy  # noqa: E402
from lightning_dp.recipes import DEFAULT_RECIPE  # noqa: E402
from lightning_dp.tuning import PrivateHyperparameterSearch, TruncatedNegativeBinomialTrials  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)
REPORT_SEEDS = {"digits": list(range(5, 10)), "text": list(range(2, 12)), "images": list(range(2, 7))}
TUNE_SEEDS = [0, 1]
OPACUS_UNTUNED = {"lr": 2.0, "max_grad_norm": 1.0}
OPACUS_GRID = {"lr": [1.0, 2.0, 4.0, 8.0], "max_grad_norm": [0.25, 0.5, 1.0, 2.0]}
SEARCH_CANDIDATES = [{"learning_rate": lr} for lr in (1.5, 3.0, 6.0)]
SEARCH_TRIALS = TruncatedNegativeBinomialTrials.from_mean(3.0, shape=0.0)
VALIDATION_PRECISION = 1 / 300
"""The validation score's noise multiplier is at least ``N·VALIDATION_PRECISION`` (``N`` scored examples): the
released accuracy's noise then has std ``√2·σ_val/N ≤ 0.5`` point, and the release costs little."""
RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hyperparameters_runs.jsonl")


class Runs:
    """The runs file: one JSON object per finished run, keyed by what defines the run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: Dict[str, Dict[str, Any]] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        self.done[record["key"]] = record

    @staticmethod
    def key(**what: Any) -> str:
        return json.dumps(what, sort_keys=True)

    def get(self, **what: Any) -> Optional[Dict[str, Any]]:
        return self.done.get(self.key(**what))

    def add(self, result: Dict[str, Any], **what: Any) -> Dict[str, Any]:
        record = dict(result, key=self.key(**what), **what)
        self.done[record["key"]] = record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def opacus_run(runs: Runs, task: str, seed: int, epsilon: float, lr: float, clip: float) -> Dict[str, Any]:
    what = dict(row="opacus", task=task, seed=seed, epsilon=epsilon, lr=lr, max_grad_norm=clip)
    found = runs.get(**what)
    if found is None:
        start = time.time()
        acc, certified = tasks.train_opacus(tasks.TASKS[task], seed, epsilon, lr, clip)
        found = runs.add(dict(accuracy=acc, certified=certified, seconds=time.time() - start), **what)
    return found


def recipe_run(runs: Runs, task: str, seed: int, epsilon: float) -> Dict[str, Any]:
    what = dict(row="recipe", task=task, seed=seed, epsilon=epsilon, recipe=DEFAULT_RECIPE.to_dict())
    found = runs.get(**what)
    if found is None:
        start = time.time()
        acc, certified = tasks.recipe_accuracy(tasks.TASKS[task], seed, epsilon)
        found = runs.add(dict(accuracy=acc, certified=certified, seconds=time.time() - start), **what)
    return found


def search_run(runs: Runs, task_name: str, seed: int, epsilon: float) -> Dict[str, Any]:
    """One accounted search at total ``epsilon`` (its trials' seeds are drawn from ``seed``)."""
    what = dict(row="search", task=task_name, seed=seed, epsilon=epsilon, recipe=DEFAULT_RECIPE.to_dict(),
                candidates=SEARCH_CANDIDATES, trials=SEARCH_TRIALS.to_dict(), validation=VALIDATION_PRECISION)
    found = runs.get(**what)
    if found is not None:
        return found
    task = tasks.TASKS[task_name]
    split = task.split(seed)
    xs, ys, xt, yt = split
    models: List[torch.nn.Module] = []

    def train_fn(candidate: Dict[str, Any], noise_multiplier: float, trial_seed: int) -> Tuple[float, Any, int]:
        recipe = DEFAULT_RECIPE.replace(**candidate)
        model, private = tasks.train_recipe(task, trial_seed, epsilon, recipe, noise_multiplier=noise_multiplier,
                                            split=split)
        score = PrivateAccuracy(noise_multiplier=search.validation_noise_multiplier, secure_mode=False,
                                seed=trial_seed)
        with torch.no_grad():
            score.update(model(xs), ys)
        models.append(model)
        privacy = private.privacy
        report = dict(steps=privacy.accountant.total_steps - privacy.centring_releases,
                      noise_multiplier=privacy.noise_multiplier,
                      sample_rate=privacy.sample_rate, sampling="poisson")
        return float(score.compute()), report, len(models) - 1

    start = time.time()
    plan = dict(distribution=SEARCH_TRIALS, sample_rate=task.sample_rate, steps=task.steps, delta=task.delta,
                target_epsilon=epsilon, extra_releases=tasks.centring_releases(task), secure_mode=False, seed=seed)
    same = PrivateHyperparameterSearch(train_fn, SEARCH_CANDIDATES, **plan).noise_multiplier  # validation at σ
    search = PrivateHyperparameterSearch(train_fn, SEARCH_CANDIDATES, **plan,
                                         validation_noise_multiplier=max(same, len(xs) * VALIDATION_PRECISION))
    result = search.run()
    best = models[result.output]
    with torch.no_grad():
        acc = float((best(xt).argmax(1) == yt).float().mean())
    return runs.add(dict(accuracy=acc, certified=result.report.epsilon, trial_epsilon=result.report.trial_epsilon,
                         noise_multiplier=result.report.noise_multiplier,
                         validation_noise_multiplier=result.report.validation_noise_multiplier,
                         num_trials=len(result.trials),
                         chosen=result.candidate, private_score=result.score, seconds=time.time() - start), **what)


def grid(task: str) -> Iterator[Tuple[float, float]]:
    for lr in OPACUS_GRID["lr"]:
        for clip in OPACUS_GRID["max_grad_norm"]:
            yield lr, clip


def tuned_opacus(runs: Runs, task: str, epsilon: float) -> Tuple[float, float, float]:
    """(lr, C, mean accuracy on the tuning seeds) of the grid's best setting at ``epsilon``."""
    scores = []
    for lr, clip in grid(task):
        accs = [opacus_run(runs, task, s, epsilon, lr, clip)["accuracy"] for s in TUNE_SEEDS]
        scores.append((statistics.mean(accs), lr, clip))
    best = max(scores)
    return best[1], best[2], best[0]


def cell(records: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    return tasks.summarise([r["accuracy"] for r in records], [r["certified"] for r in records], **extra)


def task_rows(runs: Runs, task: str, parts: List[str], epsilons: List[float]) -> Dict[str, Any]:
    """Run (or read) every part of ``parts`` for ``task``; the rows that are complete."""
    seeds = REPORT_SEEDS[task]
    rows: Dict[str, Any] = {}
    if "opacus-grid" in parts:
        tuned = {e: tuned_opacus(runs, task, e) for e in epsilons}
        rows["Opacus tuned (unaccounted): best of 16 lr × C on seeds 0-1"] = {
            str(e): cell([opacus_run(runs, task, s, e, lr, clip) for s in seeds], lr=lr, max_grad_norm=clip,
                         tuning_mean=tuning) for e, (lr, clip, tuning) in tuned.items()}
    if "opacus" in parts:
        u = OPACUS_UNTUNED
        rows[f"Opacus untuned: lr {u['lr']:g}, C {u['max_grad_norm']:g}"] = {
            str(e): cell([opacus_run(runs, task, s, e, u["lr"], u["max_grad_norm"]) for s in seeds]) for e in epsilons}
    if "recipe" in parts:
        rows["ours: default recipe"] = {str(e): cell([recipe_run(runs, task, s, e) for s in seeds])
                                        for e in epsilons}
    if "search" in parts:
        out = {}
        for e in epsilons:
            records = [search_run(runs, task, s, e) for s in seeds]
            out[str(e)] = cell(records, trials=[r["num_trials"] for r in records],
                               chosen=[r["chosen"]["learning_rate"] for r in records],
                               noise_multiplier=records[0]["noise_multiplier"],
                               trial_epsilon=records[0]["trial_epsilon"])
        rows["ours: accounted search (total ε, tuning included)"] = out
    return rows


def print_rows(task: str, rows: Dict[str, Any]) -> None:
    print(f"== {task} (seeds {REPORT_SEEDS[task]}) ==")
    for name, cells in rows.items():
        text = "  ".join(f"ε={e}: {c['mean']:.3f} ± {c['stderr']:.3f} ({c['epsilon']:.2f})" for e, c in cells.items())
        print(f"{name}\n    {text}", flush=True)


ROW_ORDER = ("ours: default recipe", "ours: accounted search", "Opacus untuned", "Opacus tuned")


def rst_tables(out: Dict[str, Dict[str, Any]], epsilons: List[float]) -> str:
    """The docs' tables (one list-table per task) from :func:`task_rows`' output: mean ± standard error."""
    lines: List[str] = []
    for task, rows in out.items():
        seeds = REPORT_SEEDS[task]
        lines += [f".. list-table:: {task}: test accuracy, mean ± standard error over seeds "
                  f"{seeds[0]}-{seeds[-1]} ({len(seeds)} seeds)", "   :header-rows: 1", "   :widths: 46 18 18 18", "",
                  "   * - row"] + [f"     - ε = {e:g}" for e in epsilons]
        for prefix in ROW_ORDER:
            for name, cells in rows.items():
                if not name.startswith(prefix):
                    continue
                lines.append(f"   * - {name}")
                for e in epsilons:
                    c = cells.get(str(e))
                    if c is None:
                        lines.append("     - not run")
                        continue
                    text = f"{c['mean']:.3f} ± {c['stderr']:.3f}"
                    if "lr" in c:
                        text += f" (lr {c['lr']:g}, C {c['max_grad_norm']:g})"
                    if "chosen" in c:
                        text += f" (σ {c['noise_multiplier']:.2f}, trials {statistics.mean(c['trials']):.1f})"
                    lines.append(f"     - {text}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits,text,images")
    parser.add_argument("--part", default="recipe,search,opacus,opacus-grid")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    parser.add_argument("--runs", default=RUNS)
    parser.add_argument("--json", default=None, help="write the tables here")
    parser.add_argument("--rst", default=None, help="write the docs' list-tables here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    runs = Runs(args.runs)
    epsilons = tasks.parse_list(args.epsilons, float)
    out = {}
    for task in args.task.split(","):
        out[task] = task_rows(runs, task, args.part.split(","), epsilons)
        print_rows(task, out[task])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.rst:
        with open(args.rst, "w") as f:
            f.write(rst_tables(out, epsilons))


if __name__ == "__main__":
    main()
