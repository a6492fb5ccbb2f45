"""Calibrating σ to a target ε through an accountant object (``Accountant.fresh``): the plain accountants,
and secure aggregation's distributed discrete Gaussian, whose parameters (model size, scale, honest shares)
only the strategy knows."""
from __future__ import annotations

import pytest

from lightning_dp.accounting import get_noise_multiplier, get_noise_multiplier_for_plan, make_accountant
from lightning_dp.secure_aggregation import DistributedDiscreteGaussianAccountant
from lightning_dp.accounting.ddg import ddg_epsilon, ddg_noise_multiplier


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_fresh_accountant_is_empty_and_of_the_same_kind(kind):
    acc = make_accountant(kind)
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=5)
    fresh = acc.fresh()
    assert type(fresh) is type(acc) and fresh.history == [] and acc.total_steps == 5
    by_object = get_noise_multiplier_for_plan(3.0, 1e-5, [(0.01, 500)], accountant=acc.fresh())
    assert by_object == get_noise_multiplier(3.0, 1e-5, 0.01, steps=500, accountant=kind)


def test_secure_aggregation_sigma_is_calibrated_by_the_ddg_accounting():
    """The plan's σ through the strategy's DDG accountant: the same σ as ``ddg_noise_multiplier`` (to the
    search tolerances), its ε at most the target, and larger than the Gaussian's (looser amplification)."""
    acc = DistributedDiscreteGaussianAccountant(scale=2.0**20, dim=9610, num_shares=1)
    acc.step(noise_multiplier=5.0, sample_rate=0.05, num_steps=100)  # already spent: kept in the plan
    fresh = acc.fresh()
    assert fresh.history == [] and (fresh.dim, fresh.num_shares, fresh.scale) == (9610, 1, 2.0**20)
    sigma = get_noise_multiplier_for_plan(3.0, 1e-5, [(0.01, 3000)], accountant=acc, history=[])
    reference = ddg_noise_multiplier(3.0, 1e-5, 0.01, 3000, dim=9610, scale=2.0**20, num_shares=1)
    assert sigma == pytest.approx(reference, rel=0.02)
    assert ddg_epsilon(sigma, 0.01, 3000, 1e-5, dim=9610, scale=2.0**20, num_shares=1) <= 3.0
    assert sigma > get_noise_multiplier(3.0, 1e-5, 0.01, steps=3000)
    resumed = get_noise_multiplier_for_plan(3.0, 1e-5, [(0.01, 3000)], accountant=acc, history=acc.history)
    assert resumed > sigma  # the privacy already spent leaves less for the plan


def test_target_epsilon_is_accepted_with_secure_aggregation():
    from tests.namespace import DPDDPStrategy

    strategy = DPDDPStrategy(target_epsilon=3.0, secure_aggregation=True)
    assert strategy.accountant.mechanism == "ddg" and strategy.noise_multiplier is None
