"""What the adapter needs from a Lightning namespace, gathered in one record.

The DP logic in :mod:`lightning_dp.adapter` imports no Lightning namespace. Everything it needs from
``lightning.pytorch`` or ``pytorch_lightning`` (the error type users catch, rank-zero messages, the
callback classes whose effect on privacy it must know) is read from a :class:`Host` that
:func:`~lightning_dp.adapter.bind` builds once per namespace and stores on the classes it makes.

From the host strategy class its strategies derive from, the adapter uses Lightning's public ``Strategy``
interface (``lightning_module``, ``precision_plugin``, ``optimizers``, ``global_rank``/``world_size``,
``root_device`` and the hooks it overrides with ``@override``: ``setup``, ``setup_optimizers``,
``process_dataloader``, ``training_step``, ``backward``, ``optimizer_step``, ``on_train_batch_start``,
``on_train_start``, ``on_train_end``, ``save_checkpoint``, ``load_checkpoint``, ``teardown``;
``configure_ddp`` for DDP; ``setup_environment`` and ``optimizer_state`` for FSDP). What has no public
form is in :mod:`~lightning_dp.adapter.lightning_internals`, one function per use, each tested.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Tuple, Type

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
"""The Lightning namespaces the adapter binds to, in order of preference."""


@dataclass(frozen=True)
class Host:
    """The pieces of one Lightning namespace the DP adapter uses.

    Attributes:
        name: the namespace's import name (``"lightning.pytorch"`` or ``"pytorch_lightning"``).
        version: its version string (recorded in the privacy report).
        error: the exception raised for a configuration Lightning or DP cannot run
            (``MisconfigurationException`` of that namespace).
        warn: ``rank_zero_warn`` of the namespace.
        info: ``rank_zero_info`` of the namespace.
        accumulation_scheduler: the namespace's ``GradientAccumulationScheduler`` class.
        tuner_callbacks: callback classes that run training steps on the private data and choose by
            their loss (``LearningRateFinder``, ``BatchSizeFinder``).
    """

    name: str
    version: str
    error: Type[Exception]
    warn: Callable[..., None]
    info: Callable[..., None]
    accumulation_scheduler: type
    tuner_callbacks: Tuple[type, ...]

    @property
    def package(self) -> str:
        """The distribution users install (``lightning`` or ``pytorch_lightning``), for reports."""
        return self.name.split(".")[0]

    def trainer_error(self, message: str) -> Exception:
        """The exception to raise for ``message`` (a configuration error, before any training work)."""
        return self.error(message)


def load_host(namespace: str) -> Host:
    """Import ``namespace`` (one of :data:`NAMESPACES`) and collect its :class:`Host` record."""
    if namespace not in NAMESPACES:
        raise ValueError(f"`namespace` must be one of {NAMESPACES}, got {namespace!r}.")
    root = importlib.import_module(namespace)
    callbacks = importlib.import_module(f"{namespace}.callbacks")
    rank_zero = importlib.import_module(f"{namespace}.utilities.rank_zero")
    exceptions = importlib.import_module(f"{namespace}.utilities.exceptions")
    return Host(
        name=namespace,
        version=str(getattr(root, "__version__", "unknown")),
        error=exceptions.MisconfigurationException,
        warn=rank_zero.rank_zero_warn,
        info=rank_zero.rank_zero_info,
        accumulation_scheduler=callbacks.GradientAccumulationScheduler,
        tuner_callbacks=tuple(getattr(callbacks, name) for name in ("LearningRateFinder", "BatchSizeFinder")),
    )


def host_bases(namespace: str) -> Any:
    """The namespace's ``strategies`` and ``callbacks`` modules (the base classes to bind to)."""
    return (
        importlib.import_module(f"{namespace}.strategies"),
        importlib.import_module(f"{namespace}.callbacks"),
    )
