"""The pieces of DP-SGD on a sharded model (FSDP2, ``fully_shard``) that :mod:`~lightning_dp.adapter.fsdp`'s
strategy puts together. No Lightning import.

* :class:`UnshardedParameters`: FSDP2 computes with unsharded copies of the parameters; the hooks record
  per-sample factors on those, this hands them to the sharded parameters the optimizer holds, and drops
  autograd's raw gradients of the copies as soon as they are accumulated (they never leave a rank);
* :class:`DTensorShards`: a layer's full-size clipped sum becomes this rank's shard of the sum over ranks
  (one reduce-scatter), through :class:`~lightning_dp.exchange.GradientShards`;
* activation checkpointing of blocks, and the checks of what is sharded how.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterator, List, Set, Tuple, Type

import torch
from torch import nn

from ..grad_sample.registry import get_dp_forward, get_grad_sampler
from ..sampling import map_tensors

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_PER_SAMPLE_ATTRS = ("grad_sample", "grad_parts")


def fsdp_module() -> Any:
    """``torch.distributed.fsdp`` (FSDP2: ``fully_shard``, ``FSDPModule``), imported when used."""
    import torch.distributed.fsdp as fsdp

    return fsdp


def dtensor_module() -> Any:
    import torch.distributed.tensor as dtensor

    return dtensor


class DTensorShards:
    """:class:`~lightning_dp.exchange.GradientShards` for FSDP2's parameters (DTensors sharded over a
    1-D mesh): a clipped sum becomes this rank's shard of the sum over ranks by redistributing a
    ``Partial`` (sum) DTensor to the parameter's placement, i.e. one reduce-scatter."""

    def reduce(self, param: nn.Parameter, clipped_sum: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``Σ_ranks clipped_sum`` (a reduce-scatter; every rank calls it)."""
        dtensor = dtensor_module()
        partial = dtensor.DTensor.from_local(clipped_sum, param.device_mesh, [dtensor.Partial("sum")], run_check=False)
        return partial.redistribute(param.device_mesh, param.placements).to_local()

    def zeros(self, param: nn.Parameter) -> torch.Tensor:
        """Zeros shaped like this rank's shard of ``param``."""
        return torch.zeros_like(param.to_local())

    def to_grad(self, param: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """A DTensor gradient with ``param``'s mesh, placement and global shape over ``shard``."""
        return dtensor_module().DTensor.from_local(
            shard, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )


def _has_rule(module: nn.Module) -> bool:
    """Whether the per-sample-gradient hooks know ``type(module)`` (only its type is looked at; the registry
    reads a class FSDP2 generated around a layer as that layer's class)."""
    return get_grad_sampler(module) is not None or get_dp_forward(module) is not None


def check_checkpointing_policy(policy: Any) -> None:
    """``activation_checkpointing_policy``: a set of block classes (not single layers with a rule)."""
    if policy is None:
        return
    if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in policy):
        raise ValueError(f"`activation_checkpointing_policy` must be a set of nn.Module classes, got {policy!r}.")
    layers = sorted(c.__name__ for c in policy if _has_rule(c.__new__(c)))
    if layers:
        raise ValueError(
            f"`activation_checkpointing_policy` names single layers {layers}: the per-sample gradient hooks run "
            "their own forward for such layers. Name the blocks that hold them (e.g. the transformer layer)."
        )


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


class UnshardedParameters:
    """Connects the parameters FSDP2 computes with (unsharded, during a forward or backward) to the sharded
    parameters the optimizer updates.

    A forward pre-hook on every module with trainable parameters (it runs after FSDP2 has unsharded them)
    notes the unsharded parameter, gives it the clipping mode the DP optimizer set on the sharded one (the
    hooks read it there) and, once per parameter object, a hook that drops autograd's raw gradient as soon
    as it is accumulated. :meth:`collect` moves the per-sample gradients the hooks recorded in the backward
    pass onto the sharded parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        self._sharded: Dict[Tuple[int, str], nn.Parameter] = {}
        self._unsharded: Dict[Tuple[int, str], Tuple[nn.Module, nn.Parameter]] = {}
        self._dropping: Set[int] = set()
        self._handles: List[Any] = []
        self._names: Dict[int, List[str]] = {}
        for module in model.modules():
            names = [name for name, p in module._parameters.items() if p is not None and p.requires_grad]
            if names:
                self._names[id(module)] = names
                for name in names:
                    self._sharded[(id(module), name)] = module._parameters[name]
                self._handles.append(module.register_forward_pre_hook(self._pre_forward))

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            return
        dtensor = dtensor_module().DTensor
        for name in self._names[id(module)]:
            current = module._parameters[name]
            key = (id(module), name)
            if current is None or isinstance(current, dtensor):
                continue  # not unsharded (FSDP2 left it sharded: nothing of it is computed here)
            mode = getattr(self._sharded[key], "_dp_clipping_mode", None)
            if mode is not None:
                current._dp_clipping_mode = mode
            if id(current) not in self._dropping:
                self._dropping.add(id(current))
                self._handles.append(current.register_post_accumulate_grad_hook(_drop_grad))
            self._unsharded[key] = (module, current)

    def collect(self) -> None:
        """Move the per-sample gradients recorded on unsharded parameters to their sharded parameters."""
        dtensor = dtensor_module().DTensor
        for key, (module, unsharded) in self._unsharded.items():
            current = module._parameters[key[1]]
            if isinstance(current, dtensor):
                self._sharded[key] = current  # FSDP2 may re-create the sharded parameter (state loading)
            sharded = self._sharded[key]
            for attr in _PER_SAMPLE_ATTRS:
                value = getattr(unsharded, attr, None)
                if value is None:
                    continue
                delattr(unsharded, attr)
                previous = getattr(sharded, attr, None)
                if previous is None:
                    setattr(sharded, attr, value)
                elif attr == "grad_parts":
                    previous.extend(value)
                else:
                    setattr(sharded, attr, previous + value)

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._dropping.clear()
        self._unsharded.clear()


def zero_loss_of(loss: torch.Tensor) -> torch.Tensor:
    """``loss · 0`` whose backward carries exact zeros (also when the loss is not finite)."""
    return (loss * 0.0).nan_to_num(0.0, 0.0, 0.0)


def padding_like(batch: Any) -> Any:
    """One all-zero example with the structure, dtypes and devices of ``batch`` (data-independent)."""
    return map_tensors(batch, lambda t: t.new_zeros((1, *t.shape[1:])) if t.dim() > 0 else t)


@contextlib.contextmanager
def declaring_configure_model(module: Any) -> Iterator[None]:
    """Lightning's ``ModelParallelStrategy.setup`` refuses a LightningModule without ``configure_model``
    (where users call ``fully_shard``). A model this strategy sharded itself (``auto_wrap_policy``) has
    none; for that check only, the module gets an instance attribute ``configure_model`` (removed after)."""
    own = "configure_model" in vars(module)
    if not own:
        module.configure_model = _sharded_by_dp_strategy
    try:
        yield
    finally:
        if not own:
            del module.configure_model


def _sharded_by_dp_strategy() -> None:
    """The model was sharded by ``DPFSDPStrategy(auto_wrap_policy=...)``."""


_CHECKPOINTED = "_dp_checkpointed_forward"


def _checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)`` under non-reentrant activation checkpointing, when gradients are on."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(module: nn.Module, policy: Tuple[Type[nn.Module], ...]) -> List[nn.Module]:
    """Run the forward of every submodule of ``module`` whose class is in ``policy`` under non-reentrant
    ``torch.utils.checkpoint`` (an instance ``forward``: no wrapper module, names and state-dict keys
    unchanged; FSDP2's hooks stay outside it). Returns the modules, each checkpointed once however often
    this is called."""
    chosen = []
    for submodule in module.modules():
        if isinstance(submodule, policy) and submodule is not module:
            if _CHECKPOINTED not in vars(submodule):
                submodule.forward = functools.partial(_checkpointed_forward, submodule.forward)
                setattr(submodule, _CHECKPOINTED, True)
            chosen.append(submodule)
    return chosen


def shard_module(module: nn.Module, mesh: Any, auto_wrap_policy: Any, mp_policy: Any, reshard_after_forward: Any) -> None:
    """``fully_shard`` every submodule whose class is in ``auto_wrap_policy`` (innermost first), then ``module``
    itself, on ``mesh`` (one data-parallel dimension); its step methods (``training_step``...) become FSDP2
    forward methods (the root's own parameters are unsharded for the whole step)."""
    fsdp = fsdp_module()
    options: Dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if reshard_after_forward is not None:
        options["reshard_after_forward"] = reshard_after_forward
    policy = tuple(auto_wrap_policy or ())
    for submodule in reversed([m for m in module.modules() if m is not module and isinstance(m, policy)]):
        fsdp.fully_shard(submodule, **options)
    fsdp.fully_shard(module, **options)
    for name in STEP_METHODS:
        if callable(getattr(module, name, None)):
            fsdp.register_fsdp_forward_method(module, name)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was called on ``module`` or a submodule of it."""
    return any(isinstance(m, fsdp_module().FSDPModule) for m in module.modules())


def stop_raw_gradient_sync(module: nn.Module) -> None:
    """FSDP2 never reduce-scatters ``module``'s raw gradients: the DP optimizer reduces the clipped sums."""
    for submodule in module.modules():
        if isinstance(submodule, fsdp_module().FSDPModule):
            submodule.set_requires_gradient_sync(False, recurse=False)


def check_sharded_parameters(params: List[nn.Parameter], names: Dict[int, str], error: Any) -> None:
    """Every parameter the DP optimizer updates is an FSDP2 shard over one data-parallel mesh dimension
    (else ``error(message)`` is raised)."""
    dtensor = dtensor_module()
    for p in params:
        name = names.get(id(p), "<a parameter outside the model>")
        if not isinstance(p, dtensor.DTensor):
            raise error(
                f"DPFSDPStrategy: parameter {name} is not sharded (no fully_shard covers it). Call fully_shard "
                "on the model itself last (or leave sharding to auto_wrap_policy)."
            )
        if p.device_mesh.ndim != 1 or not all(isinstance(pl, dtensor.Shard) for pl in p.placements):
            raise error(
                f"DPFSDPStrategy: parameter {name} is placed {p.placements} on a {p.device_mesh.ndim}-D mesh; "
                "only FSDP2 sharding over one data-parallel mesh dimension (Shard) is supported under DP."
            )
