"""The torch.func fallback for modules without a rule, and its refusal before any step."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dp.grad_sample import UnsupportedModuleError, attach_grad_sample_hooks
from tests.test_grad_sample import check_per_sample


class Gated(nn.Module):
    """A custom layer: its own parameters plus a child Linear (which keeps its own rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5))
        self.shift = nn.Parameter(torch.randn(5))
        self.inner = nn.Linear(5, 5)

    def forward(self, x, temperature: float = 1.0):
        return self.inner(x) * torch.sigmoid(self.scale / temperature) + torch.tanh(x * self.scale) + self.shift


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x, mask):
        y = x @ self.w
        return y * mask.unsqueeze(-1), y.pow(2).sum(-1)


def test_custom_module_with_own_parameters(caplog):
    model = nn.Sequential(Gated(), nn.ReLU(), nn.Linear(5, 2))
    with caplog.at_level(logging.INFO, logger="lightning_dp"):
        hooks = attach_grad_sample_hooks(model)
    assert hooks.fallback_modules == ["0"]
    assert sum("0 (Gated)" in r.getMessage() and "torch.func" in r.getMessage() for r in caplog.records) == 1
    hooks.remove()
    check_per_sample(model, torch.randn(4, 5))


def test_fallback_with_kwargs_tuple_outputs_and_shared_inputs():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gated = Gated()
            self.two = TwoOutputs()
            self.proj = nn.Linear(5, 4)

        def forward(self, x, mask):
            a, b = self.two(self.proj(self.gated(x, temperature=2.0)).unsqueeze(1).expand(-1, 3, -1), mask)
            return a.sum(1), b  # b: a second output of the custom layer, used by the loss too

    check_per_sample(Model(), torch.randn(4, 5), torch.rand(4, 3), batch_dims=[0, 0])


def test_fallback_module_used_twice_and_unused_output():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.two = TwoOutputs()
            self.back = nn.Linear(3, 4)

        def forward(self, x, mask):
            first, _ = self.two(x, mask)  # the second output gets no gradient
            second, _ = self.two(self.back(first), mask)
            return second

    check_per_sample(Model(), torch.randn(4, 2, 4), torch.rand(4, 2), batch_dims=[0, 0])


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.register_buffer("total", torch.zeros(3))

    def forward(self, x):
        self.total.add_((x * self.w).sum(0))  # in-place write of batched data into a shared buffer
        return x * self.w


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return F.dropout(x * self.w, 0.5, training=True)


@pytest.mark.parametrize("layer", [InPlace(), Noisy()], ids=["inplace", "random"])
def test_impossible_module_fails_on_first_forward_naming_its_path(layer):
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(layer))
    attach_grad_sample_hooks(model)
    with pytest.raises(UnsupportedModuleError, match=r"^1\.0 \(") as err:
        model(torch.randn(4, 3))
    assert err.value.path == "1.0"
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())


def test_frozen_custom_module_needs_no_fallback():
    model = nn.Sequential(Noisy(), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    hooks = attach_grad_sample_hooks(model)
    assert hooks.fallback_modules == []
    hooks.remove()
