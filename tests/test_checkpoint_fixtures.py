"""Checkpoints written by lightning-dp 0.1.0.dev0 before the privacy-state redesign (issue 29) resume with
their privacy history: the fixtures in ``tests/fixtures/checkpoints`` were written by main at 44472a2 with
``tests/fixtures/make_checkpoints.py`` and are never regenerated. A resumed run continues the checkpoint's
accountant history (privacy spent before the checkpoint is never forgotten), and its ε equals dp-accounting's
PLD ε of every step, before and after the checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dp_accounting_reference import import_dp_accounting
from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
from tests.namespace import DPStrategy, pl

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
MORE_STEPS = 4
pytestmark = [pytest.mark.lightning, pytest.mark.filterwarnings("ignore")]


def pld_epsilon(history, delta: float) -> float:
    """dp-accounting's PLD ε of a history of ``(σ, q, steps)`` Poisson-subsampled Gaussian rounds."""
    dp_accounting = import_dp_accounting()
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_a_checkpoint_of_0_1_0_dev0_resumes_with_its_privacy_history(name, tmp_path):
    entry = MANIFEST[name]
    path = FIXTURES / entry["file"]
    saved = torch.load(path, weights_only=False, map_location="cpu")
    assert entry["version"] == "0.1.0.dev0" and "lightning_dp" in saved
    strategy = DPStrategy(**entry["arguments"])
    trainer = pl.Trainer(max_steps=entry["steps"] + MORE_STEPS, max_epochs=4, strategy=strategy,
                         **trainer_kwargs(tmp_path))
    trainer.fit(TinyClassifier(), make_loader(n=64, batch_size=16), ckpt_path=str(path))
    history = [tuple(h) for h in strategy.accountant.history]
    frozen = [tuple(h) for h in entry["history"]]
    assert trainer.global_step == entry["steps"] + MORE_STEPS == strategy.accountant.total_steps
    assert history[: len(frozen)] == frozen or (
        len(frozen) == 1 and history[0][:2] == frozen[0][:2] and history[0][2] >= frozen[0][2]
    ), "the checkpoint's rounds open the resumed history"
    epsilon = strategy.get_epsilon(1e-5)
    reference = pld_epsilon(history, 1e-5)
    assert reference * (1 - 1e-3) <= epsilon <= reference * 1.01
    assert epsilon > entry["epsilon"]  # the steps before the checkpoint are still counted
    if "target_epsilon" in entry["arguments"]:  # recalibrated for the rest: the whole run within the target
        assert epsilon <= entry["arguments"]["target_epsilon"] * (1 + 1e-6)
