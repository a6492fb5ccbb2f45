"""The demo (`make demo`) end to end: target accuracy at its privacy budget, ε in TensorBoard."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_digits_demo_meets_its_target(tmp_path):
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_digits
    finally:
        sys.path.remove(str(EXAMPLES))
    result = train_digits.main(["--no-progress-bar", "--log-dir", str(tmp_path)])
    assert result["epsilon"] <= 3.0
    assert result["accuracy"] >= 0.88
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    tags = set()
    for directory in event_dirs:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    assert "epsilon" in tags


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_privacy_utility_example_writes_plot_and_numbers(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import privacy_utility
    finally:
        sys.path.remove(str(EXAMPLES))
    out = tmp_path / "pu.png"
    results = privacy_utility.main(["--epsilons", "4", "--epochs", "5", "--canaries", "40", "--guesses", "10",
                                    "--out", str(out)])
    assert out.stat().st_size > 10_000 and out.with_suffix(".json").exists()
    dp, non_private = results
    assert dp["claimed_epsilon"] <= 4.0 and dp["audit_lower_bound"] <= dp["claimed_epsilon"]
    assert non_private["claimed_epsilon"] == float("inf")
