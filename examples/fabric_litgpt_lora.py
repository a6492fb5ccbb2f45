"""Private LoRA fine-tuning with LitGPT's model code, in a Fabric loop shaped like LitGPT's ``finetune/lora.py``.

    python examples/fabric_litgpt_lora.py                  # offline, about 25 s on a CPU
    python examples/fabric_litgpt_lora.py --epsilon 1      # another budget
    python examples/fabric_litgpt_lora.py --steps 200      # a longer run (σ is calibrated for it)

Needs ``litgpt`` (``make example-litgpt`` builds ``.venv-litgpt`` with it and runs this script). Nothing is
downloaded: the model is ``litgpt.lora.GPT`` built from LitGPT's ``pythia-14m`` config (2 layers, a vocabulary
the size of the generated language, random init), LoRA on the query and value projections; the data is a small
synthetic language generated here.

The loop is LitGPT's: ``fabric.setup_module``/``fabric.setup_optimizers``, ``mark_only_lora_as_trainable``,
``gradient_accumulation_iters`` micro-batches per optimizer step (``fabric.no_backward_sync`` while
accumulating), ``fabric.backward``, ``optimizer.step``, ``optimizer.zero_grad``, LitGPT's warm-up + cosine
schedule, and ``validate`` on held-out data. What DP changes in it, each marked ``# DP:`` below:

* ``L.Fabric(strategy=DPStrategy(...))`` with ``accumulate_grad_batches`` = the loop's accumulation iters, and
  σ calibrated for ``--epsilon`` over ``--steps``;
* the validation loader is marked with ``evaluation_loader`` (not Poisson-sampled; held-out data);
* the loss is one term per sequence, and it is *not* divided by the accumulation iters;
* the loop stops when ``fabric.strategy.should_stop`` (the next step would exceed the budget);
* at the end, ``fabric.strategy.privacy_report()``.

ε covers the training sequences (one sequence = one record). See the docs page "Fabric and LitGPT".
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.utils import CycleIterator, instantiate_torch_optimizer, num_parameters
from torch.utils.data import DataLoader, Dataset

from lightning_dp.fabric import DPStrategy, evaluation_loader


# ---------------------------------------------------------------------------------------------------------
# The data: a small synthetic language, generated and seeded (nothing downloaded).
# ---------------------------------------------------------------------------------------------------------
class SyntheticLanguage:
    """A first-order Markov language over ``vocab_size`` tokens: each token is followed by one of
    ``successors`` tokens fixed for it (chosen at random once), with probabilities halving from one to the next
    (4/7, 2/7, 1/7 for three: 0.96 nats per prediction, where a model that knows nothing pays
    ln(vocab_size), 4.16 nats for 64 tokens). A falling validation loss is the pattern being learnt."""

    def __init__(self, vocab_size: int, successors: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.next_tokens = torch.stack([torch.randperm(vocab_size, generator=generator)[:successors]
                                        for _ in range(vocab_size)])
        weights = 0.5 ** torch.arange(1, successors + 1, dtype=torch.float64)
        self.next_probs = weights / weights.sum()

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        """``n`` sequences of ``length`` tokens."""
        generator = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, length, dtype=torch.long)
        ids[:, 0] = torch.randint(self.vocab_size, (n,), generator=generator)
        for t in range(1, length):
            choice = torch.multinomial(self.next_probs.expand(n, -1), 1, generator=generator).squeeze(1)
            ids[:, t] = self.next_tokens[ids[:, t - 1], choice]
        return ids

    def entropy_per_prediction(self) -> float:
        """The loss (nats per predicted token) of a model that has learnt the language exactly."""
        return float(-(self.next_probs * self.next_probs.log()).sum())


class SequenceDataset(Dataset):
    """LitGPT's SFT batch layout: ``{"input_ids", "labels"}`` (labels = the inputs; no prompt to mask)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def get_dataloaders(fabric: L.Fabric, args: argparse.Namespace, language: SyntheticLanguage):
    train_data = SequenceDataset(language.sample(args.train_size, args.seq_length, seed=args.seed + 1))
    val_data = SequenceDataset(language.sample(args.val_size, args.seq_length, seed=args.seed + 2))
    train_dataloader = DataLoader(train_data, batch_size=args.micro_batch_size, shuffle=True)
    # DP: held-out data, evaluated without noise: marked so that Fabric leaves it as it is. The training loader
    # is Poisson-sampled by the strategy (each optimizer step one draw at q = k·B/N, served as k micro-batches).
    val_dataloader = evaluation_loader(DataLoader(val_data, batch_size=args.val_batch_size))
    return fabric.setup_dataloaders(train_dataloader, val_dataloader)


# ---------------------------------------------------------------------------------------------------------
# The loss: one term per sequence.
# ---------------------------------------------------------------------------------------------------------
def per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The mean over sequences of each sequence's mean token loss.

    DP: LitGPT's ``chunked_cross_entropy`` divides by the number of unmasked tokens *in the whole batch*, which
    ties each sequence's gradient to the other sequences' lengths; per-sample clipping needs one term per sample
    (``loss_reduction="mean"``: the mean over the batch of per-sample losses). With fixed-length sequences and no
    masked tokens, as here, both are the same number."""
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
    mask = (targets != ignore_index).to(nll.dtype)
    return ((nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


# ---------------------------------------------------------------------------------------------------------
# LitGPT's finetune/lora.py, with the DP strategy
# ---------------------------------------------------------------------------------------------------------
def setup(args: argparse.Namespace) -> Dict[str, object]:
    strategy = DPStrategy(
        target_epsilon=args.epsilon,            # DP: σ calibrated so that --steps steps spend at most ε ...
        max_steps=args.steps,
        epsilon_budget=args.epsilon,            # ... and should_stop turns True before a step would exceed it
        delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        accumulate_grad_batches=args.gradient_accumulation_iters,  # DP: one Poisson draw = this many micro-batches
        seed=args.seed,
    )
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=strategy, precision=args.precision)
    return fabric.launch(main, args)


def main(fabric: L.Fabric, args: argparse.Namespace) -> Dict[str, object]:
    fabric.seed_everything(args.seed)
    language = SyntheticLanguage(args.vocab_size, args.successors, seed=args.seed)
    train_dataloader, val_dataloader = get_dataloaders(fabric, args, language)

    config = Config.from_name(
        "pythia-14m", n_layer=2, block_size=args.seq_length, vocab_size=args.vocab_size,
        padded_vocab_size=args.vocab_size, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_query=True,
        lora_value=True, lora_head=args.lora_head,
    )
    with fabric.init_module(empty_init=False):
        model = GPT(config)  # random init: a public starting point, as a pretrained checkpoint would be
    mark_only_lora_as_trainable(model)
    fabric.print(f"Number of trainable parameters: {num_parameters(model, requires_grad=True):,}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")

    model = fabric.setup_module(model)  # DP: validates the model, attaches the per-sample-gradient hooks
    optimizer = instantiate_torch_optimizer("AdamW", model.parameters(), lr=args.lr, weight_decay=0.0)
    optimizer = fabric.setup_optimizers(optimizer)  # DP: wrapped in a DPOptimizer (clip, noise, account)
    warmup_steps = max(1, min(args.warmup_steps, args.steps - 1))  # a short run still gets its cosine part
    scheduler = get_lr_scheduler(optimizer, warmup_steps=warmup_steps, max_steps=args.steps)

    val_before = validate(fabric, model, val_dataloader).item()
    fabric.print(f"Validation loss before: {val_before:.3f} (uniform guess {math.log(args.vocab_size):.3f}, "
                 f"the language's own entropy {language.entropy_per_prediction():.3f})")
    train_time = time.perf_counter()
    step_count = fit(fabric, model, optimizer, scheduler, train_dataloader, val_dataloader, args)
    training_time = time.perf_counter() - train_time
    val_after = validate(fabric, model, val_dataloader).item()
    fabric.print(f"Final evaluation | val loss: {val_after:.3f} | val ppl: {math.exp(val_after):.3f} "
                 f"(before: {val_before:.3f})")

    report = fabric.strategy.privacy_report()
    fabric.print(report.to_table())
    if args.out_dir is not None:
        # DP: fabric.save stores the privacy state (accountant history, generators) beside the weights;
        # fabric.load into a DPStrategy restores it, so a resumed run is accounted from where this one stopped.
        fabric.save(args.out_dir / "final" / "dp_lora.ckpt",
                    {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step_count": step_count})
    summary = {"val_loss_before": val_before, "val_loss_after": val_after, "steps": step_count,
               "epsilon": report.epsilon, "delta": report.delta, "target_epsilon": args.epsilon,
               "noise_multiplier": report.noise_multiplier, "expected_batch_size": report.expected_batch_size,
               "training_time_s": training_time, "entropy": language.entropy_per_prediction()}
    fabric.print(f"Training time: {training_time:.1f} s for {step_count} steps")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def fit(fabric: L.Fabric, model: GPT, optimizer: torch.optim.Optimizer, scheduler, train_dataloader: DataLoader,
        val_dataloader: DataLoader, args: argparse.Namespace) -> int:
    accumulation_iters = args.gradient_accumulation_iters
    train_iterator = CycleIterator(train_dataloader)
    step_count = 0
    iter_num = 0
    running_loss = 0.0
    total_t0 = time.perf_counter()

    # DP: stop before the step that would take ε over the budget (a step taken anyway raises, weights untouched).
    while step_count < args.steps and not fabric.strategy.should_stop:
        iter_num += 1
        iter_t0 = time.perf_counter()
        batch = next(train_iterator)
        if train_iterator.epoch >= args.epochs:
            fabric.print(f"Number of epochs {args.epochs} reached, stopping training...")
            break
        input_ids, targets = batch["input_ids"], batch["labels"]

        is_accumulating = iter_num % accumulation_iters != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            if input_ids.shape[0] == 0:
                # DP: a Poisson draw may leave a micro-batch empty. The step still needs its k backward calls
                # (it is accounted like every step: noise only from this micro-batch): a zero loss.
                loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            else:
                logits = model(input_ids)
                # shift the targets such that output n predicts token n+1
                loss = per_sequence_loss(logits[:, :-1, :], targets[:, 1:])
            # DP: *not* divided by the accumulation iters. The DP optimizer sums the clipped per-sample gradients
            # of all k micro-batches and divides by the expected batch size of the whole Poisson draw (q·N), so
            # the step already averages over the draw. Dividing here would scale every per-sample gradient by 1/k
            # before clipping: the same as clipping at k·C and shrinking the signal k-fold under noise σC.
            fabric.backward(loss)
        running_loss += loss.item()

        if not is_accumulating:
            optimizer.step()  # DP: clipped sum + N(0, (σC)²), divided by q·N, then AdamW; accounted
            optimizer.zero_grad()
            scheduler.step()
            step_count += 1
            if step_count % args.log_interval == 0:
                fabric.print(
                    f"Epoch {train_iterator.epoch + 1} | iter {iter_num} step {step_count} | "
                    f"loss train: {running_loss / accumulation_iters:.3f} | ε: {fabric.strategy.get_epsilon():.3f} | "
                    f"iter time: {(time.perf_counter() - iter_t0) * 1000:.2f} ms (step)"
                )
            running_loss = 0.0
            if step_count % args.eval_interval == 0:
                val_loss = validate(fabric, model, val_dataloader)
                fabric.print(f"iter {iter_num}: val loss {val_loss.item():.4f}, "
                             f"elapsed {time.perf_counter() - total_t0:.1f} s")
    if fabric.strategy.should_stop:
        fabric.print(f"Privacy budget ε = {args.epsilon} reached after {step_count} steps, stopping training...")
    return step_count


@torch.no_grad()
def validate(fabric: L.Fabric, model: GPT, val_dataloader: DataLoader) -> torch.Tensor:
    """The mean validation loss over the held-out loader (LitGPT's ``validate``, all batches)."""
    model.eval()
    losses = torch.zeros(len(val_dataloader))
    for k, batch in enumerate(val_dataloader):
        input_ids, targets = batch["input_ids"], batch["labels"]
        logits = model(input_ids)
        losses[k] = per_sequence_loss(logits[:, :-1, :], targets[:, 1:])
    model.train()
    return losses.mean()


def get_lr_scheduler(optimizer, warmup_steps: int, max_steps: int):
    # linear warmup followed by cosine annealing (LitGPT's)
    scheduler1 = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / warmup_steps)
    scheduler2 = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_steps - warmup_steps))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [scheduler1, scheduler2], milestones=[warmup_steps])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget ε (σ is calibrated for it)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (σ is calibrated for this many)")
    parser.add_argument("--epochs", type=int, default=100, help="stop after this many passes (LitGPT's train.epochs)")
    parser.add_argument("--gradient-accumulation-iters", type=int, default=4,
                        help="micro-batches per optimizer step (one Poisson draw)")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="expected sequences per micro-batch")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--train-size", type=int, default=8000, help="training sequences (the private records)")
    parser.add_argument("--val-size", type=int, default=512, help="held-out sequences")
    parser.add_argument("--val-batch-size", type=int, default=128)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--successors", type=int, default=3, help="tokens that may follow each token")
    parser.add_argument("--lora-head", action=argparse.BooleanOptionalAction, default=True,
                        help="LoRA on the output head too (the random-init model's head knows nothing of the language)")
    parser.add_argument("--precision", default="32-true", help='"32-true", "bf16-mixed" or "bf16-true"')
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the model is small: one is as fast, and on a busy machine much "
                             "faster than several)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out-dir", type=Path, default=None, help="save the final checkpoint (with privacy state)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    start = time.perf_counter()
    setup(arguments)
    print(f"total {time.perf_counter() - start:.1f} s")
