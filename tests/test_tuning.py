"""The accounted hyperparameter search (lightning_dp.tuning): Papernot-Steinke accounting against dp-accounting,
the distributions of K, calibration, the driver, resumption and a search whose trials run in a Trainer."""
from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import pytest
import torch

from lightning_dp.accounting import RDPAccountant
from lightning_dp.accounting.rdp import DEFAULT_RDP_ORDERS
from lightning_dp.metrics import PrivateAccuracy
from lightning_dp.report import PrivacyReport
from lightning_dp.tuning import (
    PoissonTrials,
    PrivateHyperparameterSearch,
    TruncatedNegativeBinomialTrials,
    search_epsilon,
    search_noise_multiplier,
)
from lightning_dp.accounting.rdp import _delta_from_rdp
from lightning_dp.accounting.repeat_and_select import search_rdp, trial_history
from tests.dp_accounting_reference import import_dp_accounting

pytestmark = pytest.mark.filterwarnings("ignore:secure_mode=False", "ignore:noise_multiplier=0")

CANDIDATES = [{"lr": 0.1}, {"lr": 0.3}, {"lr": 1.0}]
DISTRIBUTIONS = [
    PoissonTrials(1.0),
    PoissonTrials(3.0),
    PoissonTrials(20.0),
    TruncatedNegativeBinomialTrials.from_mean(5.0, 1.0),  # geometric
    TruncatedNegativeBinomialTrials.from_mean(10.0, 0.0),  # logarithmic
    TruncatedNegativeBinomialTrials.from_mean(10.0, 0.5),
    TruncatedNegativeBinomialTrials(2.0, 0.1),
]
TRIALS = [(1.0, 0.01, 1000), (2.0, 0.05, 500), (0.8, 0.004, 5000), (5.0, 1.0, 1)]


# --------------------------------------------------------------------------------------------------
# Accounting against dp-accounting's RdpAccountant with RepeatAndSelectDpEvent
# --------------------------------------------------------------------------------------------------
def _reference_epsilon(history, distribution, delta, orders=DEFAULT_RDP_ORDERS):
    dp_accounting = import_dp_accounting()
    from dp_accounting.dp_event import RepeatAndSelectDpEvent
    from dp_accounting.rdp import RdpAccountant

    events = []
    for sigma, q, n in history:
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        event = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(event, n))
    shape = math.inf if isinstance(distribution, PoissonTrials) else distribution.shape
    acc = RdpAccountant(list(orders))
    acc.compose(RepeatAndSelectDpEvent(dp_accounting.ComposedDpEvent(events), distribution.mean, shape))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS, ids=lambda d: json.dumps(d.to_dict()))
@pytest.mark.parametrize("sigma,q,steps", TRIALS)
def test_search_epsilon_is_at_least_dp_accountings_and_within_one_percent(sigma, q, steps, distribution):
    history = trial_history(sigma, q, steps)  # training and one validation release at rate 1
    ours = search_epsilon(history, distribution, 1e-5)
    theirs = _reference_epsilon(history, distribution, 1e-5)
    # dp-accounting recovers gamma from the mean by bisection to 1e-9 relative, rounded down: its epsilon may
    # exceed ours by that much; beyond it ours is never below theirs.
    assert theirs * (1 - 1e-9) <= ours <= theirs * 1.01, (ours, theirs)


@pytest.mark.parametrize("distribution", [PoissonTrials(3.0), TruncatedNegativeBinomialTrials(1.0, 0.2)],
                         ids=["poisson", "geometric"])
def test_where_dp_accounting_drops_low_orders_we_agree_on_the_orders_it_keeps(distribution):
    """At q = 0.25 dp-accounting gives up on orders 1.1-1.7 (its series needs > 1000 terms) and we do not:
    on the orders it keeps the two agree; with all orders ours may be lower (a tighter, still valid bound)."""
    history = trial_history(1.2, 0.25, 6)
    orders = [a for a in DEFAULT_RDP_ORDERS if a >= 1.8]
    logging.getLogger("absl").setLevel(logging.ERROR)
    ours = search_epsilon(history, distribution, 1e-5, orders)
    theirs = _reference_epsilon(history, distribution, 1e-5, orders)
    assert theirs * (1 - 1e-9) <= ours <= theirs * 1.01
    assert search_epsilon(history, distribution, 1e-5) <= ours


def test_the_search_costs_more_than_one_trial_and_grows_with_the_mean():
    history = trial_history(1.0, 0.01, 1000)
    one = RDPAccountant()
    one.load_state_dict({"mechanism": "rdp", "history": history})
    epsilons = [search_epsilon(history, PoissonTrials(mu), 1e-5) for mu in (2.0, 5.0, 20.0)]
    assert one.get_epsilon(1e-5) < epsilons[0] < epsilons[1] < epsilons[2]


# --------------------------------------------------------------------------------------------------
# The distributions of K
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", [PoissonTrials(3.0), TruncatedNegativeBinomialTrials(1.0, 0.25),
                                          TruncatedNegativeBinomialTrials(0.0, 0.05),
                                          TruncatedNegativeBinomialTrials(-0.5, 0.1),
                                          TruncatedNegativeBinomialTrials(2.0, 0.3)])
def test_draws_have_the_stated_mean_and_law(distribution):
    rng = random.Random(1)
    draws = np.array([distribution.sample(rng) for _ in range(20000)])
    assert abs(draws.mean() - distribution.mean) < 4 * draws.std() / math.sqrt(len(draws))
    if isinstance(distribution, TruncatedNegativeBinomialTrials):
        assert draws.min() >= 1
        eta, gamma = distribution.shape, distribution.gamma
        # P[K = 1] from Definition 1 of Papernot-Steinke
        p1 = (1 - gamma) * (eta / (gamma**-eta - 1) if eta != 0 else 1 / math.log(1 / gamma))
        assert abs((draws == 1).mean() - p1) < 4 * math.sqrt(p1 * (1 - p1) / len(draws))


def test_truncated_negative_binomial_mean_formulas():
    assert TruncatedNegativeBinomialTrials(1.0, 0.2).mean == pytest.approx(5.0, rel=1e-12)  # geometric: 1/gamma
    assert TruncatedNegativeBinomialTrials(0.0, 0.1).mean == pytest.approx(0.9 / (0.1 * math.log(10)), rel=1e-12)
    assert TruncatedNegativeBinomialTrials(2.0, 0.5).mean == pytest.approx(2 * 0.5 / (0.5 * (1 - 0.25)), rel=1e-12)
    logarithmic = TruncatedNegativeBinomialTrials(0.0, 0.1).mean
    assert TruncatedNegativeBinomialTrials(1e-12, 0.1).mean == pytest.approx(logarithmic)
    assert TruncatedNegativeBinomialTrials.from_mean(7.5, 0.5).mean == pytest.approx(7.5, rel=1e-9)


@pytest.mark.parametrize("call,name", [
    (lambda: PoissonTrials(0.0), "mean"),
    (lambda: TruncatedNegativeBinomialTrials(-1.0, 0.5), "shape"),
    (lambda: TruncatedNegativeBinomialTrials(1.0, 1.0), "gamma"),
    (lambda: TruncatedNegativeBinomialTrials.from_mean(1.0, 1.0), "mean"),
    (lambda: trial_history(1.0, 0.0, 10), "sample_rate"),
    (lambda: trial_history(1.0, 0.1, 0), "steps"),
    (lambda: search_noise_multiplier(-1.0, 1e-5, PoissonTrials(2.0), 0.01, 100), "target_epsilon"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", [PoissonTrials(4.0), TruncatedNegativeBinomialTrials.from_mean(4.0, 0.0)])
@pytest.mark.parametrize("target", [2.0, 8.0])
def test_calibration_meets_the_target_for_the_whole_search(distribution, target):
    sigma = search_noise_multiplier(target, 1e-5, distribution, 0.01, 500)
    spent = search_epsilon(trial_history(sigma, 0.01, 500), distribution, 1e-5)
    assert target * (1 - 1e-3) <= spent <= target
    assert search_epsilon(trial_history(sigma * 0.99, 0.01, 500), distribution, 1e-5) > target  # not wasteful
    # a fixed validation sigma: the training sigma alone is calibrated
    sigma_train = search_noise_multiplier(target, 1e-5, distribution, 0.01, 500, validation_noise_multiplier=20.0)
    assert search_epsilon(trial_history(sigma_train, 0.01, 500, 1, 20.0), distribution, 1e-5) <= target


@pytest.mark.parametrize("distribution", [PoissonTrials(3.0), TruncatedNegativeBinomialTrials.from_mean(3.0, 1.0)],
                         ids=["poisson", "geometric"])
def test_extra_releases_of_every_trial_are_accounted_like_dp_accountings_composition(distribution):
    """A centre released by every trial (the recipe's centring): its own σ, at rate 1, in each trial's curve."""
    history = trial_history(1.5, 0.1, 300, extra_releases=[(12.0, 1.0, 1)])
    assert history == [(1.5, 0.1, 300), (1.5, 1.0, 1), (12.0, 1.0, 1)]
    ours = search_epsilon(history, distribution, 1e-5)
    theirs = _reference_epsilon(history, distribution, 1e-5)
    assert theirs * (1 - 1e-9) <= ours <= theirs * 1.01, (ours, theirs)
    assert ours > search_epsilon(trial_history(1.5, 0.1, 300), distribution, 1e-5)  # the centre costs something
    sigma = search_noise_multiplier(3.0, 1e-5, distribution, 0.1, 300, extra_releases=[(12.0, 1.0, 1)])
    assert search_epsilon(trial_history(sigma, 0.1, 300, extra_releases=[(12.0, 1.0, 1)]), distribution,
                          1e-5) <= 3.0
    assert sigma > search_noise_multiplier(3.0, 1e-5, distribution, 0.1, 300)
    with pytest.raises(ValueError, match="extra_releases"):
        trial_history(1.0, 0.1, 10, extra_releases=[(1.0, 0.5)])
    search = PrivateHyperparameterSearch(
        lambda c, s, seed: (0.5, _report(s)), [{"lr": 1}], distribution=distribution, sample_rate=0.01, steps=100,
        delta=1e-5, target_epsilon=3.0, extra_releases=[(12.0, 1.0, 1)], secure_mode=False, seed=0)
    assert search.report.extra_releases == [(12.0, 1.0, 1)]
    assert search.report.epsilon <= 3.0 and "Other releases per trial" in search.report.to_table()


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------
def _report(sigma, steps=100, q=0.01, sampling="poisson"):
    return PrivacyReport(epsilon=1.0, delta=1e-5, accountant="prv", noise_multiplier=sigma, max_grad_norm=1.0,
                         clipping_mode="flat", sampling=sampling, sample_rate=q, expected_batch_size=10,
                         steps=steps, epochs=1, dataset_size=1000, secure_mode=False)


class FakeTrials:
    """A train_fn: the score is a function of the candidate and seed; records every call; can crash."""

    def __init__(self, crash_after=None, steps=100):
        self.calls, self.crash_after, self.steps = [], crash_after, steps

    def __call__(self, candidate, noise_multiplier, seed):
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise KeyboardInterrupt("interrupted")
        self.calls.append((candidate["lr"], noise_multiplier, seed))
        return candidate["lr"] + (seed % 97) / 1000, _report(noise_multiplier, self.steps), f"ckpt-{seed}"


def _search(train_fn, tmp_path=None, **overrides):
    kwargs = dict(distribution=TruncatedNegativeBinomialTrials.from_mean(3.0, 1.0), sample_rate=0.01, steps=100,
                  delta=1e-5, target_epsilon=6.0, secure_mode=False, seed=0,
                  state_path=None if tmp_path is None else tmp_path / "search.json")
    kwargs.update(overrides)
    return PrivateHyperparameterSearch(train_fn, CANDIDATES, **kwargs)


def test_search_runs_k_trials_and_releases_the_best_with_the_total_epsilon():
    fake = FakeTrials()
    search = _search(fake)
    result = search.run()
    k = search.distribution.sample(random.Random(0))  # the same seeded draw
    assert len(result.trials) == len(fake.calls) == k == 5
    best = max(result.trials, key=lambda t: t.score)
    assert (result.candidate, result.score, result.output) == (best.candidate, best.score, f"ckpt-{best.seed}")
    assert all(sigma == search.noise_multiplier for _, sigma, _ in fake.calls)
    report = result.report
    assert report.distribution == {"name": "truncated_negative_binomial", "shape": 1.0,
                                   "gamma": search.distribution.gamma, "mean": search.distribution.mean}
    assert report.candidates == CANDIDATES and report.target_epsilon == 6.0
    assert 6.0 * (1 - 1e-3) <= report.epsilon <= 6.0
    assert report.epsilon == search_epsilon(search.trial_history(), search.distribution, 1e-5)
    assert report.trial_epsilon < report.epsilon
    assert "mean 3" in report.to_table() and f"(ε = {report.epsilon:.4g}, δ = 1e-05)" in report.to_table()
    assert all(t.report["steps"] == 100 for t in result.trials)  # each trial's privacy report is kept
    # min mode picks the lowest score
    assert _search(FakeTrials(), mode="min").run().score == min(t.score for t in result.trials)


def test_same_seed_same_search_and_secure_mode_needs_no_seed():
    a, b = FakeTrials(), FakeTrials()
    _search(a).run(), _search(b).run()
    assert a.calls == b.calls
    secure = _search(FakeTrials(), secure_mode=True, seed=None)
    assert secure.run().report.secure_mode is True


def test_poisson_can_draw_no_trial():
    fake = FakeTrials()
    result = _search(fake, distribution=PoissonTrials(0.05)).run()
    assert result.candidate is None and result.score is None and result.trials == [] and fake.calls == []
    assert result.report.epsilon > 0


@pytest.mark.parametrize("report,match", [
    (_report(2.0, steps=101), "steps=101 > steps=100"),
    (_report(0.5), "noise_multiplier=0.5"),
    (_report(2.0, q=0.02), "sample_rate=0.02"),
    (_report(2.0, sampling="user sampler"), "sampling='user sampler'"),
    ("not a report", "PrivacyReport"),
    ({**_report(2.0).to_dict(), "privacy_unit": "user"}, "privacy_unit='user'"),
])
def test_a_trial_that_spends_more_than_the_plan_is_refused(report, match):
    search = _search(lambda c, s, seed: (0.5, report), noise_multiplier=1.0, target_epsilon=None)
    with pytest.raises(ValueError, match=match):
        search.run()


@pytest.mark.parametrize("kwargs,name", [
    (dict(noise_multiplier=1.0), "noise_multiplier"),  # both noise_multiplier and target_epsilon
    (dict(mode="best"), "mode"),
    (dict(steps=0), "steps"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(delta=0.0), "delta"),
    (dict(distribution=3.0), "distribution"),
    (dict(seed=None), "seed"),
])
def test_bad_search_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        _search(FakeTrials(), **kwargs)
    with pytest.raises(ValueError, match="`candidates`"):
        PrivateHyperparameterSearch(FakeTrials(), [], distribution=PoissonTrials(2.0), sample_rate=0.1, steps=1,
                                    delta=1e-5, noise_multiplier=1.0)


# --------------------------------------------------------------------------------------------------
# Resumption
# --------------------------------------------------------------------------------------------------
def test_an_interrupted_search_resumes_without_rerunning_or_respending_trials(tmp_path):
    uninterrupted = _search(FakeTrials()).run()
    crashing = FakeTrials(crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        _search(crashing, tmp_path).run()
    state = json.loads((tmp_path / "search.json").read_text())
    assert state["num_trials"] == 5 and len(state["trials"]) == 2  # K stored once, two trials recorded

    resumed_fn = FakeTrials()
    resumed = _search(resumed_fn, tmp_path).run()
    assert crashing.calls == uninterrupted_calls(uninterrupted)[:2]
    assert resumed_fn.calls == uninterrupted_calls(uninterrupted)[2:]  # trials 1-2 were not run again
    assert resumed.report.epsilon == uninterrupted.report.epsilon  # the same search, the same total
    assert (resumed.candidate, resumed.score, resumed.output) == (uninterrupted.candidate, uninterrupted.score,
                                                                  uninterrupted.output)
    # running it again runs nothing: every trial is recorded
    again = FakeTrials()
    assert _search(again, tmp_path).run().score == resumed.score and again.calls == []


def uninterrupted_calls(result):
    return [(t.candidate["lr"], result.report.noise_multiplier, t.seed) for t in result.trials]


def test_resuming_with_other_settings_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _search(FakeTrials(crash_after=1), tmp_path).run()
    with pytest.raises(ValueError, match=r"`state_path`.*different search.*distribution"):
        _search(FakeTrials(), tmp_path, distribution=PoissonTrials(3.0)).run()
    with pytest.raises(ValueError, match=r"different search.*noise_multiplier"):
        _search(FakeTrials(), tmp_path, target_epsilon=5.0).run()


# --------------------------------------------------------------------------------------------------
# Trials that are Trainer runs
# --------------------------------------------------------------------------------------------------
@pytest.mark.lightning
def test_a_search_whose_trials_are_trainer_runs(tmp_path):
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    held_out = make_loader(n=256, batch_size=64, shuffle=False, seed=1)
    reports = []

    def train_fn(candidate, noise_multiplier, seed):
        torch.manual_seed(seed)
        model = TinyClassifier(lr=candidate["lr"])
        strategy = DPStrategy(noise_multiplier=noise_multiplier, max_grad_norm=1.0, seed=seed)
        trainer = pl.Trainer(max_steps=4, strategy=strategy, **trainer_kwargs(tmp_path / str(seed)))
        trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=16))
        accuracy = PrivateAccuracy(noise_multiplier=noise_multiplier, secure_mode=False, seed=seed)
        with torch.no_grad():
            for x, y in held_out:
                accuracy.update(model(x), y)
        reports.append(strategy.privacy_report())
        return accuracy.compute(), reports[-1]

    search = PrivateHyperparameterSearch(
        train_fn, [{"lr": 0.05}, {"lr": 0.5}], distribution=PoissonTrials(2.0), sample_rate=16 / 64, steps=4,
        delta=1e-5, target_epsilon=10.0, secure_mode=False, seed=0, state_path=tmp_path / "search.json")
    result = search.run()
    assert len(result.trials) == len(reports) == 3  # Poisson(2) with seed 0 draws K = 3
    assert [t.report for t in result.trials] == [r.to_dict() for r in reports]
    assert all(r.steps == 4 and r.sample_rate == 0.25 and r.noise_multiplier == search.noise_multiplier
               for r in reports)
    assert result.score == max(t.score for t in result.trials) and 0 <= result.score <= 1
    assert 10.0 * (1 - 1e-3) <= result.report.epsilon <= 10.0


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_poisson_bound_holds_against_the_exact_divergence_including_k_zero(mu, sigma):
    """One Gaussian release per trial (score = the noisy value, best = largest): the exact Renyi divergence of
    order 2 of the search's output (density of the maximum plus the atom e^-mu of K = 0), by numerical
    integration, never exceeds our bound. Theorem 6 read literally (without the K = 0 atom) falls below it
    for mu < 1."""
    from scipy import stats

    y = np.linspace(-15 * sigma - 2, 15 * sigma + 3, 400001)

    def density(mean):  # d/dy of E[F(y)^K] for K ~ Poisson(mu)
        return mu * np.exp(mu * (stats.norm.cdf(y, mean, sigma) - 1)) * stats.norm.pdf(y, mean, sigma)

    history = [(sigma, 1.0, 1)]
    orders, ours = search_rdp(history, PoissonTrials(mu))
    bound = ours[list(orders).index(2.0)]
    for a, b in ((density(0.0), density(1.0)), (density(1.0), density(0.0))):
        exact = math.log(np.trapezoid(a**2 / b, y) + math.exp(-mu))
        assert exact <= bound
        if mu < 1 and sigma == 1.0:
            trial = RDPAccountant(tuple(orders)).get_rdp(history)
            delta_hat = float(_delta_from_rdp(orders, trial, np.array([math.log(2.0)]))[0])
            literal = 2.0 / (2 * sigma**2) + mu * delta_hat + math.log(mu)  # Theorem 6 at order 2, as stated
            assert literal < exact  # the atom of K = 0 is needed
