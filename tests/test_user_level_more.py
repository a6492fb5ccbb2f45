"""User-level privacy (issue 31), the checks ``tests/test_user_level.py`` does not make: 2-process FSDP steps
against the float64 per-user reference on the union of the ranks' records (users split by rank, chunks at user
boundaries, padding passes); resume (the same history, ε and weights as an uninterrupted run; a checkpoint of
the other privacy unit refused); σ calibrated for ``target_epsilon`` at the user rate; ``secure_mode`` drawing
users and capped records from the secure generator; the group-privacy numbers of a record-level report."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lightning_dp.sampling as sampling_module
import lightning_dp.user_sampling as user_sampling_module
from lightning_dp import make_private
from lightning_dp.noise import SecureRNG
from lightning_dp.report import GROUP_PRIVACY_CONVERSION
from lightning_dp.user_sampling import UserPlan
from tests.dp_accounting_reference import poisson_gaussian_epsilon
from tests.lightning_helpers import trainer_kwargs
from tests.namespace import DPStrategy, MisconfigurationException, pl
from tests.test_user_level import USER_IDS, UserModule, indexed_loader, user_reference

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore::UserWarning")]


def _fit(tmp_path, max_steps, ckpt_path=None, save_to=None, batch_size=2, **strategy_kwargs):
    """A user-level Trainer run of ``UserModule`` (seeded unless ``secure_mode``; ``torch.manual_seed(0)``: every
    run starts from the same net); ``save_to``: a checkpoint written after it."""
    options = dict(noise_multiplier=1.1, max_grad_norm=1.0, privacy_unit="user", user_ids=USER_IDS,
                   max_records_per_user=3)
    options.update(strategy_kwargs)
    if not options.get("secure_mode"):
        options.setdefault("seed", 5)
    strategy = DPStrategy(**options)
    torch.manual_seed(0)
    module = UserModule()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps), strategy=strategy)
    trainer.fit(module, train_dataloaders=indexed_loader(batch_size), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return trainer, module


def _history(strategy):
    return [tuple(entry) for entry in strategy.accountant.history]


# --- 2 processes (FSDP) ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> Path:
    from tests import distributed_helpers

    out_dir = tmp_path_factory.mktemp("user_fsdp")
    with pytest.MonkeyPatch.context() as patch:  # run_job's launcher, on this module's worker
        patch.setattr(distributed_helpers, "WORKER", Path(__file__).with_name("user_level_fsdp_worker.py"))
        distributed_helpers.run_job("user_fsdp", out_dir)
    return out_dir


def check_fsdp_fit(out_dir: Path, name: str) -> None:
    """Every optimizer step of fit ``name`` equals the float64 per-user reference on the union of the ranks'
    records; rank r holds users r, r + 2, … with all their (capped) records; chunks end at user boundaries and
    every rank runs as many passes as the busiest one (padding passes: one zero example, unit id -1)."""
    from tests.distributed_helpers import load
    from tests.fsdp_worker import build_net
    from tests.user_level_fsdp_worker import FITS, K, LR, NORM, USER_IDS as IDS, dataset as fsdp_dataset

    _, clipping, limit = FITS[name]
    ranks = load(out_dir, name)
    x_all, y_all, _ = fsdp_dataset()[:]
    plan = UserPlan(IDS)
    steps = ranks[0]["steps"]
    assert steps == 2 and [r["steps"] for r in ranks] == [2, 2]
    assert [(r["sample_rate"], r["expected_batch_size"], r["dataset_size"]) for r in ranks] == [(1.0, 6, 6)] * 2
    assert [r["raw_reduces"] for r in ranks] == [0, 0], "FSDP2 reduce-scattered raw gradients"
    for t in range(steps):
        passes = [[p for p in r["passes"] if p[0] == t] for r in ranks]
        assert len(passes[0]) == len(passes[1]), "every rank runs the same number of passes"
        real = [[p for p in rank if not p[3]] for rank in passes]
        for rank in passes:
            for _, index, units, padding in rank:
                if padding:  # one all-zero example whose unit id is -1
                    assert index.numel() == 1 and units.tolist() == [-1]
                else:
                    assert units.tolist() == plan.record_user[index].tolist()
                    assert limit is None or index.numel() <= limit
        users_of = []
        for r, rank in enumerate(real):
            units = torch.cat([p[2] for p in rank])
            users_of.append(set(units.tolist()))
            assert users_of[r] == set(range(r, plan.num_users, 2)), "rank r decides for users r, r + W, …"
            counts = torch.bincount(units, minlength=plan.num_users)
            for u in users_of[r]:
                assert counts[u] == min(K, int(plan.counts[u]))  # all of the user's records, capped at k
                assert sum(bool((p[2] == u).any()) for p in rank) == 1, "a user's records are in one pass"
        if limit is not None:  # rank 0: one chunk per user; rank 1: its 3 users in one chunk, 2 padding passes
            assert [len(p) for p in passes] == [3, 3] and [sum(p[3] for p in rank) for rank in passes] == [0, 2]
        else:
            assert [len(p) for p in passes] == [1, 1]
        index = torch.cat([p[1] for rank in real for p in rank])
        assert len(set(index.tolist())) == index.numel(), "every record is in at most one rank's passes"
        before = ranks[0]["before_steps"][t]
        after = ranks[0]["before_steps"][t + 1] if t + 1 < steps else ranks[0]["final"]
        net = build_net()
        net.load_state_dict(before)
        reference = user_reference(net, x_all[index], y_all[index], plan.record_user[index], NORM, 6, clipping)
        for name_, value in before.items():
            moved = (value.double() - after[name_].double()) / LR
            torch.testing.assert_close(moved, reference[name_], rtol=1e-4, atol=1e-6)
    for key in ranks[0]["final"]:
        torch.testing.assert_close(ranks[0]["final"][key], ranks[1]["final"][key])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whole", "physical", "physical_per_layer"])
def test_fsdp_step_is_the_per_user_reference_on_the_union_of_the_ranks(fsdp_results, name):
    check_fsdp_fit(fsdp_results, name)


# --- resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [2, 3], ids=["mid_epoch", "epoch_end"])
def test_resumed_user_level_run_ends_like_the_uninterrupted_one(tmp_path, batch_size):
    """Seeded, noise on: 4 steps at once, or 2 steps, a checkpoint, 2 more: the same accountant history, ε, the
    same users and capped records drawn after the checkpoint, and the same weights."""
    whole, whole_module = _fit(tmp_path / "whole", max_steps=4, batch_size=batch_size)
    path = tmp_path / "first.ckpt"
    first, first_module = _fit(tmp_path / "first", max_steps=2, batch_size=batch_size, save_to=path)
    saved = torch.load(path, weights_only=False)["lightning_dp"]
    assert saved["privacy_unit"] == "user" and saved["users"]["num_users"] == 6
    assert saved["users"]["max_records_per_user"] == 3
    resumed, resumed_module = _fit(tmp_path / "resumed", max_steps=4, batch_size=batch_size, ckpt_path=str(path))
    q = batch_size / 6
    assert whole.strategy.sample_rate == resumed.strategy.sample_rate == pytest.approx(q)
    assert resumed.global_step == whole.global_step == 4
    assert _history(resumed.strategy) == _history(whole.strategy) == [(1.1, pytest.approx(q), 4)]
    assert resumed.strategy.get_epsilon(1e-5) == pytest.approx(whole.strategy.get_epsilon(1e-5), rel=1e-12)
    assert first.strategy.get_epsilon(1e-5) < resumed.strategy.get_epsilon(1e-5)
    # the records trained on (non-empty Poisson batches reach training_step): before and after the checkpoint
    seen = [[s[2].tolist() for s in m.seen] for m in (whole_module, first_module, resumed_module)]
    assert seen[1] + seen[2] == seen[0]
    for (name, p), p_whole in zip(resumed_module.named_parameters(), whole_module.parameters()):
        torch.testing.assert_close(p, p_whole, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("saved_unit, resumed_unit", [("user", "record"), ("record", "user")])
def test_a_checkpoint_of_the_other_privacy_unit_is_refused(tmp_path, saved_unit, resumed_unit):
    path = tmp_path / "first.ckpt"
    _fit(tmp_path / "first", max_steps=2, save_to=path, privacy_unit=saved_unit)
    assert torch.load(path, weights_only=False)["lightning_dp"]["privacy_unit"] == saved_unit
    with pytest.raises(MisconfigurationException,
                       match=rf"privacy_unit='{saved_unit}', this run has privacy_unit='{resumed_unit}'"):
        _fit(tmp_path / "resumed", max_steps=4, ckpt_path=str(path), privacy_unit=resumed_unit)


# --- target_epsilon at the user rate ----------------------------------------------------------------------------
def test_target_epsilon_is_calibrated_at_the_user_rate(tmp_path):
    target, delta = 2.0, 1e-5
    strategy = DPStrategy(target_epsilon=target, delta=delta, max_grad_norm=1.0, seed=0, privacy_unit="user",
                          user_ids=USER_IDS, max_records_per_user=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3), strategy=strategy)
    trainer.fit(UserModule(), train_dataloaders=indexed_loader(2))
    q = 2 / 6  # 2 expected users per batch of 6 users (not 2 / 16 records)
    assert strategy.sample_rate == pytest.approx(q) and strategy.dataset_size == 6
    steps = strategy.privacy.steps_taken
    assert steps == trainer.global_step == 9  # 3 epochs of N_users / B = 3 steps
    sigma = strategy.noise_multiplier
    spent = strategy.get_epsilon(delta)
    assert 0.99 * target <= spent <= target
    reference = poisson_gaussian_epsilon(sigma, q, steps, delta)
    assert reference == pytest.approx(spent, rel=1e-2) and reference <= target * 1.01
    # the same σ at the record rate would spend far less: the calibration used the user rate
    assert poisson_gaussian_epsilon(sigma, 2 / 16, steps, delta) < 0.8 * target


# --- secure mode -------------------------------------------------------------------------------------------------
SECURE_IDS = [i % 4 for i in range(16)]  # 4 users of 4 records each: with k = 2 every sampled user is capped


def _secure_run(tmp_path, monkeypatch):
    """A user-level secure run (q = 2/4, 6 steps: no user is drawn in any of them with probability 16⁻⁶); every
    generator the Poisson draw and the capped-record draw were given is recorded."""
    used = {"poisson": [], "records": []}
    poisson_mask, uniform = sampling_module.poisson_mask, user_sampling_module._uniform

    def spy_poisson(generator, n, rate):
        used["poisson"].append(generator)
        return poisson_mask(generator, n, rate)

    def spy_uniform(generator, n):
        used["records"].append(generator)
        return uniform(generator, n)

    monkeypatch.setattr(sampling_module, "poisson_mask", spy_poisson)
    monkeypatch.setattr(user_sampling_module, "_uniform", spy_uniform)
    trainer, module = _fit(tmp_path, max_steps=6, secure_mode=True, user_ids=SECURE_IDS, max_records_per_user=2)
    return trainer, module, used


def test_secure_mode_draws_users_and_capped_records_from_the_secure_generator(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="`seed` must be None with secure_mode=True"):
        DPStrategy(noise_multiplier=1.0, secure_mode=True, seed=3, privacy_unit="user", user_ids=USER_IDS)
    net = UserModule().net
    with pytest.raises(ValueError, match="`seed` must be None with secure_mode=True"):
        make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=2, secure_mode=True, seed=3, privacy_unit="user", user_ids=USER_IDS)
    first, first_module, used = _secure_run(tmp_path / "a", monkeypatch)
    strategy = first.strategy
    assert isinstance(strategy.noise, SecureRNG) and strategy.privacy.sampling_generator is strategy.noise
    assert strategy.privacy.steps_taken == 6 and strategy.sample_rate == pytest.approx(0.5)
    assert strategy.get_epsilon(1e-5) == pytest.approx(poisson_gaussian_epsilon(1.1, 0.5, 6, 1e-5), rel=1e-2)
    assert used["poisson"] and all(g is strategy.noise for g in used["poisson"]), "users: the secure generator"
    assert used["records"] and all(g is strategy.noise for g in used["records"]), "capped records: the secure one"
    plan = UserPlan(SECURE_IDS)
    for _, _, index in first_module.seen:  # every sampled user contributes k = 2 of their 4 records
        assert set(torch.bincount(plan.record_user[index], minlength=4).tolist()) <= {0, 2}
    assert "secure" in strategy.privacy_report().to_table().lower()
    second, second_module, _ = _secure_run(tmp_path / "b", monkeypatch)
    assert second.strategy.noise is not strategy.noise and second.strategy.noise._key != strategy.noise._key
    drawn = [[s[2].tolist() for s in m.seen] for m in (first_module, second_module)]
    assert drawn[0] != drawn[1], "two secure runs draw different users and records"
    assert not torch.equal(first_module.net.head.weight, second_module.net.head.weight)


# --- group privacy in a record-level report ---------------------------------------------------------------------
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_record_level_report_gives_the_named_group_privacy_of_its_epsilon(tmp_path, delta):
    trainer, _ = _fit(tmp_path, max_steps=3, batch_size=4, privacy_unit="record", delta=delta)
    strategy = trainer.strategy
    q, k = 4 / 16, 3  # records, and k = max_records_per_user (the largest user holds 5)
    assert strategy.sample_rate == pytest.approx(q)
    eps = strategy.get_epsilon(delta)
    assert eps == pytest.approx(poisson_gaussian_epsilon(1.1, q, 3, delta), rel=1e-2)
    report = strategy.privacy_report()
    assert report.privacy_unit == "record" and report.epsilon == pytest.approx(eps, rel=1e-12)
    group = report.group_privacy
    group_delta = min(1.0, delta * sum(math.exp(i * eps) for i in range(k)))  # (kε, δ·Σ_{i<k} e^{iε})
    assert group["group_size"] == k and group["conversion"] == GROUP_PRIVACY_CONVERSION
    assert group["epsilon"] == pytest.approx(k * eps, rel=1e-12)
    assert group["delta"] == pytest.approx(group_delta, rel=1e-12)
    assert group_delta <= k * math.exp((k - 1) * eps) * delta
    table = report.to_table()
    assert f"Group privacy (a person with {k} records)" in table
    assert f"(ε = {k * eps:.4g}, δ = {group_delta:.3g}) by {GROUP_PRIVACY_CONVERSION}" in table
    assert report.to_dict()["group_privacy"]["delta"] == pytest.approx(group_delta, rel=1e-12)
