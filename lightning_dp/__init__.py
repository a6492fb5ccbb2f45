"""lightning-dp: differentially private training for PyTorch Lightning.

``Trainer(strategy=DPStrategy(noise_multiplier=1.1, max_grad_norm=1.0))`` trains any LightningModule
with DP-SGD; :class:`PrivacyBudgetCallback` logs ε and stops before the budget. The plain-PyTorch core
(:func:`make_private`, :class:`DPOptimizer`, accountants, samplers) needs no Lightning.
"""
from .__about__ import __version__
from .accounting import PRVAccountant, RDPAccountant, compute_epsilon, get_noise_multiplier, make_accountant
from .engine import make_private
from .optimizer import DPOptimizer
from .report import PrivacyReport
from .sampling import PoissonBatchSampler, poisson_dataloader
from .grad_sample import UnsupportedModuleError
from .validation import AppliedFix, PrivacyValidationError, ValidationIssue, fix, validate
from .strategy import DPStrategy  # noqa: E402  (imports pytorch_lightning)
from .strategy_ddp import DPDDPStrategy  # noqa: E402
from .callbacks import PrivacyBudgetCallback  # noqa: E402

__all__ = [
    "AppliedFix",
    "DPDDPStrategy",
    "DPOptimizer",
    "DPStrategy",
    "PRVAccountant",
    "PoissonBatchSampler",
    "PrivacyBudgetCallback",
    "PrivacyReport",
    "PrivacyValidationError",
    "RDPAccountant",
    "UnsupportedModuleError",
    "ValidationIssue",
    "__version__",
    "compute_epsilon",
    "fix",
    "get_noise_multiplier",
    "make_accountant",
    "make_private",
    "poisson_dataloader",
    "validate",
]
