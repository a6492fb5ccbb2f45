"""The privacy report of a DP strategy: built from its privacy state and settings, logged at the start of
training, written beside the logs at the end. No Lightning import."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ..centering import PrivateMean
from ..report import PrivacyReport, describe_run
from . import lightning_internals
from .host import Host


def build_report(strategy: Any, delta: Optional[float] = None) -> PrivacyReport:
    """The :class:`~lightning_dp.PrivacyReport` of a DP strategy (its ``privacy``, ``config``, optimizer,
    Trainer and host) at ``delta`` (default: the strategy's)."""
    host, module = strategy._host, strategy.lightning_module
    trainer = lightning_internals.attached_trainer(module)
    return describe_run(
        strategy.privacy, strategy.config,
        optimizer=strategy.optimizers[0] if getattr(strategy, "optimizers", None) else None,
        world_size=strategy.world_size, epochs=trainer.current_epoch if trainer is not None else 0,
        versions={host.package: host.version}, delta=delta,
        secure_aggregation=strategy.secure_aggregation_summary(),
        centering=_centering_summary(strategy._centering_spec, module),
    )


def _centering_summary(spec: Optional[Dict[Any, Any]], module: Any) -> Optional[Dict[str, str]]:
    """How each centred layer's centre was obtained (``None`` without centring)."""
    if spec is None:
        return None
    names = {id(m): n for n, m in module.named_modules()} if module is not None else {}
    summary = {}
    for key, value in spec.items():
        name = key if isinstance(key, str) else names.get(id(key), type(key).__name__)
        summary[name] = (
            f"private mean (Gaussian, σ = {value.noise_multiplier:g}, row norm ≤ {value.max_norm:g}; one release "
            "at sampling rate 1, in ε)" if isinstance(value, PrivateMean) else "public centre (no privacy cost)"
        )
    return summary


def log_hyperparameters(trainer: Any, report: PrivacyReport) -> None:
    """Log the DP settings as hyperparameters with every logger (runs then compare side by side)."""
    hparams = report.hparams()
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


def write_report(trainer: Any, report: PrivacyReport, host: Host) -> None:
    """Write ``privacy_report.json`` beside the logs, log the report, print it (rank zero)."""
    log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: log_dir broadcasts under DDP
    if not trainer.is_global_zero:
        return
    path = Path(log_dir) / "privacy_report.json"
    report.to_json(path)
    for logger in trainer.loggers:
        logger.log_hyperparams(report.hparams())
        logger.save()
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("privacy_report", report.to_markdown(), global_step=trainer.global_step)
    host.info(f"\n{report.to_table()}\nWritten to {path}")
