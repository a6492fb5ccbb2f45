"""lightning-dp for Lightning Fabric: DP-SGD in your own training loop (LitGPT's way of fine-tuning).

``from lightning_dp.fabric import DPStrategy`` gives the strategies for ``lightning.fabric`` (``import lightning
as L``), or for the standalone ``lightning_fabric`` package when only that is installed. Importing this module
registers ``"dp_sgd"``, ``"dp_ddp"`` and ``"dp_fsdp"`` in Fabric's strategy registry. The privacy state is the same
:class:`~lightning_dp.PrivacyState` as the Trainer strategies' and :func:`~lightning_dp.make_private`'s.

Example::

    import lightning as L
    from lightning_dp.fabric import DPStrategy

    fabric = L.Fabric(accelerator="cpu", devices=1,
                      strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, epsilon_budget=3.0, delta=1e-5))
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)          # Poisson sampling, as in the Trainer
    for x, y in loader:
        fabric.backward(loss_fn(model(x), y))
        optimizer.step(); optimizer.zero_grad()
        if fabric.strategy.should_stop: break           # the next step would exceed the budget
    fabric.strategy.get_epsilon(1e-5)
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, NamedTuple

from .fsdp import fsdp_strategy
from .strategies import ddp_strategy, single_device_strategy
from .strategy_base import evaluation_loader

__all__ = ["DPDDPStrategy", "DPFSDPStrategy", "DPStrategy", "FABRIC_NAMESPACE", "bind", "evaluation_loader"]

FABRIC_NAMESPACES = ("lightning.fabric", "lightning_fabric")


class _Kind(NamedTuple):
    name: str
    host_class: str
    build: object


STRATEGIES = (
    _Kind("DPStrategy", "SingleDeviceStrategy", single_device_strategy),
    _Kind("DPDDPStrategy", "DDPStrategy", ddp_strategy),
    _Kind("DPFSDPStrategy", "ModelParallelStrategy", fsdp_strategy),
)
"""Every Fabric DP strategy, in one list: :func:`bind` builds and registers each, ``__all__`` names them."""


def bind(namespace: str) -> Dict[str, type]:
    """Make every strategy of :data:`STRATEGIES` for the Fabric ``namespace`` (``"lightning.fabric"`` or
    ``"lightning_fabric"``) and register each with its strategy registry (``"dp_sgd"``, ``"dp_ddp"``, ``"dp_fsdp"``)."""
    if namespace not in FABRIC_NAMESPACES:
        raise ValueError(f"`namespace` must be one of {FABRIC_NAMESPACES}, got {namespace!r}.")
    root = importlib.import_module(namespace)
    strategies = importlib.import_module(f"{namespace}.strategies")
    warn = importlib.import_module(f"{namespace}.utilities.rank_zero").rank_zero_warn
    package = namespace.split(".")[0]
    versions = {package + (".fabric" if package == "lightning" else ""): str(getattr(root, "__version__", "unknown"))}
    bound: Dict[str, type] = {}
    for kind in STRATEGIES:
        cls = kind.build(getattr(strategies, kind.host_class), warn, versions)
        cls.__module__, cls.__qualname__, cls.__name__ = __name__, kind.name, kind.name
        cls.register_strategies(strategies.STRATEGY_REGISTRY)
        bound[kind.name] = cls
    return bound


FABRIC_NAMESPACE = next((ns for ns in FABRIC_NAMESPACES if importlib.util.find_spec(ns.split(".")[0]) is not None
                         and importlib.util.find_spec(ns) is not None), None)
"""The Fabric namespace the classes here belong to."""
if FABRIC_NAMESPACE is None:
    raise ImportError("lightning_dp.fabric needs Lightning Fabric: install `lightning` (import lightning as L).")
globals().update(bind(FABRIC_NAMESPACE))
