"""The Lightning namespace the tests run against, from ``LIGHTNING_DP_TEST_NAMESPACE``:
``lightning.pytorch`` (default, ``import lightning as L``) or ``pytorch_lightning``.

``make test`` runs the suite under the first and the Lightning tests (marker ``lightning``) again under
the second. Test modules take Lightning and lightning_dp's Lightning classes from here, never from a
namespace directly, so the same tests exercise both packages.
"""
from __future__ import annotations

import importlib
import os

NAME = os.environ.get("LIGHTNING_DP_TEST_NAMESPACE", "lightning.pytorch")
_OURS = {"lightning.pytorch": "lightning_dp.lightning", "pytorch_lightning": "lightning_dp.pytorch_lightning"}
if NAME not in _OURS:
    raise RuntimeError(f"LIGHTNING_DP_TEST_NAMESPACE must be one of {sorted(_OURS)}, got {NAME!r}")

pl = importlib.import_module(NAME)
_ours = importlib.import_module(_OURS[NAME])
DPStrategy = _ours.DPStrategy
DPDDPStrategy = _ours.DPDDPStrategy
DPFSDPStrategy = _ours.DPFSDPStrategy
PrivacyBudgetCallback = _ours.PrivacyBudgetCallback

callbacks = importlib.import_module(f"{NAME}.callbacks")
loggers = importlib.import_module(f"{NAME}.loggers")
ModelCheckpoint = callbacks.ModelCheckpoint
Logger = loggers.Logger
TensorBoardLogger = loggers.TensorBoardLogger
MisconfigurationException = importlib.import_module(f"{NAME}.utilities.exceptions").MisconfigurationException
WARNINGS_MODULE = NAME.replace(".", r"\.")  # for filterwarnings("ignore::UserWarning:<module>")


def submodule(name: str):
    """``<namespace>.<name>``, e.g. ``submodule("cli").LightningCLI``."""
    return importlib.import_module(f"{NAME}.{name}")
