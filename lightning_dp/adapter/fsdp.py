"""DP-SGD on a sharded model (FSDP2, ``fully_shard``): :class:`FSDPDP` and its pieces. No Lightning import.

* :class:`UnshardedParameters`: FSDP2 computes with unsharded copies of the parameters; the hooks record
  per-sample factors on those, this hands them to the sharded parameters the optimizer holds, and drops
  autograd's raw gradients of the copies as soon as they are accumulated (they never leave a rank);
* :class:`DTensorShards`: a layer's full-size clipped sum becomes this rank's shard of the sum over ranks
  (one reduce-scatter), through :class:`~lightning_dp.optimizer.GradientShards`;
* :class:`FSDPDP`: sharding, the same forward/backward passes on every rank (FSDP2's collectives need
  all of them), checkpoints with every rank's generator states. The docs page "Scaling out" has the
  whole step and why it is private.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn

from ..config import DPConfig
from ..grad_sample.registry import get_dp_forward, get_grad_sampler
from ..optimizer import DPOptimizer
from ..sampling import batch_size_of, is_empty_batch, map_tensors, split_batch
from . import lightning_internals
from .strategies import BANDS_REFUSAL, DPStrategyMixin, refuse_options

_D = DPConfig
_STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_PER_SAMPLE_ATTRS = ("grad_sample", "grad_parts")


def _fsdp() -> Any:
    """``torch.distributed.fsdp`` (FSDP2: ``fully_shard``, ``FSDPModule``), imported when used."""
    import torch.distributed.fsdp as fsdp

    return fsdp


def _dtensor() -> Any:
    import torch.distributed.tensor as dtensor

    return dtensor


class DTensorShards:
    """:class:`~lightning_dp.optimizer.GradientShards` for FSDP2's parameters (DTensors sharded over a
    1-D mesh): a clipped sum becomes this rank's shard of the sum over ranks by redistributing a
    ``Partial`` (sum) DTensor to the parameter's placement, i.e. one reduce-scatter."""

    def reduce(self, param: nn.Parameter, clipped_sum: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``Σ_ranks clipped_sum`` (a reduce-scatter; every rank calls it)."""
        dtensor = _dtensor()
        partial = dtensor.DTensor.from_local(clipped_sum, param.device_mesh, [dtensor.Partial("sum")], run_check=False)
        return partial.redistribute(param.device_mesh, param.placements).to_local()

    def zeros(self, param: nn.Parameter) -> torch.Tensor:
        """Zeros shaped like this rank's shard of ``param``."""
        return torch.zeros_like(param.to_local())

    def to_grad(self, param: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """A DTensor gradient with ``param``'s mesh, placement and global shape over ``shard``."""
        return _dtensor().DTensor.from_local(
            shard, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )


def _has_rule(module: nn.Module) -> bool:
    """Whether the per-sample-gradient hooks know ``type(module)`` (only its type is looked at; the registry
    reads a class FSDP2 generated around a layer as that layer's class)."""
    return get_grad_sampler(module) is not None or get_dp_forward(module) is not None


def _check_checkpointing_policy(policy: Any) -> None:
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
        dtensor = _dtensor().DTensor
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
        dtensor = _dtensor().DTensor
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


class _ShardedBackward:
    """The host-side end of :meth:`StepsMixin.backward`: after the (sharded) backward pass, and before the
    DP optimizer clips, the per-sample gradients move to the sharded parameters. Comes after the DP mixins
    in the method resolution order, right before the host strategy."""

    _unsharded_parameters: Optional[UnshardedParameters]

    def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Any:
        output = super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        if self._unsharded_parameters is not None:
            self._unsharded_parameters.collect()
        return output


def _zero_loss_of(loss: torch.Tensor) -> torch.Tensor:
    """``loss · 0`` whose backward carries exact zeros (also when the loss is not finite)."""
    return (loss * 0.0).nan_to_num(0.0, 0.0, 0.0)


def _padding_like(batch: Any) -> Any:
    """One all-zero example with the structure, dtypes and devices of ``batch`` (data-independent)."""
    return map_tensors(batch, lambda t: t.new_zeros((1, *t.shape[1:])) if t.dim() > 0 else t)


@contextlib.contextmanager
def _declaring_configure_model(module: Any) -> Iterator[None]:
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


class FSDPDP(DPStrategyMixin, _ShardedBackward):
    """DP-SGD on a sharded model (FSDP2): ``Trainer(devices=N, strategy=DPFSDPStrategy(...))`` (or ``"dp_fsdp"``).

    Each process holds ``1/W`` of every sharded parameter, of its gradient and of the optimizer state, so a
    model that does not fit on one device trains privately. Built on Lightning's ``ModelParallelStrategy``
    with every process a data-parallel rank (no tensor parallelism).

    * **Sharding**: a LightningModule whose ``configure_model`` calls ``fully_shard`` is used as it is
      (use ``self.device_mesh["data_parallel"]`` as the mesh). Otherwise every module whose class is in
      ``auto_wrap_policy`` is given to ``fully_shard`` (innermost first), then the LightningModule itself,
      with ``training_step``/``validation_step``/``test_step``/``predict_step`` registered as FSDP2 forward
      methods. Blocks (a transformer layer) and single layers (``auto_wrap_policy={nn.Linear}``, as Opacus's
      FSDP2 wrapper shards every layer with parameters) both work: FSDP2 gives a sharded module a class of
      its own (``FSDPLinear``), which the per-sample rules read as the layer's class.
    * **The DPDDPStrategy guarantee**: distributed Poisson sampling at the global rate (every example in at
      most one rank's batch); each rank clips its own samples before anything leaves it (FSDP2's raw
      gradient reduce-scatter is off); each layer's clipped sum is reduce-scattered into the ranks' shards
      and each rank adds noise of std ``σC`` to its own shard, so the update carries noise ``σC`` once; the
      accountant records the global rate and ε is the same on every rank.
    * **Flat clipping across layers**: each sample's norm over all layers is formed on its rank from the
      factors the hooks keep for every layer until the backward pass ends; the clipped sums are made layer
      by layer after that, each freed as soon as it is reduce-scattered.
    * Every rank runs the same forward and backward passes (FSDP2's collectives): a rank with an empty
      Poisson batch runs ``training_step`` on one all-zero padding example whose loss is multiplied by 0,
      and ``max_physical_batch_size`` splits every rank's batch into the same number of chunks.
    * Checkpoints, full (``save_distributed_checkpoint=False``) and distributed, carry the privacy state
      and, in seeded mode, every rank's generator states.

    Arguments are those of :class:`~lightning_dp.DPStrategy` except ``device``, and:

    Args:
        auto_wrap_policy: module classes to ``fully_shard`` (plus the root) when the model is not sharded
            by its ``configure_model``; ``None``: the root only (every parameter in one group).
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` for the modules this strategy shards (e.g.
            ``param_dtype=torch.bfloat16``); clipped sums are reduced in float32 (or the sharded
            parameters' dtype, if wider).
        reshard_after_forward: passed to ``fully_shard`` for the modules this strategy shards.
        activation_checkpointing_policy: module classes (blocks, such as a transformer layer) whose forward
            runs under non-reentrant activation checkpointing (``torch.utils.checkpoint``): their activations
            are dropped after the forward and recomputed in the backward pass; per-sample gradients are
            exact as without it. Applied whether this strategy or ``configure_model`` shards the model.
            Single layers with a per-sample rule (``nn.Linear``...) are refused: checkpoint the block that
            holds them.
        **kwargs: passed to Lightning's ``ModelParallelStrategy`` (``save_distributed_checkpoint``,
            ``process_group_backend``, ``timeout``).
    """

    strategy_name = "dp_fsdp"
    registry_description = "DP-SGD with FSDP2 sharding (lightning_dp): noise_multiplier=1.0, max_grad_norm=1.0"

    def __init__(
        self,
        noise_multiplier: Optional[float] = _D.noise_multiplier,
        max_grad_norm: float = _D.max_grad_norm,
        *,
        target_epsilon: Optional[float] = _D.target_epsilon,
        delta: float = _D.delta,
        poisson_sampling: bool = _D.poisson_sampling,
        accountant: str = _D.accountant,
        loss_reduction: str = _D.loss_reduction,
        seed: Optional[int] = _D.seed,
        secure_mode: bool = _D.secure_mode,
        max_physical_batch_size: Optional[int] = _D.max_physical_batch_size,
        clipping_mode: str = _D.clipping_mode,
        clipping: str = _D.clipping,
        auto_wrap_policy: Optional[Set[Type[nn.Module]]] = None,
        mp_policy: Optional[Any] = None,
        reshard_after_forward: Optional[bool] = None,
        activation_checkpointing_policy: Optional[Set[Type[nn.Module]]] = None,
        **kwargs: Any,
    ) -> None:
        refuse_options("DPFSDPStrategy", kwargs, {
            ("secure_aggregation", "min_honest_ranks", "secure_aggregation_bits"):
                "its clipped sums are reduce-scattered into shards after every backward pass (float sums of "
                "each parameter shard, one collective per layer), not one masked integer vector per step; secure "
                "aggregation is implemented for DPDDPStrategy(secure_aggregation=True).",
            ("bands",): BANDS_REFUSAL,
        })
        if kwargs.pop("centering", None):
            raise ValueError(
                "DPFSDPStrategy does not take `centering` for now: the bias correction after each step needs whole "
                "weight and bias tensors, which FSDP2 shards. Use DPStrategy or DPDDPStrategy with centering."
            )
        config = DPConfig.from_arguments(locals())
        for name in ("data_parallel_size", "tensor_parallel_size"):
            if name in kwargs:
                raise ValueError(
                    f"DPFSDPStrategy got {name}={kwargs[name]!r}: every process is a data-parallel rank (the model is "
                    "sharded over all of them) and tensor parallelism is not supported under DP (a sample's norm "
                    "would need the tensor-parallel pieces of every layer). Leave it out."
                )
        if auto_wrap_policy is not None and not all(isinstance(c, type) and issubclass(c, nn.Module) for c in auto_wrap_policy):
            raise ValueError(f"`auto_wrap_policy` must be a set of nn.Module classes, got {auto_wrap_policy!r}.")
        _check_checkpointing_policy(activation_checkpointing_policy)
        if "activation_checkpointing" in kwargs:
            raise ValueError(
                "DPFSDPStrategy takes `activation_checkpointing_policy` (a set of block classes), not "
                "`activation_checkpointing`."
            )
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self._init_dp(config)
        self.auto_wrap_policy = frozenset(auto_wrap_policy) if auto_wrap_policy is not None else None
        self.mp_policy = mp_policy
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing_policy = (
            frozenset(activation_checkpointing_policy) if activation_checkpointing_policy else None
        )
        self._unsharded_parameters: Optional[UnshardedParameters] = None
        self._padding_pass = False
        self._sharded_here = False  # this strategy called fully_shard on the model (auto_wrap_policy)

    # --- sharding ------------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        """Every process is a data-parallel rank: the device mesh is ``(W, 1)``."""
        lightning_internals.set_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()  # type: ignore[misc]

    def setup(self, trainer: Any) -> None:
        """Shard the model unless its ``configure_model`` did, set up as Lightning and the DP mixins do, then
        make the sharded step private: FSDP2's gradient sync off, unsharded parameters connected."""
        if self.activation_checkpointing_policy:
            apply_activation_checkpointing(self.lightning_module, tuple(self.activation_checkpointing_policy))
        self._shard_model()
        with _declaring_configure_model(self.lightning_module):
            super().setup(trainer)
        if trainer.state.fn == "fit":
            self._check_sharded_training()
            for module in self.lightning_module.modules():
                if isinstance(module, _fsdp().FSDPModule):
                    module.set_requires_gradient_sync(False, recurse=False)
            self._unsharded_parameters = UnshardedParameters(self.lightning_module)

    def _shard_model(self) -> None:
        fsdp = _fsdp()
        module = self.lightning_module
        if any(isinstance(m, fsdp.FSDPModule) for m in module.modules()):
            if self.auto_wrap_policy is not None and not self._sharded_here:
                self._host.warn(
                    "DPFSDPStrategy: the LightningModule's configure_model already called fully_shard; "
                    "auto_wrap_policy is not used."
                )
            return
        options: Dict[str, Any] = {"mesh": self.device_mesh["data_parallel"]}
        if self.mp_policy is not None:
            options["mp_policy"] = self.mp_policy
        if self.reshard_after_forward is not None:
            options["reshard_after_forward"] = self.reshard_after_forward
        policy = tuple(self.auto_wrap_policy or ())
        for submodule in reversed([m for m in module.modules() if m is not module and isinstance(m, policy)]):
            fsdp.fully_shard(submodule, **options)
        fsdp.fully_shard(module, **options)
        self._sharded_here = True
        for name in _STEP_METHODS:  # the root's own parameters are unsharded for the whole step
            if callable(getattr(module, name, None)):
                fsdp.register_fsdp_forward_method(module, name)

    def _check_sharded_training(self) -> None:
        host = self._host
        if self._grad_scaler() is not None:
            raise host.trainer_error(
                "DPFSDPStrategy does not support precision='16-mixed': its GradScaler would decide on each rank's "
                "shard alone whether to skip a step, and the ranks' weights would diverge. Use 'bf16-mixed' "
                "or mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)."
            )
        dtensor = _dtensor()
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        for p in self.dp_optimizer.params:
            name = names.get(id(p), "<a parameter outside the LightningModule>")
            if not isinstance(p, dtensor.DTensor):
                raise host.trainer_error(
                    f"DPFSDPStrategy: parameter {name} is not sharded (no fully_shard covers it). Call fully_shard "
                    "on the LightningModule itself last in configure_model (or leave sharding to auto_wrap_policy)."
                )
            if p.device_mesh.ndim != 1 or not all(isinstance(pl, dtensor.Shard) for pl in p.placements):
                raise host.trainer_error(
                    f"DPFSDPStrategy: parameter {name} is placed {p.placements} on a {p.device_mesh.ndim}-D mesh; "
                    "only FSDP2 sharding over one data-parallel mesh dimension (Shard) is supported under DP."
                )

    def teardown(self) -> None:
        """Remove the unsharded-parameter hooks, then as the DP mixins do."""
        if self._unsharded_parameters is not None:
            self._unsharded_parameters.remove()
            self._unsharded_parameters = None
        super().teardown()

    # --- steps -------------------------------------------------------------------------------------------
    def _gradient_exchange(self) -> Dict[str, Any]:
        return {"shards": DTensorShards()}

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the user's ``training_step`` so that every rank makes the same forward/backward passes: an
        empty batch becomes one zero-weighted padding example, and batches above ``max_physical_batch_size``
        are split into as many chunks as the largest batch of any rank needs (padding fills the rest)."""
        batch = args[0] if args else kwargs.get("batch")
        size = 0 if is_empty_batch(batch) else batch_size_of(batch)
        limit = self.config.max_physical_batch_size
        chunks: List[Any] = [batch] if size else []
        passes = 1
        if limit is not None:
            passes = max(1, self._max_over_ranks(math.ceil(size / limit)))
            chunks = split_batch(batch, limit) if size else []
        chunks += [None] * (passes - len(chunks))  # None: a padding pass
        accumulation = self.lightning_module.trainer.accumulate_grad_batches
        for chunk in chunks[:-1]:
            output = self._one_pass(chunk, batch, args, kwargs)
            loss = output["loss"] if isinstance(output, dict) else output
            if loss is not None:
                self.backward(loss / accumulation, self.dp_optimizer)
        return self._one_pass(chunks[-1], batch, args, kwargs)

    def _one_pass(self, chunk: Any, batch: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        self._padding_pass = chunk is None
        return self._call_training_step(_padding_like(batch) if chunk is None else chunk, args, kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Any], *args: Any, **kwargs: Any) -> Any:
        """Backward as the DP mixins do; the loss of a padding pass is multiplied by 0 first."""
        if self._padding_pass:
            closure_loss = _zero_loss_of(closure_loss)
            self._padding_pass = False
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _max_over_ranks(self, value: int) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return value
        tensor = torch.tensor([value], device=self.root_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    # --- checkpoints -------------------------------------------------------------------------------------
    def optimizer_state(self, optimizer: Any) -> Dict[str, Any]:
        """The wrapped optimizer's (sharded or full) state: torch's state-dict helpers may call ``step()`` on
        an optimizer without state to create it, which on the DP optimizer would be an accounted step."""
        return super().optimizer_state(getattr(optimizer, "original_optimizer", optimizer))  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Load as Lightning does, with the wrapped optimizer in the DP optimizer's place (see
        :meth:`optimizer_state`), then the privacy state, this rank's generators included."""
        wrapped = self.optimizers
        self.optimizers = [o.original_optimizer if isinstance(o, DPOptimizer) else o for o in wrapped]
        try:
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            self.optimizers = wrapped
