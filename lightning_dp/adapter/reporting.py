"""The privacy report of a DP strategy: built from its privacy state and settings, logged at the start of
training, written beside the logs at the end. No Lightning import."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .._checks import check_open_unit
from ..__about__ import __version__
from ..centering import PrivateMean
from ..config import DPConfig
from ..report import PrivacyReport
from . import lightning_internals
from .host import Host


def build_report(strategy: Any, delta: Optional[float] = None) -> PrivacyReport:
    """The :class:`~lightning_dp.PrivacyReport` of a DP strategy (its ``privacy``, ``config``, optimizer,
    Trainer and host) at ``delta`` (default: the strategy's)."""
    privacy, config, host = strategy.privacy, strategy.config, strategy._host
    delta = config.delta if delta is None else check_open_unit("delta", delta)
    module = strategy.lightning_module
    trainer = lightning_internals.attached_trainer(module)
    optimizer = strategy.optimizers[0] if getattr(strategy, "optimizers", None) else None
    return PrivacyReport(
        epsilon=privacy.accountant.get_epsilon(delta),
        delta=delta,
        accountant=privacy.accountant.mechanism,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        clipping_mode=_clipping_description(config, optimizer),
        sampling=_sampling_description(config),
        sample_rate=privacy.sample_rate,
        expected_batch_size=privacy.expected_batch_size,
        steps=privacy.accountant.total_steps - privacy.centring_releases,
        epochs=trainer.current_epoch if trainer is not None else 0,
        dataset_size=privacy.dataset_size,
        secure_mode=config.secure_mode,
        world_size=strategy.world_size,
        target_epsilon=config.target_epsilon,
        dropped_samples=privacy.dropped_samples,
        secure_aggregation=strategy.secure_aggregation_summary(),
        centering=_centering_summary(strategy._centering_spec, module),
        versions={"lightning_dp": __version__, "torch": str(torch.__version__), host.package: host.version},
    )


def _clipping_description(config: DPConfig, optimizer: Any) -> str:
    clipping = (
        f"{getattr(optimizer, 'clipping', config.clipping)} "
        f"({getattr(optimizer, 'clipping_mode', config.clipping_mode)} norms)"
    )
    adaptive = getattr(optimizer, "adaptive_clipping", None)
    if adaptive is not None:  # the norm moved: say from where, to where, and after what
        clipping += (
            f", adaptive (Andrew et al. 2021: target quantile {adaptive.target_quantile}, learning rate "
            f"{adaptive.learning_rate}; norm {config.max_grad_norm:g} at the start, "
            f"{optimizer.max_grad_norm:.4g} now; its noised counts are in ε)"
        )
    return clipping


def _sampling_description(config: DPConfig) -> str:
    if not config.poisson_sampling:
        return "user sampler (not covered by the subsampling analysis)"
    if config.bands > 1:
        return f"cyclic poisson over {config.bands} groups (BandMF correlated noise; q below is bands·q)"
    return "poisson"


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
