"""PrivacyBudgetCallback on real Trainer runs: logs ε every step, stops before the budget."""
from __future__ import annotations

import copy

import pytest
from tests.namespace import pl
import torch
from tests.namespace import ModelCheckpoint
from tests.namespace import MisconfigurationException

from lightning_dp import compute_epsilon
from tests.namespace import DPStrategy, PrivacyBudgetCallback
from tests.lightning_helpers import MemoryLogger, TinyClassifier, make_loader, trainer_kwargs

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore::UserWarning")

SIGMA, Q, DELTA = 1.0, 0.25, 1e-5


def _first_step_over(budget: float) -> int:
    """The first step count whose ε exceeds ``budget`` — computed independently of the callback."""
    steps = 1
    while compute_epsilon(SIGMA, Q, steps, DELTA) <= budget:
        steps += 1
    return steps


def test_stops_before_the_budget_and_logs_every_step(tmp_path):
    budget = compute_epsilon(SIGMA, Q, 10, DELTA) + 1e-9  # exactly 10 steps fit
    assert _first_step_over(budget) == 11
    logger = MemoryLogger()
    callback = PrivacyBudgetCallback(epsilon_budget=budget, delta=DELTA)
    trainer = pl.Trainer(max_epochs=50, strategy=DPStrategy(noise_multiplier=SIGMA, seed=0), callbacks=[callback],
                         **trainer_kwargs(tmp_path, logger=logger))
    trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    assert trainer.global_step == 10
    assert trainer.strategy.get_epsilon(DELTA) <= budget
    assert callback.budget_reached
    logged = logger.history["epsilon"]
    assert len(logged) == 10
    for step, (logged_step, value) in enumerate(logged, start=1):
        assert value == pytest.approx(compute_epsilon(SIGMA, Q, step, DELTA), rel=1e-6)
    assert "epsilon" in trainer.progress_bar_metrics


def test_budget_holds_even_when_min_steps_forces_training_on(tmp_path):
    budget = compute_epsilon(SIGMA, Q, 5, DELTA) + 1e-9
    trainer = pl.Trainer(
        max_steps=12, min_steps=12, strategy=DPStrategy(noise_multiplier=SIGMA, seed=0),
        callbacks=[PrivacyBudgetCallback(epsilon_budget=budget, delta=DELTA)], **trainer_kwargs(tmp_path),
    )
    with pytest.warns(UserWarning, match="min_epochs/min_steps"):
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    assert trainer.strategy.accountant.total_steps == 5
    assert trainer.strategy.get_epsilon(DELTA) <= budget


def test_zero_noise_stops_at_once_without_moving_weights(tmp_path):
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=3, strategy=DPStrategy(noise_multiplier=0.0),
                         callbacks=[PrivacyBudgetCallback(epsilon_budget=10.0, delta=DELTA)], **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader())
    assert trainer.strategy.accountant.total_steps == 0
    assert trainer.strategy.get_epsilon(DELTA) == 0.0
    for key, value in before.items():
        assert torch.equal(value, model.state_dict()[key])


def test_delta_defaults_to_the_strategy_delta(tmp_path):
    callback = PrivacyBudgetCallback(epsilon_budget=100.0)
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=SIGMA, delta=1e-6), callbacks=[callback],
                         **trainer_kwargs(tmp_path))
    trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    assert callback.delta == 1e-6
    assert callback.last_epsilon == pytest.approx(compute_epsilon(SIGMA, Q, 2, 1e-6))


def test_state_survives_checkpoints(tmp_path):
    budget = compute_epsilon(SIGMA, Q, 6, DELTA) + 1e-9
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = PrivacyBudgetCallback(epsilon_budget=budget, delta=DELTA)
    trainer = pl.Trainer(max_epochs=10, strategy=DPStrategy(noise_multiplier=SIGMA, seed=0),
                         callbacks=[callback, checkpoint], **trainer_kwargs(tmp_path, enable_checkpointing=True))
    trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = saved["callbacks"][callback.state_key]
    assert state["budget_reached"] and state["epsilon_budget"] == budget

    restored = PrivacyBudgetCallback(epsilon_budget=budget, delta=DELTA)
    trainer2 = pl.Trainer(max_epochs=10, strategy=DPStrategy(noise_multiplier=SIGMA, seed=0), callbacks=[restored],
                          **trainer_kwargs(tmp_path))
    trainer2.fit(TinyClassifier(), train_dataloaders=make_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert restored.budget_reached
    assert trainer2.strategy.accountant.total_steps == 6, "resumed run spends nothing more past the budget"
    assert trainer2.strategy.get_epsilon(DELTA) <= budget


@pytest.mark.parametrize("kwargs,name", [(dict(epsilon_budget=0.0), "epsilon_budget"),
                                         (dict(epsilon_budget=-1.0), "epsilon_budget"),
                                         (dict(epsilon_budget=1.0, delta=1.5), "delta")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PrivacyBudgetCallback(**kwargs)


def test_needs_a_private_strategy(tmp_path):
    trainer = pl.Trainer(max_steps=1, callbacks=[PrivacyBudgetCallback(epsilon_budget=1.0)], **trainer_kwargs(tmp_path))
    model = TinyClassifier()
    with pytest.raises(MisconfigurationException, match="DPStrategy"):
        trainer.fit(model, train_dataloaders=make_loader())
    assert model.training_steps_run == 0
