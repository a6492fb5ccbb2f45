"""The independent reference for ε of DP-SGD: Google's dp-accounting (a test-only dependency)."""
from __future__ import annotations

import pytest


def poisson_gaussian_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD ε of ``steps`` Poisson-subsampled Gaussian steps (noise multiplier ``sigma``, rate
    ``q``) at ``delta``; skips the test where dp-accounting is not installed."""
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def release_then_poisson_gaussian_epsilon(sigma_release: float, sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD ε of one unsampled Gaussian release (noise multiplier ``sigma_release``, e.g. a
    private centre) followed by ``steps`` Poisson-subsampled Gaussian steps; skips without dp-accounting."""
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(sigma_release))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)
