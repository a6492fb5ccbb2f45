"""Run by tests/test_secure_aggregation.py: a 2-process CPU DDP fit with DPDDPStrategy(secure_aggregation=True)
and σ = 0 (Lightning re-launches this script for rank 1); an optional second argument sets
``secure_aggregation_bits``. Each rank saves what it trained on, its final
weights, its pair keys (for the test to look for in the checkpoint) and the privacy report."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.namespace import pl  # noqa: E402
import torch  # noqa: E402

from tests.namespace import DPDDPStrategy  # noqa: E402
from tests.lightning_helpers import TinyClassifier, make_loader  # noqa: E402


def main(out_dir: str, bits: str = "") -> None:
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.5)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = DPDDPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, seed=11, secure_aggregation=True,
                             **({"secure_aggregation_bits": int(bits)} if bits else {}))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                         default_root_dir=out_dir, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=8))
    trainer.save_checkpoint(os.path.join(out_dir, "model.ckpt"))
    aggregator = trainer.strategy._aggregator
    torch.save(
        {
            "initial": initial,
            "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "batches": model.seen_batches,
            "expected_batch_size": trainer.strategy.expected_batch_size,
            "pair_keys": list(aggregator.masks._pair_keys.values()),
            "public_key": aggregator.masks.public_key,
            "report": trainer.strategy.privacy_report().to_dict(),
            "table": trainer.strategy.privacy_report().to_table(),
            "steps": aggregator.steps,
            "scale": aggregator.scale,
            "message_dtype": str(aggregator.message_dtype),
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
