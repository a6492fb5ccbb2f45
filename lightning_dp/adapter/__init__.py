"""The Lightning adapter: DP-SGD logic that imports no Lightning namespace, bound to one by :func:`bind`.

* :mod:`~lightning_dp.adapter.data` — Poisson sampling, the per-epoch plan, calibration;
* :mod:`~lightning_dp.adapter.steps` — the DP optimizer and the training step;
* :mod:`~lightning_dp.adapter.state` — accountant, generators, budgets, checkpoints;
* :mod:`~lightning_dp.adapter.reporting` — the privacy report;
* :mod:`~lightning_dp.adapter.features` — Trainer features: accounted exactly or refused before step 1;
* :mod:`~lightning_dp.adapter.strategies` — the pieces together, for one device and for DDP;
* :mod:`~lightning_dp.adapter.fsdp` — a sharded model (FSDP2): clipped sums reduce-scattered into shards;
* :mod:`~lightning_dp.adapter.callback` — PrivacyBudgetCallback's logic;
* :mod:`~lightning_dp.adapter.host` — what the adapter needs from a namespace.

A namespace is then one small file: ``lightning_dp/lightning.py`` is
``DPStrategy, DPDDPStrategy, DPFSDPStrategy, PrivacyBudgetCallback = bind("lightning.pytorch")``.
"""
from __future__ import annotations

from typing import NamedTuple

from .callback import PrivacyBudget
from .fsdp import FSDPDP
from .host import NAMESPACES, Host, host_bases, load_host
from .strategies import DDPDP, DPStrategyMixin, SingleDeviceDP

__all__ = ["Bound", "DPStrategyMixin", "Host", "NAMESPACES", "bind"]


class Bound(NamedTuple):
    """The public classes of one Lightning namespace."""

    DPStrategy: type
    DPDDPStrategy: type
    DPFSDPStrategy: type
    PrivacyBudgetCallback: type


def bind(namespace: str) -> Bound:
    """Make ``DPStrategy``, ``DPDDPStrategy``, ``DPFSDPStrategy`` and ``PrivacyBudgetCallback`` for
    ``namespace`` (``"lightning.pytorch"`` or ``"pytorch_lightning"``) and register ``"dp_sgd"``,
    ``"dp_ddp"`` and ``"dp_fsdp"`` with its strategy registry. The classes live in ``lightning_dp.lightning`` or
    ``lightning_dp.pytorch_lightning`` (their ``__module__``), so they pickle and LightningCLI's
    ``class_path`` finds them."""
    host = load_host(namespace)
    strategies, callbacks = host_bases(namespace)
    module = "lightning_dp." + host.package
    common = {"__module__": module, "_host": host}

    def make(name: str, logic: type, base: type) -> type:
        return type(name, (logic, base), {**common, "__qualname__": name, "__doc__": logic.__doc__})

    bound = Bound(
        make("DPStrategy", SingleDeviceDP, strategies.SingleDeviceStrategy),
        make("DPDDPStrategy", DDPDP, strategies.DDPStrategy),
        make("DPFSDPStrategy", FSDPDP, strategies.ModelParallelStrategy),
        make("PrivacyBudgetCallback", PrivacyBudget, callbacks.Callback),
    )
    bound.DPStrategy.register_strategies(strategies.StrategyRegistry)
    bound.DPDDPStrategy.register_strategies(strategies.StrategyRegistry)
    bound.DPFSDPStrategy.register_strategies(strategies.StrategyRegistry)
    return bound
