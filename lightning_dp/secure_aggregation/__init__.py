"""Cross-silo private training: secure aggregation with the distributed discrete Gaussian mechanism.

Kairouz, Liu & Steinke (ICML 2021), *The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation*, adapted to example-level DP-SGD across data owners (ranks). Plain PyTorch, no
Lightning import:

- :mod:`.discrete_gaussian` — exact-law discrete Gaussian samplers (a rounded Gaussian with rejection for large σ; Canonne, Kamath & Steinke 2020 below);
- :mod:`.masks` — X25519 pairwise keys and ChaCha20 masks that cancel in the sum;
- :mod:`.aggregator` — :class:`SecureAggregator`, the ``combine`` of a :class:`~lightning_dp.DPOptimizer`;
- ε of the subsampled distributed discrete Gaussian: its accountant lives with the others, in
  :mod:`lightning_dp.accounting.ddg` (re-exported here).

With Lightning: ``DPDDPStrategy(..., secure_aggregation=True, min_honest_ranks=h)``. See
``docs/cross_silo.rst`` for the threat model.
"""
from ..accounting.ddg import (
    DistributedDiscreteGaussianAccountant,
    ddg_epsilon,
    ddg_noise_multiplier,
    rounded_l2_norm_bound,
)
from .aggregator import DEFAULT_BITS, DEFAULT_SCALE, SecureAggregator
from .discrete_gaussian import discrete_gaussian_pmf, sample_discrete_gaussian
from .masks import PairwiseMasks

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_SCALE",
    "DistributedDiscreteGaussianAccountant",
    "PairwiseMasks",
    "SecureAggregator",
    "ddg_epsilon",
    "ddg_noise_multiplier",
    "discrete_gaussian_pmf",
    "rounded_l2_norm_bound",
    "sample_discrete_gaussian",
]
