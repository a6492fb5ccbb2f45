r"""Private metrics: torchmetrics ``Metric``\ s whose value on private data is released with DP.

Each metric keeps one sum state, a vector of counts (``float64``), to which every example adds a
contribution of L2 norm at most the metric's ``sensitivity`` ``Δ`` (checked on every update). Under
**add/remove-one-example adjacency** the vector of sums therefore moves by at most ``Δ``, and
:meth:`PrivateMetric.compute` releases it once with Gaussian noise of std ``σ·Δ`` (``σ =
noise_multiplier``): one Gaussian mechanism, recorded with the metric's accountant as one step at
sampling rate 1. The metric's value is computed from the noisy counts (post-processing, free).

* :class:`PrivateAccuracy`: ``(correct, incorrect)``, exactly one is 1 per example; ``Δ = 1``.
* :class:`PrivateMeanLoss`: ``(clip(loss, 0, L) / L, 1)``; ``Δ = √2``.
* :class:`PrivateF1Score`, binary: ``(TP, FP, FN)``, at most one is 1 per example; ``Δ = 1``.
* :class:`PrivateF1Score`, macro: ``(TP_c, FP_c, FN_c)`` for every class; a mistake adds 1 to ``FP`` of the
  prediction and to ``FN`` of the target; ``Δ = √2``.

The number of examples is not public under add/remove adjacency, so it is never used exactly: accuracy
is ``correct / (correct + incorrect)`` and the mean loss divides by a noisy count.

A metric on **public** data (``public=True``) adds no noise, records nothing and returns the exact value;
:attr:`PrivateMetric.last_release` says ``"public": True`` so it cannot be mistaken for a private release.

Calling a private metric on a batch (``metric(preds, target)``) only accumulates and returns ``None``: a
value per batch would be a release of its own. Log the metric object (``self.log("val_acc", metric)``) or
call :meth:`~PrivateMetric.compute` once per evaluation; repeated ``compute()`` calls without a new
``update`` return the same release, and ``reset()`` starts a new one. Each example must be fed once per
release. Under DDP the states are summed across ranks before noise is drawn on every rank: release one
rank's value (ranks draw the same noise only with the same seed in seeded mode).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from ._checks import check_choice, check_int, check_positive
from .accounting import Accountant, make_accountant
from .noise.sources import make_noise

try:
    from torchmetrics import Metric
except ImportError as _err:  # pragma: no cover - torchmetrics comes with Lightning
    raise ImportError(
        "lightning_dp.metrics needs torchmetrics (installed with Lightning: `pip install lightning-dp[lightning]`, "
        "or `pip install torchmetrics`)"
    ) from _err

from typing_extensions import override

__all__ = ["PrivateAccuracy", "PrivateF1Score", "PrivateMeanLoss", "PrivateMetric"]

_SLACK = 1e-9  # float rounding allowed in the per-example sensitivity check


class PrivateMetric(Metric):
    """Base class: a vector of count sums released once with Gaussian noise (see the module docstring).

    Subclasses set :attr:`sensitivity`, call :meth:`_add` with one row of contributions per example in
    ``update`` and turn counts into a value in :meth:`_value`.

    Args:
        noise_multiplier: ``σ`` of the release (noise std ``σ·Δ``); required unless ``public``.
        public: the data is public: no noise, no accounting, the exact value.
        accountant: records each release (one step at rate 1); default a new ``make_accountant()``.
            Pass the training run's accountant to compose the release with the training.
        secure_mode: draw noise from :class:`~lightning_dp.noise.SecureRNG` (default) or, with ``False``,
            from the seeded, reproducible, not secure :class:`~lightning_dp.noise.GaussianNoise`.
        seed: the seed in seeded mode.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    is_differentiable = False
    sensitivity: float = 1.0
    num_counts: int = 1

    def __init__(
        self,
        *,
        noise_multiplier: Optional[float] = None,
        public: bool = False,
        accountant: Optional[Accountant] = None,
        secure_mode: bool = True,
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(public, bool):
            raise ValueError(f"`public` must be True or False, got {public!r}.")
        if public and noise_multiplier is not None:
            raise ValueError(f"`noise_multiplier` must be None for a public metric (public=True), got "
                             f"{noise_multiplier!r}; public data needs no noise.")
        if not public and noise_multiplier is None:
            raise ValueError("`noise_multiplier` is required for a private metric; pass public=True if the data "
                             "is public.")
        self.public = public
        self.noise_multiplier = None if public else check_positive("noise_multiplier", noise_multiplier)
        self.accountant = None if public else (accountant if accountant is not None else make_accountant())
        self.secure_mode = bool(secure_mode)
        self.seed = seed
        self._noise: Any = None
        self._noisy: Optional[torch.Tensor] = None
        self.last_release: Optional[Dict[str, Any]] = None
        self.add_state("counts", default=torch.zeros(self.num_counts, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, contributions: torch.Tensor) -> None:
        """Adds ``(N, num_counts)`` per-example contributions, each row of L2 norm <= ``sensitivity``."""
        rows = contributions.detach().to(device=self.counts.device, dtype=torch.float64)
        norms = rows.norm(dim=1) if rows.numel() else rows.new_zeros(0)
        if bool((norms > self.sensitivity * (1 + _SLACK)).any()):  # an internal error, never the user's
            raise RuntimeError(f"{type(self).__name__}: a contribution of norm {float(norms.max())} exceeds the "
                               f"sensitivity {self.sensitivity}")
        self.counts += rows.sum(dim=0)
        self._noisy = None

    def _value(self, counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @override
    def compute(self) -> torch.Tensor:
        """The value: exact for public data, else from the counts released once with noise ``σ·Δ``."""
        counts = self.counts
        if not self.public and self._noisy is None:
            if self._noise is None:
                self._noise = make_noise(self.secure_mode, self.seed)
            std = self.noise_multiplier * self.sensitivity
            noise = self._noise.normal(counts.shape, std, device=counts.device, dtype=torch.float64)
            self._noisy = counts + noise
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        released = counts if self.public else self._noisy
        value = self._value(released.clamp_min(0.0))
        self.last_release = {
            "value": float(value),
            "public": self.public,
            "counts": released.tolist(),
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": self.sensitivity,
        }
        return value.to(torch.float32)

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Public: torchmetrics' batch value. Private: accumulate only and return ``None`` (a per-batch
        value would be a release of its own)."""
        if self.public:
            return super().forward(*args, **kwargs)
        self.update(*args, **kwargs)
        return None

    @override
    def reset(self) -> None:
        """Clear the counts; the next ``compute()`` is a new release."""
        super().reset()
        self._noisy = None


def _labels(preds: torch.Tensor, target: torch.Tensor, threshold: float, name: str) -> torch.Tensor:
    """Predicted labels from labels, per-class scores ``(N, C)`` or binary probabilities ``(N,)``."""
    if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(f"{name}.update needs tensors `preds` and `target`, got {type(preds).__name__} and "
                         f"{type(target).__name__}.")
    if target.dim() != 1 or target.is_floating_point():
        raise ValueError(f"`target` must be a 1-D integer tensor of class labels (one per example), got shape "
                         f"{tuple(target.shape)} and dtype {target.dtype}.")
    if preds.dim() == 2 and preds.shape[0] == target.shape[0]:
        return preds.argmax(dim=1)
    if preds.shape != target.shape:
        raise ValueError(f"`preds` must have shape (N,) or (N, num_classes) with N = {target.shape[0]} examples, "
                         f"got {tuple(preds.shape)}.")
    return (preds >= threshold).long() if preds.is_floating_point() else preds.long()


def _check_classes(labels: torch.Tensor, num_classes: Optional[int], what: str) -> None:
    if num_classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"`{what}` holds labels outside [0, num_classes) with num_classes={num_classes}: "
                         f"min {int(labels.min())}, max {int(labels.max())}.")


class PrivateAccuracy(PrivateMetric):
    """Accuracy from the noisy counts ``(correct, incorrect)`` (``Δ = 1``).

    ``preds`` are labels ``(N,)``, scores ``(N, C)`` (argmax) or binary probabilities ``(N,)``
    (``>= threshold``); ``target`` are labels ``(N,)``.

    Example:
        >>> import torch
        >>> metric = PrivateAccuracy(noise_multiplier=2.0, secure_mode=False, seed=0)
        >>> metric.update(torch.tensor([0, 1, 1, 0] * 250), torch.tensor([0, 1, 0, 0] * 250))
        >>> abs(float(metric.compute()) - 0.75) < 0.02
        True
        >>> metric.accountant.history
        [(2.0, 1.0, 1)]
    """

    higher_is_better = True
    num_counts = 2

    def __init__(self, num_classes: Optional[int] = None, threshold: float = 0.5, **kwargs: Any) -> None:
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, 2)
        self.threshold = float(threshold)
        super().__init__(**kwargs)

    @override
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Count each example as correct or incorrect."""
        labels = _labels(preds, target, self.threshold, type(self).__name__)
        _check_classes(target, self.num_classes, "target")
        correct = (labels.to(target.device) == target).to(torch.float64)
        self._add(torch.stack([correct, 1.0 - correct], dim=1))

    @override
    def _value(self, counts: torch.Tensor) -> torch.Tensor:
        total = counts.sum()
        return counts[0] / total if total > 0 else counts.new_tensor(0.0)


class PrivateMeanLoss(PrivateMetric):
    """The mean of per-example losses clipped to ``[0, max_loss]``: the noisy ``(Σ loss/L, count)``
    (``Δ = √2``; a non-finite loss counts as ``max_loss``).

    Args:
        max_loss: ``L``; losses above it are clipped (a bias), the noise on the mean grows with it.

    Example:
        >>> import torch
        >>> metric = PrivateMeanLoss(max_loss=4.0, noise_multiplier=1.0, secure_mode=False, seed=0)
        >>> metric.update(torch.full((2000,), 1.5))
        >>> abs(float(metric.compute()) - 1.5) < 0.02
        True
    """

    higher_is_better = False
    num_counts = 2
    sensitivity = math.sqrt(2.0)

    def __init__(self, max_loss: float, **kwargs: Any) -> None:
        self.max_loss = check_positive("max_loss", max_loss)
        super().__init__(**kwargs)

    @override
    def update(self, losses: torch.Tensor) -> None:
        """Add per-example losses (a 1-D tensor: compute the loss with ``reduction="none"``)."""
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError("`losses` must be a 1-D tensor of per-example losses (use reduction='none'), got "
                             f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}.")
        bound = self.max_loss
        clipped = torch.nan_to_num(losses.detach().double(), nan=bound, posinf=bound, neginf=0.0).clamp(0.0, bound)
        self._add(torch.stack([clipped / bound, torch.ones_like(clipped)], dim=1))

    @override
    def _value(self, counts: torch.Tensor) -> torch.Tensor:
        return self.max_loss * (counts[0] / counts[1].clamp_min(1.0)).clamp(0.0, 1.0)


class PrivateF1Score(PrivateMetric):
    """F1 from noisy counts: ``average="binary"`` (class 1 positive; ``(TP, FP, FN)``, ``Δ = 1``) or
    ``"macro"`` (the mean over classes of each class's F1 from ``(TP_c, FP_c, FN_c)``, ``Δ = √2``).
    ``F1 = 2 TP / (2 TP + FP + FN)``, 0 where the denominator is 0.

    Example:
        >>> import torch
        >>> metric = PrivateF1Score(noise_multiplier=1.0, secure_mode=False, seed=0)
        >>> metric.update(torch.tensor([1, 1, 0, 0] * 500), torch.tensor([1, 0, 1, 0] * 500))
        >>> abs(float(metric.compute()) - 0.5) < 0.02
        True
    """

    higher_is_better = True

    def __init__(self, num_classes: int = 2, average: str = "binary", threshold: float = 0.5, **kwargs: Any) -> None:
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.average = check_choice("average", average, ("binary", "macro"))
        if average == "binary" and self.num_classes != 2:
            raise ValueError(f"`average` must be 'macro' for num_classes={num_classes} > 2, got 'binary'.")
        self.threshold = float(threshold)
        self.num_counts = 3 if average == "binary" else 3 * self.num_classes
        self.sensitivity = 1.0 if average == "binary" else math.sqrt(2.0)
        super().__init__(**kwargs)

    @override
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Count TP/FP/FN per example."""
        labels = _labels(preds, target, self.threshold, type(self).__name__).to(target.device)
        _check_classes(target, self.num_classes, "target")
        _check_classes(labels, self.num_classes, "preds")
        n, k = target.shape[0], self.num_classes
        rows = torch.zeros(n, 3, k, dtype=torch.float64, device=target.device)  # [TP, FP, FN] x class
        index = torch.arange(n, device=target.device)
        hit = labels == target
        rows[index[hit], 0, target[hit]] = 1.0
        rows[index[~hit], 1, labels[~hit]] = 1.0
        rows[index[~hit], 2, target[~hit]] = 1.0
        if self.average == "binary":
            rows = rows[:, :, 1:]  # class 1 is positive: a true negative adds nothing
        self._add(rows.reshape(n, -1))

    @override
    def _value(self, counts: torch.Tensor) -> torch.Tensor:
        tp, fp, fn = counts.reshape(3, -1)
        denominator = 2 * tp + fp + fn
        f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1e-300), torch.zeros_like(tp))
        return f1.mean()
