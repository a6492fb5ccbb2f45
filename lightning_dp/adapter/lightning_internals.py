"""Every use of a Lightning internal, in one module: one small function per use.

The adapter works on duck-typed Lightning objects and uses Lightning's public API wherever one exists.
Where none does, the private attribute is read or written here, and only here; each function says which
attribute it relies on, why no public hook exists, and the Lightning versions checked (``lightning`` and
``pytorch_lightning`` 2.4.0 and 2.6.6, the supported range's ends). ``tests/test_lightning_internals.py``
checks each one against the installed Lightning, in both namespaces, and fails with "Lightning changed
<attribute>: update lightning_dp/adapter/lightning_internals.py" when a release moves it.

Uses:

* :func:`training_step_metrics` — ``Trainer._results`` (the result collection) and its metrics'
  ``meta.name`` / ``meta.fx`` / ``meta.logger``: which metrics ``training_step`` logged (PrivacyBudget's
  warning about metrics the privacy accounting does not cover).
* :func:`epoch_micro_batches_done` — ``trainer.fit_loop.epoch_loop.batch_progress.current.ready``: the
  micro-batches of the epoch already run (the Poisson sampler's plan on a resume mid-epoch).
* :func:`val_check_is_time_based` — ``Trainer._val_check_time_interval`` (not in 2.4): a time-based
  ``val_check_interval`` (refused with gradient accumulation).
* :func:`set_single_device` — ``SingleDeviceStrategy._root_device``: the device the accelerator connector
  hands to ``DPStrategy`` when the user gave none.
* :func:`set_data_parallel_size` — ``ModelParallelStrategy._data_parallel_size``: every process is a
  data-parallel rank under ``DPFSDPStrategy``.
* :func:`set_backward_sync_control` — Fabric's ``Strategy._backward_sync_control``: the DP FSDP strategy for
  Fabric keeps FSDP2's raw-gradient sync off through ``fabric.no_backward_sync`` too.
* :func:`wrapped_sampler` — ``DistributedSamplerWrapper.dataset._sampler``: the user's sampler inside the
  wrapper Lightning puts around it under DDP (to name it in the "replaced by Poisson sampling" warning).
  Registered with :mod:`lightning_dp.sampling` on import, so the core imports no adapter.

Not internals any more (kept here because they stand in for one, and are tested like the others):

* :func:`attached_trainer` — the public ``LightningModule.trainer``, which raises ``RuntimeError`` when the
  module is not attached (was a read of ``LightningModule._trainer``).
* :func:`callback_state_key` — the key format of ``Callback._generate_state_key``, written here (was a
  call of that protected helper); the test checks it still equals Lightning's, so checkpoints written
  with either load.
* ``DPDDPStrategy`` installs its no-communication hook from the public ``DDPStrategy.configure_ddp`` with
  PyTorch's public ``DistributedDataParallel.register_comm_hook`` (it overrode the private
  ``DDPStrategy._register_ddp_hooks``). It relies on Lightning registering no hook of its own unless the
  user passes ``ddp_comm_hook``, which ``DPDDPStrategy`` refuses; should Lightning ever register one, DDP
  refuses the second registration with an error (no silent fall-back to averaging raw gradients).

No Lightning import.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..sampling import register_wrapped_sampler_reader

CHECKED = "lightning / pytorch_lightning 2.4.0 and 2.6.6"
"""The Lightning versions every function here was checked against (and is tested on)."""


def changed(attribute: str) -> str:
    """The message of a test (or an error) when Lightning moved ``attribute``."""
    return f"Lightning changed {attribute}: update lightning_dp/adapter/lightning_internals.py"


def training_step_metrics(trainer: Any) -> List[str]:
    """Names of the metrics ``training_step`` logged to a logger in the current batch.

    Relies on ``Trainer._results`` (the active loop's ``_ResultCollection``), whose values are
    ``_ResultMetric`` objects with ``meta.name``, ``meta.fx`` (the hook that logged) and ``meta.logger``.
    No public hook: ``trainer.callback_metrics`` and ``trainer.logged_metrics`` hold values only, not the
    hook that logged them, and ``logged_metrics`` is filled only every ``log_every_n_steps``. Checked:
    2.4.0, 2.6.6. Outside a loop (``_results`` is ``None``): ``[]``.
    """
    results = getattr(trainer, "_results", None)
    if results is None:
        return []
    return [
        metric.meta.name
        for metric in results.values()
        if getattr(metric, "meta", None) is not None and metric.meta.fx == "training_step" and metric.meta.logger
    ]


def epoch_micro_batches_done(trainer: Any) -> int:
    """The micro-batches of the current epoch already run (fetched), also after a resume mid-epoch.

    Relies on ``trainer.fit_loop.epoch_loop.batch_progress.current.ready`` (the loop's progress
    tracking, restored from the checkpoint's ``loops`` state). No public hook: the Trainer exposes
    ``global_step`` (optimizer steps, all epochs) and a ``batch_idx`` only inside batch hooks, not the
    count the restored loop will skip. Checked: 2.4.0, 2.6.6.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def val_check_is_time_based(trainer: Any) -> bool:
    """Whether the Trainer validates on a time interval (``val_check_interval`` a string, dict or
    ``timedelta``) rather than every so many batches.

    Relies on ``Trainer._val_check_time_interval`` (seconds, or ``None``), set from ``val_check_interval``
    in ``Trainer.__init__``. No public hook: ``trainer.val_check_interval`` keeps its previous (batch)
    value when the interval is time-based. Checked: 2.6.6; 2.4.0 has neither time-based intervals nor the
    attribute (``False``, rightly).
    """
    return getattr(trainer, "_val_check_time_interval", None) is not None


def attached_trainer(module: Any) -> Optional[Any]:
    """The Trainer ``module`` (a LightningModule, or ``None``) is attached to, else ``None``.

    Public API: ``LightningModule.trainer``, which raises ``RuntimeError`` when the module is not
    attached (2.x); some releases returned ``None`` instead, which is passed on. Replaces a read of the
    private ``LightningModule._trainer``. Checked: 2.4.0, 2.6.6.
    """
    if module is None:
        return None
    try:
        return module.trainer
    except RuntimeError:
        return None


def set_single_device(strategy: Any, device: Any) -> torch.device:
    """Make ``device`` the one device of a ``SingleDeviceStrategy`` after construction; returns it.

    Relies on ``SingleDeviceStrategy._root_device`` (what ``root_device`` returns). No public hook: the
    device is a constructor argument only, and ``DPStrategy`` takes it from the accelerator connector
    (which fills ``parallel_devices`` of a strategy that has that attribute) when the user gave none.
    Checked: 2.4.0, 2.6.6.
    """
    device = device if isinstance(device, torch.device) else torch.device(device)
    strategy._root_device = device
    return device


def set_data_parallel_size(strategy: Any, size: int) -> None:
    """Make every process a data-parallel rank of a ``ModelParallelStrategy`` (device mesh ``(size, 1)``).

    Relies on ``ModelParallelStrategy._data_parallel_size``, read by its ``setup_environment`` to build the
    mesh. No public hook: ``data_parallel_size`` is a constructor argument, and its ``"auto"`` means the
    number of nodes; the process count is known only after the accelerator connector ran. Checked: 2.4.0,
    2.6.6.
    """
    strategy._data_parallel_size = size


def set_backward_sync_control(strategy: Any, control: Any) -> None:
    """Make ``control`` what ``fabric.no_backward_sync`` asks a Fabric strategy for (its ``no_backward_sync(module,
    enabled)`` context). Relies on ``Strategy._backward_sync_control``, which ``Fabric.no_backward_sync`` reads.
    No public hook: it is set in the strategies' constructors only. Fabric's ``ModelParallelStrategy`` turns
    FSDP2's raw-gradient reduce-scatter back on when its context exits, which DP must never do. Checked: 2.4.0,
    2.6.6 (``lightning.fabric``)."""
    strategy._backward_sync_control = control


def callback_state_key(callback: Any, **kwargs: Any) -> str:
    """A callback's checkpoint key: its class's qualified name and ``repr(kwargs)``.

    The format of Lightning's protected ``Callback._generate_state_key``, written here rather than called:
    checkpoints hold the state under this key, so it must not change with Lightning. The test checks it
    still equals Lightning's (checkpoints written by either load). Checked: 2.4.0, 2.6.6.
    """
    return f"{type(callback).__qualname__}{repr(kwargs)}"


def wrapped_sampler(sampler: Any) -> Optional[Any]:
    """The sampler inside Lightning's ``DistributedSamplerWrapper`` (``None`` for any other sampler).

    Relies on ``DistributedSamplerWrapper.dataset`` being a ``_DatasetSamplerWrapper`` that keeps the
    wrapped sampler as ``_sampler`` (``lightning.fabric.utilities.distributed``). No public hook: the
    wrapper takes the sampler in its constructor and keeps no public reference. Duck-typed: any
    ``DistributedSampler`` whose dataset has ``_sampler``. Checked: 2.4.0, 2.6.6.
    """
    if not isinstance(sampler, torch.utils.data.DistributedSampler):
        return None
    return getattr(getattr(sampler, "dataset", None), "_sampler", None)


register_wrapped_sampler_reader(wrapped_sampler)
