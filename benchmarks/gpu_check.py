"""The GPU check: one prepared script for the first machine with a GPU (under 8 minutes on one H100).

    python benchmarks/gpu_check.py                      # cuda:0, everything, JSON to gpu_check.json
    python benchmarks/gpu_check.py --device cpu --dry-run   # the same code paths on CPU, small (CI runs it)

It prints four tables (markdown, ready for ``docs/clipping.rst``) and writes them as JSON (``--out``):

1. **Step time and peak memory**: every model of ``benchmarks/step_time.py`` (tutorial CNN, MLP, 1-block
   transformer, GPT-2-shaped LM full and LoRA), in fp32 and bf16-mixed (``torch.autocast``), non-private
   against our default step seeded (:class:`~lightning_dp.noise.GaussianNoise`) and secure
   (:class:`~lightning_dp.noise.SecureRNG`). Medians of ``--repeats`` interleaved rounds (each method's
   second step of a round is timed, as in ``step_time.py``); ratios are to the non-private step in the same
   precision. Peak memory: ``torch.cuda.max_memory_allocated`` over 3 steps (CPU: not measured here; see
   ``step_time.py``).
2. **Secure normals**: ``SecureRNG.normal`` against ``torch.normal`` (``benchmarks/noise.py``'s
   interleaved timing), float32, ``--samples`` draws. Where the fused Triton kernel runs (CUDA with
   ``triton``), both CUDA paths in the same interleaved rounds (fused Triton, and torch ops with
   ``LIGHTNING_DP_SECURE_KERNEL=torch``), and their seeded normals compared (``FAIL`` above 1e-5).
3. **ChaCha20 on the device**: the tensor backend's keystream on the device against OpenSSL's bytes on the
   CPU, for several sizes and counters, and RFC 8439's block-function vector (§2.3.2); with the Triton
   kernel, its keystream entry too (``Triton:`` rows).
4. **bf16 clipped norm**: a bf16 model on the device, one sample far outside the clipping ball, every
   clipping mode: the float64 norm of its pre-noise contribution over ``C`` (must be ``≤ 1 + 1e-5``).

Nothing here is a test with a pass/fail threshold except tables 3 and 4, which print ``FAIL`` and make the
exit status non-zero. Run it once, put the tables in ``docs/clipping.rst``, give the machine back.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import noise as noise_bench  # noqa: E402  (benchmarks/noise.py)
import step_time  # noqa: E402  (benchmarks/step_time.py)

METHODS = ("non-private", "ours-auto", "ours-auto-secure")
PRECISIONS = ("fp32", "bf16-mixed")
RFC_8439_232 = (  # §2.3.2: key 00..1f, nonce 000000090000004a00000000, counter 1: the serialized block
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _in_precision(step: Callable[[], None], precision: str, device: torch.device) -> Callable[[], None]:
    if precision == "fp32":
        return step

    def mixed() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step()
    return mixed


def step_table(keys: List[str], repeats: int, device: torch.device) -> List[Dict[str, Any]]:
    """Median step times (ms), ratios to the non-private step and peak memory (MB, CUDA only)."""
    rows = []
    for key in keys:
        _, make_model, make_batch = step_time.models()[key]
        torch.manual_seed(0)
        model, batch = make_model(), make_batch()
        for precision in PRECISIONS:
            steps = {}
            for method in METHODS:
                try:
                    steps[method] = _in_precision(
                        step_time.make_step(method, copy.deepcopy(model), batch, str(device)), precision, device)
                    steps[method]()
                    steps[method]()
                except Exception as err:  # noqa: BLE001 - reported in the table, not fatal
                    rows.append({"model": key, "precision": precision, "method": method,
                                 "error": f"{type(err).__name__}: {str(err)[:160]}"})
                    steps.pop(method, None)
            times: Dict[str, List[float]] = {m: [] for m in steps}
            for _ in range(repeats):
                for method, step in steps.items():
                    step()
                    _sync(device)
                    start = time.perf_counter()
                    step()
                    _sync(device)
                    times[method].append(time.perf_counter() - start)
            base = statistics.median(times["non-private"]) if times.get("non-private") else float("nan")
            for method, step in steps.items():
                peak = float("nan")
                if device.type == "cuda":
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    for _ in range(3):
                        step()
                    _sync(device)
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                median = statistics.median(times[method])
                rows.append({"model": key, "precision": precision, "method": method, "ms": 1e3 * median,
                             "range_ms": [1e3 * min(times[method]), 1e3 * max(times[method])],
                             "ratio": median / base, "peak_mb": peak})
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def normal_table(samples: int, repeats: int, device: torch.device) -> Dict[str, Any]:
    """``benchmarks/noise.py``'s interleaved timing of ``torch.normal`` and ``SecureRNG.normal``; on a
    device where the fused Triton kernel runs, ``SecureRNG.normal`` with it (``kernel``: ``"triton"``)
    and, interleaved in the same rounds, with the torch-ops path (``LIGHTNING_DP_SECURE_KERNEL=torch``),
    and the largest difference between the two paths' seeded normals (``FAIL`` above 1e-5)."""
    from lightning_dp.noise import SecureRNG, secure_normal

    kernel = secure_normal.device_kernel(device) if device.type != "cpu" else "cpu"
    if kernel != "triton":
        result: Dict[str, Any] = noise_bench.bench(samples, repeats, device, torch.float32)
        result["ratio"] = result["SecureRNG.normal"] / result["torch.normal"]
        result["kernel"] = kernel
        return result
    env = secure_normal.KERNEL_ENV

    def with_kernel(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            os.environ[env] = name
            try:
                return fn()
            finally:
                os.environ.pop(env, None)
        return run

    rng = SecureRNG()
    contenders = {
        "torch.normal": lambda: torch.normal(0.0, 1.0, size=(samples,), device=device, dtype=torch.float32),
        "SecureRNG.normal": with_kernel("triton", lambda: rng.normal((samples,), 1.0, device=device)),
        "SecureRNG.normal torch ops": with_kernel("torch", lambda: rng.normal((samples,), 1.0, device=device)),
    }
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()  # warm-up (the Triton kernel compiles here)
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(noise_bench._times(fn, device)[0])
    result = {name: statistics.median(ts) for name, ts in times.items()}
    result["ratio"] = result["SecureRNG.normal"] / result["torch.normal"]
    result["ratio torch ops"] = result["SecureRNG.normal torch ops"] / result["torch.normal"]
    result["kernel"] = kernel
    fused = with_kernel("triton", lambda: SecureRNG(seed=b"gpu_check").normal((1 << 20) + 3, 1.0, device=device))()
    ops = with_kernel("torch", lambda: SecureRNG(seed=b"gpu_check").normal((1 << 20) + 3, 1.0, device=device))()
    result["fused_max_abs_diff"] = float((fused - ops).abs().max())
    result["fused_equal"] = result["fused_max_abs_diff"] <= 1e-5
    return result


def chacha_table(device: torch.device) -> List[Dict[str, Any]]:
    """The tensor backend's ChaCha20 on ``device`` against OpenSSL's bytes (and RFC 8439 §2.3.2)."""
    from lightning_dp.noise import secure_normal
    from lightning_dp.noise.chacha import chacha20_keystream

    rows = []
    key, nonce = bytes(range(32)), bytes.fromhex("000000090000004a00000000")
    block = chacha20_keystream(key, nonce, 1, 64, device=device, backend="torch").cpu()
    rows.append({"case": "RFC 8439 §2.3.2", "equal": bytes(block.tolist()).hex() == RFC_8439_232})
    generator = torch.Generator().manual_seed(0)
    for size, counter in ((1, 0), (4096, 7), (1 << 20, 123), ((1 << 24) + 5, (1 << 32) - (1 << 18) - 1)):
        key = bytes(torch.randint(0, 256, (32,), generator=generator).tolist())
        nonce = bytes(torch.randint(0, 256, (12,), generator=generator).tolist())
        _sync(device)
        start = time.perf_counter()
        ours = chacha20_keystream(key, nonce, counter, size, device=device, backend="torch")
        _sync(device)
        seconds = time.perf_counter() - start
        reference = chacha20_keystream(key, nonce, counter, size, backend="openssl")
        rows.append({"case": f"{size} bytes from block {counter}", "equal": bool(torch.equal(ours.cpu(), reference)),
                     "gb_per_s": size / seconds / 1e9})
        if device.type != "cpu" and secure_normal.device_kernel(device) == "triton":  # the fused kernel's keystream
            from lightning_dp.noise import _triton_chacha

            _triton_chacha.keystream(key, nonce, counter, 64, device)  # compile outside the timing
            _sync(device)
            start = time.perf_counter()
            ours = _triton_chacha.keystream(key, nonce, counter, size, device)
            _sync(device)
            seconds = time.perf_counter() - start
            rows.append({"case": f"Triton: {size} bytes from block {counter}",
                         "equal": bool(torch.equal(ours.cpu(), reference)), "gb_per_s": size / seconds / 1e9})
    return rows


def clipped_norm_table(device: torch.device) -> List[Dict[str, Any]]:
    """A bf16 model on ``device``; one sample whose gradient is ~10³·C; its pre-noise contribution's norm."""
    from lightning_dp import make_private

    class Recording:
        def __init__(self) -> None:
            self.handed: List[torch.Tensor] = []
            self.dtypes: List[str] = []

        def add_normal_(self, tensors: List[torch.Tensor], std: float) -> None:
            self.dtypes = sorted({str(t.dtype) for t in tensors})
            self.handed = [t.detach().double().cpu() for t in tensors]

    rows = []
    for mode in ("auto", "ghost", "materialize"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256), torch.nn.Tanh(),
                                    torch.nn.Linear(256, 10)).to(device=device, dtype=torch.bfloat16)
        opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=1, clipping_mode=mode, seed=0)
        opt.noise = Recording()
        x = torch.randn(1, 16, 64, device=device, dtype=torch.bfloat16)
        (model(x).float().pow(2).sum() * 1e3).backward()
        opt.step()
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in opt.noise.handed))
        rows.append({"mode": mode, "norm_over_c": norm, "sum_dtypes": opt.noise.dtypes,
                     "ok": norm <= 1 + 1e-5 and opt.noise.dtypes == ["torch.float32"]})
    return rows


def _print_markdown(steps, normals, chacha, clipped, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"\n### Step time and peak memory on {name}, torch {torch.__version__}\n")
    print("| model | precision | method | median ms (range) | × non-private | peak MB |")
    print("|---|---|---|---|---|---|")
    for r in steps:
        if "error" in r:
            print(f"| {r['model']} | {r['precision']} | {r['method']} | {r['error']} | | |")
            continue
        lo, hi = r["range_ms"]
        print(f"| {r['model']} | {r['precision']} | {r['method']} | {r['ms']:.2f} ({lo:.2f}–{hi:.2f}) "
              f"| {r['ratio']:.2f} | {r['peak_mb']:.0f} |")
    print(f"\n### Secure normals ({normals['kernel']}): {normals['SecureRNG.normal'] * 1e3:.2f} ms vs torch.normal "
          f"{normals['torch.normal'] * 1e3:.2f} ms: {normals['ratio']:.2f}×\n")
    if "ratio torch ops" in normals:
        print(f"Torch-ops path, same rounds: {normals['SecureRNG.normal torch ops'] * 1e3:.2f} ms: "
              f"{normals['ratio torch ops']:.2f}×; fused vs torch ops, seeded: max |Δ| "
              f"{normals['fused_max_abs_diff']:.3g} {'(equal)' if normals['fused_equal'] else 'FAIL'}\n")
    print("| ChaCha20 on the device | equal to OpenSSL / RFC | GB/s |\n|---|---|---|")
    for r in chacha:
        print(f"| {r['case']} | {'yes' if r['equal'] else 'FAIL'} | {r.get('gb_per_s', float('nan')):.2f} |")
    print("\n| bf16 clipped norm, mode | ‖contribution‖ / C | ≤ 1 + 1e-5 |\n|---|---|---|")
    for r in clipped:
        print(f"| {r['mode']} | {r['norm_over_c']:.7f} | {'yes' if r['ok'] else 'FAIL'} |")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default="cnn,mlp,tf64,gpt2,gpt2-lora")
    parser.add_argument("--samples", type=float, default=1.6e7, help="secure-normal draws (16M: a 16M-parameter model)")
    parser.add_argument("--dry-run", action="store_true", help="small and quick: 1 round, MLP and CNN, 1e5 normals")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu --dry-run for the CPU dry run")
    keys, repeats, samples = args.models.split(","), args.repeats, int(args.samples)
    if args.dry_run:
        keys, repeats, samples = ["mlp", "cnn"], 1, 100_000
    started = time.perf_counter()
    steps = step_table(keys, repeats, device)
    normals = normal_table(samples, max(3, repeats // 2), device)
    chacha = chacha_table(device)
    clipped = clipped_norm_table(device)
    _print_markdown(steps, normals, chacha, clipped, device)
    report = {"device": str(device), "torch": torch.__version__, "steps": steps, "normals": normals,
              "chacha": chacha, "clipped": clipped, "seconds": time.perf_counter() - started}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['seconds']:.0f} s; written to {args.out}")
    failed = [r for r in chacha if not r["equal"]] + [r for r in clipped if not r["ok"]]
    failed += [normals] if not normals.get("fused_equal", True) else []
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
