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
    model = nn.ModuleDict({"bn": nn.BatchNorm1d(4), "rnn": nn.LSTM(4, 4), "emb": nn.Embedding(5, 2, sparse=True)})
    with pytest.raises(PrivacyValidationError) as err:
        validate(model, raise_error=True)
    message = str(err.value)
    assert "3 problems" in message
    for path in ("bn (BatchNorm1d)", "rnn (LSTM)", "emb (Embedding)"):
        assert path in message
    assert len(err.value.issues) == 3


def test_frozen_layers_without_rule_are_fine():
    rnn = nn.LSTM(4, 4)
    rnn.requires_grad_(False)
    assert validate(nn.ModuleList([rnn, nn.Linear(4, 2)])) == []


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
