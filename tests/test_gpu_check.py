"""``benchmarks/gpu_check.py`` (the script prepared for the first GPU) runs end to end on the CPU: the same
code paths with ``--device cpu --dry-run``, so it is known to work before a GPU's minutes are spent on it."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")
SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_check.py")


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    methods = {(r["model"], r["precision"], r["method"]) for r in report["steps"] if "error" not in r}
    assert len(methods) == 2 * len(gpu_check.PRECISIONS) * len(gpu_check.METHODS)  # nothing failed to run
    assert all(r["equal"] for r in report["chacha"]) and len(report["chacha"]) == 5
    assert all(r["ok"] and r["sum_dtypes"] == ["torch.float32"] for r in report["clipped"])
    assert report["normals"]["ratio"] > 0
    assert "| bf16 clipped norm" in capsys.readouterr().out
