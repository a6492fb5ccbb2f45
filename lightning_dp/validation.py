"""What cannot be trained privately, and how to fix it.

:func:`validate` lists *every* problem (module path, reason, fix) instead of stopping at the first;
:func:`fix` applies the fixes that change the model (BatchNorm → GroupNorm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .grad_sample import get_grad_sampler, trainable_parameters


@dataclass(frozen=True)
class ValidationIssue:
    """One reason a model cannot be made private as it is."""

    module_path: str
    module_type: str
    reason: str
    fix: str

    def __str__(self) -> str:
        path = self.module_path or "<root module>"
        return f"{path} ({self.module_type}): {self.reason} Fix: {self.fix}"


class PrivacyValidationError(ValueError):
    """Raised before training when the model has layers DP-SGD cannot handle; lists every issue."""

    def __init__(self, issues: List[ValidationIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        super().__init__(
            f"The model cannot be trained with differential privacy as it is ({len(self.issues)} "
            f"problem{'s' if len(self.issues) != 1 else ''}):\n{lines}"
        )


def _group_count(num_channels: int, max_groups: int = 32) -> int:
    return math.gcd(num_channels, max_groups)


def validate(model: nn.Module, *, raise_error: bool = False) -> List[ValidationIssue]:
    """Every problem that stops ``model`` from being trained with per-sample clipping.

    Checks: layers that mix samples in a batch (BatchNorm: one sample's data changes every other
    sample's output, so per-sample gradients are not defined); trainable layers without a per-sample
    gradient rule; embedding options whose gradient is not a per-sample sum.

    Args:
        model: the model (a LightningModule or any ``nn.Module``).
        raise_error: raise :class:`PrivacyValidationError` instead of returning a non-empty list.

    Example::

        >>> validate(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))[0].module_path
        '1'
    """
    issues: List[ValidationIssue] = []
    for path, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, _BatchNorm):
            issues.append(
                ValidationIssue(
                    path,
                    kind,
                    "BatchNorm normalises with statistics of the whole batch, so each sample's output "
                    "depends on the other samples and per-sample gradients do not exist.",
                    f"replace it with nn.GroupNorm({_group_count(module.num_features)}, {module.num_features}) "
                    "(lightning_dp.fix(model) does this), or LayerNorm.",
                )
            )
            continue
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            if module.sparse:
                issues.append(
                    ValidationIssue(path, kind, "sparse gradients are not supported.", "use sparse=False.")
                )
            if module.scale_grad_by_freq:
                issues.append(
                    ValidationIssue(
                        path,
                        kind,
                        "scale_grad_by_freq scales gradients by batch-wide token counts, mixing samples.",
                        "use scale_grad_by_freq=False.",
                    )
                )
        if trainable_parameters(module) and get_grad_sampler(module) is None:
            names = ", ".join(trainable_parameters(module))
            issues.append(
                ValidationIssue(
                    path,
                    kind,
                    f"has trainable parameters ({names}) but no per-sample gradient rule.",
                    "freeze them (requires_grad=False), build the layer from supported modules "
                    "(Linear, Conv2d, Embedding, LayerNorm, GroupNorm), or register a rule with "
                    "lightning_dp.grad_sample.register_grad_sampler.",
                )
            )
    if issues and raise_error:
        raise PrivacyValidationError(issues)
    return issues


def fix(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``model`` (in place) by a GroupNorm over the same channels.

    The GroupNorm uses ``gcd(C, 32)`` groups and the BatchNorm's ``eps`` and ``affine``; the affine
    parameters are copied. Returns ``model`` (a BatchNorm root module is returned replaced). Build the
    optimizer *after* calling ``fix`` — the new layers have new parameters.
    """
    if isinstance(model, _BatchNorm):
        return _to_group_norm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, _to_group_norm(child))
        else:
            fix(child)
    return model


def _to_group_norm(bn: _BatchNorm) -> nn.GroupNorm:
    gn = nn.GroupNorm(_group_count(bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
    return gn.to(device=bn.weight.device if bn.affine else None)


__all__ = ["PrivacyValidationError", "ValidationIssue", "fix", "validate"]
