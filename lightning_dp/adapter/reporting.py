"""The privacy report of a DP strategy: built from the accountant and settings, logged at the start
of training, written beside the logs at the end. No Lightning import."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .._checks import check_open_unit
from ..__about__ import __version__
from ..report import PrivacyReport
from . import lightning_internals


class ReportMixin:
    """``privacy_report()`` and the logging of it (part of the DP strategy)."""

    def privacy_report(self, delta: Optional[float] = None) -> PrivacyReport:
        """The record of how this model was trained privately (see :class:`~lightning_dp.PrivacyReport`)."""
        delta = self.delta if delta is None else check_open_unit("delta", delta)
        module = self.lightning_module
        trainer = lightning_internals.attached_trainer(module)
        optimizer = self.optimizers[0] if getattr(self, "optimizers", None) else None
        config = self.config
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
        return PrivacyReport(
            epsilon=self.accountant.get_epsilon(delta),
            delta=delta,
            accountant=self.accountant.mechanism,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            clipping_mode=clipping,
            sampling=self._sampling_description(),
            sample_rate=self.sample_rate,
            expected_batch_size=self.expected_batch_size,
            steps=self.accountant.total_steps - self._centering_releases(),
            epochs=trainer.current_epoch if trainer is not None else 0,
            dataset_size=self.dataset_size,
            secure_mode=config.secure_mode,
            world_size=self.world_size,
            target_epsilon=config.target_epsilon,
            dropped_samples=self.dropped_samples,
            secure_aggregation=self._secure_aggregation_summary(),
            centering=self._centering_summary(),
            versions={
                "lightning_dp": __version__,
                "torch": str(torch.__version__),
                self._host.package: self._host.version,
            },
        )

    def _sampling_description(self) -> str:
        config = self.config
        if not config.poisson_sampling:
            return "user sampler (not covered by the subsampling analysis)"
        if config.bands > 1:
            return f"cyclic poisson over {config.bands} groups (BandMF correlated noise; q below is bands·q)"
        return "poisson"

    def _secure_aggregation_summary(self) -> Optional[dict]:
        """The secure-aggregation mechanism of the report; ``None`` (the DDP strategy overrides it)."""
        return None

    def on_train_start(self) -> None:
        """Log the DP settings as hyperparameters, so runs compare side by side in TensorBoard."""
        super().on_train_start()  # type: ignore[misc]
        trainer = self.lightning_module.trainer
        hparams = self.privacy_report().hparams()
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)

    def on_train_end(self) -> None:
        """Write ``privacy_report.json`` beside the logs, log the report, print it (rank zero)."""
        super().on_train_end()  # type: ignore[misc]
        trainer = self.lightning_module.trainer
        report = self.privacy_report()
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
        self._host.info(f"\n{report.to_table()}\nWritten to {path}")
