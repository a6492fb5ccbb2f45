"""Step time and peak memory of DP-SGD: non-private, lightning_dp (auto, materialize), Opacus 1.6.

    python benchmarks/step_time.py [--repeats 15] [--models cnn,mlp,tf64,tf256,gpt2,gpt2-lora] [--methods ...]
                                   [--no-memory] [--device cuda]

Models ``gpt2-ac`` and ``gpt2-lora-ac`` are the GPT-2-shaped rows with activation checkpointing on (Hugging
Face's ``gradient_checkpointing_enable()``): compare their peak memory with ``gpt2`` and ``gpt2-lora``.

Times: every method's training step (zero_grad, forward, loss, backward, optimizer step incl. noise)
on the same model weights and the same batch, interleaved round by round in one process; the table
shows medians and ratios to the non-private step. In each round every method runs two steps and only
the second is timed: the first after another method's step pays for the allocator's state that method
left (glibc returns freed gigabytes to the OS, so a step right after Opacus's can spend more than its
own compute on page faults: a non-private transformer step measured 2.2 s there, 0.9 s otherwise). ``ours-auto-no-noise`` is our default with σ = 0:
the same step without the Gaussian draw, to show how much of the overhead is clipping and how much is
noise (which every DP-SGD implementation pays: one normal per parameter per step). ``ours-auto-secure``
is our default with ``secure_mode=True`` (noise from :class:`~lightning_dp.noise.SecureRNG`); after the
table, its time is also given as a ratio to the seeded ``ours-auto`` step.

Memory: each method runs in a fresh subprocess that tracks every tensor allocation and free
(``torch.profiler``, ``profile_memory=True``) from before the model is built; "peak MB" is the most tensor
memory live at once during 3 steps after a warm-up step (model, optimizer state, batch, activations,
gradients, per-sample state: what ``torch.cuda.max_memory_allocated`` counts on a GPU), its ratio is to the
non-private peak, and "step +" is the peak minus what was live just before the 3 steps. (Resident set size is
not used: the C allocator keeps and reuses freed pages, so RSS misses most of a step's temporaries.)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")
SIGMA, C = 1.0, 1.0


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 5000, d: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(idx)))


class GPT2Logits(nn.Module):
    """A GPT-2-shaped causal LM built from a config (random init, offline): 6 layers, d=384, 6 heads,
    vocabulary 8192, tied input/output embeddings; ``lora=True`` freezes it and adds PEFT LoRA (r=8) to the
    attention and MLP projections; ``checkpointing=True`` turns on Hugging Face's activation checkpointing
    of every block (``gradient_checkpointing_enable()``, its default: non-reentrant since transformers 5).
    Returns the logits."""

    def __init__(self, lora: bool = False, checkpointing: bool = False) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=128,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                            eos_token_id=0)
        model = GPT2LMHeadModel(config)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=True,
                                                     target_modules=["c_attn", "c_proj", "c_fc"]))
        if checkpointing:
            model.gradient_checkpointing_enable()  # frozen embeddings (LoRA): inputs made to require grad too
        self.lm = model.train()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=idx).logits


def models() -> Dict[str, Tuple[str, Callable[[], nn.Module], Callable[[], tuple]]]:
    def cnn() -> nn.Module:  # the Opacus MNIST tutorial CNN
        return nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
        )

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def lm_batch(b: int) -> Callable[[], tuple]:
        return lambda: (torch.randint(0, 5000, (b, 64)), torch.randint(0, 5000, (b, 64)))

    def gpt2_batch() -> tuple:
        return torch.randint(0, 8192, (8, 128)), torch.randint(0, 8192, (8, 128))

    return {
        "gpt2": ("GPT-2-shaped LM (6×384, V=8192), full fine-tuning, T=128, B=8", GPT2Logits, gpt2_batch),
        "gpt2-lora": ("GPT-2-shaped LM (6×384, V=8192), LoRA r=8, T=128, B=8", lambda: GPT2Logits(lora=True),
                      gpt2_batch),
        "gpt2-ac": ("GPT-2-shaped LM (6×384, V=8192), full fine-tuning, activation checkpointing, T=128, B=8",
                    lambda: GPT2Logits(checkpointing=True), gpt2_batch),
        "gpt2-lora-ac": ("GPT-2-shaped LM (6×384, V=8192), LoRA r=8, activation checkpointing, T=128, B=8",
                         lambda: GPT2Logits(lora=True, checkpointing=True), gpt2_batch),
        "cnn": ("tutorial CNN, MNIST, B=256", cnn, lambda: (torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))),
        "mlp": ("MLP 784-512-512-10, B=256", mlp, lambda: (torch.randn(256, 784), torch.randint(0, 10, (256,)))),
        "tf64": ("1-block transformer, T=64, B=64", TinyTransformer, lm_batch(64)),
        "tf256": ("1-block transformer, T=64, B=256", TinyTransformer, lm_batch(256)),
    }


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(method: str, model: nn.Module, batch: tuple, device: str = "cpu") -> Callable[[], None]:
    """One training step of ``method`` on ``model`` (changed in place, moved to ``device``) and ``batch``."""
    model = model.to(device)
    x, y = (t.to(device) for t in batch)
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    n = x.shape[0]
    if method == "non-private":
        def step() -> None:
            base.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            base.step()
        return step
    if method.startswith("ours"):
        from lightning_dp import make_private

        mode = method.split("-")[1]
        sigma = 0.0 if method.endswith("-no-noise") else SIGMA  # σ = 0: the clipping alone, no noise draw
        secure = method.endswith("-secure")  # SecureRNG, keyed from the OS: no seed
        opt = make_private(model, base, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=n,
                           seed=None if secure else 0, secure_mode=secure, clipping_mode=mode)

        def step() -> None:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return step
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    mode = method.split("-", 1)[1]
    model = ModuleValidator.fix(model)  # nn.MultiheadAttention → Opacus's DPMultiheadAttention (same weights)
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    engine = PrivacyEngine()
    kwargs = dict(module=model, optimizer=base, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=C,
                  poisson_sampling=False, grad_sample_mode=mode)
    if mode == "ghost":
        criterion = nn.CrossEntropyLoss()
        wrapped, opt, criterion, _ = engine.make_private(criterion=criterion, **kwargs)
        crit = lambda out, t: criterion(out.reshape(-1, out.shape[-1]), t.reshape(-1), shape=out.shape)  # noqa: E731
    else:
        wrapped, opt, _ = engine.make_private(**kwargs)
        crit = loss_fn

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        crit(wrapped(x), y).backward()
        opt.step()
    return step


def available_methods() -> List[str]:
    methods = ["non-private", "ours-auto", "ours-auto-secure", "ours-auto-no-noise", "ours-materialize"]
    try:
        import opacus  # noqa: F401

        methods += ["opacus-hooks", "opacus-functorch", "opacus-ghost"]
    except ImportError:
        pass
    return methods


def time_model(key: str, methods: List[str], repeats: int, device: str = "cpu") -> Dict[str, float]:
    dev = torch.device(device)
    _, make_model, make_batch = models()[key]
    torch.manual_seed(0)
    model, batch = make_model(), make_batch()
    steps = {}
    for m in methods:
        try:
            steps[m] = make_step(m, copy.deepcopy(model), batch, device)
            steps[m]()  # warm-up
            steps[m]()
        except Exception as err:  # noqa: BLE001  (a baseline that cannot run this model is reported, not fatal)
            print(f"  {m} on {key}: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)
            steps.pop(m, None)
    times: Dict[str, List[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for m, step in steps.items():
            step()  # untimed: settles the allocator after the previous method's step
            _sync(dev)
            start = time.perf_counter()
            step()
            _sync(dev)
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def memory_child(key: str, method: str, device: str = "cpu") -> None:
    """Print ``[peak, rise]`` in MB for 3 steps of ``method`` after one warm-up step (fresh process).

    Every tensor allocation is tracked from before the model is built (``torch.profiler`` with
    ``profile_memory``: the CPU allocator reports each allocation and free), so the live total is exact:
    ``peak`` is its maximum during the 3 steps (model, optimizer state, batch, activations, gradients and
    per-sample state: what ``torch.cuda.max_memory_allocated`` counts on a GPU), ``rise`` the peak minus
    what was live just before them. On CUDA the allocator's own statistics give the same two numbers.
    """
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    _, make_model, make_batch = models()[key]
    torch.manual_seed(0)
    if torch.device(device).type == "cuda":
        step = make_step(method, make_model(), make_batch(), device)
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        print(json.dumps([peak / 2**20, (peak - before) / 2**20]))
        return
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = make_step(method, make_model(), make_batch())
        step()  # first step allocates optimizer state and lazy buffers; measure the steady state
        with record_function("measured_steps"):
            for _ in range(3):
                step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    window = next(e for e in events if e.get("name") == "measured_steps" and "dur" in e)
    start, end = window["ts"], window["ts"] + window["dur"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events if e.get("name") == "[memory]")
    before = next((total for ts, total in reversed(memory) if ts < start), 0)
    peak = max([total for ts, total in memory if start <= ts <= end] + [before])
    print(json.dumps([peak / 2**20, (peak - before) / 2**20]))


def peak_memory(key: str, method: str, device: str = "cpu") -> Tuple[float, float]:
    """``(peak MB, rise MB)`` of ``method`` on ``key``, measured in a fresh subprocess."""
    command = [sys.executable, __file__, "--memory-child", key, method, "--device", device]
    out = subprocess.run(command, capture_output=True, text=True)
    try:
        peak, rise = json.loads(out.stdout.strip().splitlines()[-1])
        return float(peak), float(rise)
    except (ValueError, IndexError, TypeError):
        return float("nan"), float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default="cnn,mlp,tf64,tf256,gpt2,gpt2-lora")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA: times synchronised, "
                        "memory from torch.cuda.max_memory_allocated)")
    parser.add_argument("--memory-child", nargs=2)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, device=args.device)
        return
    methods = available_methods()
    if args.methods:
        unknown = sorted(set(args.methods.split(",")) - set(methods))
        if unknown:
            parser.error(f"unknown or unavailable methods {unknown}; available: {methods}")
        methods = ["non-private"] + [m for m in methods if m in args.methods.split(",") and m != "non-private"]
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"CPU, {torch.get_num_threads()} threads")
    from lightning_dp.noise import secure_normal
    from lightning_dp.noise.gaussian import native_kernel

    kernel = "native" if native_kernel() else "torch ops"
    kernel += ", secure: " + ("native" if secure_normal.native_kernel() else "torch ops")
    print(f"torch {torch.__version__}, {where}; noise Box–Muller: {kernel}; median of {args.repeats} steps; "
          "each timed step follows an untimed step of the same method; "
          "peak MB = most tensor memory live during a step (allocator-tracked, fresh process per method)")
    header = f"| model | {' | '.join(methods)} |"
    print(header)
    print("|" + "---|" * (len(methods) + 1))
    secure_ratios = []
    for key in args.models.split(","):
        title = models()[key][0]
        med = time_model(key, methods, args.repeats, args.device)
        base = med["non-private"]
        nan = (float("nan"), float("nan"))
        mem = {m: (nan if args.no_memory else peak_memory(key, m, args.device)) for m in methods}
        cells = []
        for m in methods:
            if m not in med:
                cells.append("n/a")
                continue
            cell = f"{med[m] * 1e3:.1f} ms ({med[m] / base:.2f}×)"
            if not args.no_memory:
                peak, rise = mem[m]
                cell += f", {peak:.1f} MB ({peak / mem['non-private'][0]:.2f}×; step +{rise:.1f} MB)"
            cells.append(cell)
        print(f"| {title} | {' | '.join(cells)} |", flush=True)
        if "ours-auto-secure" in med and "ours-auto" in med:
            secure_ratios.append(f"{key} {med['ours-auto-secure'] / med['ours-auto']:.2f}×")
    if secure_ratios:
        print("secure / seeded step (ours-auto-secure / ours-auto): " + ", ".join(secure_ratios))


if __name__ == "__main__":
    main()
