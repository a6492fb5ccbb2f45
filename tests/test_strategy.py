"""DPStrategy inside a real Trainer: the DP update, validation, arguments, checkpoints, teardown."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
from tests.namespace import pl
import torch
import torch.nn.functional as F
from tests.namespace import ModelCheckpoint
from tests.namespace import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset

from lightning_dp import PrivacyValidationError, compute_epsilon
from tests.namespace import DPStrategy
from tests.conftest import clipped_mean_reference, microbatch_grads
from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore::UserWarning")


def _reference_update(model, batch, max_grad_norm, expected_batch_size):
    x, y = batch
    grads = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"))
    return clipped_mean_reference(grads, max_grad_norm, expected_batch_size)


@pytest.mark.parametrize("poisson", [True, False])
def test_closure_pitfall_weights_move_exactly_as_clipped_reference(tmp_path, poisson):
    """Noise 0 and a tiny clip norm: a step that lost the clipping would move the weights far more."""
    model = TinyClassifier(lr=1.0)
    initial = copy.deepcopy(model)
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=1e-3, poisson_sampling=poisson, seed=3)
    trainer = pl.Trainer(max_steps=1, strategy=strategy, **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader(shuffle=False))
    assert trainer.global_step == 1 and len(model.seen_batches) == 1
    update = _reference_update(initial, model.seen_batches[0], 1e-3, expected_batch_size=16)
    for (name, p0), p1 in zip(initial.named_parameters(), model.parameters()):
        # float32 weights ~0.5 resolve ~6e-8; the clipped update has norm <= 1e-3, an unclipped one ~1e-1
        torch.testing.assert_close(p1.detach().double(), p0.detach().double() - update[name], rtol=0, atol=2e-7)


def test_several_steps_match_the_reference_step_by_step(tmp_path):
    model = TinyClassifier(lr=0.3)
    replay = copy.deepcopy(model)
    trainer = pl.Trainer(max_steps=5, strategy=DPStrategy(noise_multiplier=0.0, max_grad_norm=0.1, seed=0),
                         **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader())
    for batch in model.seen_batches:
        update = _reference_update(replay, batch, 0.1, 16)
        with torch.no_grad():
            for name, p in replay.named_parameters():
                p -= 0.3 * update[name].float()
    for p_ref, p in zip(replay.parameters(), model.parameters()):
        torch.testing.assert_close(p_ref, p, rtol=1e-4, atol=1e-6)


def test_registered_name_uses_documented_defaults(tmp_path):
    trainer = pl.Trainer(max_steps=2, strategy="dp_sgd", **trainer_kwargs(tmp_path))
    assert isinstance(trainer.strategy, DPStrategy)
    assert trainer.strategy.noise_multiplier == 1.0 and trainer.strategy.max_grad_norm == 1.0
    trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    assert trainer.strategy.get_epsilon(1e-5) == pytest.approx(compute_epsilon(1.0, 16 / 64, 2, 1e-5))


def test_poisson_sampler_replaces_training_loader_only(tmp_path):
    model = TinyClassifier()
    trainer = pl.Trainer(max_epochs=1, strategy=DPStrategy(noise_multiplier=1.0, seed=0), **trainer_kwargs(tmp_path))
    val = make_loader(shuffle=False)
    trainer.fit(model, train_dataloaders=make_loader(), val_dataloaders=val)
    sizes = {len(b[0]) for b in model.seen_batches}
    assert len(sizes) > 1, "Poisson batch sizes vary"
    assert trainer.strategy.sample_rate == pytest.approx(0.25)
    assert trainer.val_dataloaders is val
    assert trainer.strategy.accountant.total_steps == trainer.global_step == 4


def test_empty_batches_take_noise_only_steps(tmp_path):
    model = TinyClassifier()
    loader = make_loader(n=64, batch_size=1)  # q = 1/64: about a third of the batches are empty
    trainer = pl.Trainer(max_steps=30, strategy=DPStrategy(noise_multiplier=1.0, seed=0), **trainer_kwargs(tmp_path))
    before = copy.deepcopy(model.state_dict())
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == 30 == trainer.strategy.accountant.total_steps
    assert model.training_steps_run < 30, "the model is skipped on empty batches"
    assert not torch.equal(before["net.0.weight"], model.net[0].weight)


def test_target_epsilon_calibrates_for_the_planned_steps(tmp_path):
    trainer = pl.Trainer(max_epochs=3, strategy=DPStrategy(target_epsilon=2.0, delta=1e-5, seed=0),
                         **trainer_kwargs(tmp_path))
    trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    spent = trainer.strategy.get_epsilon()
    assert trainer.global_step == 12
    assert 0.97 * 2.0 <= spent <= 2.0
    assert spent == pytest.approx(compute_epsilon(trainer.strategy.noise_multiplier, 0.25, 12, 1e-5))


def test_batchnorm_is_refused_before_any_training_step(tmp_path):
    model = TinyClassifier(norm="batch")
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=1.0), **trainer_kwargs(tmp_path))
    with pytest.raises(PrivacyValidationError, match=r"net\.1 \(BatchNorm1d\).*GroupNorm"):
        trainer.fit(model, train_dataloaders=make_loader())
    assert model.training_steps_run == 0 and trainer.global_step == 0
    for key, value in before.items():
        assert torch.equal(value, model.state_dict()[key])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm"),
        (dict(noise_multiplier=1.0, max_grad_norm=-2.0), "max_grad_norm"),
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-3.0), "target_epsilon"),
        (dict(noise_multiplier=1.0, delta=0.0), "delta"),
        (dict(noise_multiplier=1.0, delta=1.0), "delta"),
        (dict(noise_multiplier=1.0, target_epsilon=3.0), "exactly one of `noise_multiplier` and `target_epsilon`"),
        (dict(), "exactly one of `noise_multiplier` and `target_epsilon`"),
        (dict(noise_multiplier=1.0, loss_reduction="avg"), "loss_reduction"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        DPStrategy(**kwargs)
    if "=" in str(kwargs):
        assert "got" in str(err.value)


def test_a_loader_poisson_sampling_cannot_serve_is_refused_before_step_one(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            for _ in range(8):
                yield torch.randn(6), torch.tensor(0)

    model = TinyClassifier()
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0), **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="IterableDataset.*poisson_sampling=False"):
        trainer.fit(model, train_dataloaders=DataLoader(Stream(), batch_size=4))
    assert model.training_steps_run == 0


def test_gradient_clip_val_is_refused_at_setup(tmp_path):
    model = TinyClassifier()
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0),
                         **trainer_kwargs(tmp_path, gradient_clip_val=1.0))
    with pytest.raises(MisconfigurationException, match="max_grad_norm"):
        trainer.fit(model, train_dataloaders=make_loader())
    assert model.training_steps_run == 0


def test_zero_noise_warns_that_epsilon_is_infinite():
    with pytest.warns(UserWarning, match="NOT private"):
        strategy = DPStrategy(noise_multiplier=0.0)
    strategy.accountant.step(noise_multiplier=0.0, sample_rate=0.1)
    assert strategy.get_epsilon() == float("inf")


def test_poisson_sampling_off_keeps_loader_and_warns(tmp_path):
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, poisson_sampling=False),
                         **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="amplification"):
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader())
    assert trainer.strategy.sample_rate == pytest.approx(0.25)


def test_model_is_ordinary_after_fit_and_eval_loops_work(tmp_path):
    model = TinyClassifier()
    keys = list(model.state_dict())
    trainer = pl.Trainer(max_epochs=1, strategy=DPStrategy(noise_multiplier=1.0, seed=0), **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader(), val_dataloaders=make_loader(shuffle=False))
    assert list(model.state_dict()) == keys
    assert all(not m._forward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    pickle.dumps(model)  # no hook closures left behind
    predictions = trainer.predict(model, dataloaders=make_loader(shuffle=False))
    assert torch.cat(predictions).shape == (64, 3)
    assert trainer.validate(model, dataloaders=make_loader(shuffle=False))[0]["val_loss"] > 0


def test_checkpoint_carries_privacy_state_and_resume_continues_it(tmp_path):
    def run(max_epochs, ckpt_path=None):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            strategy=DPStrategy(noise_multiplier=1.2, seed=0),
            **trainer_kwargs(tmp_path, enable_checkpointing=True, callbacks=[checkpoint]),
        )
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader(), ckpt_path=ckpt_path)
        return trainer

    first = run(2)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["lightning_dp"]["accountant"]["history"] == [(1.2, 0.25, 8)] or saved["lightning_dp"]["accountant"][
        "history"
    ] == [[1.2, 0.25, 8]]
    resumed = run(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.global_step == 16 == resumed.strategy.accountant.total_steps
    assert resumed.strategy.get_epsilon(1e-5) == pytest.approx(compute_epsilon(1.2, 0.25, 16, 1e-5))
    assert first.strategy.get_epsilon(1e-5) < resumed.strategy.get_epsilon(1e-5)


def test_checkpoint_weights_load_into_a_plain_module(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0),
                         **trainer_kwargs(tmp_path, enable_checkpointing=True, callbacks=[checkpoint]))
    model = TinyClassifier()
    trainer.fit(model, train_dataloaders=make_loader())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = TinyClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.smoke
def test_secure_mode_end_to_end_and_key_never_in_checkpoint(tmp_path):
    from lightning_dp.noise import SecureRNG

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    strategy = DPStrategy(noise_multiplier=1.0, secure_mode=True)
    assert isinstance(strategy.noise, SecureRNG)
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=2, strategy=strategy,
                         **trainer_kwargs(tmp_path, enable_checkpointing=True, callbacks=[checkpoint]))
    trainer.fit(model, train_dataloaders=make_loader())
    assert trainer.global_step == 8 == strategy.accountant.total_steps
    assert not torch.equal(before["net.0.weight"], model.net[0].weight)
    key = strategy.noise._key
    raw = (tmp_path / "ckpt" / "last.ckpt").read_bytes()
    assert key not in raw, "the secure generator's key must never be written"
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["lightning_dp"]
    assert saved["noise"] == {} and saved["sampler"] is None

    resumed_strategy = DPStrategy(noise_multiplier=1.0, secure_mode=True)
    resumed = pl.Trainer(max_epochs=3, strategy=resumed_strategy, **trainer_kwargs(tmp_path))
    resumed.fit(TinyClassifier(), train_dataloaders=make_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_strategy.noise._key != key, "a resumed secure run re-keys from the OS"
    assert resumed_strategy.accountant.total_steps == 12


def test_secure_mode_refuses_seeds_and_insecure_mode_warns_once():
    with pytest.raises(ValueError, match="`seed` must be None with secure_mode=True"):
        DPStrategy(noise_multiplier=1.0, secure_mode=True, seed=3)
    import lightning_dp.noise.sources as engine

    engine._warned_not_secure = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DPStrategy(noise_multiplier=1.0)
        DPStrategy(noise_multiplier=1.0)
    assert sum("secure_mode=False" in str(w.message) for w in caught) == 1


def test_clipping_modes_give_the_same_update_through_the_strategy(tmp_path):
    def run(**kwargs):
        torch.manual_seed(0)
        model = TinyClassifier(lr=0.5)
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.1, seed=2, **kwargs)
        pl.Trainer(max_steps=3, strategy=strategy, **trainer_kwargs(tmp_path)).fit(model, train_dataloaders=make_loader())
        return model, strategy

    fast, strategy = run()
    plain, _ = run(clipping_mode="materialize")
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert strategy.privacy_report().clipping_mode == "flat (auto norms)"
    per_layer, strategy = run(clipping="per_layer")
    assert strategy.dp_optimizer.clipping == "per_layer"
    with pytest.raises(ValueError, match="clipping_mode"):
        DPStrategy(noise_multiplier=1.0, clipping_mode="fastest")
