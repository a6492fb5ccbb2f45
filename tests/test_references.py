"""The references are required in CI: ``tests.dp_accounting_reference.import_dp_accounting``, the one way the
tests import dp-accounting, skips a reference check where dp-accounting is missing on a developer's machine
but fails it in CI (``CI=true``) or with ``LIGHTNING_DP_REQUIRE_REFERENCES=1``; a CI run without the ``test``
extra would otherwise pass with every check against the reference skipped."""
from __future__ import annotations

import sys

import pytest

from tests.dp_accounting_reference import REQUIRE_REFERENCES, import_dp_accounting, poisson_gaussian_epsilon


@pytest.fixture
def without_dp_accounting(monkeypatch):
    """dp-accounting made unimportable (``None`` in ``sys.modules``), in an environment that is not CI."""
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    for name in ("CI", REQUIRE_REFERENCES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name,value", [("CI", "true"), ("CI", "1"), (REQUIRE_REFERENCES, "1")])
def test_a_missing_reference_fails_where_references_are_required(without_dp_accounting, name, value):
    without_dp_accounting.setenv(name, value)
    with pytest.raises(pytest.fail.Exception, match="References are required here"):
        import_dp_accounting()
    with pytest.raises(pytest.fail.Exception, match="References are required here"):
        poisson_gaussian_epsilon(1.0, 0.01, 100, 1e-5)  # the shared references go through it too


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_reference_skips_elsewhere(without_dp_accounting, ci):
    if ci is not None:
        without_dp_accounting.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="dp-accounting, the independent reference"):
        import_dp_accounting()


def test_an_installed_reference_is_returned():
    dp_accounting = import_dp_accounting()
    assert sys.modules["dp_accounting"] is dp_accounting and hasattr(dp_accounting, "PoissonSampledDpEvent")
