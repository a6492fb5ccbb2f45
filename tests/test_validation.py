"""validate() lists every problem with path and fix; fix() replaces BatchNorm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dp import PrivacyValidationError, fix, validate


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6)), nn.Flatten(), nn.LazyLinear(2) if False else nn.Linear(6 * 4 * 4, 2),
    )


def test_every_batchnorm_is_reported_with_path_and_fix():
    issues = validate(_cnn())
    assert [i.module_path for i in issues] == ["1", "3.1"]
    assert all("GroupNorm" in i.fix for i in issues)
    assert "nn.GroupNorm(8, 8)" in issues[0].fix


def test_all_problem_kinds_are_listed_together():
    model = nn.ModuleDict(
        {
            "bn": nn.BatchNorm1d(4),
            "inorm": nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
            "emb": nn.Embedding(5, 2, sparse=True),
            "bag": nn.EmbeddingBag(5, 2, scale_grad_by_freq=True),
            "lazy": nn.LazyLinear(3),
        }
    )
    with pytest.raises(PrivacyValidationError) as err:
        validate(model, raise_error=True)
    message = str(err.value)
    assert "5 problems" in message
    paths = ("bn (BatchNorm1d)", "inorm (InstanceNorm1d)", "emb (Embedding)", "bag (EmbeddingBag)", "lazy (LazyLinear)")
    for path in paths:
        assert path in message
    assert len(err.value.issues) == 5
    assert "4 of these can be fixed automatically" in message and "lightning_dp.fix(model)" in message
    assert all(issue.fix for issue in err.value.issues)


def test_message_without_automatic_fix_does_not_promise_one():
    with pytest.raises(PrivacyValidationError) as err:
        validate(nn.LazyLinear(3), raise_error=True)
    assert "lightning_dp.fix" not in str(err.value)


def test_supported_layers_and_custom_layers_are_fine():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    model = nn.ModuleList(
        [
            nn.LSTM(4, 4, num_layers=2, bidirectional=True), nn.GRU(4, 4), nn.RNN(4, 4),
            nn.MultiheadAttention(4, 2, kdim=3, vdim=5, add_bias_kv=True), nn.TransformerEncoderLayer(4, 2),
            nn.TransformerDecoderLayer(4, 2), nn.Conv3d(2, 2, 3), nn.ConvTranspose1d(2, 2, 3),
            nn.EmbeddingBag(5, 2, mode="max"), nn.InstanceNorm2d(3, affine=True), nn.RMSNorm(4), nn.PReLU(), Custom(),
        ]
    )
    assert validate(model) == []


def test_dry_run_finds_modules_the_fallback_cannot_handle():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return torch.nn.functional.dropout(x * self.w, 0.5)

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(Noisy()))
    assert validate(model) == []
    issues = validate(model, example_inputs=torch.randn(3, 4))
    assert [(i.module_path, i.module_type) for i in issues] == [("1.0", "Noisy")]
    assert "random" in issues[0].reason
    assert validate(nn.Sequential(nn.Linear(4, 4)), example_inputs=(torch.randn(3, 4),)) == []
    assert all(p.grad is None for p in model.parameters())  # the dry run used a copy


def test_frozen_layers_with_problems_are_fine():
    emb = nn.Embedding(5, 2, sparse=True)
    emb.requires_grad_(False)
    assert validate(nn.ModuleList([emb, nn.Linear(4, 2)])) == []


def test_fix_replaces_batchnorm_and_keeps_behaviour_shape():
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    out_shape = model(x).shape
    fixed = fix(model)
    assert fixed is model
    assert validate(model) == []
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 8
    assert isinstance(model[3][1], nn.GroupNorm) and model[3][1].num_groups == 2
    assert model(x).shape == out_shape


def test_fix_on_a_bare_batchnorm_returns_groupnorm():
    assert isinstance(fix(nn.BatchNorm1d(12)), nn.GroupNorm)


def test_fix_reports_every_change():
    model = nn.ModuleDict(
        {
            "bn": nn.BatchNorm1d(12, affine=False),
            "inorm": nn.InstanceNorm1d(4, track_running_stats=True),
            "bag": nn.EmbeddingBag(5, 2, sparse=True, scale_grad_by_freq=True),
        }
    )
    fixed, changes = fix(model, report=True)
    assert fixed is model and validate(model) == []
    assert [c.module_path for c in changes] == ["bn", "inorm", "bag", "bag"]
    assert "GroupNorm(4, 12" in str(changes[0]) and not model["bn"].affine
    assert model["inorm"].running_mean is None and "running_mean" not in model.state_dict()
    model["inorm"].train()
    model["inorm"](torch.randn(2, 4, 5))  # still works
    assert fix(model, report=True)[1] == []


class _ReadsAParameterDict(nn.Module):
    """A parent whose forward reads a ParameterDict's weight: no per-sample rule sees that use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.extra = nn.ParameterDict({"scale": nn.Parameter(torch.ones(2))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.extra["scale"]


def test_trainable_parameter_dict_is_reported_and_frozen_one_is_fine():
    issues = validate(_ReadsAParameterDict())
    assert [(i.module_path, i.module_type) for i in issues] == [("extra", "ParameterDict")]
    assert "scale" in issues[0].reason and "requires_grad_(False)" in issues[0].fix
    model = _ReadsAParameterDict()
    model.extra.requires_grad_(False)
    assert validate(model) == []


def test_a_gradient_without_per_sample_gradient_stops_the_step():
    """Past validation (the check is skipped here by attaching directly), the optimizer still refuses a
    parameter that received a gradient no rule saw, naming it, before the inner optimizer steps."""
    from lightning_dp import DPOptimizer
    from lightning_dp.grad_sample import attach_grad_sample_hooks

    model = _ReadsAParameterDict()
    attach_grad_sample_hooks(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = DPOptimizer(inner, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=8)
    model(torch.randn(8, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"\['extra.scale'\] received a gradient .* no per-sample gradient"):
        optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
