"""Both Lightning packages: the top-level classes follow the package in use, each package alone is
enough, registry names and pickling work in both, and the adapter imports no Lightning namespace."""
from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dp import DPConfig
from tests.namespace import NAME, DPDDPStrategy, DPStrategy, PrivacyBudgetCallback, pl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (cwd: the repository) and return the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_FIT = """
import json, tempfile, torch
from torch.utils.data import DataLoader, TensorDataset
class Model({pl}.LightningModule):
    def __init__(self):
        super().__init__(); self.net = torch.nn.Linear(4, 2)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
trainer = {pl}.Trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=1.0, seed=0), accelerator="cpu",
                       logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, callbacks=[PrivacyBudgetCallback(epsilon_budget=50.0)],
                       default_root_dir=tempfile.mkdtemp())
trainer.fit(Model(), data)
print(json.dumps({{"namespace": lightning_dp.LIGHTNING_NAMESPACE, "steps": trainer.strategy.accountant.total_steps,
                  "module": type(trainer.strategy).__module__}}))
"""


@pytest.mark.parametrize(
    ("prelude", "expected"),
    [
        ("import lightning_dp\nimport lightning.pytorch as L\nfrom lightning_dp import DPStrategy, PrivacyBudgetCallback",
         "lightning.pytorch"),
        ("import pytorch_lightning as pl\nimport lightning_dp\nfrom lightning_dp import DPStrategy, PrivacyBudgetCallback",
         "pytorch_lightning"),
        # only pytorch_lightning installed (``lightning`` hidden): it alone is enough
        ("import sys\nsys.modules['lightning'] = None\nimport lightning_dp\nimport pytorch_lightning as pl\n"
         "from lightning_dp import DPStrategy, PrivacyBudgetCallback", "pytorch_lightning"),
        # only lightning installed
        ("import sys\nsys.modules['pytorch_lightning'] = None\nimport lightning_dp\nimport lightning.pytorch as L\n"
         "from lightning_dp import DPStrategy, PrivacyBudgetCallback", "lightning.pytorch"),
    ],
    ids=["both-lightning-default", "pytorch_lightning-imported-first", "only-pytorch_lightning", "only-lightning"],
)
def test_top_level_classes_train_with_the_package_in_use(prelude, expected):
    pl_name = "L" if expected == "lightning.pytorch" else "pl"
    out = _python(prelude + "\n" + _FIT.format(pl=pl_name))
    assert out == {"namespace": expected, "steps": 3, "module": "lightning_dp." + expected.split(".")[0]}


def test_without_lightning_the_core_works_and_the_strategy_says_what_to_install():
    out = _python(
        "import sys, json\nsys.modules['lightning'] = None\nsys.modules['pytorch_lightning'] = None\n"
        "import torch, lightning_dp\n"
        "model = torch.nn.Linear(3, 1)\n"
        "opt = lightning_dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,"
        " max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1, seed=0)\n"
        "model(torch.randn(4, 3)).sum().backward(); opt.step()\n"
        "try:\n    lightning_dp.DPStrategy\n    message = ''\nexcept ImportError as err:\n    message = str(err)\n"
        "print(json.dumps({'namespace': lightning_dp.LIGHTNING_NAMESPACE, 'steps': opt.steps_taken, 'message': message}))"
    )
    assert out["namespace"] is None and out["steps"] == 1
    assert "install `lightning`" in out["message"] and "pytorch-lightning" in out["message"]


@pytest.mark.parametrize(("name", "cls"), [("dp_sgd", "DPStrategy"), ("dp_ddp", "DPDDPStrategy")])
def test_registry_names_give_this_namespaces_strategy(name, cls):
    registry = __import__(f"{NAME}.strategies", fromlist=["StrategyRegistry"]).StrategyRegistry
    strategy = registry.get(name)
    assert type(strategy) is {"DPStrategy": DPStrategy, "DPDDPStrategy": DPDDPStrategy}[cls]
    assert (strategy.noise_multiplier, strategy.max_grad_norm) == (1.0, 1.0)
    assert isinstance(strategy, pl.strategies.Strategy)


def test_trainer_accepts_registry_name_and_callback(tmp_path):
    trainer = pl.Trainer(strategy="dp_sgd", accelerator="cpu", callbacks=[PrivacyBudgetCallback(epsilon_budget=1.0)],
                         default_root_dir=str(tmp_path), logger=False)
    assert isinstance(trainer.strategy, DPStrategy)


def test_classes_pickle_by_their_namespace_module():
    strategy = DPStrategy(noise_multiplier=1.1, max_grad_norm=0.5, seed=3)
    assert type(strategy).__module__ == "lightning_dp." + NAME.split(".")[0]
    assert pickle.loads(pickle.dumps(type(strategy))) is DPStrategy
    assert pickle.loads(pickle.dumps(PrivacyBudgetCallback)) is PrivacyBudgetCallback


def test_signatures_are_explicit_with_the_config_defaults():
    import inspect

    for cls in (DPStrategy, DPDDPStrategy):
        parameters = inspect.signature(cls).parameters
        for field in ("noise_multiplier", "max_grad_norm", "target_epsilon", "delta", "clipping_mode", "seed"):
            assert parameters[field].default == getattr(DPConfig, field), (cls, field)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=1.0, max_grad_norm=0), "max_grad_norm"),
        (dict(noise_multiplier=1.0, delta=1.0), "delta"),
        (dict(noise_multiplier=1.0, clipping_mode="fast"), "clipping_mode"),
        (dict(noise_multiplier=1.0, accountant="gdp"), "accountant"),
        (dict(noise_multiplier=1.0, seed=1, secure_mode=True), "seed"),
        (dict(noise_multiplier=1.0, target_epsilon=3.0), "target_epsilon"),
        (dict(noise_multiplier=1.0, max_physical_batch_size=0), "max_physical_batch_size"),
    ],
)
def test_every_entry_point_names_the_bad_argument(kwargs, names):
    import torch

    from lightning_dp import make_private

    for build in (lambda: DPStrategy(**kwargs), lambda: DPDDPStrategy(**kwargs)):
        with pytest.raises(ValueError, match=names):
            build()
    if not {"target_epsilon", "max_physical_batch_size", "delta"} & set(kwargs):  # not make_private's arguments
        model = torch.nn.Linear(2, 1)
        with pytest.raises(ValueError, match=names):
            make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), expected_batch_size=4,
                         **{"max_grad_norm": 1.0, **kwargs})


def test_adapter_imports_no_lightning_namespace():
    for path in sorted((ROOT / "lightning_dp" / "adapter").glob("*.py")) + [ROOT / "lightning_dp" / "config.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"lightning", "pytorch_lightning", "lightning_fabric"}, (path, name)
