"""The clipped DP-SGD update (noise off) equals the textbook one for the hard cases of issue 3."""
from __future__ import annotations

import copy
from typing import Sequence

import pytest
import torch
from torch import nn

from lightning_dp import DPOptimizer
from lightning_dp.grad_sample import attach_grad_sample_hooks
from tests.conftest import clipped_mean_reference
from tests.test_grad_sample import TiedLM, Reused, reference_grads, smooth_loss
from tests.test_grad_sample_fallback import Gated
from tests.test_grad_sample_sequence import SeqModel

MAX_GRAD_NORM = 0.5  # small enough that every sample is clipped


def _clipped_update_matches(model: nn.Module, inputs: Sequence[torch.Tensor], batch_dims: Sequence[int]) -> None:
    batch_size = inputs[0].shape[batch_dims[0]]
    reference = clipped_mean_reference(
        reference_grads(model, inputs, smooth_loss, batch_dims), MAX_GRAD_NORM, batch_size
    )
    before = copy.deepcopy(model.state_dict())
    hooks = attach_grad_sample_hooks(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=batch_size,
    )
    optimizer.zero_grad()
    (smooth_loss(model(*inputs)) / batch_size).backward()
    optimizer.pre_step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), reference[name], rtol=1e-4, atol=1e-6, msg=name)
    optimizer.original_optimizer.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen: never changes, never gets a gradient
            assert p.grad is None and torch.equal(p, before[name]), name
    hooks.remove()


def test_tied_embedding_and_head():
    _clipped_update_matches(TiedLM(), [torch.randint(0, 9, (4, 3))], [0])


def test_module_called_twice():
    _clipped_update_matches(Reused(), [torch.randn(4, 5)], [0])


def test_frozen_and_peft():
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), Gated(), nn.Tanh(), nn.Linear(5, 2))
    model[0].requires_grad_(False)
    model[2].inner.requires_grad_(False)  # PEFT: the custom layer trains only its own gates
    _clipped_update_matches(model, [torch.randn(4, 5)], [0])


def test_batch_not_first_sequence_model():
    _clipped_update_matches(SeqModel(), [torch.randint(0, 11, (7, 4))], [1])


def test_transformer_and_custom_layer():
    model = nn.Sequential(nn.TransformerEncoderLayer(5, 1, 8, dropout=0.0, batch_first=True), Gated())
    _clipped_update_matches(model, [torch.randn(3, 4, 5)], [0])


@pytest.mark.parametrize("train", [True, False])
def test_eval_train_mode_and_no_grad_are_unaffected(train):
    model = nn.Sequential(nn.Embedding(11, 5), nn.LSTM(5, 5, batch_first=True))
    head = nn.Sequential(nn.TransformerEncoderLayer(5, 1, 8, dropout=0.2, batch_first=True), Gated())

    class Full(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = model, head

        def forward(self, tokens):
            return self.head(self.body(tokens)[0])

    full = Full().train(train)
    tokens = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        expected = full.eval()(tokens)
    full.train(train)
    hooks = attach_grad_sample_hooks(full)
    for grad_mode in (torch.no_grad, torch.inference_mode):  # validation / predict loops
        with grad_mode():
            torch.testing.assert_close(full.eval()(tokens), expected)
            full.train(train)
            full(tokens)
    assert all(not hasattr(p, "grad_sample") for p in full.parameters())
    if not train:  # training in eval mode (no dropout): exact vs the reference too
        hooks.remove()
        _clipped_update_matches(full, [tokens], [0])
    hooks.remove()


def test_deep_copy_of_a_hooked_model_is_a_plain_model():
    """An EMA/teacher copy made while the hooks are attached trains like the original module did before
    hooking: ordinary ``param.grad`` from autograd, nothing recorded for the DP optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    hooks = attach_grad_sample_hooks(model)
    copied = copy.deepcopy(model)
    x = torch.randn(4, 6)
    copied(x).square().sum().backward()  # while the original is hooked
    for p in copied.parameters():
        assert p.grad is not None and not hasattr(p, "grad_parts") and not hasattr(p, "grad_sample")
    for name, p in model.named_parameters():
        assert not hasattr(p, "grad_parts"), name  # the original's hooks saw nothing of the copy
    hooks.remove()
    plain_model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    plain_model.load_state_dict(copied.state_dict())
    plain_model(x).square().sum().backward()
    for p, q in zip(copied.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert opt.steps_taken == 0


@pytest.mark.parametrize("clipping_mode", ["auto", "ghost", "materialize"])
def test_noisy_gradients_carry_no_autograd_graph(clipping_mode):
    """Clipping runs without autograd: no graph from the recorded activations (hidden layers' inputs
    require grad) reaches ``param.grad``, so nothing of the step stays alive until the next one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    attach_grad_sample_hooks(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4, clipping_mode=clipping_mode)
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    for p in model.parameters():
        assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
