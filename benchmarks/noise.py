"""Throughput of secure Gaussian noise vs ``torch.normal``, and of both generators' Box–Muller kernels.

Usage::

    python benchmarks/noise.py                     # 1e7 float32 samples on CPU (and CUDA if present)
    python benchmarks/noise.py --samples 1e6 --repeats 9 --device cpu
    python benchmarks/noise.py --only-step --rounds 5  # the second table only, 5 times

The second table (the optimizer's noise call) adds ``--fast-samples`` (default: the step benchmark's
MLP, 669,706 parameters) normals into float32 tensors shaped like that MLP's parameters, interleaved, on
CPU: ``torch.normal`` (a new tensor) and ``torch.randn`` + ``add_`` for reference,
:class:`~lightning_dp.noise.GaussianNoise` (seeded) and :class:`~lightning_dp.noise.SecureRNG`
``.add_normal_``, each with its native kernel and with torch ops (and, where the default secure cipher
is AES-256-CTR, the native kernel with ChaCha20); ratios are to ``torch.normal``.

Each line is the median wall time of ``--repeats`` runs (after one warm-up), the two contenders run
interleaved so that machine load affects both alike; ``ratio`` = secure / ``torch.normal``. The CPU
columns give the median process CPU time per call (all threads), which shared machines disturb less.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

import lightning_dp.noise.gaussian as gaussian
from lightning_dp.noise import GaussianNoise, SecureRNG, secure_normal
from lightning_dp.noise.chacha import resolve_backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    return _times(fn, device)[0]


def _times(fn: Callable[[], object], device: torch.device) -> tuple:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def bench(samples: int, repeats: int, device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    rng = SecureRNG()
    contenders = {
        "torch.normal": lambda: torch.normal(0.0, 1.0, size=(samples,), device=device, dtype=dtype),
        "SecureRNG.normal": lambda: rng.normal((samples,), std=1.0, device=device, dtype=dtype),
    }
    times: Dict[str, List[tuple]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_times(fn, device))
    result = {}
    for name, ts in times.items():
        result[name] = statistics.median(t[0] for t in ts)
        result[name + " cpu"] = statistics.median(t[1] for t in ts)
    return result


def _mlp_shaped(samples: int) -> List[torch.Tensor]:
    """Zero float32 tensors shaped like the step benchmark's MLP parameters (their sizes scaled to ``samples``)."""
    sizes = [784 * 512, 512, 512 * 512, 512, 512 * 10, 10]
    scaled = [max(1, size * samples // 669706) for size in sizes]
    scaled[0] += samples - sum(scaled)
    return [torch.zeros(size) for size in scaled]


def fast_bench(samples: int, repeats: int) -> Dict[str, float]:
    """Median seconds to add ``samples`` normals into CPU float32 tensors, per generator and kernel."""
    targets, seeded, secure = _mlp_shaped(samples), GaussianNoise(seed=0), SecureRNG()
    chacha = SecureRNG(cipher="chacha20")
    modules = {gaussian: gaussian._native, secure_normal: secure_normal._native}

    def with_kernel(noise: object, module: object, native: bool) -> Callable[[], None]:
        def draw() -> None:
            module._native = modules[module] if native else None  # type: ignore[attr-defined]
            try:
                noise.add_normal_(targets, std=1.0)  # type: ignore[attr-defined]
            finally:
                module._native = modules[module]  # type: ignore[attr-defined]
        return draw

    contenders = {
        "torch.normal": lambda: torch.normal(0.0, 1.0, size=(samples,)),
        "torch.randn + add_": lambda: targets[0].add_(torch.randn(targets[0].shape)),
    }
    for name, noise, module in (("seeded", seeded, gaussian), ("secure", secure, secure_normal)):
        if modules[module] is not None:
            contenders[f"{name} native"] = with_kernel(noise, module, True)
        contenders[f"{name} torch ops"] = with_kernel(noise, module, False)
    if secure.cipher_for("cpu") != "chacha20" and modules[secure_normal] is not None:
        contenders["secure native, ChaCha20"] = with_kernel(chacha, secure_normal, True)
    for fn in contenders.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_time(fn, torch.device("cpu")))
    return {name: statistics.median(ts) for name, ts in times.items()}


def keystream_rate(num_bytes: int, device: torch.device) -> Tuple[float, str]:
    """GB/s of one call for ``num_bytes`` of the keystream SecureRNG uses on ``device`` (one thread), and
    its cipher."""
    cipher = SecureRNG().cipher_for(device)
    nonce = bytes(12 if cipher == "chacha20" else 8)
    backend = "openssl" if cipher != "chacha20" else resolve_backend("auto", device)
    stream = secure_normal.Keystream(cipher, bytes(32), nonce, backend)
    stream.read(0, 1 << 16, device=device)
    seconds = statistics.median(_time(lambda: stream.read(0, num_bytes, device=device), device) for _ in range(3))
    return num_bytes / seconds / 1e9, cipher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", action="append", help="cpu / cuda (repeatable; default: cpu and cuda if present)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--fast-samples", type=float, default=669706)
    parser.add_argument("--only-step", action="store_true", help="only the second table (the optimizer's call)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the second table (median per round)")
    args = parser.parse_args()
    samples = int(args.samples)
    dtype = getattr(torch, args.dtype)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, SecureRNG num_normals=2")
    if args.only_step:
        devices = []
    else:
        print(f"\nSecureRNG.normal vs torch.normal, {samples:.0e} {args.dtype} samples, median of {args.repeats}")
        print("| device | torch.normal (ms) | SecureRNG.normal (ms) | ratio | CPU ms torch | CPU ms secure "
              "| CPU ratio | keystream (GB/s, one call) |")
        print("|--------|------------------:|----------------------:|------:|-------------:|--------------:"
              "|----------:|-----------------:|")
    for name in devices:
        device = torch.device(name)
        result = bench(samples, args.repeats, device, dtype)
        baseline, secure = result["torch.normal"], result["SecureRNG.normal"]
        cpu_base, cpu_secure = result["torch.normal cpu"], result["SecureRNG.normal cpu"]
        rate, cipher = keystream_rate(16 * samples, device)
        print(
            f"| {name:6} | {1e3 * baseline:17.1f} | {1e3 * secure:21.1f} | {secure / baseline:5.2f} "
            f"| {1e3 * cpu_base:12.1f} | {1e3 * cpu_secure:13.1f} | {cpu_secure / cpu_base:9.2f} | {rate:.2f} ({cipher}) |"
        )
    print(f"\nadd_normal_ of {int(args.fast_samples)} float32 normals into MLP-shaped tensors on CPU (median ms of "
          f"{max(args.repeats, 21)}, interleaved; ratio to torch.normal; native kernels built: seeded "
          f"{gaussian.native_kernel()}, secure {secure_normal.native_kernel()}; secure cipher on CPU: "
          f"{SecureRNG().cipher_for('cpu')})")
    for round_ in range(args.rounds):
        fast = fast_bench(int(args.fast_samples), max(args.repeats, 21))
        if round_ == 0:
            print("| " + " | ".join(fast) + " |")
            print("|" + "---:|" * len(fast))
        base = fast["torch.normal"]
        print("| " + " | ".join(f"{1e3 * t:.2f} ({t / base:.2f}×)" for t in fast.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
