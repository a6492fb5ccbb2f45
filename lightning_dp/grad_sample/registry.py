"""Registry mapping ``nn.Module`` types to how their per-sample gradients are computed.

Three kinds of entries, each registered by decorator, one file per layer family (a factored layer's file
also holds the part type of its gradient and its forward without weight gradients):

* **rules** (:func:`register_grad_sampler`): ``rule(module, activations, backprops) -> {name: grad}``
  where ``activations`` is the tuple of the module's positional inputs, ``backprops`` the gradient of
  the loss with respect to its output (already rescaled to the per-sample loss and by
  ``GradSampleHooks.loss_scale``), batch dimension first, and each returned tensor has shape
  ``(batch_size, *param.shape)``. Only the module's *own* trainable parameters appear
  (``recurse=False``); frozen ones are skipped. ``batch_dim`` says where the batch is: ``0`` for layers
  whose input layout fixes it (convolutions, channel norms), ``None`` for layers that accept any
  leading dims (Linear, Embedding, LayerNorm): the hooks then find it (see ``per_sample_recorder.py``)
  and move it first before calling the rule.
* **factors** (:func:`register_factored`): for layers whose weight gradient is a sum of outer products
  of the layer's input and output gradient (Linear, Conv, Embedding, Hugging Face's ``Conv1D``): a
  :class:`Factored` object says how to run the layer without autograd's weight gradient and which
  :class:`~lightning_dp.grad_sample.per_sample_parts.Part` s its input and output gradient make. Such a
  layer takes the fast clipping path (book-keeping, ghost norms); without a rule of its own, its
  materialised per-sample gradient (``clipping_mode="materialize"``) is that of its parts.
* **DP forwards** (:func:`register_dp_forward`): for fused modules whose internals hooks cannot see
  (``nn.MultiheadAttention``, ``nn.LSTM``...). While hooks are attached, the module's ``forward`` is
  an equivalent implementation built from operations whose per-sample gradients are known
  (``forward(module, recorder, *args, **kwargs)``, see
  :class:`~lightning_dp.grad_sample.per_sample_recorder.PerSampleRecorder`).
  It uses the module's own ``nn.Parameter`` objects, so ``state_dict`` keys, optimizers and
  checkpoints are unchanged; removing the hooks restores the original forward.

Modules with trainable parameters and no entry use the ``torch.func`` fallback
(``torch_func_fallback.py``).

A type can be registered by its qualified name (``"transformers.pytorch_utils.Conv1D"``) instead of the
class, so that an optional library is never imported to register its layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Type, TypeVar, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from .per_sample_parts import Part

GradSampleRule = Callable[[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor], Dict[str, torch.Tensor]]
DPForward = Callable[..., object]

ModuleType = Union[Type[nn.Module], str]
"""A layer class, or its qualified name ``"module.path.ClassName"`` (no import needed)."""

GRAD_SAMPLERS: Dict[ModuleType, GradSampleRule] = {}
DP_FORWARDS: Dict[ModuleType, DPForward] = {}
FACTORED: Dict[ModuleType, "Factored"] = {}
_T = TypeVar("_T")


@dataclass(frozen=True)
class _RuleInfo:
    batch_dim: Optional[int]


_RULE_INFO: Dict[ModuleType, _RuleInfo] = {}


class Factored:
    """How a layer type's weight gradient factors, declared once per type (:func:`register_factored`).

    The weight gradient of sample ``b`` is ``Σ_t g_{b,t} a_{b,t}ᵀ`` over the layer's positions ``t`` (a
    Linear's leading dims, a convolution's windows, an embedding's lookups), with ``a`` from the layer's
    input and ``g`` its output gradient. A subclass says how to run the layer so that autograd skips that
    gradient (:meth:`forward`) and which parts the pair ``(input, output gradient)`` makes (:meth:`parts`).

    Attributes:
        batch_dim: ``None`` when the layer takes any leading dims (the hooks find the batch and hand
            :meth:`parts` batch-first tensors), ``0`` when its input layout fixes it.
    """

    batch_dim: Optional[int] = None

    def applies(self, module: nn.Module) -> bool:
        """Whether this module (an instance of the registered type) is covered; else its rule runs."""
        return True

    def forward(
        self, module: nn.Module, x: torch.Tensor, record: Optional[Callable[[torch.Tensor, torch.Tensor], None]]
    ) -> torch.Tensor:
        """``module(x)`` whose backward skips autograd's weight gradient and calls ``record(input, grad)``
        once (``record=None``: records nothing), see :mod:`~lightning_dp.grad_sample.clipping_modes`."""
        raise NotImplementedError

    def parts(
        self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, scale: float
    ) -> List[Tuple[nn.Parameter, "Part"]]:
        """The parts of the module's *trainable* parameters from the batch-first input ``x`` given to
        ``record`` and output gradient ``grad``; ``scale`` multiplies every per-sample gradient."""
        raise NotImplementedError


def register_factored(*module_types: ModuleType) -> Callable[[_T], _T]:
    """Declare the factors of ``module_types`` (classes or qualified names) with a :class:`Factored`
    instance; returns it unchanged, so it can decorate a class that is instantiated right away.

    Example::

        >>> register_factored("transformers.pytorch_utils.Conv1D")(LinearFactors(transposed=True))  # doctest: +SKIP
    """

    def decorator(factored: _T) -> _T:
        instance = factored() if isinstance(factored, type) else factored
        for module_type in module_types:
            FACTORED[module_type] = instance  # type: ignore[assignment]
        return factored

    return decorator


def register_grad_sampler(
    *module_types: ModuleType, batch_dim: Optional[int] = None
) -> Callable[[GradSampleRule], GradSampleRule]:
    """Register ``rule`` as the per-sample gradient rule for ``module_types`` (exact type match).

    Args:
        module_types: the layer classes the rule handles (or their qualified names).
        batch_dim: the batch dimension of the module's input and output when the layer fixes it
            (``0`` for ``(B, C, *spatial)`` layouts); ``None`` (default) when it may be any leading
            dimension — the hooks locate it and hand the rule batch-first tensors.

    Example::

        >>> @register_grad_sampler(MyLayer)                       # doctest: +SKIP
        ... def my_layer_rule(module, activations, backprops):
        ...     return {"weight": torch.einsum("bo,bi->boi", backprops, activations[0])}
    """

    def decorator(rule: GradSampleRule) -> GradSampleRule:
        for module_type in module_types:
            GRAD_SAMPLERS[module_type] = rule
            _RULE_INFO[module_type] = _RuleInfo(batch_dim)
        return rule

    return decorator


def register_dp_forward(*module_types: ModuleType) -> Callable[[DPForward], DPForward]:
    """Register ``forward(module, recorder, *args, **kwargs)`` as the DP implementation of ``module_types``."""

    def decorator(forward: DPForward) -> DPForward:
        for module_type in module_types:
            DP_FORWARDS[module_type] = forward
        return forward

    return decorator


_NAMES: Dict[type, str] = {}
_LAYER_CLASSES: Dict[type, type] = {}


def layer_class(cls: type) -> type:
    """The class rules are looked up by: ``cls``, or for a class that PyTorch's composable distributed APIs
    generated around a layer's own (``fully_shard`` turns an ``nn.Linear`` into ``FSDPLinear`` with bases
    ``(FSDPModule, nn.Linear)``; ``replicate`` likewise) that layer's class. The wrapper adds hooks around
    the forward, not another computation, so the layer's rule holds."""
    found = _LAYER_CLASSES.get(cls)
    if found is None:
        bases = cls.__bases__
        generated = (
            cls.__module__.startswith("torch.distributed.") and len(bases) == 2
            and bases[0].__module__.startswith("torch.distributed.") and issubclass(bases[1], nn.Module)
        )
        found = _LAYER_CLASSES[cls] = layer_class(bases[1]) if generated else cls
    return found


def _lookup(table: Dict[ModuleType, _T], module: nn.Module) -> Optional[_T]:
    cls = layer_class(type(module))
    found = table.get(cls)
    if found is None and table:
        name = _NAMES.get(cls)
        if name is None:
            name = _NAMES[cls] = f"{cls.__module__}.{cls.__qualname__}"
        found = table.get(name)
    return found


def get_grad_sampler(module: nn.Module) -> GradSampleRule | None:
    """The rule registered for ``type(module)``; for a factored type without one, the materialised
    gradients of its parts; ``None`` when there is neither."""
    rule = _lookup(GRAD_SAMPLERS, module)
    if rule is None and get_factored(module) is not None:
        return _rule_from_parts
    return rule


def get_rule_batch_dim(module: nn.Module) -> Optional[int]:
    """The batch dimension a rule declared for ``type(module)`` (``None``: any leading dim)."""
    info = _lookup(_RULE_INFO, module)
    if info is None:
        factored = get_factored(module)
        return None if factored is None else factored.batch_dim
    return info.batch_dim


def get_dp_forward(module: nn.Module) -> DPForward | None:
    """The DP forward registered for ``type(module)``, or ``None``."""
    return _lookup(DP_FORWARDS, module)


def get_factored(module: nn.Module) -> Optional[Factored]:
    """The :class:`Factored` declared for ``type(module)``, or ``None``."""
    return _lookup(FACTORED, module)


def _rule_from_parts(
    module: nn.Module, activations: Tuple[torch.Tensor, ...], backprops: torch.Tensor
) -> Dict[str, torch.Tensor]:
    factored = get_factored(module)
    assert factored is not None
    names = {id(p): name for name, p in module.named_parameters(recurse=False)}
    grads: Dict[str, torch.Tensor] = {}
    for param, part in factored.parts(module, activations[0], backprops, 1.0):
        name = names[id(param)]
        grads[name] = part.materialize() if name not in grads else grads[name] + part.materialize()
    return grads


def trainable_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    """The module's own (non-recursive) parameters that require a gradient, by name."""
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}
