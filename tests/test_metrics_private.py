"""Private metrics (lightning_dp.metrics): noise statistics, sensitivity, accounting, public pass-through, errors,
and a private metric logged from a LightningModule's validation_step."""
from __future__ import annotations

import math

import pytest
import torch
import torchmetrics

from lightning_dp.accounting import RDPAccountant
from lightning_dp.metrics import PrivateAccuracy, PrivateF1Score, PrivateMeanLoss

pytestmark = pytest.mark.filterwarnings("ignore:secure_mode=False")


def _data(n=400, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=g)
    scores = torch.randn(n, classes, generator=g) + 1.5 * torch.nn.functional.one_hot(target, classes)
    losses = torch.rand(n, generator=g) * 6.0  # some above max_loss = 4
    return scores, target, losses


# Each case: a factory (private or public) and an update that feeds data[index] (all examples when None).
def _accuracy(**kw):
    return PrivateAccuracy(num_classes=3, **kw)


def _loss(**kw):
    return PrivateMeanLoss(max_loss=4.0, **kw)


def _f1_macro(**kw):
    return PrivateF1Score(num_classes=3, average="macro", **kw)


def _f1_binary(**kw):
    return PrivateF1Score(**kw)


def _feed(metric, index=None):
    scores, target, losses = _data()
    if index is not None:
        scores, target, losses = scores[index], target[index], losses[index]
    if isinstance(metric, PrivateMeanLoss):
        metric.update(losses)
    elif isinstance(metric, PrivateF1Score) and metric.average == "binary":
        metric.update(scores[:, 1] - scores[:, 0] > 0, (target == 1).long())  # bool preds: labels
    else:
        metric.update(scores, target)


CASES = [(_accuracy, 1.0), (_loss, math.sqrt(2.0)), (_f1_macro, math.sqrt(2.0)), (_f1_binary, 1.0)]
IDS = ["accuracy", "mean_loss", "f1_macro", "f1_binary"]


# --------------------------------------------------------------------------------------------------
# Sensitivity: removing any one example moves the count vector by at most Δ, and some example by exactly Δ
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory,sensitivity", CASES, ids=IDS)
def test_one_example_moves_the_counts_by_at_most_the_sensitivity(factory, sensitivity):
    full = factory(public=True)
    _feed(full)
    assert full.sensitivity == pytest.approx(sensitivity)
    n = _data()[1].shape[0]
    moves = []
    for i in range(0, n, 7):
        without = factory(public=True)
        _feed(without, torch.tensor([j for j in range(n) if j != i]))
        moves.append(float((full.counts - without.counts).norm()))
    assert max(moves) <= sensitivity * (1 + 1e-12)
    if factory is not _loss:
        assert max(moves) == pytest.approx(sensitivity)  # attained: Δ is exact, not loose


def test_worst_case_losses_stay_within_the_sensitivity():
    metric = PrivateMeanLoss(max_loss=2.0, public=True)
    metric.update(torch.tensor([math.nan, math.inf, -math.inf, 1e30, -5.0, 2.0]))
    # nan and inf count as max_loss, -inf and negatives as 0: each example adds at most (1, 1)
    assert metric.counts.tolist() == [4.0, 6.0]  # sum of clip(loss, 0, L) / L = 1 + 1 + 0 + 1 + 0 + 1, count 6
    assert float(metric.compute()) == pytest.approx(2.0 * 4 / 6)


# --------------------------------------------------------------------------------------------------
# Noise: released counts are unbiased with std σ·Δ; every release is accounted once
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory,sensitivity", CASES, ids=IDS)
def test_released_counts_have_mean_counts_and_std_sigma_times_sensitivity(factory, sensitivity):
    sigma, releases = 3.0, 1500
    accountant = RDPAccountant()
    metric = factory(noise_multiplier=sigma, secure_mode=False, seed=123, accountant=accountant)
    noisy = []
    for _ in range(releases):
        metric.reset()
        _feed(metric)
        metric.compute()
        noisy.append(metric.last_release["counts"])
    noisy = torch.tensor(noisy, dtype=torch.float64)
    exact = metric.counts
    errors = noisy - exact
    std = sigma * sensitivity
    assert errors.mean(0).abs().max() < 4 * std / math.sqrt(releases)
    assert errors.std(0).sub(std).abs().max() < 0.06 * std  # ~1.8% standard error per count
    assert accountant.history == [(sigma, 1.0, releases)]  # one Gaussian step at rate 1 per release


def test_repeated_compute_is_one_release_and_an_update_starts_a_new_one():
    metric = _accuracy(noise_multiplier=1.0, secure_mode=False, seed=0)
    _feed(metric)
    first, again = metric.compute(), metric.compute()
    assert first == again and metric.accountant.total_steps == 1
    _feed(metric, torch.arange(10))
    metric.compute()
    assert metric.accountant.total_steps == 2


def test_seeded_releases_reproduce_and_the_default_is_secure():
    values = []
    for _ in range(2):
        metric = _accuracy(noise_multiplier=1.0, secure_mode=False, seed=7)
        _feed(metric)
        values.append(float(metric.compute()))
    assert values[0] == values[1]
    secure = _accuracy(noise_multiplier=1.0)
    _feed(secure)
    secure.compute()
    assert type(secure._noise).__name__ == "SecureRNG"


def test_private_values_track_the_exact_values():
    scores, target, _ = _data(n=20000)
    private = PrivateF1Score(num_classes=3, average="macro", noise_multiplier=1.0, secure_mode=False, seed=1)
    private.update(scores, target)
    exact = torchmetrics.classification.MulticlassF1Score(num_classes=3, average="macro")(scores, target)
    assert abs(float(private.compute()) - float(exact)) < 0.01


# --------------------------------------------------------------------------------------------------
# Public data: the exact value, marked public, nothing accounted
# --------------------------------------------------------------------------------------------------
def test_public_metrics_pass_through_exactly():
    scores, target, losses = _data()
    acc = PrivateAccuracy(num_classes=3, public=True)
    f1 = PrivateF1Score(num_classes=3, average="macro", public=True)
    binary = PrivateF1Score(public=True)
    loss = PrivateMeanLoss(max_loss=4.0, public=True)
    batch_value = acc(scores, target)  # forward on public data: torchmetrics' batch value
    f1.update(scores, target)
    binary.update((scores[:, 1] > scores[:, 0]).long(), (target == 1).long())
    loss.update(losses)
    tm = torchmetrics.classification
    assert float(batch_value) == pytest.approx(float(tm.MulticlassAccuracy(3, average="micro")(scores, target)))
    assert float(acc.compute()) == pytest.approx(float(tm.MulticlassAccuracy(3, average="micro")(scores, target)))
    assert float(f1.compute()) == pytest.approx(float(tm.MulticlassF1Score(3, average="macro")(scores, target)))
    assert float(binary.compute()) == pytest.approx(
        float(tm.BinaryF1Score()((scores[:, 1] > scores[:, 0]).long(), (target == 1).long())))
    assert float(loss.compute()) == pytest.approx(float(losses.clamp(0, 4).mean()))
    for metric in (acc, f1, binary, loss):
        assert metric.last_release["public"] is True and metric.last_release["noise_multiplier"] is None
        assert metric.accountant is None


def test_calling_a_private_metric_on_a_batch_only_accumulates():
    scores, target, _ = _data()
    metric = _accuracy(noise_multiplier=1.0, secure_mode=False, seed=0)
    assert metric(scores, target) is None
    assert metric.accountant.total_steps == 0 and metric.counts.sum() == len(target)


# --------------------------------------------------------------------------------------------------
# Errors name the argument
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda: PrivateAccuracy(), "`noise_multiplier` is required"),
    (lambda: PrivateAccuracy(noise_multiplier=0.0), "`noise_multiplier`"),
    (lambda: PrivateAccuracy(noise_multiplier=1.0, public=True), "`noise_multiplier` must be None"),
    (lambda: PrivateAccuracy(public="yes"), "`public`"),
    (lambda: PrivateAccuracy(num_classes=1, public=True), "`num_classes`"),
    (lambda: PrivateMeanLoss(max_loss=0.0, public=True), "`max_loss`"),
    (lambda: PrivateF1Score(average="micro", public=True), "`average`"),
    (lambda: PrivateF1Score(num_classes=3, public=True), "`average` must be 'macro'"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("update,match", [
    (lambda: PrivateMeanLoss(max_loss=1.0, public=True).update(torch.ones(3, 2)), "`losses` must be a 1-D"),
    (lambda: PrivateMeanLoss(max_loss=1.0, public=True).update(torch.tensor(1.0)), "reduction='none'"),
    (lambda: PrivateAccuracy(public=True).update(torch.ones(3), torch.ones(3)), "`target` must be a 1-D integer"),
    (lambda: PrivateAccuracy(public=True).update(torch.ones(4, 2), torch.ones(3).long()), "`preds` must have shape"),
    (lambda: PrivateAccuracy(num_classes=2, public=True).update(torch.ones(3).long(), torch.full((3,), 5)),
     "`target` holds labels outside"),
    (lambda: PrivateF1Score(public=True).update(torch.full((3,), 4), torch.ones(3).long()), "`preds` holds labels"),
])
def test_bad_updates_name_the_argument(update, match):
    with pytest.raises(ValueError, match=match):
        update()


# --------------------------------------------------------------------------------------------------
# In a LightningModule
# --------------------------------------------------------------------------------------------------
@pytest.mark.lightning
def test_a_private_metric_logged_from_validation_step_is_one_accounted_release(tmp_path):
    from tests.lightning_helpers import MemoryLogger, TinyClassifier, make_loader, trainer_kwargs
    from tests.namespace import pl

    class Validated(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.val_accuracy = PrivateAccuracy(noise_multiplier=2.0, secure_mode=False, seed=0)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_accuracy.update(self(x), y)
            self.log("val_acc", self.val_accuracy)

    model, logger = Validated(), MemoryLogger()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger))
    trainer.validate(model, make_loader(n=128, batch_size=32, shuffle=False))
    assert model.val_accuracy.accountant.history == [(2.0, 1.0, 1)]  # one release for the epoch, not per batch
    logged = logger.history["val_acc"][-1][1]
    assert logged == pytest.approx(model.val_accuracy.last_release["value"], abs=1e-6)
    assert model.val_accuracy.last_release["public"] is False
