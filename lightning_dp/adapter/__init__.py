"""The Lightning adapter: DP-SGD logic that imports no Lightning namespace, bound to one by :func:`bind`.

* :mod:`~lightning_dp.adapter.strategy_base` — the typed base every DP strategy derives from its host class;
  its hooks delegate to the run's :class:`~lightning_dp.PrivacyState` and :class:`~lightning_dp.DPOptimizer`;
* :mod:`~lightning_dp.adapter.strategies` — one device and DDP (:data:`STRATEGIES` here is the one list);
* :mod:`~lightning_dp.adapter.fsdp` (with :mod:`~lightning_dp.adapter.fsdp_sharding`) — a sharded model (FSDP2);
* :mod:`~lightning_dp.adapter.data` — Poisson sampling, the per-epoch plan, calibration;
* :mod:`~lightning_dp.adapter.steps` — per-sample scale, empty batches, physical micro-batches;
* :mod:`~lightning_dp.adapter.bandmf` — BandMF's checks and σ in the Trainer;
* :mod:`~lightning_dp.adapter.reporting` — the privacy report;
* :mod:`~lightning_dp.adapter.features` — Trainer features: accounted exactly or refused before step 1;
* :mod:`~lightning_dp.adapter.callback` — PrivacyBudgetCallback's logic;
* :mod:`~lightning_dp.adapter.host` — what the adapter needs from a namespace.

A namespace is then one small file: ``lightning_dp/lightning.py`` is ``globals().update(bind("lightning.pytorch"))``.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple

from .callback import privacy_budget_callback
from .fsdp import fsdp_strategy
from .host import NAMESPACES, Host, host_bases, load_host
from .strategies import ddp_strategy, single_device_strategy


class StrategyKind(NamedTuple):
    """One DP strategy: its public name, the host strategy class it derives from (by name, in the namespace's
    ``strategies`` module) and the function that builds it."""

    name: str
    host_class: str
    build: Callable[[type, Host], type]


STRATEGIES = (
    StrategyKind("DPStrategy", "SingleDeviceStrategy", single_device_strategy),
    StrategyKind("DPDDPStrategy", "DDPStrategy", ddp_strategy),
    StrategyKind("DPFSDPStrategy", "ModelParallelStrategy", fsdp_strategy),
)
"""Every DP strategy, in one list: :func:`bind` builds and registers each of them for a namespace, and
``lightning_dp.lightning``/``lightning_dp.pytorch_lightning``/``lightning_dp`` export their names."""

__all__ = ["CALLBACK_NAME", "Host", "NAMESPACES", "PUBLIC_NAMES", "STRATEGIES", "StrategyKind", "bind"]

CALLBACK_NAME = "PrivacyBudgetCallback"
PUBLIC_NAMES = tuple(kind.name for kind in STRATEGIES) + (CALLBACK_NAME,)
"""The names every namespace module exports: the strategies of :data:`STRATEGIES` and the callback."""


def bind(namespace: str) -> Dict[str, type]:
    """Make every strategy of :data:`STRATEGIES` and ``PrivacyBudgetCallback`` for ``namespace``
    (``"lightning.pytorch"`` or ``"pytorch_lightning"``), by name, and register each strategy with the
    namespace's strategy registry (``"dp_sgd"``, ``"dp_ddp"``, ``"dp_fsdp"``). The classes live in
    ``lightning_dp.lightning`` or ``lightning_dp.pytorch_lightning`` (their ``__module__``), so they pickle and
    LightningCLI's ``class_path`` finds them."""
    host = load_host(namespace)
    strategies, callbacks = host_bases(namespace)
    module = "lightning_dp." + host.package
    bound: Dict[str, type] = {}
    for kind in STRATEGIES:
        cls = kind.build(getattr(strategies, kind.host_class), host)
        cls.__module__, cls.__qualname__, cls.__name__ = module, kind.name, kind.name
        cls.register_strategies(strategies.StrategyRegistry)
        bound[kind.name] = cls
    callback = privacy_budget_callback(callbacks.Callback, host)
    callback.__module__, callback.__qualname__ = module, CALLBACK_NAME
    bound[CALLBACK_NAME] = callback
    return bound
