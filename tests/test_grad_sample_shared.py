"""Layers whose input is shared by the batch (``grad_sample/batch_shared_inputs.py``,
``grad_sample/forward_batch.py``).

Small models of the patterns Hugging Face models use, with no Hugging Face code: position ids ``(1, T)``
or ``(T,)`` looked up once and broadcast; a relative-position bias ``(q, k) → (1, H, q, k)`` added to
every sample's scores in two layers; a shared value made by two layers in a row, broadcast by
``expand``; a shared table indexed by each sample's ids. Each is checked against the float64 micro-batch
reference: the per-sample gradients (``materialize``) and the clipped DP step with noise 0 in every mode.
Tolerance: float32 vs float64, ``rtol=1e-4``, ``atol=1e-6``.
"""
from __future__ import annotations

import gc
import math
import warnings
from typing import Dict

import pytest
import torch
from torch import nn

from lightning_dp import make_private
from lightning_dp.grad_sample import attach_grad_sample_hooks
from tests.conftest import clipped_mean_reference
from lightning_dp.grad_sample.batch_shared_inputs import SharedInputError, SharedTensor
from lightning_dp.grad_sample.embedding import RowsPart
from tests.test_grad_sample import reference_grads, smooth_loss
from tests.test_grad_sample_fallback import Gated
from tests.test_nonfinite import RecordingSGD

TOL = dict(rtol=1e-4, atol=1e-6)
MODES = ("auto", "ghost", "materialize")
V, D, H = 11, 6, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (see ``tests/conftest.py``)."""


class Positions(nn.Module):
    """Token embedding plus a position embedding looked up once for the batch: ids ``(1, T)`` (GPT-2,
    BERT) or ``(T,)``."""

    def __init__(self, unbatched: bool = False) -> None:
        super().__init__()
        self.unbatched = unbatched
        self.tokens, self.positions = nn.Embedding(V, D), nn.Embedding(16, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        pos = pos if self.unbatched else pos.unsqueeze(0)
        return self.head(torch.tanh(self.tokens(ids) + self.positions(pos).to(torch.float32)))


class RelativeBias(nn.Module):
    """T5's pattern: a bias from buckets ``(q, k)``, permuted to ``(1, H, q, k)``, plus a constant causal
    mask, added to the scores of every sample in two layers (one lookup for both)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, D)
        self.bias = nn.Embedding(8, H)
        self.query, self.out = nn.Linear(D, H * D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        relative = torch.arange(t)[None, :] - torch.arange(t)[:, None]
        buckets = relative.clamp(-3, 4) + 3  # (q, k), made inside the forward
        mask = torch.triu(torch.full((t, t), -1.0), diagonal=1)[None, None]
        bias = self.bias(buckets).permute([2, 0, 1]).unsqueeze(0) + mask  # (1, H, q, k): shared
        h = self.embed(x)
        for _ in range(2):
            q = self.query(h).view(x.shape[0], t, H, D).transpose(1, 2)  # (B, H, T, D)
            scores = q @ q.transpose(-1, -2) / math.sqrt(D)
            scores += bias  # in place on the per-sample scores
            h = h + (scores.softmax(-1) @ q).mean(1)
        return self.out(h)


class LearnedQueries(nn.Module):
    """Queries made by two layers from shared ids (the second layer's input is itself shared), broadcast
    to the batch by ``expand``, then attending over each sample's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.ids, self.proj = nn.Embedding(4, D), nn.Linear(D, D)
        self.embed, self.head = nn.Linear(3, D), nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = self.proj(self.ids(torch.arange(4)))  # (4, D): shared, through two layers
        queries = queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        keys = self.embed(x)
        attn = (queries @ keys.transpose(1, 2)).softmax(-1)
        return self.head(attn @ keys)


class SharedTable(nn.Module):
    """A table made once (a Linear over a shared embedding) and indexed by each sample's ids."""

    def __init__(self) -> None:
        super().__init__()
        self.rows, self.proj, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.proj(self.rows(torch.arange(V)))  # (V, D): shared
        return self.head(torch.tanh(table[ids]))


class MadeIds(nn.Module):
    """Ids made inside the forward from the input, ``(B, T)``: undecided by their shape until they meet
    the batch, then per-sample (RoBERTa's position ids, BERT's token types)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.made = nn.Embedding(V, D), nn.Embedding(V, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        made = (ids * 3 + 1) % V
        return self.head(torch.tanh(self.tokens(ids) + self.made(made)))


class IntoOtherModules(nn.Module):
    """Embeddings of made ids (undecided) fed to a custom layer (``torch.func`` fallback) and to attention
    (a fused DP forward): both need the batch in their input, so the ids are decided per-sample there."""

    def __init__(self) -> None:
        super().__init__()
        self.made = nn.Embedding(V, 5)
        self.custom = Gated()
        self.attention = nn.MultiheadAttention(5, 1, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.custom(self.made((ids * 3 + 1) % V))
        return self.head(self.attention(h, h, self.made(ids % 4), need_weights=False)[0])


def _tokens(batch: int = 4, t: int = 5) -> torch.Tensor:
    return torch.randint(0, V, (batch, t))


CASES: Dict[str, tuple] = {
    "positions_1xT": (lambda: Positions(), _tokens),
    "positions_T": (lambda: Positions(unbatched=True), _tokens),
    "relative_bias": (RelativeBias, lambda batch=4, t=5: torch.randn(batch, t, 3)),
    "relative_bias_B_equals_T": (RelativeBias, lambda: torch.randn(5, 5, 3)),  # buckets (5, 5) look per-sample
    "positions_batch_of_one": (lambda: Positions(), lambda: _tokens(1)),
    "learned_queries": (LearnedQueries, lambda: torch.randn(4, 5, 3)),
    "shared_table": (SharedTable, _tokens),
    "made_ids": (MadeIds, _tokens),
    "made_ids_into_fallback_and_attention": (IntoOtherModules, _tokens),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_gradients_equal_the_reference(case):
    build, make_input = CASES[case]
    model, x = build(), make_input()
    reference = reference_grads(model, [x], smooth_loss, [0])
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum")
    out = model(x)
    assert type(out) is torch.Tensor  # nothing shared leaves the model
    smooth_loss(out).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample.double(), reference[name], **TOL, msg=name)
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-4, atol=1e-5, msg=name)  # same step
    hooks.remove()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_dp_step_equals_the_clipped_reference(case, mode, clipping):
    build, make_input = CASES[case]
    model, x = build(), make_input()
    grads = reference_grads(model, [x], smooth_loss, [0])
    c = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1).median().item()
    expected = clipped_mean_reference(grads, c, x.shape[0], clipping)
    inner = RecordingSGD(dict(model.named_parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_private(model, inner, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=x.shape[0],
                           loss_reduction="sum", clipping_mode=mode, clipping=clipping)
    smooth_loss(model(x)).backward()
    opt.step()
    for name, value in expected.items():
        torch.testing.assert_close(inner.received[-1][name].double(), value, **TOL, msg=name)


def test_shared_layer_records_parts_of_the_whole_batch():
    model = Positions()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                     expected_batch_size=4)
    smooth_loss(model(_tokens(4))).backward()
    (part,) = model.positions.weight.grad_parts
    assert isinstance(part, RowsPart) and part.batch_size == 4


def test_batch_size_holds_for_one_call_only():
    """Micro-batches of different sizes, one after the other; and a layer called on its own (outside the
    model's call) takes its input as per-sample, as before."""
    model = Positions()
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum")
    for batch in (3, 5):
        x = _tokens(batch)
        reference = reference_grads(model, [x], smooth_loss, [0])
        smooth_loss(model(x)).backward()
        torch.testing.assert_close(model.positions.weight.grad_sample.double(), reference["positions.weight"], **TOL)
        for p in model.parameters():
            del p.grad_sample
    assert hooks.batch.size is None
    model.head(torch.randn(2, D)).sum().backward()
    assert model.head.weight.grad_sample.shape == (2, 3, D)
    hooks.remove()


def test_batch_size_from_a_part_of_the_model_called_directly():
    """Hooks on a LightningModule-like holder; ``training_step`` calls a part of it deep inside."""
    holder = nn.Module()
    holder.backbone = nn.ModuleDict({"model": Positions()})
    model = holder.backbone["model"]
    x = _tokens()
    reference = reference_grads(model, [x], smooth_loss, [0])
    hooks = attach_grad_sample_hooks(holder, loss_reduction="sum")
    smooth_loss(model(x)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample.double(), reference[name], **TOL, msg=name)
    hooks.remove()


class LeaksShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(V, D), nn.Embedding(16, D)

    def forward(self, ids: torch.Tensor):
        pos = self.positions(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.tokens(ids) + pos, pos


def test_shared_value_reaching_the_loss_directly_is_an_error():
    model = LeaksShared()
    hooks = attach_grad_sample_hooks(model)
    out, pos = model(_tokens())
    assert isinstance(pos, SharedTensor)
    with pytest.raises(SharedInputError, match="positions"):
        (out.sum() + pos.square().sum()).backward()  # the second term belongs to no sample
    hooks.remove()


def test_in_place_change_of_a_shared_value_is_an_error():
    model = LeaksShared()
    hooks = attach_grad_sample_hooks(model)
    _, pos = model(_tokens())
    with pytest.raises(SharedInputError, match="in place"):
        pos.mul_(2.0)
    hooks.remove()


class SharedIntoFallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.positions, self.custom = nn.Embedding(16, 5), Gated()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.custom(self.positions(torch.arange(x.shape[1]).unsqueeze(0)))


def test_shared_value_into_a_module_that_needs_the_batch_is_an_error():
    """A custom layer (``torch.func`` fallback) assumes its input's first dimension is the batch: a shared
    value is refused before its forward runs, naming both modules."""
    model = SharedIntoFallback()
    hooks = attach_grad_sample_hooks(model)
    with pytest.raises(SharedInputError, match=r"custom \(Gated\).*positions"):
        model(torch.randn(4, 6, 5))
    hooks.remove()


def test_values_and_evaluation_are_unchanged():
    model = RelativeBias()
    x = torch.randn(3, 5, 3)
    expected = model(x)
    hooks = attach_grad_sample_hooks(model)
    torch.testing.assert_close(model(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    hooks.remove()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("case", ["positions_1xT", "relative_bias", "learned_queries", "made_ids"])
def test_nothing_is_left_to_the_cycle_collector(case):
    """Shared values, their lineage and their per-sample copies are freed with the step (reference
    counting), not kept alive until the garbage collector runs: no tensor is in a reference cycle."""
    build, make_input = CASES[case]
    model, x = build(), make_input()
    hooks = attach_grad_sample_hooks(model)

    def step() -> None:
        model(x).sum().backward()
        for p in model.parameters():
            del p.grad_sample

    step()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        step()
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert left == []
    hooks.remove()


def test_frozen_shared_layer_is_left_alone():
    model = Positions()
    model.positions.requires_grad_(False)
    hooks = attach_grad_sample_hooks(model)
    assert "positions" not in hooks.patched_modules and "forward" not in model.positions.__dict__
    out = model(_tokens())
    assert type(out) is torch.Tensor
    hooks.remove()
