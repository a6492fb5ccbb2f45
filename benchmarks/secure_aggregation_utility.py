"""Accuracy of secure aggregation against plain DDP at the same ε: the digits demo (examples/train_digits.py's
model and data, 60 epochs, 128 examples per rank) trained by 2 CPU processes with DPDDPStrategy calibrated to
a target ε, with or without ``secure_aggregation`` (Lightning re-launches this script for rank 1). Rank 0
writes σ, the certified ε and the test accuracy to ``OUT_DIR/MODE.json``::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 OMP_NUM_THREADS=1 \
        python benchmarks/secure_aggregation_utility.py {plain,secure} OUT_DIR EPSILON SEED [BATCH_PER_RANK [EPOCHS [HONEST]]]

BATCH_PER_RANK (default 128) sets the sampling rate q = 2·BATCH_PER_RANK/1437; EPOCHS defaults to 60;
HONEST is ``min_honest_ranks`` (default: the strategy's, W − 1 = 1, so each of the 2 ranks adds the whole
noise variance and the total noise is √2 times plain DDP's; 2 gives plain DDP's total noise).
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/ and examples/ are imported
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from tests.namespace import pl  # noqa: E402
import torch  # noqa: E402

from tests.namespace import DPDDPStrategy  # noqa: E402
from train_digits import DigitsMLP, digits_loaders  # noqa: E402


def main(mode: str, out_dir: str, epsilon: float, seed: int, batch_per_rank: int = 128, epochs: int = 60,
         honest: int = 0) -> None:
    pl.seed_everything(seed)
    train, test = digits_loaders(batch_size=batch_per_rank, seed=seed)  # per rank: twice that expected in all
    model = DigitsMLP(lr=0.1, momentum=0.9)
    strategy = DPDDPStrategy(target_epsilon=epsilon, delta=1e-5, max_grad_norm=1.0, seed=seed,
                             secure_aggregation=mode == "secure",
                             **({"min_honest_ranks": honest} if honest and mode == "secure" else {}))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
                         default_root_dir=out_dir, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, train_dataloaders=train)
    if trainer.global_rank != 0:
        return
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    result = {
        "accuracy": hits / len(test.dataset),
        "epsilon": trainer.strategy.get_epsilon(1e-5),
        "noise_multiplier": trainer.strategy.noise_multiplier,
        "accountant": trainer.strategy.accountant.mechanism,
        "steps": trainer.global_step,
        "batch_per_rank": batch_per_rank,
        "epochs": epochs,
        "min_honest_ranks": honest or None,
    }
    with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), *(int(a) for a in sys.argv[5:8]))
