"""Input centring: DP-SGD in the geometry of a layer whose input is centred, at the price of one private mean.

A linear layer ``y = W x + b`` whose inputs ``x`` are far from zero on average (pixel intensities, counts,
post-ReLU features) is badly conditioned for gradient descent: every sample pushes ``W`` along its own
``x``, and these directions share the large common part ``E[x]``. The same layer written as ``y = W (x −
c) + u`` with ``u = b + W c`` computes the same function, but gradient descent on ``(W, u)`` is far better
conditioned when ``c ≈ E[x]``; with DP-SGD it also means that the clipped, noised per-sample gradients
are those of the centred layer: ``∂L/∂W = Σ_t g_t (x_t − c)ᵀ`` and ``∂L/∂u = Σ_t g_t``.

:class:`InputCentering` runs DP-SGD in those coordinates while the model keeps its own parameters (same
class, same ``state_dict``): the per-sample gradient rules of the centred ``nn.Linear`` layers use
``x − c`` for the weight (``c`` is kept in the module attribute :data:`CENTER_ATTRIBUTE`), the wrapped
optimizer steps ``W`` and ``b`` with those gradients, and after each step the bias is corrected by ``(W_before
− W_after) c``, so that ``b`` always equals ``u − W c``. Any optimizer then acts on ``(W, u)`` exactly.

The centre is either public (a tensor: it costs no privacy, e.g. known from public data or the input
format) or a :class:`PrivateMean` of the training inputs: one Gaussian mechanism on the whole dataset,
recorded by the accountant as one step at sampling rate 1 before training (so a ``target_epsilon``
calibration spends what is left on DP-SGD).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ._checks import check_positive
from .noise.adding import add_noise_

CENTER_ATTRIBUTE = "_dp_input_center"
"""Attribute of a centred ``nn.Linear`` holding its centre ``c`` (read by its per-sample gradient rule)."""

AccountingEvent = Tuple[float, float, int]


def _rows(batch: Any, select: Optional[Callable[[Any], torch.Tensor]]) -> torch.Tensor:
    if select is not None:
        batch = select(batch)
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"PrivateMean needs the layer's inputs as tensors of rows, got a batch of type {type(batch).__name__}; "
            "pass `select=` to take the input tensor out of each batch."
        )
    if batch.dim() == 0:
        raise ValueError("PrivateMean needs rows (a tensor with a batch dimension), got a scalar.")
    return batch.detach().reshape(batch.shape[0], -1)


class PrivateMean:
    """A differentially private mean of a dataset's rows, released once: the centre of a centred layer.

    Each row is clipped to L2 norm ``max_norm`` (``S``); the sum of the clipped rows and the count of rows
    (weighted by ``κ = count_weight · S``) are released together with Gaussian noise of std ``σ·√(S² + κ²)``
    (``σ = noise_multiplier``) on every coordinate — one Gaussian mechanism of sensitivity ``√(S² + κ²)``
    under adding or removing a row — and the mean is their ratio. The accountant records it as one step
    at sampling rate 1 (:attr:`accounting_event`). A coordinate of mean ``m`` has error of std about
    ``σ√(S² + κ²)/N · √(1 + (m/κ)²)`` for ``N`` rows (the second factor is the count's noise).

    Nothing is computed until :meth:`release` (the strategy or :func:`~lightning_dp.make_private` calls it
    with its own noise source before the first step); later calls return the same value.

    Args:
        data: the rows: a tensor ``(N, d)`` or an iterable of batches (tensors, or tuples/lists whose first
            element is the input tensor, e.g. a ``DataLoader``). Rows must be the inputs of the centred
            layer, one per training example (the whole training set, each example once).
        max_norm: clipping norm ``S`` of each row (choose it from the input format, e.g. ``√d`` for
            features in ``[0, 1]``; rows above it are scaled down, which biases the mean towards 0).
        noise_multiplier: ``σ``; the error of the mean falls as ``σ/N``, its privacy cost as ``1/σ²``.
        count_weight: ``κ/S`` (default 0.5): the larger, the more accurate the count, the larger the noise.
        select: takes the input tensor out of a batch (default: the batch itself, or its first element).

    Example::

        >>> import torch
        >>> from lightning_dp.centering import PrivateMean
        >>> from lightning_dp.noise import GaussianNoise
        >>> x = torch.rand(5000, 4)
        >>> mean = PrivateMean(x, max_norm=2.0, noise_multiplier=5.0)
        >>> bool((mean.release(GaussianNoise(0)) - 0.5).abs().max() < 0.05)
        True
        >>> mean.accounting_event
        (5.0, 1.0, 1)
    """

    def __init__(
        self,
        data: "torch.Tensor | Iterable[Any]",
        *,
        max_norm: float,
        noise_multiplier: float,
        count_weight: float = 0.5,
        select: Optional[Callable[[Any], torch.Tensor]] = None,
    ) -> None:
        self.data = data
        self.max_norm = check_positive("max_norm", max_norm)
        self.noise_multiplier = check_positive("noise_multiplier", noise_multiplier)
        self.count_weight = check_positive("count_weight", count_weight)
        self.select = select
        self.value: Optional[torch.Tensor] = None

    @property
    def sensitivity(self) -> float:
        """``√(S² + κ²)``: how far one row moves the released (sum, weighted count)."""
        return self.max_norm * math.sqrt(1.0 + self.count_weight**2)

    @property
    def accounting_event(self) -> AccountingEvent:
        """``(noise_multiplier, sample_rate, steps) = (σ, 1, 1)``: one unsampled Gaussian mechanism."""
        return (self.noise_multiplier, 1.0, 1)

    def _batches(self) -> Iterator[torch.Tensor]:
        if isinstance(self.data, torch.Tensor):
            yield _rows(self.data, self.select)
            return
        for batch in self.data:
            yield _rows(batch, self.select)

    @torch.no_grad()
    def release(self, noise: Any) -> torch.Tensor:
        """The private mean (float32, one value per input feature), drawn with ``noise`` (a
        :class:`~lightning_dp.noise.GaussianNoise` or :class:`~lightning_dp.noise.SecureRNG`) the first time."""
        if self.value is not None:
            return self.value
        total: Optional[torch.Tensor] = None
        count = 0
        for rows in self._batches():
            rows = rows.to(torch.float64)
            norms = rows.norm(dim=1, keepdim=True)
            clipped = rows * (self.max_norm / norms.clamp_min(1e-300)).clamp(max=1.0)
            part = clipped.sum(0)
            total = part if total is None else total + part
            count += rows.shape[0]
        if total is None:
            raise ValueError("PrivateMean: `data` holds no rows.")
        kappa = self.count_weight * self.max_norm
        released = torch.cat([total.cpu(), torch.tensor([kappa * count], dtype=torch.float64)])
        add_noise_(noise, [released], self.noise_multiplier * self.sensitivity)
        noisy_count = max(float(released[-1]) / kappa, 1.0)  # post-processing: never divide by < 1 row
        self.value = (released[:-1] / noisy_count).to(torch.float32)
        return self.value


def _as_center(center: Any, noise: Any) -> Tuple[torch.Tensor, Optional[AccountingEvent]]:
    """The centre tensor and the accounting event it costs (``None``: public, free)."""
    if isinstance(center, PrivateMean):
        return center.release(noise), center.accounting_event
    return torch.as_tensor(center).detach().clone(), None


class InputCentering:
    """The centred ``nn.Linear`` layers of a model and the bias correction after each optimizer step.

    Args:
        centers: ``{layer: c}`` for ``nn.Linear`` layers with a trainable weight and bias; ``c`` holds one
            value per input feature (a float tensor).
        names: each layer's name in the model (the keys of :meth:`state_dict` and of error messages).

    Raises:
        ValueError: a layer is not an ``nn.Linear``, has no trainable bias or weight, or ``c`` does not
            have ``in_features`` elements or is not finite.
    """

    def __init__(
        self, centers: Mapping[nn.Module, torch.Tensor], names: Optional[Mapping[nn.Module, str]] = None
    ) -> None:
        self.centers: Dict[nn.Linear, torch.Tensor] = {}
        names = names or {}
        for layer, center in centers.items():
            name = names.get(layer, type(layer).__name__)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"`centering` applies to nn.Linear layers; {name} is a {type(layer).__name__}.")
            if layer.bias is None or not layer.bias.requires_grad or not layer.weight.requires_grad:
                raise ValueError(
                    f"`centering` of {name} needs a trainable weight and bias: the bias absorbs W·c after every "
                    "step (y = W(x − c) + u with u = b + W·c). Give the layer a bias, or do not centre it."
                )
            center = torch.as_tensor(center).detach().reshape(-1)
            if not center.is_floating_point():
                center = center.to(torch.float32)
            if center.numel() != layer.in_features or not bool(torch.isfinite(center).all()):
                raise ValueError(
                    f"the centre of {name} must hold in_features={layer.in_features} finite numbers, got "
                    f"{center.numel()} (finite: {bool(torch.isfinite(center).all())})."
                )
            self.centers[layer] = center.to(layer.weight.device)
        self.names = {layer: names.get(layer, f"layer{i}") for i, layer in enumerate(self.centers)}

    def attach(self) -> None:
        """Let the per-sample gradient rules of the layers see their centres."""
        for layer, center in self.centers.items():
            setattr(layer, CENTER_ATTRIBUTE, center)

    def detach(self) -> None:
        """Make the layers ordinary layers again."""
        for layer in self.centers:
            if hasattr(layer, CENTER_ATTRIBUTE):
                delattr(layer, CENTER_ATTRIBUTE)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Wrap the inner optimizer's step: afterwards ``b += (W_before − W_after) c`` for every layer."""
        before = [layer.weight.detach().clone() for layer in self.centers]
        yield
        with torch.no_grad():
            for layer, weight in zip(list(self.centers), before):
                center = self._on_device(layer, weight.device)
                weight.sub_(layer.weight)
                layer.bias.add_(weight.to(layer.bias.dtype) @ center.to(layer.bias.dtype))

    def _on_device(self, layer: nn.Linear, device: torch.device) -> torch.Tensor:
        """``layer``'s centre on ``device``, moved there once when the model moved (``.to("cuda")`` after
        :func:`~lightning_dp.make_private`): no copy per step."""
        center = self.centers[layer]
        if center.device != device:
            center = self.centers[layer] = center.to(device)
            if hasattr(layer, CENTER_ATTRIBUTE):
                setattr(layer, CENTER_ATTRIBUTE, center)
        return center

    def state_dict(self) -> Dict[str, List[float]]:
        """The centres by layer name (they are released values: as private as the accounted ε)."""
        return {self.names[layer]: center.tolist() for layer, center in self.centers.items()}


def centered_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x − c`` for a centred layer (``c`` in :data:`CENTER_ATTRIBUTE`), else ``x``."""
    center = getattr(module, CENTER_ATTRIBUTE, None)
    if center is None:
        return x
    if center.device != x.device:  # the model moved after the centring was built: move the centre once
        center = center.to(x.device)
        setattr(module, CENTER_ATTRIBUTE, center)
    return x - center.to(x.dtype)


def check_centering_bands(centering: Optional[Mapping[Any, Any]], bands: int) -> None:
    """Refuse centring with BandMF (``bands > 1``): the one place this combination is checked."""
    if centering and bands > 1:
        raise ValueError(
            f"`centering` cannot be combined with bands={bands} for now: BandMF's accountant records rounds "
            "of the banded mechanism only. Use bands=1 with centering, or no centering."
        )


def check_centering_unit(centering: Optional[Mapping[Any, Any]], privacy_unit: str) -> None:
    """Refuse a private-mean centre with user-level privacy: the mean bounds each *row*, so a user with ``k``
    rows would move it ``k`` times as much as its release is accounted for. Public centres are free."""
    if privacy_unit == "user" and centering and any(isinstance(v, PrivateMean) for v in centering.values()):
        raise ValueError(
            "`centering` with a PrivateMean cannot be combined with privacy_unit='user': its release bounds each "
            "record, not each user. Give a public centre (a tensor), or no centering."
        )


def resolve_layer(model: nn.Module, key: Any) -> Tuple[nn.Module, str]:
    """The layer a ``centering`` key names in ``model`` (a module of it, or its name) and its name."""
    if isinstance(key, str):
        modules = dict(model.named_modules())
        if key not in modules:
            raise ValueError(f"`centering` names {key!r}, which is not a module of the model.")
        return modules[key], key
    for name, module in model.named_modules():
        if module is key:
            return module, name
    raise ValueError(f"`centering` keys must be layers of the model or their names, got {key!r}.")


def build_centering(
    model: nn.Module, centering: Mapping[Any, Any], noise: Any, restored: Optional[Mapping[str, Any]] = None
) -> Tuple[InputCentering, List[AccountingEvent]]:
    """Resolve ``centering`` (``{layer or its name in model: tensor or PrivateMean}``), release the private
    centres with ``noise`` (or take them from ``restored``, a checkpoint's :meth:`InputCentering.state_dict`:
    nothing is released twice) and return the centring with the accounting events of the new releases."""
    centers: Dict[nn.Module, torch.Tensor] = {}
    names: Dict[nn.Module, str] = {}
    events: List[AccountingEvent] = []
    for key, center in centering.items():
        layer, name = resolve_layer(model, key)
        if restored is not None and name in restored:
            value: torch.Tensor = torch.tensor(restored[name], dtype=torch.float32)
        else:
            value, event = _as_center(center, noise)
            if event is not None:
                events.append(event)
        centers[layer], names[layer] = value, name
    return InputCentering(centers, names), events
