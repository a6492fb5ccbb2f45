"""Lightning Trainer features that change what feeds an optimizer step, under DP (the table in
``lightning_dp/adapter/features.py``): each one is either accounted exactly or refused before step 1.

For every accounted feature three things are checked against quantities computed here, independently
of the strategy:

* the *recorded* per-step sample rates (``accountant.history``, run-length ``(σ, q, steps)``) equal the
  rates the feature really uses, ``q = k·B/N`` (``k`` accumulation, ``B`` loader batch size, ``N`` data);
* ``get_epsilon(δ)`` agrees with dp-accounting's PLD accountant fed those per-step rates
  (:func:`pld_epsilon`), within the tolerance ``tests/test_accounting_prv.py`` uses;
* the module trained on the batches we think (optimizer steps, ``training_step`` calls).

Case 1's figures (n=64, B=8, σ=1, δ=1e-5, ``GradientAccumulationScheduler({0: 1, 2: 3})``, 4 epochs:
16 steps at q=1/8 then 4 steps at q=3/8): the strategy reports ε = 6.4885 and dp-accounting's PLD
(interval 1e-4) gives ε = 6.4852 (ours 0.05% above, the safe side; a 1e-5 grid gives the same 6.4852).
Had all 20 steps been recorded at the epoch-0 rate q=1/8 (a stale-rate error of the kind the issue
reports: ε shown 4.07, truly 6.31, on the reporter's unknown data and batch size), ε would read 4.364
here, a third below the truth.
"""
from __future__ import annotations

import copy
import itertools
import time
from typing import List, Sequence, Tuple

import pytest
import torch

from tests.dp_accounting_reference import import_dp_accounting
from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
from tests.namespace import DPStrategy, MisconfigurationException, pl, submodule

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore::UserWarning")

callbacks = submodule("callbacks")
GradientAccumulationScheduler = callbacks.GradientAccumulationScheduler

DELTA = 1e-5
N = 64  # every training set here has 64 examples
# Same tolerance as tests/test_accounting_prv.py against dp-accounting's PLD accountant.
ABOVE_TOL = 0.01  # ε at most 1% above the reference ...
BELOW_TOL = 0.001  # ... and at most 0.1% below it
REFUSED = r"^Not available under DP:"


# --- references ---------------------------------------------------------------------------------------
def pld_epsilon(steps: Sequence[Tuple[float, float]], delta: float, interval: float = 1e-4) -> float:
    """ε at ``delta`` of the per-step ``(σ, q)`` list by dp-accounting's PLD accountant (each run of
    equal steps composed as one ``SelfComposedDpEvent`` of a Poisson-subsampled Gaussian)."""
    dp_accounting = import_dp_accounting()
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), len(list(group))
        )
        for (sigma, q), group in itertools.groupby(steps)
    ]
    accountant = PLDAccountant(value_discretization_interval=interval)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return accountant.get_epsilon(delta)


def per_step(*segments: Tuple[float, float, int]) -> List[Tuple[float, float]]:
    """``(σ, q, n)`` segments expanded to the per-step list ``pld_epsilon`` takes."""
    return [(sigma, q) for sigma, q, n in segments for _ in range(n)]


def assert_history(strategy, expected: Sequence[Tuple[float, float, int]]) -> None:
    """The accountant recorded exactly ``expected`` (run-length ``(σ, q, steps)``)."""
    history = strategy.accountant.history
    assert len(history) == len(expected), (history, expected)
    for (sigma, q, n), (e_sigma, e_q, e_n) in zip(history, expected):
        assert sigma == pytest.approx(e_sigma, rel=1e-12), (history, expected)
        assert q == pytest.approx(e_q, rel=1e-12), (history, expected)
        assert n == e_n, (history, expected)


def assert_epsilon_matches_pld(strategy, steps: Sequence[Tuple[float, float]], delta: float = DELTA) -> Tuple[float, float]:
    ours = strategy.get_epsilon(delta)
    ref = pld_epsilon(steps, delta)
    assert ref * (1 - BELOW_TOL) <= ours <= ref * (1 + ABOVE_TOL), (ours, ref)
    return ours, ref


def assert_nothing_spent(trainer, model=None, before=None) -> None:
    assert trainer.strategy.accountant.total_steps == 0
    assert trainer.strategy.get_epsilon(DELTA) == 0.0
    assert trainer.global_step == 0
    if model is not None:
        assert model.training_steps_run == 0
        for key, value in before.items():
            assert torch.equal(value, model.state_dict()[key]), key


class CountingClassifier(TinyClassifier):
    """TinyClassifier that also counts ``validation_step`` calls."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.validation_steps_run = 0

    def validation_step(self, batch, batch_idx):
        self.validation_steps_run += 1
        return super().validation_step(batch, batch_idx)


def fit(tmp_path, model=None, strategy=None, loader=None, val=None, **trainer_overrides):
    model = model if model is not None else TinyClassifier()
    strategy = strategy if strategy is not None else DPStrategy(noise_multiplier=1.0, seed=0)
    trainer = pl.Trainer(strategy=strategy, **trainer_kwargs(tmp_path, **trainer_overrides))
    trainer.fit(model, train_dataloaders=loader if loader is not None else make_loader(n=N, batch_size=8),
                val_dataloaders=val)
    return trainer, model


# --- 1, 2. GradientAccumulationScheduler -----------------------------------------------------------------
def test_accumulation_schedule_records_the_rate_of_every_epoch(tmp_path):
    """B=8, N=64: 8 micro-batches per epoch. Epochs 0–1: k=1, 8 steps at q=1/8; epochs 2–3: k=3,
    8//3 = 2 steps at q=3/8 (6 micro-batches)."""
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, max_epochs=4, callbacks=[GradientAccumulationScheduler({0: 1, 2: 3})],
                         strategy=DPStrategy(noise_multiplier=sigma, seed=0))
    chunks = N // B
    expected = [(sigma, 1 * B / N, 2 * (chunks // 1)), (sigma, 3 * B / N, 2 * (chunks // 3))]
    assert expected == [(1.0, 0.125, 16), (1.0, 0.375, 4)]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == 20 == trainer.strategy.accountant.total_steps
    assert model.training_steps_run == 2 * 8 + 2 * 6  # micro-batches: whole windows only
    ours, ref = assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))
    # The figures quoted in the module docstring (and what the pre-fix accounting would have said).
    assert ours == pytest.approx(6.4885, abs=1e-3) and ref == pytest.approx(6.4852, abs=1e-3)
    stale = pld_epsilon(per_step((sigma, B / N, 20)), DELTA)  # every step at the epoch-0 rate
    assert stale == pytest.approx(4.3642, abs=1e-3) and stale < 0.7 * ref


def test_accumulation_schedule_with_target_epsilon_spends_the_target(tmp_path):
    B, target = 8, 3.0
    strategy = DPStrategy(target_epsilon=target, delta=DELTA, seed=0)
    trainer, model = fit(tmp_path, max_epochs=4, callbacks=[GradientAccumulationScheduler({0: 1, 2: 3})],
                         strategy=strategy)
    sigma = strategy.noise_multiplier
    expected = [(sigma, B / N, 16), (sigma, 3 * B / N, 4)]
    assert_history(strategy, expected)
    assert trainer.global_step == 20
    spent = strategy.get_epsilon(DELTA)
    assert target - 0.05 <= spent <= target
    assert_epsilon_matches_pld(strategy, per_step(*expected))


def test_decreasing_schedule_accounts_the_steps_that_ran(tmp_path):
    """{0: 3, 2: 1}: epochs 0–1 take 8 // 3 = 2 draws at q=3B/N; the k=1 epochs are accounted at q=B/N for
    every step they really take (see the next test for how many that is)."""
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, max_epochs=4, callbacks=[GradientAccumulationScheduler({0: 3, 2: 1})])
    late = trainer.global_step - 4
    expected = [(sigma, 3 * B / N, 4), (sigma, B / N, late)]
    assert_history(trainer.strategy, expected)
    assert model.training_steps_run == 2 * 6 + late
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


def test_decreasing_schedule_keeps_lightnings_epoch_length(tmp_path):
    """Lightning fixes num_training_batches from the loader's length when it sets it up (epoch 0: 8 // 3 * 3
    = 6 micro-batches); the sampler plans with that cap, so the k=1 epochs take 6 whole draws each."""
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, max_epochs=4, callbacks=[GradientAccumulationScheduler({0: 3, 2: 1})])
    expected = [(sigma, 3 * B / N, 2 * (8 // 3)), (sigma, B / N, 2 * 6)]
    assert_history(trainer.strategy, expected)
    assert model.training_steps_run == 4 * 6
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


def test_decreasing_schedule_with_target_epsilon_spends_the_target(tmp_path):
    target = 3.0
    strategy = DPStrategy(target_epsilon=target, delta=DELTA, seed=0)
    fit(tmp_path, max_epochs=4, callbacks=[GradientAccumulationScheduler({0: 3, 2: 1})], strategy=strategy)
    assert target - 0.05 <= strategy.get_epsilon(DELTA) <= target


def test_schedule_whose_window_overruns_the_first_epochs_length_takes_whole_draws(tmp_path):
    """{0: 3, 1: 4}: Lightning keeps epoch 0's 6 micro-batches per epoch; epoch 1 takes 6 // 4 = 1 draw of 4."""
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, max_epochs=2, callbacks=[GradientAccumulationScheduler({0: 3, 1: 4})])
    expected = [(sigma, 3 * B / N, 2), (sigma, 4 * B / N, 1)]
    assert_history(trainer.strategy, expected)
    assert model.training_steps_run == 6 + 4
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


# --- 3. accumulate_grad_batches changed inside an epoch ----------------------------------------------
class ChangeAccumulation(pl.Callback):
    def __init__(self, epoch: int, batch_idx: int, to: int) -> None:
        self.epoch, self.batch_idx, self.to = epoch, batch_idx, to

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            trainer.accumulate_grad_batches = self.to


@pytest.mark.parametrize(
    "k,epoch,batch_idx,to,steps_before",
    [
        (1, 0, 3, 2, 3),  # after three whole steps
        (2, 0, 1, 1, 0),  # inside the first window: its first micro-batch never reaches a step
        (2, 0, 4, 4, 2),  # at a window boundary, still mid-epoch
        (1, 1, 5, 2, 13),  # in the second epoch
    ],
)
def test_accumulation_changed_mid_epoch_is_refused(tmp_path, k, epoch, batch_idx, to, steps_before):
    B = 8
    model = TinyClassifier()
    strategy = DPStrategy(noise_multiplier=1.0, seed=0)
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=k, strategy=strategy,
                         callbacks=[ChangeAccumulation(epoch, batch_idx, to)], **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*accumulate_grad_batches changed to " + str(to)):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=B))
    # every step taken is a whole draw at the rate of the k it was drawn for; nothing after the change
    assert trainer.global_step == steps_before == strategy.accountant.total_steps
    assert_history(strategy, [(1.0, k * B / N, steps_before)] if steps_before else [])
    assert model.training_steps_run == epoch * (N // B) + batch_idx  # the changed batch never ran


class SetAccumulationAtEpochStart(pl.Callback):
    """Changes ``accumulate_grad_batches`` between epochs, without GradientAccumulationScheduler."""

    def __init__(self, epoch: int, to: int) -> None:
        self.epoch, self.to = epoch, to

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.accumulate_grad_batches = self.to


def test_accumulation_changed_between_epochs_is_accounted(tmp_path):
    """Between epochs the sampler re-reads k: the new epoch's draws are whole at the new rate."""
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, max_epochs=4, callbacks=[SetAccumulationAtEpochStart(2, 3)])
    expected = [(sigma, B / N, 16), (sigma, 3 * B / N, 4)]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == 20 and model.training_steps_run == 28
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


def test_accumulation_changed_between_epochs_with_target_epsilon_is_refused_at_the_change(tmp_path):
    """σ was calibrated for k=1 in all 4 epochs (32 steps at q=1/8); k=3 from epoch 2 would take steps at
    q=3/8 the plan never priced. The table in lightning_dp/adapter/features.py (and
    docs/lightning_features.rst) says: refused with target_epsilon, at the first micro-batch after the
    change. So epochs 0–1 run (16 steps at q=1/8, within the target), and nothing of epoch 2 does."""
    B, target = 8, 3.0
    model = TinyClassifier()
    strategy = DPStrategy(target_epsilon=target, delta=DELTA, seed=0)
    trainer = pl.Trainer(max_epochs=4, strategy=strategy, callbacks=[SetAccumulationAtEpochStart(2, 3)],
                         **trainer_kwargs(tmp_path))
    refused = REFUSED + r" accumulate_grad_batches changed to 3 in epoch 2, but σ was calibrated for target_epsilon"
    with pytest.raises(MisconfigurationException, match=refused):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=B))
    sigma = strategy.noise_multiplier
    assert_history(strategy, [(sigma, B / N, 2 * (N // B))])
    assert trainer.global_step == 16 and model.training_steps_run == 16  # epoch 2's first batch never ran
    assert strategy.get_epsilon(DELTA) <= target


# --- 4. reload_dataloaders_every_n_epochs -------------------------------------------------------------
class ReloadingClassifier(TinyClassifier):
    """``train_dataloader()`` gives a different batch size each epoch."""

    def __init__(self, batch_sizes: Sequence[int]) -> None:
        super().__init__()
        self.batch_sizes = list(batch_sizes)
        self.loaded: List[int] = []

    def train_dataloader(self):
        batch_size = self.batch_sizes[self.current_epoch]
        self.loaded.append(batch_size)
        return make_loader(n=N, batch_size=batch_size)


def test_reloaded_loaders_are_accounted_at_their_own_rates(tmp_path):
    sigma = 1.0
    model = ReloadingClassifier([8, 16, 8])
    trainer = pl.Trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1,
                         strategy=DPStrategy(noise_multiplier=sigma, seed=0), **trainer_kwargs(tmp_path))
    trainer.fit(model)
    assert model.loaded == [8, 16, 8]
    expected = [(sigma, 8 / N, N // 8), (sigma, 16 / N, N // 16), (sigma, 8 / N, N // 8)]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == 20 == model.training_steps_run
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


def test_reloaded_loaders_with_target_epsilon_are_refused_before_step_1(tmp_path):
    model = ReloadingClassifier([8, 16, 8])
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1,
                         strategy=DPStrategy(target_epsilon=3.0, seed=0), **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*reload_dataloaders_every_n_epochs"):
        trainer.fit(model)
    assert_nothing_spent(trainer, model, before)


# --- 5. limit_train_batches ---------------------------------------------------------------------------
def test_integer_limit_draws_whole_windows_only(tmp_path):
    """limit 3 with k=2: 3 // 2 = 1 draw of rate 2B/N per epoch (2 micro-batches, never a half window)."""
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, max_epochs=2, accumulate_grad_batches=2, limit_train_batches=3)
    expected = [(sigma, 2 * B / N, 2 * (3 // 2))]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == 2
    assert model.training_steps_run == 4
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


def test_fractional_limit_aligned_with_the_window_is_accounted(tmp_path):
    """0.5 of 8 micro-batches = 4 = two windows of k=2: two steps of rate 2B/N per epoch."""
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, max_epochs=2, accumulate_grad_batches=2, limit_train_batches=0.5)
    expected = [(sigma, 2 * B / N, 2 * int(0.5 * (N // B)) // 2)]
    assert expected == [(1.0, 0.25, 4)]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == 4
    assert model.training_steps_run == 8
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


@pytest.mark.parametrize("k,limit", [(2, 0.375), (3, 0.75), (4, 0.75)])  # 3 of 8, 4 of 6, 6 of 8 micro-batches
def test_fractional_limit_cutting_a_window_is_refused(tmp_path, k, limit):
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=k, limit_train_batches=limit,
                         strategy=DPStrategy(noise_multiplier=1.0, seed=0), **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*limit_train_batches"):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=8))
    assert_nothing_spent(trainer, model, before)


def test_fractional_limit_cutting_a_scheduled_window_is_refused(tmp_path):
    """k=1 in epoch 0 is fine with 4 of 8 micro-batches, k=3 of epoch 1 is not (4 % 3): refused up front."""
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=0.5, callbacks=[GradientAccumulationScheduler({0: 1, 1: 3})],
                         strategy=DPStrategy(noise_multiplier=1.0, seed=0), **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*limit_train_batches.*accumulate_grad_batches=3"):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=8))
    assert_nothing_spent(trainer, model, before)


# --- 6. overfit_batches ---------------------------------------------------------------------------------
def test_overfit_batches_is_refused_before_step_1(tmp_path):
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=2, overfit_batches=2, strategy=DPStrategy(noise_multiplier=1.0, seed=0),
                         **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*overfit_batches=2"):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=8))
    assert_nothing_spent(trainer, model, before)


# --- 7. a second fit on the same Trainer --------------------------------------------------------------------
def _two_fits(tmp_path, **strategy_kwargs):
    model = TinyClassifier()
    strategy = DPStrategy(seed=0, **strategy_kwargs)
    trainer = pl.Trainer(max_epochs=2, strategy=strategy, **trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=16))
    first = list(model.seen_batches)
    trainer.fit_loop.max_epochs = 4
    return trainer, model, first


def test_second_fit_continues_the_history(tmp_path):
    sigma = 1.0
    trainer, model, first = _two_fits(tmp_path, noise_multiplier=sigma)
    assert trainer.global_step == 8 and len(first) == 8
    trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=16))
    assert trainer.current_epoch == 4 and trainer.global_step == 16 == model.training_steps_run
    expected = [(sigma, 16 / N, 16)]
    assert_history(trainer.strategy, expected)
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


def test_second_fit_draws_fresh_poisson_samples(tmp_path):
    """The accountant composes the second fit's steps as fresh Poisson draws, so they must be: a sampling
    generator re-seeded at every ``setup`` replayed all 8 draws of the first fit (found while writing this
    file; fixed in ``PrivacyStateMixin._seed_generators``, which now seeds once per rank)."""
    trainer, model, first = _two_fits(tmp_path, noise_multiplier=1.0)
    trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=16))
    second = model.seen_batches[len(first):]
    assert len(second) == len(first) == 8
    same = sum(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert same == 0, f"{same} of {len(first)} Poisson batches of the second fit repeat the first fit's"


def test_second_fit_with_another_loader_is_accounted_at_its_rate(tmp_path):
    sigma = 1.0
    trainer, model, first = _two_fits(tmp_path, noise_multiplier=sigma)
    trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=8))
    expected = [(sigma, 16 / N, 8), (sigma, 8 / N, 16)]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == 24 == model.training_steps_run
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


def test_second_fit_with_target_epsilon_is_refused(tmp_path):
    trainer, model, _ = _two_fits(tmp_path, target_epsilon=3.0)
    history = list(trainer.strategy.accountant.history)
    spent = trainer.strategy.get_epsilon(DELTA)
    assert spent <= 3.0 and trainer.global_step == 8
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*second Trainer.fit.*target_epsilon=3.0"):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=16))
    assert trainer.strategy.accountant.history == history and trainer.global_step == 8
    assert trainer.strategy.get_epsilon(DELTA) == spent
    for key, value in before.items():
        assert torch.equal(value, model.state_dict()[key]), key


# --- 8. target_epsilon and the length of the run --------------------------------------------------------------
@pytest.mark.parametrize(
    "limits",
    [dict(max_epochs=-1, max_steps=-1), dict(max_time={"minutes": 10})],  # max_time alone: Lightning sets max_epochs=-1
    ids=["unlimited", "max_time-only"],
)
def test_target_epsilon_without_a_finite_length_is_refused(tmp_path, limits):
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(strategy=DPStrategy(target_epsilon=3.0, seed=0), **trainer_kwargs(tmp_path, **limits))
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*finite training length"):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=8))
    assert_nothing_spent(trainer, model, before)


def test_target_epsilon_with_max_time_and_max_epochs_is_planned_for_the_epochs(tmp_path):
    B, target = 8, 3.0
    strategy = DPStrategy(target_epsilon=target, delta=DELTA, seed=0)
    trainer, model = fit(tmp_path, strategy=strategy, max_epochs=2, max_time={"minutes": 10})
    expected = [(strategy.noise_multiplier, B / N, 16)]
    assert_history(strategy, expected)
    assert target - 0.05 <= strategy.get_epsilon(DELTA) <= target
    assert_epsilon_matches_pld(strategy, per_step(*expected))


class SlowStep(pl.Callback):
    """Sleeps after optimizer step ``at`` so that ``max_time`` runs out there."""

    def __init__(self, at: int, seconds: float) -> None:
        self.at, self.seconds = at, seconds

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            time.sleep(self.seconds)


def test_max_time_stopping_early_spends_less_than_the_target(tmp_path):
    B, target = 8, 3.0
    strategy = DPStrategy(target_epsilon=target, delta=DELTA, seed=0)
    trainer, model = fit(tmp_path, strategy=strategy, max_epochs=2, max_time={"seconds": 1},
                         callbacks=[SlowStep(at=3, seconds=1.2)])
    steps = trainer.global_step
    assert 3 <= steps <= 4  # the Timer stopped the run long before the planned 16 steps
    expected = [(strategy.noise_multiplier, B / N, steps)]
    assert_history(strategy, expected)
    assert strategy.get_epsilon(DELTA) < target - 0.05
    assert_epsilon_matches_pld(strategy, per_step(*expected))


# --- 9. Tuner ---------------------------------------------------------------------------------------------
class TunableClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 8

    def train_dataloader(self):
        return make_loader(n=N, batch_size=self.batch_size)


@pytest.mark.parametrize(
    "method,kwargs,callback",
    [("lr_find", dict(num_training=5), "LearningRateFinder"),
     ("scale_batch_size", dict(max_trials=2, steps_per_trial=1), "BatchSizeFinder")],
)
def test_tuner_is_refused_without_spending_privacy(tmp_path, method, kwargs, callback):
    Tuner = submodule("tuner").Tuner
    model = TunableClassifier()
    before = copy.deepcopy(model.state_dict())
    strategy = DPStrategy(noise_multiplier=1.0, seed=0)
    trainer = pl.Trainer(max_epochs=2, strategy=strategy, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + rf".*{callback}"):
        getattr(Tuner(trainer), method)(model, **kwargs)
    assert_nothing_spent(trainer, model, before)
    assert model.batch_size == 8


@pytest.mark.parametrize("name", ["LearningRateFinder", "BatchSizeFinder"])
def test_tuner_callbacks_are_refused_without_spending_privacy(tmp_path, name):
    model = TunableClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=2, strategy=DPStrategy(noise_multiplier=1.0, seed=0),
                         callbacks=[getattr(callbacks, name)()], **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + rf".*{name}"):
        trainer.fit(model)
    assert_nothing_spent(trainer, model, before)


# --- 10. val_check_interval -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,interval,every", [(1, 2, 2), (2, 2, 2), (2, 0.5, 4)])
def test_val_check_interval_aligned_with_the_window_is_accounted(tmp_path, k, interval, every):
    """``every``: micro-batches between validations (0.5 of 8 = 4)."""
    B, sigma = 8, 1.0
    model = CountingClassifier()
    val = make_loader(n=16, batch_size=8, shuffle=False)  # 2 validation batches per check
    trainer, model = fit(tmp_path, model=model, val=val, max_epochs=2, accumulate_grad_batches=k,
                         val_check_interval=interval)
    checks_per_epoch = (N // B) // every
    assert model.validation_steps_run == 2 * checks_per_epoch * 2
    expected = [(sigma, k * B / N, 2 * (N // B) // k)]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == expected[0][2]
    assert model.training_steps_run == 2 * (N // B)
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))


@pytest.mark.parametrize("interval", [3, 0.375])  # every 3 micro-batches, inside windows of 2
def test_val_check_interval_inside_a_window_is_refused(tmp_path, interval):
    model = CountingClassifier()
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=2, val_check_interval=interval,
                         strategy=DPStrategy(noise_multiplier=1.0, seed=0), **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=REFUSED + r".*val_check_interval"):
        trainer.fit(model, train_dataloaders=make_loader(n=N, batch_size=8),
                    val_dataloaders=make_loader(n=16, batch_size=8, shuffle=False))
    assert_nothing_spent(trainer, model, before)
    assert model.validation_steps_run == 0


# --- 11. weight averaging ----------------------------------------------------------------------------------------
def _averaging_callbacks():
    yield pytest.param(lambda: callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1), id="SWA")
    if hasattr(callbacks, "WeightAveraging"):
        yield pytest.param(lambda: callbacks.WeightAveraging(), id="WeightAveraging")
    else:
        yield pytest.param(None, id="WeightAveraging", marks=pytest.mark.skip("no WeightAveraging in this namespace"))


@pytest.mark.parametrize("make_callback", list(_averaging_callbacks()))
def test_weight_averaging_is_post_processing(tmp_path, make_callback):
    B, sigma = 8, 1.0
    callback = make_callback()
    trainer, model = fit(tmp_path, max_epochs=3, callbacks=[callback])
    expected = [(sigma, B / N, 3 * (N // B))]
    assert_history(trainer.strategy, expected)
    assert trainer.global_step == 24 == model.training_steps_run
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))
    # the averaging really happened (and the released weights are the average)
    if isinstance(callback, callbacks.StochasticWeightAveraging):
        assert callback.n_averaged is not None and int(callback.n_averaged) >= 2
        averaged = callback._average_model
    else:
        assert int(callback._average_model.n_averaged) == 24
        averaged = callback._average_model.module
    for p, q in zip(averaged.parameters(), model.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu())


# --- configure_optimizers sizing a schedule with trainer.estimated_stepping_batches --------------------
class ScheduledClassifier(TinyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        total = self.trainer.estimated_stepping_batches  # sets the training loader up before the optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total),
                                 "interval": "step"}}


def test_estimated_stepping_batches_in_configure_optimizers(tmp_path):
    B, sigma = 8, 1.0
    trainer, model = fit(tmp_path, model=ScheduledClassifier(), max_epochs=2, accumulate_grad_batches=2)
    assert trainer.estimated_stepping_batches == 2 * (8 // 2)
    expected = [(sigma, 2 * B / N, 2 * (8 // 2))]
    assert_history(trainer.strategy, expected)
    assert_epsilon_matches_pld(trainer.strategy, per_step(*expected))
