"""Shared test helpers: float64 micro-batch references (one backward per sample)."""
from __future__ import annotations

import copy
import math
import os
from typing import Callable, Dict, List

import pytest
import torch
from torch import nn


def microbatch_grads(
    model: nn.Module, inputs: torch.Tensor, loss_fn: Callable[[torch.Tensor, int], torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients by brute force in float64: ``{name: (B, *shape)}`` for trainable params.

    ``loss_fn(output, i)`` is sample ``i``'s own loss given the model's output on that sample alone.
    """
    ref = copy.deepcopy(model).double()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    per_sample: Dict[str, List[torch.Tensor]] = {n: [] for n in params}
    x = inputs.double() if inputs.is_floating_point() else inputs
    for i in range(x.shape[0]):
        ref.zero_grad()
        loss = loss_fn(ref(x[i : i + 1]), i)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), grads):
            per_sample[name].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(gs) for n, gs in per_sample.items()}


def clipped_mean_reference(
    grads: Dict[str, torch.Tensor], max_grad_norm: float, denom: float, clipping: str = "flat"
) -> Dict[str, torch.Tensor]:
    """Textbook DP-SGD gradient without noise: ``Σ_b clip(g_b) / denom``. ``"flat"``: one factor
    ``min(1, C/‖g_b‖)`` per sample over all parameters; ``"per_layer"``: each of the K parameters clipped
    to ``C/√K`` on its own."""
    if clipping == "flat":
        norms = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).norm(dim=1)
        factors = {n: torch.clamp(max_grad_norm / norms, max=1.0) for n in grads}
    else:
        bound = max_grad_norm / math.sqrt(len(grads))
        factors = {n: torch.clamp(bound / g.reshape(g.shape[0], -1).norm(dim=1), max=1.0) for n, g in grads.items()}
    return {n: torch.einsum("b,b...->...", factors[n], g) / denom for n, g in grads.items()}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a busy machine (no spinning).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


_DISTRIBUTED_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                            "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _restore_distributed_environment():
    """Undo what a one-process distributed fit writes into ``os.environ`` (Lightning sets ``LOCAL_RANK``,
    ``NODE_RANK``, ``MASTER_PORT``...). Left behind, a later 2-process test's launcher sees ``LOCAL_RANK``,
    believes its processes were created outside it, never starts rank 1, and rank 0 waits until its
    timeout: the DDP tests after the single-process FSDP fits hung this way."""
    saved = {name: os.environ.get(name) for name in _DISTRIBUTED_ENVIRONMENT}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test of a module that runs Lightning (it takes Lightning from ``tests.namespace``) with
    ``lightning``: ``make test`` runs those again under the second Lightning namespace. A module that sets
    ``NAMESPACE_INDEPENDENT = True`` (Fabric's tests: ``lightning.fabric`` whatever the namespace) runs once."""
    for item in items:
        module = getattr(item, "module", None)
        source = getattr(module, "__file__", None)
        if source and _uses_lightning(source) and not getattr(module, "NAMESPACE_INDEPENDENT", False):
            item.add_marker(pytest.mark.lightning)


_LIGHTNING_SOURCES: Dict[str, bool] = {}


def _uses_lightning(path: str) -> bool:
    if path not in _LIGHTNING_SOURCES:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        _LIGHTNING_SOURCES[path] = any(key in text for key in ("tests.namespace", "lightning_helpers", "resume_worker"))
    return _LIGHTNING_SOURCES[path]
