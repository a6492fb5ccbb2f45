"""Helpers of the 2-process tests (``test_fsdp.py``, ``test_num_nodes.py``): start ``fsdp_worker.py`` as a
cluster launcher would, read what it wrote, and check optimizer steps against one process on the union
batch (float64, textbook DP-SGD without noise)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from tests.conftest import clipped_mean_reference, microbatch_grads
from tests.namespace import NAME

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_launching_script(script: Path, *args: object) -> None:
    """Run ``script`` (a ``Trainer(devices=2)`` fit that Lightning re-launches for rank 1) on a free local
    port under this test's Lightning namespace; fail with its stderr unless it exits 0."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(random.randint(20000, 40000)),
               PYTHONWARNINGS="ignore", LIGHTNING_DP_TEST_NAMESPACE=NAME)
    result = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def run_job(job: str, out_dir: Path, nodes: bool = False) -> None:
    """Start both processes with Lightning's cluster environment variables (as torchrun or SLURM would):
    two ranks of one node, or (``nodes``) one rank on each of two nodes."""
    port = str(random.randint(20000, 40000))
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", PYTHONWARNINGS="ignore",
                   NODE_RANK=str(rank if nodes else 0), LOCAL_RANK=str(0 if nodes else rank),
                   LIGHTNING_DP_TEST_NAMESPACE=NAME)
        log = open(out_dir / f"{job}.log{rank}", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), job, str(out_dir)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=240) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    assert codes == [0, 0], (out_dir / f"{job}.log0").read_text()[-3000:] + (out_dir / f"{job}.log1").read_text()[-3000:]


def load(out_dir: Path, name: str) -> List[dict]:
    return [torch.load(out_dir / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1)]


def real_rows(batches: list):
    """The examples trained on (padding examples, all-zero inputs, removed)."""
    xs = [x for x, _ in batches]
    ys = [y for _, y in batches]
    x, y = torch.cat(xs), torch.cat(ys)
    keep = x.abs().sum(dim=1) > 0
    return x[keep], y[keep]


def reference_update(weights: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
                     expected_batch_size: int, clipping: str = "flat",
                     model: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Textbook DP-SGD update without noise, one process, float64 (zero for an empty union batch); per-layer
    clipping clips each of the K parameter tensors to C/√K. ``model`` takes ``weights`` (default: the FSDP
    worker's net)."""
    from tests.fsdp_worker import build_net

    if x.shape[0] == 0:
        return {k: torch.zeros_like(v, dtype=torch.float64) for k, v in weights.items()}
    model = build_net() if model is None else model
    model.load_state_dict(weights)
    grads = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"))
    if clipping == "flat":
        return clipped_mean_reference(grads, max_grad_norm, expected_batch_size)
    bound = max_grad_norm / len(grads) ** 0.5
    return {n: clipped_mean_reference({n: g}, bound, expected_batch_size)[n] for n, g in grads.items()}


def check_steps(ranks: List[dict], records_per_step=None, lr: float = 0.5, rtol: float = 1e-4, atol: float = 1e-6,
                clipping: str = "flat"):
    """Every optimizer step, from the weights before it, equals one process on the union of the ranks'
    batches of that step; both ranks hold the same weights; no example is in two ranks' batches."""
    steps = ranks[0]["steps"]
    assert [r["steps"] for r in ranks] == [steps, steps] and len(ranks[0]["before_steps"]) == steps
    for t in range(steps):
        per = records_per_step or len(ranks[0]["batches"]) // steps
        batches = [b for r in ranks for b in (r["batches"][t * per : (t + 1) * per] if records_per_step or steps > 1
                                               else r["batches"])]
        x, y = real_rows(batches)
        rows = [tuple(v.tolist()) for v in x]
        assert len(rows) == len(set(rows)), "every example is in at most one rank's batch"
        before = ranks[0]["before_steps"][t]
        after = ranks[0]["before_steps"][t + 1] if t + 1 < steps else ranks[0]["final"]
        update = reference_update(before, x, y, 0.05, ranks[0]["expected_batch_size"], clipping)
        for name, value in before.items():
            torch.testing.assert_close(after[name].double(), value.double() - lr * update[name], rtol=rtol, atol=atol)
    for name in ranks[0]["final"]:
        torch.testing.assert_close(ranks[0]["final"][name], ranks[1]["final"][name])
        for t in range(steps):
            torch.testing.assert_close(ranks[0]["before_steps"][t][name], ranks[1]["before_steps"][t][name])
    assert [r["raw_reduces"] for r in ranks] == [0, 0], "FSDP2 reduce-scattered raw gradients"


def assert_resume_matches(whole: list, resumed: list, steps: int = 4) -> None:
    """A resumed 2-rank run ends like the uninterrupted one on every rank: steps, ε, the batches after the
    checkpoint (each rank continued its own sampling stream) and the final weights (and noise)."""
    for r in (0, 1):
        assert resumed[r]["steps"] == whole[r]["steps"] == steps
        assert abs(resumed[r]["epsilon"] - whole[r]["epsilon"]) <= 1e-9 * whole[r]["epsilon"]
        for (x, _), (x_whole, _) in zip(resumed[r]["batches"], whole[r]["batches"][steps // 2:]):
            torch.testing.assert_close(x, x_whole)
        for k in whole[r]["final"]:
            torch.testing.assert_close(resumed[r]["final"][k], whole[r]["final"][k], rtol=1e-5, atol=1e-7)
