"""Tests of lightning_dp.accounting: RDP against dp-accounting, history semantics, checkpoints,
calibration and argument checks (PRV-specific tests: test_accounting_prv.py)."""

from __future__ import annotations

import ast
import doctest
import json
import math
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from lightning_dp.accounting import (
    DEFAULT_RDP_ORDERS,
    Accountant,
    RDPAccountant,
    compute_epsilon,
    get_noise_multiplier,
    make_accountant,
)
from tests.dp_accounting_reference import import_dp_accounting

REL_TOL = 1e-3  # agreement required with dp-accounting

# (noise_multiplier, sample_rate, steps, delta)
REFERENCE_CONFIGS = [
    (1.1, 256 / 60000, 14062, 1e-5),  # MNIST DP-SGD (Abadi et al.): optimum at a fractional order
    (0.6, 0.01, 1000, 1e-6),
    (2.0, 0.5, 50, 1e-5),
    (5.0, 1.0, 10, 1e-5),  # q = 1: plain Gaussian mechanism
    (0.8, 1e-3, 100_000, 1e-5),
    (4.0, 0.02, 200, 1e-5),  # small epsilon, large optimal order
    (10.0, 1e-4, 1_000_000, 1e-5),
    (0.3, 1e-6, 1000, 1e-5),
    (100.0, 0.1, 1000, 1e-5),
    (1.0, 0.05, 2000, 1e-5),  # large epsilon, optimal order below 2 (fractional)
]
FRACTIONAL_OPTIMUM_CONFIGS = [(1.1, 256 / 60000, 14062, 1e-5), (1.0, 0.05, 2000, 1e-5), (2.0, 0.5, 50, 1e-5)]


def _reference_accountant(segments, orders=DEFAULT_RDP_ORDERS):
    dp_accounting = import_dp_accounting()
    from dp_accounting.rdp import RdpAccountant

    ref = RdpAccountant(list(orders))
    for sigma, q, steps in segments:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        ref.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return ref


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --------------------------------------------------------------------------------------------------
# Agreement with dp-accounting
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,q,steps,delta", REFERENCE_CONFIGS)
def test_epsilon_matches_dp_accounting(sigma, q, steps, delta):
    ref = _reference_accountant([(sigma, q, steps)])
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    eps, order = acc.get_epsilon_and_order(delta)
    ref_eps, ref_order = ref.get_epsilon_and_optimal_order(delta)
    assert _rel(eps, ref_eps) < REL_TOL, (eps, ref_eps)
    assert acc.get_epsilon(delta) == eps
    assert compute_epsilon(sigma, q, steps, delta, accountant="rdp") == eps
    assert order == ref_order


@pytest.mark.parametrize("sigma,q,steps,delta", REFERENCE_CONFIGS)
def test_rdp_vector_matches_dp_accounting(sigma, q, steps, delta):
    ref = _reference_accountant([(sigma, q, steps)])
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    ours, theirs = acc.get_rdp(), np.asarray(ref._rdp)
    assert np.all(np.isfinite(ours))
    # dp-accounting drops a fractional order (inf) when its series needs > 1000 terms (q = 0.5
    # here); we sum further. Elsewhere the two agree.
    finite = np.isfinite(theirs)
    assert finite.sum() >= len(theirs) - 10
    assert np.all(np.abs(ours[finite] - theirs[finite]) <= REL_TOL * theirs[finite])


@pytest.mark.parametrize("sigma,q,steps,delta", FRACTIONAL_OPTIMUM_CONFIGS)
def test_fractional_orders_are_optimal_and_match(sigma, q, steps, delta):
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    eps, order = acc.get_epsilon_and_order(delta)
    assert not float(order).is_integer(), order
    ref_eps = _reference_accountant([(sigma, q, steps)]).get_epsilon(delta)
    assert _rel(eps, ref_eps) < REL_TOL


def test_only_fractional_orders_match_dp_accounting():
    orders = [1.25, 1.5, 1.75, 2.5, 3.5, 4.5, 6.5, 9.5, 14.5, 20.5]
    segments = [(1.1, 256 / 60000, 14062)]
    ref = _reference_accountant(segments, orders)
    acc = RDPAccountant(orders=orders)
    acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=14062)
    assert _rel(acc.get_epsilon(1e-5), ref.get_epsilon(1e-5)) < REL_TOL


def test_heterogeneous_history_matches_dp_accounting():
    segments = [(1.1, 256 / 60000, 5000), (0.8, 512 / 60000, 3000), (1.1, 256 / 60000, 100)]
    ref = _reference_accountant(segments)
    acc = RDPAccountant()
    for sigma, q, n in segments:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    assert acc.history == [tuple(s) for s in segments]
    assert acc.total_steps == len(acc) == 8100
    assert _rel(acc.get_epsilon(1e-5), ref.get_epsilon(1e-5)) < REL_TOL


def test_custom_orders_match_dp_accounting():
    orders = [2, 4, 8, 16, 32, 64]
    ref = _reference_accountant([(1.0, 0.01, 1000)], orders)
    acc = make_accountant("rdp", orders=orders)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
    assert _rel(acc.get_epsilon(1e-5), ref.get_epsilon(1e-5)) < REL_TOL


def test_q_one_is_gaussian_mechanism_closed_form():
    sigma, steps, delta = 3.0, 7, 1e-5
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=1.0, num_steps=steps)
    a = np.asarray(DEFAULT_RDP_ORDERS)
    rdp = steps * a / (2 * sigma**2)
    expected = np.min(rdp - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a))
    assert acc.get_epsilon(delta) == pytest.approx(expected, rel=1e-12)


def test_integer_order_closed_form_at_order_two():
    # A_2 = 1 + q^2 (exp(1/sigma^2) - 1)  (Mironov, Talwar, Zhang 2019)
    sigma, q = 1.3, 1e-6
    acc = RDPAccountant(orders=[2])
    acc.step(noise_multiplier=sigma, sample_rate=q)
    expected = math.log1p(q**2 * math.expm1(1 / sigma**2))
    assert acc.get_rdp()[0] == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------
def test_empty_history_is_zero():
    acc = RDPAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    assert acc.total_steps == 0 and len(acc) == 0
    assert compute_epsilon(1.0, 0.01, 0, 1e-5) == 0.0


def test_zero_noise_is_infinite():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    acc.step(noise_multiplier=0.0, sample_rate=0.01)
    assert acc.get_epsilon(1e-5) == math.inf
    assert compute_epsilon(0.0, 1.0, 1, 1e-5) == math.inf
    fresh = RDPAccountant()
    assert fresh.get_epsilon(1e-5, additional_steps=1, noise_multiplier=0.0, sample_rate=0.5) == math.inf


def test_zero_sample_rate_costs_nothing():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.0, num_steps=100)
    assert acc.get_epsilon(1e-5) == 0.0


def test_history_is_run_length_encoded():
    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=3)
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.history == [(1.0, 0.01, 5), (1.0, 0.02, 3), (1.0, 0.01, 1)]
    assert acc.total_steps == 9


def test_additional_steps_equal_actual_steps():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.004, num_steps=1000)
    before = list(acc.history)
    predicted = acc.get_epsilon(1e-5, additional_steps=500)
    predicted_other = acc.get_epsilon(1e-5, additional_steps=20, noise_multiplier=0.7, sample_rate=0.01)
    assert acc.history == before  # not mutated
    stepped = RDPAccountant()
    stepped.step(noise_multiplier=1.1, sample_rate=0.004, num_steps=1000)
    for _ in range(500):
        stepped.step(noise_multiplier=1.1, sample_rate=0.004)
    assert stepped.get_epsilon(1e-5) == pytest.approx(predicted, rel=1e-12)
    other = RDPAccountant()
    other.step(noise_multiplier=1.1, sample_rate=0.004, num_steps=1000)
    other.step(noise_multiplier=0.7, sample_rate=0.01, num_steps=20)
    assert other.get_epsilon(1e-5) == pytest.approx(predicted_other, rel=1e-12)
    assert acc.get_epsilon(1e-5, additional_steps=0) == acc.get_epsilon(1e-5)


def test_additional_steps_on_empty_history():
    acc = RDPAccountant()
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.get_epsilon(1e-5, additional_steps=10)
    eps = acc.get_epsilon(1e-5, additional_steps=10, noise_multiplier=1.0, sample_rate=0.1)
    assert eps == compute_epsilon(1.0, 0.1, 10, 1e-5, accountant="rdp")
    assert acc.history == []


def test_epsilon_monotone_in_steps_and_noise():
    eps_steps = [compute_epsilon(1.0, 0.01, n, 1e-5) for n in (10, 100, 1000, 10000)]
    assert all(a < b for a, b in zip(eps_steps, eps_steps[1:]))
    eps_sigma = [compute_epsilon(s, 0.01, 1000, 1e-5) for s in (0.5, 0.8, 1.2, 2.0, 5.0)]
    assert all(a > b for a, b in zip(eps_sigma, eps_sigma[1:]))


def test_numerically_stable_over_the_supported_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sigma in (0.3, 1.0, 100.0):
            for q in (1e-6, 0.01, 1.0):
                acc = RDPAccountant()
                acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=1_000_000)
                rdp = acc.get_rdp()
                assert np.all(np.isfinite(rdp)) and np.all(rdp >= 0)
                eps = acc.get_epsilon(1e-5)
                assert math.isfinite(eps) and eps >= 0


def test_epsilon_is_cheap_every_step():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.004)
    acc.get_epsilon(1e-5)  # fills the cache
    start = time.perf_counter()
    for _ in range(200):
        acc.step(noise_multiplier=1.1, sample_rate=0.004)
        acc.get_epsilon(1e-5)
    assert (time.perf_counter() - start) / 200 < 5e-3


# --------------------------------------------------------------------------------------------------
# Checkpointing
# --------------------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.004, num_steps=300)
    acc.step(noise_multiplier=0.9, sample_rate=0.008, num_steps=20)
    state = acc.state_dict()
    assert state == {"mechanism": "rdp", "history": [(1.1, 0.004, 300), (0.9, 0.008, 20)]}
    for restored_state in (pickle.loads(pickle.dumps(state)), json.loads(json.dumps(state))):
        restored = make_accountant("rdp")
        restored.load_state_dict(restored_state)
        assert restored.history == acc.history
        assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    restored.step(noise_multiplier=0.9, sample_rate=0.008)
    assert restored.history[-1] == (0.9, 0.008, 21)
    assert acc.history[-1] == (0.9, 0.008, 20)  # no aliasing


def test_load_state_dict_refuses_other_mechanism():
    with pytest.raises(ValueError, match="'prv'.*'rdp'"):
        RDPAccountant().load_state_dict({"mechanism": "prv", "history": []})


def test_load_state_dict_refuses_malformed():
    with pytest.raises(ValueError, match="mechanism"):
        RDPAccountant().load_state_dict({"history": []})
    with pytest.raises(ValueError, match="num_steps"):
        RDPAccountant().load_state_dict({"mechanism": "rdp", "history": [(1.0, 0.1, 0)]})
    with pytest.raises(ValueError, match="history"):
        RDPAccountant().load_state_dict({"mechanism": "rdp", "history": [(1.0, 0.1)]})


def test_make_accountant():
    acc = make_accountant("rdp")
    assert isinstance(acc, RDPAccountant) and isinstance(acc, Accountant)
    assert acc.mechanism == "rdp"
    assert make_accountant().mechanism == "prv"
    with pytest.raises(ValueError, match=r"kind must be one of \['prv', 'rdp'\], got 'nope'"):
        make_accountant("nope")


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target,delta,q,steps",
    [
        (1.0, 1e-5, 0.01, 1000),
        (3.0, 1e-5, 256 / 60000, 14063),
        (8.0, 1e-5, 0.004, 10000),
        (2.0, 1e-6, 0.1, 100),
        (50.0, 1e-5, 0.01, 1000),
    ],
)
def test_get_noise_multiplier_is_feasible_and_tight(target, delta, q, steps):
    sigma = get_noise_multiplier(target, delta, q, steps=steps)
    eps = compute_epsilon(sigma, q, steps, delta)
    assert target - 0.01 <= eps <= target
    assert compute_epsilon(sigma * 0.98, q, steps, delta) > target


def test_get_noise_multiplier_epochs_and_tolerance():
    q = 256 / 60000
    by_epochs = get_noise_multiplier(3.0, 1e-5, q, epochs=60)
    assert by_epochs == get_noise_multiplier(3.0, 1e-5, q, steps=math.ceil(60 / q))
    sigma = get_noise_multiplier(3.0, 1e-5, q, epochs=60, epsilon_tolerance=1e-4)
    assert 3.0 - 1e-4 <= compute_epsilon(sigma, q, math.ceil(60 / q), 1e-5) <= 3.0


def test_get_noise_multiplier_argument_errors():
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        get_noise_multiplier(1.0, 1e-5, 0.01)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        get_noise_multiplier(1.0, 1e-5, 0.01, steps=10, epochs=1.0)
    with pytest.raises(ValueError, match="target_epsilon=1e-09 is not reachable"):
        get_noise_multiplier(1e-9, 1e-10, 0.01, steps=1000)
    with pytest.raises(ValueError, match="kind must be one of"):
        get_noise_multiplier(1.0, 1e-5, 0.01, steps=10, accountant="nope")


# --------------------------------------------------------------------------------------------------
# Argument checks: every bad argument raises ValueError naming it and the value given
# --------------------------------------------------------------------------------------------------
def _stepped():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    return acc


BAD_CALLS = [
    ("noise_multiplier", "-1.0", lambda: RDPAccountant().step(noise_multiplier=-1.0, sample_rate=0.1)),
    ("noise_multiplier", "nan", lambda: RDPAccountant().step(noise_multiplier=float("nan"), sample_rate=0.1)),
    ("noise_multiplier", "'1'", lambda: RDPAccountant().step(noise_multiplier="1", sample_rate=0.1)),
    ("sample_rate", "1.5", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=1.5)),
    ("sample_rate", "-0.1", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=-0.1)),
    ("num_steps", "0", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=0.1, num_steps=0)),
    ("num_steps", "2.5", lambda: RDPAccountant().step(noise_multiplier=1.0, sample_rate=0.1, num_steps=2.5)),
    ("delta", "1.5", lambda: _stepped().get_epsilon(1.5)),
    ("delta", "0", lambda: _stepped().get_epsilon(0)),
    ("delta", "0", lambda: RDPAccountant().get_epsilon(0)),
    ("additional_steps", "-1", lambda: _stepped().get_epsilon(1e-5, additional_steps=-1)),
    ("noise_multiplier", "-2", lambda: _stepped().get_epsilon(1e-5, additional_steps=1, noise_multiplier=-2)),
    ("sample_rate", "2", lambda: _stepped().get_epsilon(1e-5, additional_steps=1, sample_rate=2)),
    ("orders", "[0.5]", lambda: RDPAccountant(orders=[0.5])),
    ("orders", "[]", lambda: RDPAccountant(orders=[])),
    ("noise_multiplier", "-1", lambda: compute_epsilon(-1, 0.1, 10, 1e-5)),
    ("sample_rate", "1.1", lambda: compute_epsilon(1.0, 1.1, 10, 1e-5)),
    ("steps", "-1", lambda: compute_epsilon(1.0, 0.1, -1, 1e-5)),
    ("steps", "1.5", lambda: compute_epsilon(1.0, 0.1, 1.5, 1e-5)),
    ("delta", "1.0", lambda: compute_epsilon(1.0, 0.1, 10, 1.0)),
    ("target_epsilon", "0", lambda: get_noise_multiplier(0, 1e-5, 0.1, steps=10)),
    ("delta", "-1e-05", lambda: get_noise_multiplier(1.0, -1e-5, 0.1, steps=10)),
    ("sample_rate", "0", lambda: get_noise_multiplier(1.0, 1e-5, 0, steps=10)),
    ("steps", "0", lambda: get_noise_multiplier(1.0, 1e-5, 0.1, steps=0)),
    ("epochs", "-1", lambda: get_noise_multiplier(1.0, 1e-5, 0.1, epochs=-1)),
    ("epsilon_tolerance", "0", lambda: get_noise_multiplier(1.0, 1e-5, 0.1, steps=10, epsilon_tolerance=0)),
]


@pytest.mark.parametrize("name,value,call", BAD_CALLS, ids=[f"{n}={v}" for n, v, _ in BAD_CALLS])
def test_bad_arguments_raise_value_error(name, value, call):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert f"`{name}`" in message, message
    assert f"got {value}" in message, message


# --------------------------------------------------------------------------------------------------
# Hygiene
# --------------------------------------------------------------------------------------------------
ACCOUNTING_DIR = Path(__file__).resolve().parents[1] / "lightning_dp" / "accounting"


def test_accounting_imports_neither_torch_nor_lightning():
    for path in sorted(ACCOUNTING_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"torch", "pytorch_lightning", "lightning"}, (path.name, name)


def test_docstring_examples():
    import lightning_dp.accounting as package
    from lightning_dp.accounting import base, calibration, prv, rdp

    for module in (package, base, rdp, prv, calibration):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        assert result.attempted > 0, module.__name__
