"""Epsilon and wall time of privacy accountants on the settings of issue 5, and noise calibration.

Run: ``python benchmarks/accountants.py``. Compares our PRV (PLD) and RDP accountants with Opacus's
RDP / PRV / GDP accountants and dp-accounting's PLD accountant (value_discretization_interval=1e-4),
each when importable. Times are one fresh call (construction + composition + epsilon), best of
``REPEATS``; calibration is the noise multiplier for epsilon = 3 at q = 256/60000 over 60 epochs.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, List, Optional, Tuple

from lightning_dp.accounting import compute_epsilon, get_noise_multiplier

SETTINGS = [  # (label, noise_multiplier, sample_rate, steps, delta)
    ("q=256/60000 s=1.1 14062 steps d=1e-5", 1.1, 256 / 60000, 14062, 1e-5),
    ("q=64/60000  s=1.3 9375 steps  d=1e-5", 1.3, 64 / 60000, 9375, 1e-5),
    ("q=0.01      s=0.6 1000 steps  d=1e-6", 0.6, 0.01, 1000, 1e-6),
]
CALIBRATION = (3.0, 1e-5, 256 / 60000, 60)  # target epsilon, delta, q, epochs
REPEATS = 3


def _timed(fn: Callable[[], float], repeats: int = REPEATS) -> Tuple[float, float]:
    best, value = math.inf, math.nan
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def _ours(kind: str):
    return lambda s, q, n, d: compute_epsilon(s, q, n, d, accountant=kind)


def _opacus(kind: str):
    try:
        from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
    except Exception:  # pragma: no cover - optional
        return None
    cls = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}[kind]

    def run(s: float, q: float, n: int, d: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc = cls()
            acc.history = [(s, q, n)]
            return float(acc.get_epsilon(delta=d))

    return run


def _dp_accounting():
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
    except Exception:  # pragma: no cover - optional
        return None

    def run(s: float, q: float, n: int, d: float) -> float:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        return float(acc.get_epsilon(d))

    return run


def main() -> None:
    accountants: List[Tuple[str, Optional[Callable]]] = [
        ("lightning_dp PRV (default)", _ours("prv")),
        ("lightning_dp RDP", _ours("rdp")),
        ("Opacus RDP", _opacus("rdp")),
        ("Opacus PRV", _opacus("prv")),
        ("Opacus GDP (approximation)", _opacus("gdp")),
        ("dp-accounting PLD (1e-4)", _dp_accounting()),
    ]
    width = 28
    print(f"{'accountant':<{width}}" + "".join(f" | {label:<38}" for label, *_ in SETTINGS))
    for name, fn in accountants:
        if fn is None:
            print(f"{name:<{width}} | not installed")
            continue
        cells = []
        for _, s, q, n, d in SETTINGS:
            eps, seconds = _timed(lambda: fn(s, q, n, d), 1 if name.startswith("dp-acc") else REPEATS)
            cells.append(f"eps={eps:8.4f}  {seconds * 1e3:9.1f} ms")
        print(f"{name:<{width}}" + "".join(f" | {c:<38}" for c in cells))

    target, delta, q, epochs = CALIBRATION
    steps = math.ceil(epochs / q)
    print(f"\nCalibration: sigma for eps={target} at delta={delta}, q=256/60000, {epochs} epochs ({steps} steps)")
    rows = [
        ("lightning_dp PRV (default)", lambda: get_noise_multiplier(target, delta, q, epochs=epochs)),
        ("lightning_dp RDP", lambda: get_noise_multiplier(target, delta, q, epochs=epochs, accountant="rdp")),
    ]
    try:
        from opacus.accountants.utils import get_noise_multiplier as opacus_sigma

        rows.append(
            ("Opacus PRV", lambda: opacus_sigma(target_epsilon=target, target_delta=delta, sample_rate=q,
                                                epochs=epochs, accountant="prv"))
        )
        rows.append(
            ("Opacus RDP", lambda: opacus_sigma(target_epsilon=target, target_delta=delta, sample_rate=q,
                                                epochs=epochs, accountant="rdp"))
        )
    except Exception:  # pragma: no cover - optional
        pass
    dp_eps = _dp_accounting()
    if dp_eps is not None:
        import dp_accounting

        def dp_sigma() -> float:
            return float(dp_accounting.calibrate_dp_mechanism(
                lambda: __import__("dp_accounting").pld.PLDAccountant(value_discretization_interval=1e-4),
                lambda s: dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps),
                target, delta, tol=1e-3))

        rows.append(("dp-accounting PLD (1e-4)", dp_sigma))
    for name, fn in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigma, seconds = _timed(fn, 1)
        eps = compute_epsilon(sigma, q, steps, delta)
        print(f"{name:<{width}} | sigma={sigma:.4f}  {seconds:7.3f} s  (our PRV eps at that sigma: {eps:.4f})")


if __name__ == "__main__":
    main()
