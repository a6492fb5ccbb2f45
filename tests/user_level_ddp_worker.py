"""Run by tests/test_user_level.py: a 2-process CPU DDP fit with DPDDPStrategy(privacy_unit="user") (Lightning
re-launches this script for rank 1). Each rank saves the records it trained on and its final weights."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests.namespace import DPDDPStrategy, pl  # noqa: E402
from tests.test_user_level import NORM, USER_IDS, UserModule, indexed_loader  # noqa: E402


def main(clipping_mode: str, clipping: str, out_dir: str) -> None:
    torch.manual_seed(0)
    module = UserModule()
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    norm = 1.0 if clipping == "automatic" else NORM
    # 3 expected users per rank and micro-batch, 2 ranks: q = 2·3/6 = 1, every user in the step
    strategy = DPDDPStrategy(noise_multiplier=0.0, max_grad_norm=norm, seed=11, privacy_unit="user", user_ids=USER_IDS,
                             max_records_per_user=3, clipping_mode=clipping_mode, clipping=clipping)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                         default_root_dir=out_dir, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, train_dataloaders=indexed_loader(3))
    torch.save(
        {
            "initial": initial,
            "final": {k: v.detach().clone() for k, v in module.net.state_dict().items()},
            "seen": module.seen,
            "sample_rate": strategy.sample_rate,
            "expected_batch_size": strategy.expected_batch_size,
            "steps": strategy.privacy.steps_taken,
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
