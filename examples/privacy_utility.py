"""Privacy vs utility on digits: test accuracy at several budgets, with the audit's lower bound.

    python examples/privacy_utility.py                       # ε ∈ {0.5, 1, 2, 4, 8} and non-private
    python examples/privacy_utility.py --epsilons 1 4 --out plot.png

For each budget the digits MLP of ``train_digits.py`` is trained with the noise calibrated to that ε
and its test accuracy measured; a second run with canaries (``lightning_dp.audit.run_audit``) gives the
empirical lower bound on ε beside the claimed one. Writes a PNG (matplotlib, the ``examples`` extra)
and the numbers as JSON next to it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L

from lightning_dp import DPStrategy
from lightning_dp.audit import run_audit

import train_digits  # noqa: E402  (same folder)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "_static" / "privacy_utility.png"


def _trainer(epochs: int, epsilon: Optional[float], delta: float, seed: int) -> L.Trainer:
    strategy = DPStrategy(target_epsilon=epsilon, delta=delta, seed=seed) if epsilon is not None else "auto"
    return L.Trainer(max_epochs=epochs, strategy=strategy, accelerator="cpu", logger=False,
                     default_root_dir="lightning_logs/privacy_utility",  # privacy_report.json goes here
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def evaluate(epsilon: Optional[float], args: argparse.Namespace) -> Dict[str, float]:
    """Test accuracy at ``epsilon`` (``None``: non-private) and the audit of the same training setup."""
    L.seed_everything(args.seed, workers=True)
    train, test = train_digits.digits_loaders(args.batch_size, seed=args.seed)
    model = train_digits.DigitsMLP()
    trainer = _trainer(args.epochs, epsilon, args.delta, args.seed)
    trainer.fit(model, train_dataloaders=train)
    accuracy = trainer.test(model, dataloaders=test, verbose=False)[0]["test_accuracy"]
    claimed = trainer.strategy.get_epsilon(args.delta) if epsilon is not None else math.inf

    audit = run_audit(
        train_digits.DigitsMLP,
        lambda: _trainer(args.epochs, epsilon, args.delta, args.seed),
        train.dataset,
        num_canaries=args.canaries,
        num_classes=10,
        batch_size=args.batch_size,
        guesses=args.guesses,
        delta=args.delta,
        seed=args.seed,
    )
    return {"target_epsilon": epsilon if epsilon is not None else math.inf, "claimed_epsilon": claimed,
            "test_accuracy": accuracy, "audit_lower_bound": audit.epsilon_lower_bound,
            "audit_correct": audit.correct, "audit_guesses": audit.guesses}


def plot(results: List[Dict[str, float]], out: Path) -> None:
    """Accuracy vs ε (log axis), the non-private accuracy as a line, audit bounds beside the claims."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in results if math.isfinite(r["target_epsilon"])]
    baseline = [r for r in results if not math.isfinite(r["target_epsilon"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    eps = [r["claimed_epsilon"] for r in private]
    ticks = [r["target_epsilon"] for r in private]

    def log_axis(axis) -> None:
        axis.set_xscale("log")
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axis.minorticks_off()

    left.plot(eps, [r["test_accuracy"] for r in private], "o-", label="DP-SGD (lightning-dp)")
    if baseline:
        left.axhline(baseline[0]["test_accuracy"], color="gray", ls="--", label="non-private")
    log_axis(left)
    left.set_xlabel("claimed ε (δ = 1e-5)")
    left.set_ylabel("test accuracy")
    left.set_title("Digits MLP: accuracy vs privacy budget")
    left.legend()
    right.plot(eps, eps, "k:", label="claimed ε (upper bound)")
    right.plot(eps, [r["audit_lower_bound"] for r in private], "s-", color="C3", label="audit lower bound (95%)")
    if baseline:
        right.axhline(baseline[0]["audit_lower_bound"], color="gray", ls="--", label="audit, non-private run")
    log_axis(right)
    right.set_xlabel("claimed ε")
    right.set_ylabel("ε")
    right.set_title("Empirical lower bound vs claim")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> List[Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--guesses", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    results = []
    for epsilon in [*args.epsilons, None]:
        result = evaluate(epsilon, args)
        results.append(result)
        print(f"target ε={result['target_epsilon']:<5} claimed ε={result['claimed_epsilon']:.3f} "
              f"accuracy={result['test_accuracy']:.4f} audit lower bound={result['audit_lower_bound']:.3f} "
              f"({result['audit_correct']}/{result['audit_guesses']})", flush=True)
    plot(results, args.out)
    finite = [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in results]
    args.out.with_suffix(".json").write_text(json.dumps(finite, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return results


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning_dp").setLevel(logging.WARNING)
    main()
