"""The privacy report: content, JSON beside the logs, checkpoints, loggers, markdown."""
from __future__ import annotations

import json
import math

import pytest
from tests.namespace import pl
import torch
from tests.namespace import ModelCheckpoint
from tests.namespace import TensorBoardLogger

import lightning_dp
from lightning_dp import PrivacyReport, compute_epsilon
from tests.namespace import DPStrategy
from tests.lightning_helpers import MemoryLogger, TinyClassifier, make_loader, trainer_kwargs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_report_after_fit_has_every_field_and_is_written_beside_the_logs(tmp_path, caplog):
    logger = TensorBoardLogger(tmp_path, name="run")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    strategy = DPStrategy(noise_multiplier=1.2, max_grad_norm=0.8, delta=1e-6, seed=0)
    trainer = pl.Trainer(max_epochs=2, strategy=strategy,
                         **trainer_kwargs(tmp_path, logger=logger, enable_checkpointing=True, callbacks=[checkpoint]))
    with caplog.at_level("INFO"):
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    report = strategy.privacy_report()
    assert report.epsilon == pytest.approx(compute_epsilon(1.2, 0.25, 8, 1e-6))
    assert (report.delta, report.noise_multiplier, report.max_grad_norm) == (1e-6, 1.2, 0.8)
    assert (report.accountant, report.sampling, report.sample_rate) == ("prv", "poisson", 0.25)
    assert (report.steps, report.epochs, report.dataset_size, report.expected_batch_size) == (8, 2, 64, 16)
    assert report.secure_mode is False and report.versions["lightning_dp"] == lightning_dp.__version__
    assert report.versions["torch"] == str(torch.__version__)

    written = json.loads((tmp_path / "run" / "version_0" / "privacy_report.json").read_text())
    assert PrivacyReport.from_dict(written) == report
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["lightning_dp"]["report"]
    assert saved["steps"] == 8 and saved["noise_multiplier"] == 1.2
    assert "Privacy report" in caplog.text and "ε = " in caplog.text
    assert logger.hparams["dp/noise_multiplier"] == 1.2 and logger.hparams["dp/steps"] == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "version_0"))
    events.Reload()
    assert any("privacy_report" in tag for tag in events.Tags()["tensors"]), events.Tags()


def test_dp_settings_are_logged_as_hyperparameters_at_start(tmp_path):
    logger = MemoryLogger()
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=0.9, secure_mode=True),
                         **trainer_kwargs(tmp_path, logger=logger))
    trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    assert logger.hparams["dp/noise_multiplier"] == 0.9
    assert logger.hparams["dp/secure_mode"] is True
    assert logger.hparams["dp/sample_rate"] == 0.25


def test_markdown_and_infinite_epsilon():
    report = PrivacyReport(epsilon=math.inf, delta=1e-5, accountant="prv", noise_multiplier=0.0, max_grad_norm=1.0,
                           clipping_mode="flat", sampling="poisson", sample_rate=0.1, expected_batch_size=10,
                           steps=3, epochs=1, dataset_size=100, secure_mode=False)
    markdown = report.to_markdown()
    assert markdown.startswith("## Privacy") and "ε = ∞" in markdown and "| Noise multiplier σ | 0 |" in markdown
    assert json.loads(report.to_json())["epsilon"] == "inf"
    assert PrivacyReport.from_dict(json.loads(report.to_json())).epsilon == math.inf
    assert "not private" in report.to_table()
