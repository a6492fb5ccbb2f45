"""Per-sample gradients of every rule vs a float64 micro-batch reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dp.grad_sample import attach_grad_sample_hooks, get_attached_hooks
from tests.conftest import microbatch_grads

TOL = dict(rtol=1e-4, atol=1e-5)  # float32 hooks vs float64 reference


def _check(model: nn.Module, x: torch.Tensor, reduction: str = "mean") -> None:
    """Hooks' per-sample gradients (float32) equal the float64 reference for a squared-output loss."""
    weights = torch.randn_like(model(x))  # a fixed random direction makes the loss depend on every output

    def sample_loss(out: torch.Tensor, i: int) -> torch.Tensor:
        return (out * weights[i : i + 1].to(out.dtype)).sum() + 0.5 * out.pow(2).sum()

    reference = microbatch_grads(model, x, sample_loss)
    hooks = attach_grad_sample_hooks(model, loss_reduction=reduction)
    out = model(x)
    per_sample_losses = (out * weights).flatten(1).sum(1) + 0.5 * out.pow(2).flatten(1).sum(1)
    loss = per_sample_losses.mean() if reduction == "mean" else per_sample_losses.sum()
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert not hasattr(p, "grad_sample")
            continue
        torch.testing.assert_close(p.grad_sample.double(), reference[name], **TOL)
    hooks.remove()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 5), (6, 2, 3, 5)])
def test_linear_any_leading_dims(shape, reduction):
    _check(nn.Linear(5, 4), torch.randn(*shape), reduction)


def test_linear_without_bias():
    _check(nn.Linear(5, 4, bias=False), torch.randn(4, 5))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), dilation=2, padding=(1, 2)),
        dict(kernel_size=3, groups=2),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=4, padding="same", dilation=2),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=2, padding_mode="circular", bias=False),
    ],
)
def test_conv2d(kwargs):
    _check(nn.Conv2d(4, 6, **kwargs), torch.randn(3, 4, 9, 8))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(padding_idx):
    model = nn.Embedding(11, 4, padding_idx=padding_idx)
    idx = torch.randint(0, 11, (5, 7))
    idx[:, 0] = 0  # every sample looks up row 0 (the padding row when padding_idx=0) ...
    idx[0, 1] = idx[0, 2] = 3  # ... and a row repeated within one sample accumulates
    _check(model, idx)
    if padding_idx is not None:
        hooks = attach_grad_sample_hooks(model)
        model(idx).sum().backward()
        assert model.weight.grad_sample[:, padding_idx].abs().sum() == 0
        hooks.remove()


@pytest.mark.parametrize("shape,normalized", [((4, 6), 6), ((4, 3, 6), 6), ((4, 3, 2, 5), (2, 5))])
def test_layer_norm(shape, normalized):
    model = nn.LayerNorm(normalized)
    with torch.no_grad():
        model.weight.normal_()
        model.bias.normal_()
    _check(model, torch.randn(*shape))


def test_layer_norm_without_bias():
    _check(nn.LayerNorm(6, bias=False), torch.randn(4, 3, 6))


@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 6, 7), (4, 6)])
def test_group_norm(shape):
    _check(nn.GroupNorm(3, 6), torch.randn(*shape))


def test_small_cnn_with_inplace_relu():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    _check(model, torch.randn(5, 1, 6, 6))


class TiedLM(nn.Module):
    """Embedding tied to the output head: the same Parameter used by two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


class Reused(nn.Module):
    """One Linear applied twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 5)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_tied_parameters_sum_both_uses():
    _check(TiedLM(), torch.randint(0, 9, (4, 3)))


def test_module_called_twice_accumulates_per_sample():
    _check(Reused(), torch.randn(4, 5))


def test_frozen_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    _check(model, torch.randn(3, 5))


def test_no_grad_and_eval_record_nothing():
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))
    attach_grad_sample_hooks(model)
    with torch.no_grad():
        model(torch.randn(3, 5))
    model.eval()
    with torch.inference_mode():
        model(torch.randn(3, 5))
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    get_attached_hooks(model).remove()
    assert get_attached_hooks(model) is None
    assert not model._forward_hooks and not model[0]._forward_hooks


def test_attaching_twice_replaces_hooks():
    model = nn.Linear(3, 2)
    attach_grad_sample_hooks(model)
    attach_grad_sample_hooks(model, loss_reduction="sum")
    assert len(model._forward_hooks) == 1
    model(torch.randn(2, 3)).sum().backward()
    torch.testing.assert_close(model.weight.grad_sample.sum(0), model.weight.grad)


def test_cross_entropy_mean_matches_reference():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    reference = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1].to(out.device)))
    attach_grad_sample_hooks(model, loss_reduction="mean")
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample.double(), reference[name], **TOL)
