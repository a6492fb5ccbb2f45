"""Secrets a user repeats: record-level against user-level DP at the same ε.

    python examples/user_level_secrets.py                  # offline, about 3 minutes on 2 CPU cores
    python examples/user_level_secrets.py --seeds 0 1      # more seeds (one table per seed, all in the plot)
    python examples/user_level_secrets.py --epsilon 4      # another budget

The private data belong to **users**, each with several records (clinic notes they wrote). A few users, the
**secret owners**, repeat one secret in many of their records: "the secret code of <name> is d d d d" in 16 of
their 20 records. The same small GPT-2 (pretrained on a generated public corpus, as in
``finetune_lm_lora.py``, whose pieces this script imports) is then fine-tuned with LoRA three times on the
same records, for the same number of steps, at the same sampling rate:

* **non-private**: plain Lightning, the reference (does this set-up memorise the secrets at all?);
* **record-level DP**: ``DPStrategy(target_epsilon=ε)``: ε protects one record;
* **user-level DP**: ``DPStrategy(target_epsilon=ε, privacy_unit="user", user_ids=..., max_records_per_user=k)``:
  the same ε protects one user with all of their records (at most ``k`` of them used per step).

Each planted secret's **exposure** (Carlini et al. 2019, *The Secret Sharer*) is
``log2 |R| − log2 rank(secret)`` among all ``|R| = 10^4`` four-digit candidates, ranked by the model's
log-perplexity of "<prefix> <candidate>". Every candidate is scored (an exact rank; no sampling of candidates):
the maximum is log2 10^4 = 13.3 bits (the secret is the model's first choice); a secret ranked like any other
candidate has about 1.4 bits on average. The public model (before any fine-tuning) is shown as the chance level
of these very secrets.

For a secret owner, record-level ε gives only group privacy over their 20 records (``20·ε``, with a δ that is
1 at these ε: no guarantee); user-level ε covers them as one unit. See the docs page "User-level privacy".

Writes a PNG (matplotlib, Agg) and the numbers as JSON next to it, and prints a markdown table per seed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling example, imported for its pieces
from finetune_lm_lora import (  # noqa: E402
    _json_ready,
    SECRET_DIGITS, Canary, CausalLM, Encoder, directory, exposure, perplexity, private_record, public_corpus,
    small_gpt2, to_dataset, with_lora, word_tokenizer)

from lightning_dp import DPStrategy  # noqa: E402
from lightning_dp.report import group_privacy  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "_static" / "user_level_secrets.png"
SETTINGS = ("non-private", "record-level DP", "user-level DP")
REFERENCE = "public model (no fine-tuning)"
"""The chance level: the same secrets' exposure under the model that never saw them."""


# ---------------------------------------------------------------------------------------------------------
# The data: users with several records each; a few owners repeat a secret
# ---------------------------------------------------------------------------------------------------------
def build_data(encoder: Encoder, args: argparse.Namespace, rng: np.random.Generator):
    """Public corpus; private records with one user id per record; held-out notes; the owners' canaries.

    Ordinary users write ``min_records``..``max_records`` clinic notes. Each secret owner writes
    ``owner_records`` records, ``repeats`` of which are their secret (the others are ordinary notes).
    """
    people = directory(rng)
    public = [encoder.text(t) for t in public_corpus(args.public_size, people, rng)]
    owners = rng.choice(len(people), size=args.owners, replace=False)
    canaries = [Canary(f"the secret code of {people[i].name} is",
                       tuple(int(d) for d in rng.integers(0, 10, size=SECRET_DIGITS)), args.repeats)
                for i in owners]
    records: List[List[int]] = []
    user_ids: List[int] = []
    for user in range(args.users):
        for _ in range(rng.integers(args.min_records, args.max_records + 1)):
            records.append(encoder.text(private_record(people, rng)))
            user_ids.append(user)
    for j, canary in enumerate(canaries):  # the owners are users args.users, args.users + 1, ...
        for i in range(args.owner_records):
            records.append(encoder.canary(canary) if i < args.repeats else encoder.text(private_record(people, rng)))
            user_ids.append(args.users + j)
    order = rng.permutation(len(records))
    records, user_ids = [records[i] for i in order], [user_ids[i] for i in order]
    held_out = [encoder.text(private_record(people, rng)) for _ in range(args.held_out_size)]
    return to_dataset(public), to_dataset(records), user_ids, to_dataset(held_out), canaries


# ---------------------------------------------------------------------------------------------------------
# Training: three fine-tunings with the same steps, sampling rate, optimizer and seed
# ---------------------------------------------------------------------------------------------------------
def _trainer(args: argparse.Namespace, strategy="auto", max_steps: int = -1, max_epochs: Optional[int] = None):
    return L.Trainer(max_steps=max_steps, max_epochs=max_epochs, strategy=strategy, accelerator="cpu", devices=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=args.progress_bar,
                     enable_model_summary=False, default_root_dir="lightning_logs/user_level_secrets")


def fine_tune(base: torch.nn.Module, private: TensorDataset, user_ids: List[int], setting: str,
              args: argparse.Namespace, seed: int) -> Tuple[torch.nn.Module, Dict[str, object]]:
    """LoRA on a copy of ``base`` for ``args.steps`` steps: non-private, record-level or user-level DP.

    Both DP runs sample at the same rate ``q``: ``batch_size / N_records`` records, or
    ``users_per_batch / N_users`` users with ``users_per_batch = q · N_users`` (the same expected share of the
    data per step). Same ε, δ, steps and q: the same σ.
    """
    L.seed_everything(seed, workers=True)  # the same adapters' initialisation in every run
    lora = with_lora(base, args)
    num_users = len(set(user_ids))
    facts: Dict[str, object] = {"steps": args.steps}
    if setting == "user-level DP":
        users_per_batch = max(1, round(args.batch_size * num_users / len(private)))
        loader = DataLoader(private, batch_size=users_per_batch)
        strategy = DPStrategy(target_epsilon=args.epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
                              seed=seed, privacy_unit="user", user_ids=user_ids,
                              max_records_per_user=args.max_records_per_user)
        facts.update(unit="user", sample_rate=users_per_batch / num_users, expected_batch=f"{users_per_batch} users")
    elif setting == "record-level DP":  # user_ids only for the report's group privacy
        loader = DataLoader(private, batch_size=args.batch_size)
        strategy = DPStrategy(target_epsilon=args.epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
                              seed=seed, user_ids=user_ids)
        facts.update(unit="record", sample_rate=args.batch_size / len(private),
                     expected_batch=f"{args.batch_size} records")
    else:
        loader = DataLoader(private, batch_size=args.batch_size, shuffle=True)
        strategy = "auto"
        facts.update(unit="-", sample_rate=args.batch_size / len(private), expected_batch=f"{args.batch_size} records")
    model = CausalLM(lora, lr=args.lr, total_steps=args.steps)
    trainer = _trainer(args, strategy, max_steps=args.steps, max_epochs=-1)
    trainer.fit(model, loader)
    assert trainer.global_step == args.steps, (setting, trainer.global_step)
    if strategy != "auto":
        facts["epsilon"] = trainer.strategy.get_epsilon(args.delta)
        facts["noise_multiplier"] = trainer.strategy.noise_multiplier
    else:
        facts["epsilon"] = math.inf
    return lora, facts


def evaluate(name: str, model: torch.nn.Module, held_out: TensorDataset, canaries: List[Canary],
             encoder: Encoder, **facts) -> Dict[str, object]:
    """Held-out perplexity, every owner's secret's exposure, their mean and maximum."""
    exposures = [exposure(model, c, encoder) for c in canaries]
    return {"run": name, **facts, "held_out_perplexity": perplexity(model, held_out), "exposure": exposures,
            "mean_exposure": float(np.mean(exposures)), "max_exposure": float(np.max(exposures))}


def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, object]:
    """Data and secrets from ``seed``; pretraining; the three fine-tunings; the evaluation."""
    started = time.perf_counter()
    L.seed_everything(seed, workers=True)
    tokenizer = word_tokenizer()
    encoder = Encoder(tokenizer)
    base = small_gpt2(len(tokenizer), args)
    public, private, user_ids, held_out, canaries = build_data(encoder, args, np.random.default_rng(seed))

    loader = DataLoader(public, batch_size=64, shuffle=True)  # public pretraining: not private
    model = CausalLM(base, lr=args.pretrain_lr, total_steps=args.pretrain_epochs * len(loader))
    _trainer(args, max_epochs=args.pretrain_epochs).fit(model, loader)
    base.requires_grad_(False)
    runs = [evaluate(REFERENCE, base, held_out, canaries, encoder, steps=0, epsilon=None)]
    timings = {"pretraining_s": time.perf_counter() - started}
    for setting in SETTINGS:
        t0 = time.perf_counter()
        lora, facts = fine_tune(base, private, user_ids, setting, args, seed)
        timings[f"{setting}_fit_s"] = time.perf_counter() - t0
        runs.append(evaluate(setting, lora, held_out, canaries, encoder, **facts))
    timings["total_s"] = time.perf_counter() - started
    record_level = next(r for r in runs if r["run"] == "record-level DP")
    owner_group = group_privacy(record_level["epsilon"], args.delta, args.owner_records)
    return {"seed": seed, "records": len(private), "users": len(set(user_ids)), "runs": runs, "timings": timings,
            "owner_group_privacy_under_record_level": {k: owner_group[k] for k in ("group_size", "epsilon", "delta")},
            "secrets": [{"prefix": c.prefix, "secret": " ".join(map(str, c.secret))} for c in canaries]}


# ---------------------------------------------------------------------------------------------------------
# Output: a markdown table per seed and one plot
# ---------------------------------------------------------------------------------------------------------
def _epsilon_text(run: Dict[str, object]) -> str:
    eps = run["epsilon"]
    if eps is None:
        return "-"
    return "∞" if math.isinf(eps) else f"{eps:.2f} per {run['unit']}"


def markdown_table(result: Dict[str, object], delta: float) -> str:
    """One row per model: ε (its unit), σ, expected batch, held-out perplexity, mean and max exposure."""
    lines = [f"| seed {result['seed']} | ε (δ = {delta:g}) | σ | expected batch | held-out perplexity | "
             "mean exposure (bits) | max exposure (bits) |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        sigma = f"{r['noise_multiplier']:.3f}" if "noise_multiplier" in r else "-"
        lines.append(f"| {r['run']} | {_epsilon_text(r)} | {sigma} | {r.get('expected_batch', '-')} | "
                     f"{r['held_out_perplexity']:.2f} | {r['mean_exposure']:.2f} | {r['max_exposure']:.2f} |")
    return "\n".join(lines)


def plot(summary: Dict[str, object], out: Path) -> None:
    """Each secret's exposure per model (a dot per secret and seed, a bar at the mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [REFERENCE, *SETTINGS]
    colors = ["0.6", "C3", "C1", "C0"]
    markers = "os^Dv"
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (name, color) in enumerate(zip(names, colors)):
        values = []
        for s, result in enumerate(summary["results"]):
            run = next(r for r in result["runs"] if r["run"] == name)
            xs = i + np.linspace(-0.25, 0.25, len(run["exposure"])) + (s - (len(summary["results"]) - 1) / 2) * 0.06
            ax.scatter(xs, run["exposure"], color=color, edgecolor="k", linewidth=0.5, zorder=3,
                       marker=markers[s % len(markers)], label=f"seed {result['seed']}" if i == 0 else None)
            values += run["exposure"]
        ax.bar(i, np.mean(values), 0.7, color=color, alpha=0.35, zorder=2)
        ax.annotate(f"mean {np.mean(values):.1f}", (i, np.mean(values)), ha="center", va="bottom", fontsize=8)
    ax.axhline(summary["max_exposure"], color="k", ls=":", lw=1)
    ax.annotate("maximum (secret ranked first)", (len(names) - 0.5, summary["max_exposure"]), ha="right",
                va="bottom", fontsize=8)
    labels = [REFERENCE.replace(" (", "\n("), "non-private", f"record-level DP\nε = {summary['epsilon']:g} per record",
              f"user-level DP\nε = {summary['epsilon']:g} per user"]
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_ylabel("exposure (bits)")
    ax.set_ylim(0, summary["max_exposure"] + 1.5)
    ax.set_title(f"Secrets repeated in {summary['repeats']} of their owner's {summary['owner_records']} records "
                 f"({summary['steps']} steps, δ = {summary['delta']:g}, k = {summary['max_records_per_user']})",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=8.0, help="ε of both DP runs (per record, per user)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every fine-tuning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full experiment per seed")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="expected records per step (user-level: the same share of users, q·N_users)")
    parser.add_argument("--max-records-per-user", type=int, default=8, help="k of the user-level run")
    parser.add_argument("--users", type=int, default=200, help="ordinary users")
    parser.add_argument("--min-records", type=int, default=2, help="records of an ordinary user, at least")
    parser.add_argument("--max-records", type=int, default=10, help="records of an ordinary user, at most")
    parser.add_argument("--owners", type=int, default=4, help="secret owners (each with their own secret)")
    parser.add_argument("--owner-records", type=int, default=20, help="records of a secret owner")
    parser.add_argument("--repeats", type=int, default=16, help="of the owner's records, how many hold the secret")
    parser.add_argument("--lr", type=float, default=1e-2, help="fine-tuning learning rate (AdamW, every run)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--held-out-size", type=int, default=500)
    parser.add_argument("--public-size", type=int, default=6000)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 blocks")
    parser.add_argument("--d-model", type=int, default=128, help="GPT-2 width")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG; the JSON summary goes next to it")
    parser.add_argument("--progress-bar", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.repeats <= args.owner_records:
        parser.error(f"--repeats must be in 1..--owner-records ({args.owner_records}), got {args.repeats}")
    args.model, args.lora_targets = None, None  # what finetune_lm_lora.with_lora reads: the built-in GPT-2
    torch.set_num_threads(args.threads)

    results = []
    for seed in args.seeds:
        result = run_seed(args, seed)
        results.append(result)
        group = result["owner_group_privacy_under_record_level"]
        print(f"\n{result['records']} records of {result['users']} users ({args.owners} secret owners, each with "
              f"{args.repeats} of {args.owner_records} records holding the secret), {args.steps} steps, "
              f"k = {args.max_records_per_user}\n")
        print(markdown_table(result, args.delta))
        print(f"\nRecord-level ε for a secret owner (group privacy, {group['group_size']} records): "
              f"ε = {group['epsilon']:.1f}, δ = {group['delta']:.3g}. Maximum exposure "
              f"{math.log2(10 ** SECRET_DIGITS):.2f} bits. Seed {seed}: {result['timings']['total_s']:.0f} s.")
    summary = {"epsilon": args.epsilon, "delta": args.delta, "steps": args.steps, "batch_size": args.batch_size,
               "max_records_per_user": args.max_records_per_user, "owners": args.owners,
               "owner_records": args.owner_records, "repeats": args.repeats, "users": args.users,
               "records_per_ordinary_user": [args.min_records, args.max_records], "lr": args.lr,
               "max_grad_norm": args.max_grad_norm, "model": f"GPT-2, {args.layers} layers, d={args.d_model}",
               "lora_rank": args.lora_rank, "max_exposure": math.log2(10 ** SECRET_DIGITS), "results": results}
    plot(summary, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(_json_ready(summary), indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return summary


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning_dp").setLevel(logging.WARNING)
    main()
