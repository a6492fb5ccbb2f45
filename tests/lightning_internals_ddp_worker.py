"""Run by tests/test_lightning_internals.py: a 2-process CPU (gloo) DDP fit with DPDDPStrategy,
``accumulate_grad_batches=2``, under PyTorch's profiler. Every collective the process group runs is a
``gloo:<collective>`` event (DDP's gradient buckets too, which its C++ reducer all-reduces without going
through ``torch.distributed``); a callback marks the phases of each micro-batch (the batch, its backward
pass, the optimizer step). Each rank saves the collectives with their sizes and start times, the phases
and the trainable parameters' sizes.

``mode``: ``"dp"`` as shipped; ``"no_hook"`` the fault the test must catch, the DP strategy's
no-communication hook left out (Lightning's ``configure_ddp`` alone), so DDP all-reduces raw gradients."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests.lightning_helpers import TinyClassifier, make_loader  # noqa: E402
from tests.namespace import DPDDPStrategy, pl, submodule  # noqa: E402


class Phases(pl.Callback):
    """Marks ``batch:<i>``, ``backward:<i>`` and ``step:<i>`` (from ``on_before_optimizer_step`` to the end
    of the batch: the DP optimizer clips, noises and combines there) as profiler ranges."""

    def __init__(self) -> None:
        self.open: dict = {}
        self.batch = -1

    def _enter(self, name: str) -> None:
        self.open[name] = torch.profiler.record_function(f"dp_phase:{name}")
        self.open[name].__enter__()

    def _exit(self, name: str) -> None:
        if name in self.open:
            self.open.pop(name).__exit__(None, None, None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch += 1
        self._enter(f"batch:{self.batch}")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._enter(f"backward:{self.batch}")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._exit(f"backward:{self.batch}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._enter(f"step:{self.batch}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._exit(f"step:{self.batch}")
        self._exit(f"batch:{self.batch}")


def main(mode: str, out_dir: str) -> None:
    torch.manual_seed(0)
    if mode == "no_hook":  # the fault: Lightning's configure_ddp only, no no-communication hook
        DPDDPStrategy.configure_ddp = submodule("strategies").DDPStrategy.configure_ddp
    model = TinyClassifier(lr=0.5)
    phases = Phases()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DPDDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3),
        max_steps=2,
        accumulate_grad_batches=2,
        callbacks=[phases],
        logger=False,
        default_root_dir=out_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=8))
    events = prof.events()
    collectives = [
        {"name": e.name, "shapes": [list(s) for s in e.input_shapes], "start": e.time_range.start}
        for e in events if e.name.startswith("gloo:")
    ]
    marks = [
        {"name": e.name[len("dp_phase:"):], "start": e.time_range.start, "end": e.time_range.end}
        for e in events if e.name.startswith("dp_phase:")
    ]
    trainable = [(n, p.numel(), p.element_size(), str(p.dtype)) for n, p in model.named_parameters() if p.requires_grad]
    torch.save(
        {"collectives": collectives, "phases": marks, "trainable": trainable,
         "hook": getattr(trainer.strategy, "_local_hook_installed_by", None),
         "steps": trainer.strategy.accountant.total_steps, "batches": phases.batch + 1},
        os.path.join(out_dir, f"collectives.rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
