"""Per-sample gradients of every rule vs a float64 micro-batch reference."""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence

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


def reference_grads(
    model: nn.Module, inputs: Sequence[torch.Tensor], loss: Callable, batch_dims: Sequence[Optional[int]]
) -> Dict[str, torch.Tensor]:
    """float64 micro-batch reference for several inputs, each sliced along its own batch dim (None: shared)."""
    ref = copy.deepcopy(model).double()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    batch_size = next(x.shape[d] for x, d in zip(inputs, batch_dims) if d is not None)
    per_sample: Dict[str, List[torch.Tensor]] = {n: [] for n in params}
    for i in range(batch_size):
        xi = [x if d is None else x.narrow(d, i, 1) for x, d in zip(inputs, batch_dims)]
        xi = [x.double() if x.is_floating_point() else x for x in xi]
        grads = torch.autograd.grad(loss(ref(*xi)), list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), grads):
            per_sample[name].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(gs) for n, gs in per_sample.items()}


def smooth_loss(output: Any) -> torch.Tensor:
    """A loss that depends on every output tensor (tuples and nested tuples too), nonlinearly."""
    tensors = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    total = 0.0
    for t in tensors:
        ramp = torch.linspace(-1.0, 1.0, t.shape[-1], dtype=t.dtype)
        total = total + (t.pow(2) * ramp).sum() + torch.sin(t).sum()
    return total


def check_per_sample(
    model: nn.Module,
    *inputs: torch.Tensor,
    batch_dims: Optional[Sequence[Optional[int]]] = None,
    loss: Callable = smooth_loss,
    reduction: str = "mean",
    **hook_kwargs: Any,
) -> float:
    """Hooks' per-sample gradients equal the float64 reference; returns the max relative error."""
    batch_dims = list(batch_dims) if batch_dims is not None else [0] * len(inputs)
    reference = reference_grads(model, inputs, loss, batch_dims)
    batch_size = next(x.shape[d] for x, d in zip(inputs, batch_dims) if d is not None)
    hooks = attach_grad_sample_hooks(model, loss_reduction=reduction, **hook_kwargs)
    total = loss(model(*inputs))
    (total / batch_size if reduction == "mean" else total).backward()
    worst = 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert not hasattr(p, "grad_sample"), name
            continue
        got = p.grad_sample.double()
        torch.testing.assert_close(got, reference[name], **TOL, msg=lambda m: f"{name}: {m}")
        worst = max(worst, ((got - reference[name]).norm() / reference[name].norm().clamp(min=1e-12)).item())
    hooks.remove()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    return worst


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


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=2),
        dict(kernel_size=4, padding="same", padding_mode="replicate"),
        dict(kernel_size=3, padding="valid", bias=False),
    ],
)
def test_conv1d(kwargs):
    check_per_sample(nn.Conv1d(4, 6, **kwargs), torch.randn(3, 4, 11))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=1, padding_mode="circular"),
        dict(kernel_size=3, padding="same", dilation=2, groups=2),
    ],
)
def test_conv3d(kwargs):
    check_per_sample(nn.Conv3d(4, 6, **kwargs), torch.randn(2, 4, 5, 6, 5))


@pytest.mark.parametrize(
    "cls,kwargs,shape",
    [
        (nn.ConvTranspose1d, dict(kernel_size=3, stride=3, padding=2, output_padding=1, dilation=2), (3, 4, 7)),
        (nn.ConvTranspose2d, dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 5, 6)),
        (nn.ConvTranspose2d, dict(kernel_size=(2, 3), bias=False), (3, 4, 4, 5)),
        (nn.ConvTranspose3d, dict(kernel_size=2, stride=2), (2, 4, 3, 3, 3)),
    ],
)
def test_conv_transpose(cls, kwargs, shape):
    check_per_sample(cls(4, 6, **kwargs), torch.randn(*shape))


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


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag_2d_input(mode, padding_idx):
    model = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx)
    idx = torch.randint(0, 10, (5, 6))
    idx[:, 0] = 2
    idx[1] = 2  # a bag made only of padding (mean: empty bag)
    check_per_sample(model, idx)


class Bags(nn.Module):
    """EmbeddingBag on flat indices with offsets (one bag per sample) and optional per-index weights."""

    def __init__(self, mode: str, include_last_offset: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 3, mode=mode, include_last_offset=include_last_offset, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, idx, lengths, weights=None):
        # ``idx`` is (B, L) padded; the bag sees the flat concatenation of each row's first lengths[b]
        flat = torch.cat([row[:n] for row, n in zip(idx, lengths.tolist())])
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        if self.bag.include_last_offset:
            offsets = torch.cat([offsets, lengths.sum().reshape(1)])
        w = None if weights is None else torch.cat([row[:n] for row, n in zip(weights, lengths.tolist())])
        return self.head(self.bag(flat, offsets, per_sample_weights=w))


@pytest.mark.parametrize(
    "mode,include_last,weighted", [("sum", False, True), ("mean", True, False), ("max", False, False)]
)
def test_embedding_bag_offsets(mode, include_last, weighted):
    idx = torch.randint(0, 9, (4, 5))
    lengths = torch.tensor([3, 5, 1, 4])
    inputs = [idx, lengths] + ([torch.rand(4, 5)] if weighted else [])
    check_per_sample(Bags(mode, include_last), *inputs, batch_dims=[0, 0, 0][: len(inputs)])


def test_rms_norm():
    model = nn.RMSNorm((3, 4))
    with torch.no_grad():
        model.weight.normal_()
    check_per_sample(model, torch.randn(4, 2, 3, 4))


@pytest.mark.parametrize(
    "cls,shape",
    [(nn.InstanceNorm1d, (4, 3, 7)), (nn.InstanceNorm2d, (4, 3, 5, 5)), (nn.InstanceNorm3d, (3, 3, 3, 4, 2))],
)
def test_instance_norm(cls, shape):
    model = cls(3, affine=True)
    with torch.no_grad():
        model.weight.normal_()
        model.bias.normal_()
    check_per_sample(model, torch.randn(*shape))


@pytest.mark.parametrize("num_parameters,shape", [(1, (4, 3, 5)), (3, (4, 3, 5)), (3, (4, 3))])
def test_prelu(num_parameters, shape):
    model = nn.PReLU(num_parameters)
    with torch.no_grad():
        model.weight.uniform_(-1, 1)
    check_per_sample(model, torch.randn(*shape))


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
    second = attach_grad_sample_hooks(model, loss_reduction="sum")
    assert get_attached_hooks(model) is second and second.loss_reduction == "sum"
    model(torch.randn(2, 3)).sum().backward()  # recorded once, by the second hooks (a "sum" loss)
    torch.testing.assert_close(model.weight.grad_sample.sum(0), model.weight.grad)


def test_cross_entropy_mean_matches_reference():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    reference = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1].to(out.device)))
    attach_grad_sample_hooks(model, loss_reduction="mean")
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample.double(), reference[name], **TOL)


def test_loss_scale_multiplies_per_sample_gradients():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum")
    assert hooks.loss_scale == 1.0
    model(x).sum().backward()
    plain = model.weight.grad_sample.clone()
    del model.weight.grad_sample, model.bias.grad_sample
    hooks.loss_scale = 4.0
    (model(x).sum() / 4.0).backward()  # e.g. Lightning's accumulate_grad_batches=4 divides the loss
    torch.testing.assert_close(model.weight.grad_sample, plain)
    hooks.remove()


def test_peft_costs_only_trainable_layers():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    hooks = attach_grad_sample_hooks(model)
    assert not any(m._forward_hooks for m in model)  # Linear layers are patched, not hooked
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__
    assert "forward" in model[4].__dict__
    hooks.remove()
    check_per_sample(model, torch.randn(4, 5))
