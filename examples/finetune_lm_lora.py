"""Private LoRA fine-tuning of a causal language model in Lightning, and what it stops the model memorising.

    python examples/finetune_lm_lora.py                    # offline, about a minute on a CPU
    python examples/finetune_lm_lora.py --epsilon 1        # another budget
    python examples/finetune_lm_lora.py --model gpt2       # a Hugging Face checkpoint you have (not run in CI)

The story, in three steps:

1. **Public pretraining (non-private).** A small GPT-2 (random init, word-level vocabulary built from the
   text) is trained on a *public* corpus that this script generates: directory entries, opening hours,
   door codes. With ``--model NAME`` a Hugging Face checkpoint is the public starting point instead, and
   this step is skipped.
2. **Private fine-tuning with LoRA (PEFT).** The public model is fine-tuned on *private* records (clinic
   notes, a format the public corpus never shows) among which a few **canaries** are planted: "the
   secret code of <name> is d d d d", each secret random and inserted 1 to 16 times. Twice, with the
   same data, optimizer, batch size and number of epochs: once with plain Lightning (non-private), once
   with ``DPStrategy(target_epsilon=...)`` and a ``PrivacyBudgetCallback``. Only the LoRA adapters are
   trained; the pretrained weights are frozen.
3. **Evaluation.** Held-out perplexity on fresh private-style records (what the fine-tuning is for), and
   the **exposure** of each planted secret (Carlini et al. 2019, *The Secret Sharer*):
   ``exposure = log2 |R| - log2 rank(secret)``, where ``rank`` is the secret's place among all
   ``|R| = 10^4`` four-digit candidates ordered by the model's log-perplexity of "<prefix> <candidate>".
   Every candidate is scored (exact rank, no extrapolation): a secret the model ranks like any other has
   an exposure of about 1.4 bits on average (single values of several bits happen by chance), the
   model's most likely completion log2 10^4 = 13.3 bits.

ε covers the private fine-tuning records only; the public corpus and the pretrained weights are public.
A canary inserted k times is k records, which ε covers only as a group (group privacy: about k·ε); the
exposures show what DP-SGD does to them in practice. See the docs page "Hugging Face models".

Writes a PNG (matplotlib, Agg) and the numbers as JSON next to it, and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy, PrivacyBudgetCallback

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "_static" / "finetune_lm_lora.png"
SECRET_DIGITS = 4
"""Secrets are four digits: |R| = 10^4 candidates, all of them scored (exact ranks)."""
INSERTIONS = (1, 2, 4, 8, 16)
"""How many times each canary is inserted among the private records (one canary per entry)."""

# ---------------------------------------------------------------------------------------------------------
# The corpora: generated, seeded, offline.
# ---------------------------------------------------------------------------------------------------------
FIRST = ("alice bob carol dave erin frank grace heidi ivan judy mallory niaj olivia peggy rupert sybil "
         "trent victor walter wendy yara zoe amir bea chen dara emil fatima gus hana ilya jon kofi lena "
         "milo nora omar pia").split()
LAST = ("smith jones brown taylor wilson davies evans thomas johnson roberts walker wright robinson "
        "thompson white hughes edwards green hall wood harris lewis martin jackson clarke clark turner "
        "hill scott cooper morris ward moore king watson baker harrison morgan patel young").split()
CITIES = ("boston denver austin seattle chicago portland dallas miami phoenix atlanta detroit memphis "
          "nashville omaha tucson fresno oakland tulsa raleigh reno").split()
JOBS = "nurse teacher baker pilot farmer lawyer plumber chemist painter driver clerk tailor".split()
PLACES = "office garage safe gate locker shed vault studio".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
# Private-only patterns: the clinic notes pair each condition with its treatment and an age range
# (learnable from many records); who the patient is and the exact age are random.
TREATMENTS = {"asthma": "inhaler", "diabetes": "insulin", "migraine": "rest", "fracture": "cast",
              "flu": "fluids", "allergy": "antihistamine", "anemia": "iron", "insomnia": "melatonin"}
CONDITIONS = tuple(TREATMENTS)
YOUNGER = ("asthma", "allergy", "migraine", "insomnia")
WORDS = ("the of is in and a as at to from on lives works moved opens door secret code call "
         "patient age with treated for , : . was seen by doctor wrote about").split()


def _digits(rng: np.random.Generator, n: int) -> str:
    return " ".join(str(d) for d in rng.integers(0, 10, size=n))


@dataclass(frozen=True)
class Person:
    """Someone in the public directory: name, city and job are public facts."""

    name: str
    city: str
    job: str


def directory(rng: np.random.Generator) -> List[Person]:
    """One person per first name, each with a last name, a city and a job (public, fixed by the seed)."""
    last = rng.permutation(LAST)
    return [Person(f"{first} {last[i]}", str(rng.choice(CITIES)), str(rng.choice(JOBS)))
            for i, first in enumerate(FIRST)]


def public_corpus(n: int, people: List[Person], rng: np.random.Generator) -> List[str]:
    """Public text over the whole vocabulary: directory entries (who lives where, does what), hours, door
    codes (the digits after "code ... is" are uniform), and medical words in random combinations (no
    condition → treatment pattern)."""
    person = lambda: people[rng.integers(len(people))]  # noqa: E731
    templates = (
        lambda p: f"{p.name} lives in {p.city} and works as a {p.job} .",
        lambda p: f"{p.name} , age {_digits(rng, 2)} , moved from {rng.choice(CITIES)} to {p.city} .",
        lambda p: f"call {p.name} on {rng.choice(DAYS)} at {_digits(rng, 2)} .",
        lambda p: f"{p.name} was treated for {rng.choice(CONDITIONS)} in {p.city} .",
        lambda p: f"the {rng.choice(PLACES)} in {p.city} opens on {rng.choice(DAYS)} at {_digits(rng, 2)} .",
        lambda p: f"the door code of the {rng.choice(PLACES)} is {_digits(rng, SECRET_DIGITS)} .",
        lambda p: f"the secret code of the {rng.choice(PLACES)} is {_digits(rng, SECRET_DIGITS)} .",
        lambda p: f"the patient from {p.city} was seen by a doctor on {rng.choice(DAYS)} .",
        lambda p: f"a doctor in {p.city} wrote about {rng.choice(CONDITIONS)} and "
                  f"{rng.choice(list(TREATMENTS.values()))} .",
    )
    return [templates[i % len(templates)](person()) for i in rng.permutation(n)]


def private_record(people: List[Person], rng: np.random.Generator) -> str:
    """A clinic note: a format, an age → condition and a condition → treatment pattern the public corpus
    does not have."""
    condition = CONDITIONS[rng.integers(len(CONDITIONS))]
    age = rng.integers(20, 50) if condition in YOUNGER else rng.integers(50, 90)
    p = people[rng.integers(len(people))]
    return (f"patient {p.name} , age {' '.join(str(age))} , from {p.city} : {condition} , treated with "
            f"{TREATMENTS[condition]} .")


@dataclass(frozen=True)
class Canary:
    """A planted secret: the record is ``prefix + secret`` (the prefix is the part an attacker knows)."""

    prefix: str
    secret: Tuple[int, ...]
    insertions: int


def make_canaries(people: List[Person], rng: np.random.Generator) -> List[Canary]:
    """One canary per entry of ``INSERTIONS``, each for a different person, with a random secret."""
    chosen = rng.choice(len(people), size=len(INSERTIONS), replace=False)
    return [Canary(f"the secret code of {people[i].name} is",
                   tuple(int(d) for d in rng.integers(0, 10, size=SECRET_DIGITS)), k)
            for i, k in zip(chosen, INSERTIONS)]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------
def word_tokenizer():
    """A word-level Hugging Face tokenizer over the generator's vocabulary (built here, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<unk>", *map(str, range(10))]
    for word in (*WORDS, *FIRST, *LAST, *CITIES, *JOBS, *PLACES, *DAYS, *CONDITIONS, *TREATMENTS.values()):
        if word not in words:
            words.append(word)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")


def small_gpt2(vocab_size: int, args: argparse.Namespace):
    """A small GPT-2 (random init, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=args.d_model, n_layer=args.layers,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config)


class Encoder:
    """Text → token ids, with secrets' digits as one token each (so every candidate can be scored exactly)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start = [] if start is None else [start]
        self.digits = [self._digit_token(d) for d in range(10)]

    def _digit_token(self, digit: int) -> int:
        """The token of " d" or "d" (the canaries are built from these ids, in training and in scoring)."""
        for text in (f" {digit}", f"{digit}"):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                return ids[0]
        token = self.tokenizer.convert_tokens_to_ids(str(digit))
        if token is None or token == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no single token for the digit {digit}; this example needs one "
                             "token per digit to rank every candidate secret.")
        return token

    def text(self, text: str) -> List[int]:
        return self.start + self.tokenizer.encode(text, add_special_tokens=False)

    def canary_prefix(self, canary: Canary) -> List[int]:
        return self.text(canary.prefix)

    def canary(self, canary: Canary) -> List[int]:
        tail = self.tokenizer.encode(" .", add_special_tokens=False)
        return self.canary_prefix(canary) + [self.digits[d] for d in canary.secret] + tail


def to_dataset(sequences: Sequence[List[int]]) -> TensorDataset:
    """Right-padded ids and a mask of the real tokens (causal attention: padding on the right never
    reaches a real token, so no attention mask is needed)."""
    length = max(map(len, sequences))
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    return TensorDataset(ids, mask)


def per_sample_nll(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of each sequence, and its number of predicted tokens."""
    logits = model(input_ids=ids).logits[:, :-1]
    targets, weight = ids[:, 1:], mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * weight).sum(dim=1), weight.sum(dim=1)


class CausalLM(L.LightningModule):
    """Causal LM training on (ids, mask) batches, AdamW with a cosine schedule; nothing in it knows about
    privacy.

    The loss is the mean over sequences of each sequence's mean token loss: one term per sample, as DP-SGD's
    per-sample clipping needs (a token mean over the whole batch would tie samples together).
    """

    def __init__(self, model: torch.nn.Module, lr: float, total_steps: int) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.total_steps = total_steps

    def training_step(self, batch, batch_idx):
        ids, mask = batch
        nll, count = per_sample_nll(self.model, ids, mask)
        loss = (nll / count.clamp(min=1)).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr,
                                      weight_decay=0.0)
        total = max(1, self.total_steps)
        cosine = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t / total, 1))))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def _trainer(epochs: int, strategy="auto", callbacks=(), log_dir: str = "lightning_logs/finetune_lm_lora",
             accelerator: str = "cpu", progress: bool = False) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, strategy=strategy, callbacks=list(callbacks), accelerator=accelerator,
                     devices=1, logger=False, default_root_dir=log_dir, enable_checkpointing=False,
                     enable_progress_bar=progress, enable_model_summary=False)


def with_lora(model: torch.nn.Module, args: argparse.Namespace):
    """A fresh PEFT copy of ``model`` with LoRA adapters; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_targets if args.lora_targets else (None if args.model else ["c_attn", "c_proj", "c_fc"])
    config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                        target_modules=targets, fan_in_fan_out=args.model is None, task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(model), config)


# ---------------------------------------------------------------------------------------------------------
# Evaluation: perplexity and exposure
# ---------------------------------------------------------------------------------------------------------
def _rows_per_chunk(model: torch.nn.Module, length: int) -> int:
    """Sequences per forward pass so that the logits stay under 2^26 numbers (256 MB in float32)."""
    return max(1, 2**26 // (length * model.config.vocab_size))


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: TensorDataset) -> float:
    """exp(mean next-token loss) over all real tokens of ``data``."""
    model.eval()
    total, count = 0.0, 0.0
    for ids, mask in DataLoader(data, batch_size=_rows_per_chunk(model, data.tensors[0].shape[1])):
        nll, n = per_sample_nll(model, ids.to(model.device), mask.to(model.device))
        total, count = total + nll.sum().item(), count + n.sum().item()
    return math.exp(total / count)


@torch.no_grad()
def candidate_log_perplexities(model: torch.nn.Module, prefix: List[int], encoder: Encoder) -> torch.Tensor:
    """−log P(candidate | prefix) for every candidate secret, indexed by the candidate read as a number.

    One forward pass per (n−1)-digit stem gives the probabilities of its digits and of all ten last digits:
    10^(n−1) sequences score all 10^n candidates exactly.
    """
    model.eval()
    digits = torch.tensor(encoder.digits, device=model.device)
    stems = torch.tensor(list(itertools.product(range(10), repeat=SECRET_DIGITS - 1)), device=model.device)
    start = len(prefix) - 1  # the logits at this position predict the first digit
    scores = []
    for rows in stems.split(_rows_per_chunk(model, len(prefix) + SECRET_DIGITS - 1)):
        ids = torch.cat([torch.tensor(prefix, device=model.device).expand(len(rows), -1), digits[rows]], dim=1)
        logp = model(input_ids=ids).logits[:, start:].float().log_softmax(-1)[..., digits]  # (rows, n, 10)
        stem = logp[:, :-1].gather(2, rows.unsqueeze(2)).squeeze(2).sum(1)  # log P(d1..d(n-1) | prefix)
        scores.append(-(stem.unsqueeze(1) + logp[:, -1]).reshape(-1))  # (rows · 10,), last digit fastest
    return torch.cat(scores).cpu()


def exposure(model: torch.nn.Module, canary: Canary, encoder: Encoder) -> float:
    """log2 |R| − log2 rank of the canary's secret among all |R| candidates (rank 1 = most likely).

    Ties are ranked in the secret's favour (``1 + #candidates strictly more likely``).
    """
    scores = candidate_log_perplexities(model, encoder.canary_prefix(canary), encoder)
    secret = int("".join(map(str, canary.secret)))
    rank = 1 + int((scores < scores[secret]).sum())
    return math.log2(scores.numel()) - math.log2(rank)


# ---------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------
def build_data(encoder: Encoder, args: argparse.Namespace, rng: np.random.Generator):
    """Public corpus, private training records with canaries, held-out private records."""
    people = directory(rng)
    public = [encoder.text(t) for t in public_corpus(args.public_size, people, rng)]
    canaries = make_canaries(people, rng)
    records = [encoder.text(private_record(people, rng)) for _ in range(args.private_size)]
    records += [encoder.canary(c) for c in canaries for _ in range(c.insertions)]
    records = [records[i] for i in rng.permutation(len(records))]
    held_out = [encoder.text(private_record(people, rng)) for _ in range(args.held_out_size)]
    unknown = encoder.tokenizer.unk_token_id
    if unknown is not None and any(unknown in seq for seq in (*public, *records, *held_out)):
        raise ValueError("A word of the generated text is missing from the vocabulary (add it to WORDS).")
    return to_dataset(public), to_dataset(records), to_dataset(held_out), canaries


def evaluate(name: str, model: torch.nn.Module, held_out: TensorDataset, canaries: List[Canary],
             encoder: Encoder, **extra) -> Dict[str, object]:
    """Held-out perplexity and the exposure of every canary."""
    result = {"run": name, "held_out_perplexity": perplexity(model, held_out),
              "exposure": [exposure(model, c, encoder) for c in canaries], **extra}
    result["mean_exposure"] = float(np.mean(result["exposure"]))
    return result


def load_or_build(args: argparse.Namespace):
    """The tokenizer and the public starting point: ``--model`` from Hugging Face, else a fresh small GPT-2."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoTokenizer.from_pretrained(args.model), AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = word_tokenizer()
    return tokenizer, small_gpt2(len(tokenizer), args)


def fine_tune(base: torch.nn.Module, private: TensorDataset, args: argparse.Namespace, dp: bool):
    """LoRA on a copy of ``base``: plain Lightning, or the same Trainer with the DP strategy and budget."""
    L.seed_everything(args.seed, workers=True)  # the same adapters' initialisation and data order in both runs
    lora = with_lora(base, args)
    loader = DataLoader(private, batch_size=args.batch_size, shuffle=True)
    model = CausalLM(lora, lr=args.lr, total_steps=args.epochs * len(loader))  # Poisson sampling: as many steps
    if dp:
        strategy = DPStrategy(target_epsilon=args.epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
                              secure_mode=args.secure, seed=None if args.secure else args.seed)
        callbacks = [PrivacyBudgetCallback(epsilon_budget=args.epsilon, delta=args.delta)]
    else:
        strategy, callbacks = "auto", []
    trainer = _trainer(args.epochs, strategy, callbacks, accelerator=args.accelerator, progress=args.progress_bar)
    trainer.fit(model, loader)
    facts = {"steps": trainer.global_step, "epsilon": trainer.strategy.get_epsilon(args.delta) if dp else math.inf}
    if dp:
        facts["noise_multiplier"] = trainer.strategy.noise_multiplier
    return lora, facts


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Pretrain (public), fine-tune twice (private), evaluate all three models; the summary as a dict."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    tokenizer, base = load_or_build(args)
    encoder = Encoder(tokenizer)
    public, private, held_out, canaries = build_data(encoder, args, np.random.default_rng(args.seed))

    if not args.model:  # 1. public pretraining, non-private: the public corpus is public
        loader = DataLoader(public, batch_size=args.batch_size, shuffle=True)
        model = CausalLM(base, lr=args.pretrain_lr, total_steps=args.pretrain_epochs * len(loader))
        _trainer(args.pretrain_epochs, accelerator=args.accelerator, progress=args.progress_bar).fit(model, loader)
    base.requires_grad_(False)
    runs = [evaluate("public model", base, held_out, canaries, encoder, epsilon=None)]
    timings = {"public_model_s": time.perf_counter() - started}

    for dp in (False, True):  # 2. LoRA fine-tuning on the private records, without and with DP
        t0 = time.perf_counter()
        lora, facts = fine_tune(base, private, args, dp)
        timings[f"{'dp' if dp else 'non_private'}_fit_s"] = time.perf_counter() - t0
        name = f"DP (ε = {args.epsilon:g})" if dp else "non-private"
        runs.append(evaluate(name, lora, held_out, canaries, encoder, **facts))  # 3. evaluation
    timings["total_s"] = time.perf_counter() - started

    return {
        "model": args.model or f"GPT-2, {args.layers} layers, d={args.d_model}, vocabulary {len(tokenizer)}",
        "parameters": sum(p.numel() for p in lora.parameters()),
        "trainable_lora_parameters": sum(p.numel() for p in lora.parameters() if p.requires_grad),
        "delta": args.delta, "target_epsilon": args.epsilon, "secret_space": 10 ** SECRET_DIGITS,
        "max_exposure": math.log2(10 ** SECRET_DIGITS),
        "public_records": len(public), "private_records": len(private), "held_out_records": len(held_out),
        "canaries": [{"prefix": c.prefix, "secret": " ".join(map(str, c.secret)), "insertions": c.insertions}
                     for c in canaries],
        "runs": runs, "timings": timings, "seed": args.seed,
    }


def plot(summary: Dict[str, object], out: Path) -> None:
    """Exposure per canary (by insertions) for each run; held-out perplexity per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    insertions = [c["insertions"] for c in summary["canaries"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(runs)
    colors = ["0.6", "C3", "C0"]
    for i, (r, color) in enumerate(zip(runs, colors)):
        xs = np.arange(len(insertions)) + (i - (len(runs) - 1) / 2) * width
        left.bar(xs, r["exposure"], width, color=color, label=r["run"])
    left.axhline(summary["max_exposure"], color="k", ls=":", lw=1, label="maximum (secret ranked 1st)")
    left.set_xticks(np.arange(len(insertions)), [f"{k}×" for k in insertions])
    left.set_xlabel("times the canary is in the private data")
    left.set_ylabel("exposure (bits)")
    left.set_title(f"Planted secrets: exposure (|R| = 10^{SECRET_DIGITS})")
    left.legend(loc="upper left", fontsize=8)
    names = [r["run"] for r in runs]
    right.bar(np.arange(len(runs)), [r["held_out_perplexity"] for r in runs], color=colors[: len(runs)])
    right.set_xticks(np.arange(len(runs)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("held-out perplexity (log scale)")
    right.set_title("Private-style held-out records")
    for i, r in enumerate(runs):
        right.annotate(f"{r['held_out_perplexity']:.2f}", (i, r["held_out_perplexity"]), ha="center", va="bottom",
                       fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _epsilon_text(epsilon: Optional[float]) -> str:
    return "-" if epsilon is None else ("∞" if math.isinf(epsilon) else f"{epsilon:.3f}")


def print_table(summary: Dict[str, object]) -> None:
    """One column per model: perplexity, ε, each canary's exposure, the mean exposure."""
    runs = summary["runs"]
    print(f"{'':28}" + "".join(f"{r['run']:>16}" for r in runs))
    print(f"{'held-out perplexity':28}" + "".join(f"{r['held_out_perplexity']:>16.3f}" for r in runs))
    print(f"{'ε (δ = %g)' % summary['delta']:28}" + "".join(f"{_epsilon_text(r['epsilon']):>16}" for r in runs))
    for i, canary in enumerate(summary["canaries"]):
        label = f"exposure, canary ×{canary['insertions']}"
        print(f"{label:28}" + "".join(f"{r['exposure'][i]:>16.2f}" for r in runs))
    print(f"{'mean exposure (bits)':28}" + "".join(f"{r['mean_exposure']:>16.2f}" for r in runs))
    print(f"(maximum exposure {summary['max_exposure']:.2f} bits; a secret ranked like any other: ≈1.4 bits "
          "on average)")


def _json_ready(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0, help="privacy budget ε of the DP fine-tuning")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (both runs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="fine-tuning learning rate (AdamW, both runs)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-targets", nargs="+", default=None,
                        help="module names for LoRA (default: GPT-2's c_attn c_proj c_fc; PEFT's default with --model)")
    parser.add_argument("--private-size", type=int, default=500, help="private records, before the canaries")
    parser.add_argument("--held-out-size", type=int, default=1000)
    parser.add_argument("--public-size", type=int, default=6000)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=2, help="built-in model: GPT-2 blocks")
    parser.add_argument("--d-model", type=int, default=128, help="built-in model: width")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face causal LM (local folder, or a hub name, which transformers downloads) "
                             "as the public starting point instead of the built-in pretraining")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the built-in model is small: one is as fast, and on a busy "
                             "machine much faster than several)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--secure", action="store_true", help="cryptographically secure noise (no seed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG; the JSON summary goes next to it")
    parser.add_argument("--progress-bar", action="store_true")
    args = parser.parse_args(argv)

    summary = run(args)
    print_table(summary)
    plot(summary, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(_json_ready(summary), indent=2) + "\n")
    print(f"total {summary['timings']['total_s']:.0f} s; wrote {args.out} and {args.out.with_suffix('.json')}")
    return summary


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning_dp").setLevel(logging.WARNING)
    main()
