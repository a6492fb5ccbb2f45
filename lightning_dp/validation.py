"""What cannot be trained privately, and how to fix it.

:func:`validate` lists *every* problem (module path, reason, fix) instead of stopping at the first;
:func:`fix` applies the fixes that change the model (BatchNorm → GroupNorm, ...) and reports each.

What is *not* a problem: every layer with a per-sample rule or DP forward (see ``docs/layers.rst``)
and any other module with trainable parameters, which the ``torch.func`` fallback handles. The rare
module the fallback cannot handle (in-place ops ``vmap`` rejects, randomness in its own forward) is
found by a dry run: ``validate(model, example_inputs=batch)``, or at the latest on the first training
forward, before any optimizer step (:class:`~lightning_dp.grad_sample.UnsupportedModuleError`).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union, overload

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import UninitializedParameter

from .grad_sample import UnsupportedModuleError, attach_grad_sample_hooks

log = logging.getLogger("lightning_dp")

_FIX_HINT = "lightning_dp.fix(model) does this"


@dataclass(frozen=True)
class ValidationIssue:
    """One reason a model cannot be made private as it is.

    Attributes:
        module_path: dotted path of the module (``""`` for the root).
        module_type: its class name.
        reason: why it cannot be trained privately as it is.
        fix: what to do about it.
        fixable: whether :func:`fix` applies that change automatically.
    """

    module_path: str
    module_type: str
    reason: str
    fix: str
    fixable: bool = False

    def __str__(self) -> str:
        path = self.module_path or "<root module>"
        return f"{path} ({self.module_type}): {self.reason} Fix: {self.fix}"


@dataclass(frozen=True)
class AppliedFix:
    """One change :func:`fix` made to the model."""

    module_path: str
    change: str

    def __str__(self) -> str:
        return f"{self.module_path or '<root module>'}: {self.change}"


class PrivacyValidationError(ValueError):
    """Raised before training when the model has layers DP-SGD cannot handle; lists every issue."""

    def __init__(self, issues: List[ValidationIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        count = len(self.issues)
        message = (
            f"The model cannot be trained with differential privacy as it is ({count} "
            f"problem{'s' if count != 1 else ''}):\n{lines}"
        )
        fixable = sum(issue.fixable for issue in self.issues)
        if fixable:
            message += (
                f"\n{fixable} of these can be fixed automatically: call `model = lightning_dp.fix(model)` "
                "before creating the optimizer (it reports every change it makes)."
            )
        super().__init__(message)


def _group_count(num_channels: int, max_groups: int = 32) -> int:
    """Groups for the GroupNorm replacing a BatchNorm: ``gcd(C, 32)`` (32 groups of C/32 channels when
    C is a multiple of 32, the GroupNorm paper's default; fewer, equal groups otherwise)."""
    return math.gcd(num_channels, max_groups)


# Long on purpose: one table of layer checks, one branch per layer kind; each branch is a few lines.
def _module_issues(path: str, module: nn.Module) -> List[ValidationIssue]:
    kind = type(module).__name__
    issue = lambda reason, fix, fixable=False: ValidationIssue(path, kind, reason, fix, fixable)  # noqa: E731
    if isinstance(module, _BatchNorm):
        return [
            issue(
                "BatchNorm normalises with statistics of the whole batch, so each sample's output depends on "
                "the other samples and per-sample gradients do not exist.",
                f"replace it with nn.GroupNorm({_group_count(module.num_features)}, {module.num_features}) "
                f"({_FIX_HINT}), or LayerNorm.",
                True,
            )
        ]
    issues: List[ValidationIssue] = []
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        issues.append(
            issue(
                "track_running_stats=True keeps running averages of every training batch's statistics: they are "
                "computed from private data without noise and released with the model (training outputs are "
                "per-sample and fine; evaluation would use the leaked averages).",
                f"use track_running_stats=False ({_FIX_HINT}).",
                True,
            )
        )
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight.requires_grad:
        if module.sparse:
            issues.append(issue("sparse gradients are not supported.", f"use sparse=False ({_FIX_HINT}).", True))
        if module.scale_grad_by_freq:
            issues.append(
                issue(
                    "scale_grad_by_freq scales gradients by batch-wide token counts, mixing samples.",
                    f"use scale_grad_by_freq=False ({_FIX_HINT}).",
                    True,
                )
            )
    if isinstance(module, (nn.ParameterDict, nn.ParameterList)):
        held = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if held:
            issues.append(
                issue(
                    f"its trainable parameters ({', '.join(held)}) are read by another module's forward, so no "
                    "per-sample gradient rule sees them: they could only be noised, never trained from the data "
                    "(PEFT keeps LoRA-on-embedding weights this way).",
                    "freeze them (requires_grad_(False)) or keep them out of the adapter (for PEFT: leave embedding "
                    "layers out of target_modules).",
                )
            )
    uninitialized = [n for n, p in module.named_parameters(recurse=False) if isinstance(p, UninitializedParameter)]
    if uninitialized:
        issues.append(
            issue(
                f"lazy parameters ({', '.join(uninitialized)}) are not initialised yet.",
                "run one forward pass on a batch before making the model private.",
            )
        )
    return issues


def validate(
    model: nn.Module, *, raise_error: bool = False, example_inputs: Optional[Union[torch.Tensor, Sequence[Any]]] = None
) -> List[ValidationIssue]:
    """Every problem that stops ``model`` from being trained with per-sample clipping.

    Checks: layers that mix samples in a batch (BatchNorm: one sample's data changes every other
    sample's output, so per-sample gradients do not exist); statistics of private data kept without
    noise (InstanceNorm running stats); embedding options whose gradient is not a per-sample sum; lazy
    parameters. With ``example_inputs``, also a dry run (forward + backward on a copy of the model)
    that finds custom modules the ``torch.func`` fallback cannot handle.

    Args:
        model: the model (a LightningModule or any ``nn.Module``).
        raise_error: raise :class:`PrivacyValidationError` instead of returning a non-empty list.
        example_inputs: optional batch (a tensor, or a tuple of positional arguments) for the dry run.

    Example::

        >>> validate(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))[0].module_path
        '1'
    """
    issues: List[ValidationIssue] = []
    for path, module in model.named_modules():
        issues.extend(_module_issues(path, module))
    if example_inputs is not None and not issues:
        issues.extend(_dry_run(model, example_inputs))
    if issues and raise_error:
        raise PrivacyValidationError(issues)
    return issues


def _dry_run(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[Any]]) -> List[ValidationIssue]:
    """Forward + backward of a copy in training mode; an unsupported fallback module becomes an issue."""
    args: Tuple[Any, ...] = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    replica = copy.deepcopy(model).train()
    paths = {id(m): p for p, m in replica.named_modules()}
    hooks = attach_grad_sample_hooks(replica)
    try:
        with torch.enable_grad():
            output = replica(*args)
            leaves = [
                o for o in torch.utils._pytree.tree_leaves(output) if isinstance(o, torch.Tensor) and o.requires_grad
            ]
            if leaves:
                sum(o.float().sum() for o in leaves).backward()
    except UnsupportedModuleError as err:
        module = replica.get_submodule(err.path) if err.path != "<root module>" else replica
        return [
            ValidationIssue(
                paths.get(id(module), err.path), type(module).__name__,
                f"the torch.func fallback cannot compute its per-sample gradients ({err.reason}).",
                "freeze its parameters, avoid in-place ops / randomness in its own forward, or register a rule "
                "with lightning_dp.grad_sample.register_grad_sampler.",
            )
        ]
    finally:
        hooks.remove()
    return []


@overload
def fix(model: nn.Module) -> nn.Module: ...
@overload
def fix(model: nn.Module, *, report: bool) -> Union[nn.Module, Tuple[nn.Module, List[AppliedFix]]]: ...


def fix(model: nn.Module, *, report: bool = False) -> Union[nn.Module, Tuple[nn.Module, List[AppliedFix]]]:
    """Apply (in place) every fix :func:`validate` marks ``fixable``, and report each change.

    * BatchNorm → ``nn.GroupNorm(gcd(C, 32), C)`` with the BatchNorm's ``eps`` and ``affine``, affine
      parameters copied, on the same device and dtype;
    * InstanceNorm ``track_running_stats=True`` → ``False`` (the running buffers are dropped);
    * Embedding / EmbeddingBag ``sparse`` and ``scale_grad_by_freq`` → ``False``.

    Each change is logged (logger ``"lightning_dp"``, level INFO). Build the optimizer *after* calling
    ``fix`` — replaced layers have new parameters.

    Args:
        model: the model; a bare BatchNorm root module is returned replaced.
        report: also return the list of :class:`AppliedFix`.

    Returns:
        ``model`` (or its replacement), or ``(model, changes)`` when ``report=True``.
    """
    changes: List[AppliedFix] = []
    model = _fix_module("", model, changes)
    for change in changes:
        log.info("lightning_dp.fix: %s", change)
    return (model, changes) if report else model


def _fix_module(path: str, module: nn.Module, changes: List[AppliedFix]) -> nn.Module:
    if isinstance(module, _BatchNorm):
        replacement = _to_group_norm(module)
        changes.append(AppliedFix(path, f"{type(module).__name__}({module.num_features}) → {replacement!r}"))
        return replacement
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        module.track_running_stats = False
        module.running_mean = module.running_var = module.num_batches_tracked = None
        changes.append(AppliedFix(path, "track_running_stats=True → False (running buffers dropped)"))
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        for flag in ("sparse", "scale_grad_by_freq"):
            if getattr(module, flag):
                setattr(module, flag, False)
                changes.append(AppliedFix(path, f"{flag}=True → False"))
    for name, child in list(module.named_children()):
        fixed = _fix_module(f"{path}.{name}" if path else name, child, changes)
        if fixed is not child:
            setattr(module, name, fixed)
    return module


def _to_group_norm(bn: _BatchNorm) -> nn.GroupNorm:
    gn = nn.GroupNorm(_group_count(bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
    reference = bn.weight if bn.affine else bn.running_mean
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    if reference is not None:
        gn = gn.to(device=reference.device, dtype=reference.dtype)
    return gn


__all__ = ["AppliedFix", "PrivacyValidationError", "ValidationIssue", "fix", "validate"]
