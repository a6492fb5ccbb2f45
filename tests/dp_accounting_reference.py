"""The independent reference for ε of DP-SGD: Google's dp-accounting (a test-only dependency, in the ``test``
extra), and :func:`import_dp_accounting`, the one way tests import it."""
from __future__ import annotations

import os
from types import ModuleType

import pytest

REQUIRE_REFERENCES = "LIGHTNING_DP_REQUIRE_REFERENCES"
"""Set to 1 (or run with ``CI=true``, as CI runners do) and a missing reference fails the test."""


def references_required() -> bool:
    """Whether a missing dp-accounting fails a test instead of skipping it: in CI (``CI=true``: the CI
    runner sets it) or with ``LIGHTNING_DP_REQUIRE_REFERENCES=1``. Without this a run whose environment
    lacks the ``test`` extra would pass with every check against the reference skipped."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in ("CI", REQUIRE_REFERENCES))


def import_dp_accounting() -> ModuleType:
    """``dp_accounting``; where it cannot be imported the test is skipped on a developer's machine and
    failed where references are required (:func:`references_required`)."""
    try:
        import dp_accounting
    except ImportError as err:
        reason = f"dp-accounting, the independent reference of this check (the `test` extra), is missing: {err}"
        if references_required():
            pytest.fail(f"{reason}. References are required here (CI=true or {REQUIRE_REFERENCES}=1): "
                        "install the `test` extra.", pytrace=False)
        pytest.skip(reason)
    return dp_accounting


def poisson_gaussian_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD ε of ``steps`` Poisson-subsampled Gaussian steps (noise multiplier ``sigma``, rate
    ``q``) at ``delta``; skips the test where dp-accounting is not installed (fails it in CI)."""
    dp_accounting = import_dp_accounting()
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def release_then_poisson_gaussian_epsilon(sigma_release: float, sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD ε of one unsampled Gaussian release (noise multiplier ``sigma_release``, e.g. a
    private centre) followed by ``steps`` Poisson-subsampled Gaussian steps; skips without dp-accounting
    (fails in CI)."""
    dp_accounting = import_dp_accounting()
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(sigma_release))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)
