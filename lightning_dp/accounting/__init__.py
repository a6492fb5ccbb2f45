"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (numpy/scipy only).

The accountant's ``history`` is the only record of privacy spent; everything else (epsilon now,
epsilon after more steps, the noise needed for a target epsilon) is computed from it.

Example:
    >>> from lightning_dp.accounting import make_accountant
    >>> accountant = make_accountant()  # "prv": privacy-loss distribution, the tightest bound
    >>> accountant.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    >>> accountant.total_steps
    100
"""

from lightning_dp.accounting.base import DEFAULT_ACCOUNTANT, Accountant, make_accountant
from lightning_dp.accounting.calibration import compute_epsilon, get_noise_multiplier, get_noise_multiplier_for_plan
from lightning_dp.accounting.ddg import DistributedDiscreteGaussianAccountant, ddg_epsilon, ddg_noise_multiplier
from lightning_dp.accounting.prv import PRVAccountant
from lightning_dp.accounting.rdp import DEFAULT_RDP_ORDERS, RDPAccountant

__all__ = [
    "Accountant",
    "PRVAccountant",
    "RDPAccountant",
    "DistributedDiscreteGaussianAccountant",
    "DEFAULT_ACCOUNTANT",
    "make_accountant",
    "compute_epsilon",
    "get_noise_multiplier",
    "get_noise_multiplier_for_plan",
    "ddg_epsilon",
    "ddg_noise_multiplier",
    "DEFAULT_RDP_ORDERS",
]
