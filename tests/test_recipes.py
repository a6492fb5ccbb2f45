"""The default recipe (lightning_dp.recipes) and DPStrategy(recipe=...): its learning rate at every step, its clipping,
the moving average released as the model, validation on the average, exact resume, refusals."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_dp.config import DPConfig
from lightning_dp.recipes import DEFAULT_RECIPE, Recipe, resolve_recipe


def test_recipe_fields_are_checked_with_their_names():
    with pytest.raises(ValueError, match="learning_rate"):
        Recipe(learning_rate=0.0)
    with pytest.raises(ValueError, match="schedule"):
        Recipe(schedule="step")
    with pytest.raises(ValueError, match="clipping"):
        Recipe(clipping="hard")
    with pytest.raises(ValueError, match="ema_decay"):
        Recipe(ema_decay=1.0)
    with pytest.raises(ValueError, match="recipe"):
        resolve_recipe("fast")
    with pytest.raises(ValueError, match=r"unknown fields \['lr'\]"):
        resolve_recipe({"lr": 3.0})
    assert resolve_recipe("default") is DEFAULT_RECIPE
    assert resolve_recipe({"schedule": "cosine"}) == DEFAULT_RECIPE.replace(schedule="cosine")


def test_learning_rate_is_noise_scaled_and_follows_the_schedule():
    recipe = Recipe(learning_rate=6.0, decay_fraction=1.0)
    assert recipe.learning_rate_for(3.0) == 2.0
    assert recipe.learning_rate_for(0.0) == 6.0  # non-private: no scaling
    assert [recipe.lr_factor(t, 4) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = recipe.replace(schedule="cosine")
    assert cosine.lr_factor(0, 10) == 1.0 and cosine.lr_factor(5, 10) == pytest.approx(0.5)
    assert recipe.replace(schedule="constant").lr_factor(7, 10) == 1.0
    held = recipe.replace(decay_fraction=0.5)  # held for the first half, then the decay
    assert [held.lr_factor(t, 8) for t in range(9)] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="decay_fraction"):
        Recipe(decay_fraction=0.0)
    model = torch.nn.Linear(3, 2)
    optimizer = recipe.optimizer(model.parameters(), 2.0)
    scheduler = recipe.scheduler(optimizer, 4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([3.0, 2.25, 1.5, 0.75])


def test_centring_applies_to_a_first_linear_layer_on_raw_features_only():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    spec = DEFAULT_RECIPE.centring(mlp, torch.rand(50, 4))
    (layer, mean), = spec.items()
    assert layer is mlp[0] and mean.max_norm == 2.0 and mean.noise_multiplier == DEFAULT_RECIPE.centering_noise_multiplier
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    assert DEFAULT_RECIPE.centring(cnn, torch.rand(5, 1, 4, 4)) is None
    assert DEFAULT_RECIPE.replace(centering_noise_multiplier=None).centring(mlp, torch.rand(5, 4)) is None


def test_config_takes_the_clipping_from_the_recipe_and_refuses_conflicts():
    config = DPConfig(noise_multiplier=1.0, recipe="default")
    assert config.recipe is DEFAULT_RECIPE and config.clipping == "automatic" and config.max_grad_norm == 1.0
    assert DPConfig(noise_multiplier=1.0, recipe={"clipping": "flat", "max_grad_norm": 0.5}).max_grad_norm == 0.5
    for wrong in ({"clipping": "per_layer"}, {"max_grad_norm": 2.0}):
        with pytest.raises(ValueError, match="`recipe` sets the clipping"):
            DPConfig(noise_multiplier=1.0, recipe="default", **wrong)
    with pytest.raises(ValueError, match="bands=2"):
        DPConfig(noise_multiplier=1.0, recipe="default", bands=2)


def _recording_callback(pl):
    class Recorder(pl.Callback):
        def __init__(self):
            self.lrs, self.iterates, self.optimizers = [], [], []

        def on_train_start(self, trainer, module):
            self.iterates.append([p.detach().clone() for p in module.parameters()])

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])
            self.optimizers.append(type(optimizer.original_optimizer).__name__)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.iterates.append([p.detach().clone() for p in module.parameters()])

    return Recorder()


def _ema(iterates, decay):
    average = [t.clone() for t in iterates[0]]
    for t, weights in enumerate(iterates[1:]):
        d = min(decay, (1.0 + t) / (10.0 + t))
        average = [d * a + (1 - d) * w for a, w in zip(average, weights)]
    return average


def test_strategy_trains_with_the_recipes_learning_rate_clipping_and_releases_the_average(tmp_path):
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    recorder = _recording_callback(pl)
    strategy = DPStrategy(noise_multiplier=2.0, seed=0, recipe="default")
    model = TinyClassifier(lr=123.0)  # the module's optimizer says which parameters train; its lr is not used
    pl.Trainer(strategy=strategy, callbacks=[recorder], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
        model, train_dataloaders=make_loader(n=64, batch_size=8))
    steps = 2 * 64 // 8
    held = round((1 - DEFAULT_RECIPE.decay_fraction) * steps, 6)
    expected_lrs = [DEFAULT_RECIPE.learning_rate_for(2.0) * min(1.0, 1 - (t - held) / (steps - held))
                    for t in range(steps)]
    assert recorder.lrs == pytest.approx(expected_lrs, rel=1e-12)
    assert recorder.lrs[0] == recorder.lrs[int(held)] > recorder.lrs[-1]
    assert set(recorder.optimizers) == {"SGD"} and strategy.dp_optimizer.clipping == "automatic"
    assert strategy.privacy_report().clipping_mode.startswith("automatic")
    released = list(model.parameters())
    expected = _ema(recorder.iterates, DEFAULT_RECIPE.ema_decay)
    for got, want in zip(released, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(released[0].detach(), recorder.iterates[-1][0])  # the average, not the last iterate


def test_recipe_uses_the_calibrated_sigma_with_target_epsilon(tmp_path):
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    recorder = _recording_callback(pl)
    strategy = DPStrategy(target_epsilon=3.0, seed=0, recipe={"schedule": "constant", "learning_rate": 2.0})
    pl.Trainer(strategy=strategy, callbacks=[recorder], **trainer_kwargs(tmp_path, max_steps=5)).fit(
        TinyClassifier(), train_dataloaders=make_loader(n=64, batch_size=8))
    recipe = DEFAULT_RECIPE.replace(schedule="constant", learning_rate=2.0)
    assert recorder.lrs == pytest.approx([recipe.learning_rate_for(strategy.noise_multiplier)] * 5, rel=1e-12)
    assert recipe.learning_rate_for(strategy.noise_multiplier) != recipe.learning_rate_for(1.0)
    assert strategy.get_epsilon() <= 3.0


class _Validating:
    """A TinyClassifier whose validation steps record the weights they see."""

    @staticmethod
    def build():
        from tests.lightning_helpers import TinyClassifier

        class Model(TinyClassifier):
            def __init__(self):
                super().__init__()
                self.validated_with = []

            def validation_step(self, batch, batch_idx):
                self.validated_with.append([p.detach().clone() for p in self.parameters()])
                return super().validation_step(batch, batch_idx)

        return Model()


def test_validation_sees_the_average_and_training_goes_on_from_the_trained_weights(tmp_path):
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    loader = make_loader(n=64, batch_size=8)
    strategy = DPStrategy(noise_multiplier=1.0, seed=0, recipe="default")
    torch.manual_seed(0)
    validating = _Validating.build()
    pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path / "v", max_epochs=2, limit_val_batches=1)).fit(
        validating, train_dataloaders=loader, val_dataloaders=make_loader(n=16, batch_size=8, shuffle=False))
    plain_strategy = DPStrategy(noise_multiplier=1.0, seed=0, recipe="default")
    torch.manual_seed(0)
    plain = TinyClassifier()
    pl.Trainer(strategy=plain_strategy, **trainer_kwargs(tmp_path / "p", max_epochs=2)).fit(
        plain, train_dataloaders=loader)
    for a, b in zip(validating.parameters(), plain.parameters()):
        assert torch.equal(a, b)  # validating in between changed nothing
    last_validation = validating.validated_with[-1]
    for seen, released in zip(last_validation, validating.parameters()):
        assert torch.equal(seen, released.detach())  # the last validation saw the final average


def test_resume_from_a_checkpoint_is_exact_and_the_checkpoint_holds_the_average(tmp_path):
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    loader = make_loader(n=64, batch_size=8)
    torch.manual_seed(0)
    whole = TinyClassifier()
    pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, recipe="default"),
               **trainer_kwargs(tmp_path / "w", max_epochs=2)).fit(whole, train_dataloaders=loader)

    class StopAfterOneEpoch(pl.Callback):  # an interrupted run: planned for 2 epochs (the schedule's length)
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    first = pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, recipe="default"),
                       callbacks=[StopAfterOneEpoch()], **trainer_kwargs(tmp_path / "a", max_epochs=2))
    torch.manual_seed(0)
    half = TinyClassifier()
    first.fit(half, train_dataloaders=loader)
    path = tmp_path / "one_epoch.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    saved = checkpoint["lightning_dp_recipe"]
    for name, value in half.state_dict().items():
        assert torch.equal(checkpoint["state_dict"][name], value)  # the average: the released model
    assert not torch.equal(saved["trained"]["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])

    resumed = TinyClassifier()
    pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, recipe="default"),
               **trainer_kwargs(tmp_path / "b", max_epochs=2)).fit(resumed, train_dataloaders=loader, ckpt_path=path)
    for a, b in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(a, b)


def test_recipe_refusals_name_what_to_do(tmp_path):
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPFSDPStrategy, DPStrategy, pl

    class WithScheduler(TinyClassifier):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1)]

    with pytest.raises(Exception, match="learning-rate scheduler"):
        pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, recipe="default"),
                   **trainer_kwargs(tmp_path, max_epochs=1)).fit(WithScheduler(), train_dataloaders=make_loader())
    with pytest.raises(Exception, match="runs without end"):
        pl.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=0, recipe="default"),
                   **trainer_kwargs(tmp_path, max_epochs=-1)).fit(TinyClassifier(), train_dataloaders=make_loader())
    with pytest.raises(ValueError, match="DPFSDPStrategy does not take `recipe`"):
        DPFSDPStrategy(noise_multiplier=1.0, recipe="default")
    with pytest.raises(ValueError, match="`recipe` sets the clipping"):
        DPStrategy(noise_multiplier=1.0, recipe="default", clipping="per_layer")


def test_fabric_strategies_refuse_a_recipe_with_the_way_to_use_it():
    from lightning_dp.fabric import DPStrategy

    with pytest.raises(ValueError, match=r"Recipe.optimizer"):
        DPStrategy(noise_multiplier=1.0, recipe="default")


def test_recipe_is_math_consistent_with_make_private_parts():
    """The plain-PyTorch parts: optimizer lr at σ, scheduler over the steps, EMA decay."""
    model = torch.nn.Linear(2, 2)
    optimizer = DEFAULT_RECIPE.optimizer(model.parameters(), 4.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(DEFAULT_RECIPE.learning_rate / 4.0)
    average = DEFAULT_RECIPE.averaging(model)
    assert average.decay == DEFAULT_RECIPE.ema_decay
    assert DEFAULT_RECIPE.replace(ema_decay=0.0).averaging(model) is None
    assert math.isclose(DEFAULT_RECIPE.lr_factor(10, 10), 0.0)
