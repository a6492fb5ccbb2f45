"""lightning-dp: differentially private training for PyTorch Lightning.

``Trainer(strategy=DPStrategy(noise_multiplier=1.1, max_grad_norm=1.0))`` trains any LightningModule
with DP-SGD; :class:`PrivacyBudgetCallback` logs ε and stops before the budget. The plain-PyTorch core
(:func:`make_private`, :class:`DPOptimizer`, accountants, samplers) needs no Lightning.

Both Lightning packages are served: ``DPStrategy``, ``DPDDPStrategy``, ``DPFSDPStrategy`` and ``PrivacyBudgetCallback`` here
are the classes of the package you use — ``lightning`` (``import lightning as L``) or
``pytorch_lightning``, whichever is installed. With both installed they are ``lightning``'s, unless
``pytorch_lightning`` alone was imported before ``lightning_dp``; ``lightning_dp.lightning`` and
``lightning_dp.pytorch_lightning`` give either set explicitly. Importing ``lightning_dp`` registers
``"dp_sgd"``, ``"dp_ddp"`` and ``"dp_fsdp"`` with every installed package's strategy registry.
"""
import importlib
import importlib.util
import sys

from .__about__ import __version__
from .accounting import PRVAccountant, RDPAccountant, compute_epsilon, get_noise_multiplier, make_accountant
from .averaging import ExponentialMovingAverage
from .centering import PrivateMean
from .config import DPConfig
from .plain_pytorch import make_private
from .optimizer import DPOptimizer
from .privacy_state import PrivacyState
from .report import PrivacyReport
from .sampling import PoissonBatchSampler, poisson_dataloader
from .user_sampling import UserPlan, user_poisson_dataloader
from .tuning import PoissonTrials, PrivateHyperparameterSearch, TruncatedNegativeBinomialTrials
from .grad_sample import UnsupportedModuleError
from .adapter import PUBLIC_NAMES
from .validation import AppliedFix, PrivacyValidationError, ValidationIssue, fix, validate

_MODULES = {"lightning.pytorch": "lightning", "pytorch_lightning": "pytorch_lightning"}
"""Lightning namespace → its distribution's import name (and our module ``lightning_dp.<name>``)."""


def _default_namespace(installed: list, imported_before: list) -> str:
    if len(installed) == 1:
        return installed[0]
    if len(imported_before) == 1:
        return imported_before[0]
    return "lightning.pytorch"


_installed = [ns for ns, dist in _MODULES.items() if importlib.util.find_spec(dist) is not None]
_imported_before = [ns for ns in _installed if ns in sys.modules]
_bound = {ns: importlib.import_module(f"{__name__}.{_MODULES[ns]}") for ns in _installed}
LIGHTNING_NAMESPACE = _default_namespace(_installed, _imported_before) if _installed else None
"""The Lightning namespace the top-level classes belong to (``None`` when no Lightning is installed)."""

if LIGHTNING_NAMESPACE is not None:
    globals().update({name: getattr(_bound[LIGHTNING_NAMESPACE], name) for name in PUBLIC_NAMES})
    from .metrics import PrivateAccuracy, PrivateF1Score, PrivateMeanLoss  # torchmetrics comes with Lightning


def __getattr__(name: str):  # only reached when no Lightning package is installed
    if name in PUBLIC_NAMES:
        raise ImportError(
            f"lightning_dp.{name} needs Lightning: install `lightning` (import lightning as L) or "
            "`pytorch-lightning`. The plain-PyTorch core (make_private, DPOptimizer) works without it."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*PUBLIC_NAMES,
    "AppliedFix",
    "DPConfig",
    "DPOptimizer",
    "PrivacyState",
    "ExponentialMovingAverage",
    "LIGHTNING_NAMESPACE",
    "PRVAccountant",
    "PoissonBatchSampler",
    "PoissonTrials",
    "PrivacyReport",
    "PrivacyValidationError",
    "PrivateAccuracy",
    "PrivateF1Score",
    "PrivateHyperparameterSearch",
    "PrivateMean",
    "PrivateMeanLoss",
    "RDPAccountant",
    "TruncatedNegativeBinomialTrials",
    "UnsupportedModuleError",
    "UserPlan",
    "ValidationIssue",
    "__version__",
    "user_poisson_dataloader",
    "compute_epsilon",
    "fix",
    "get_noise_multiplier",
    "make_accountant",
    "make_private",
    "poisson_dataloader",
    "validate",
]
