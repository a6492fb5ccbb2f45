"""DPOptimizer: wraps any ``torch.optim.Optimizer`` so that ``step()`` performs a DP-SGD step:
clip → exchange → noise → step. σ, q, C and the noise source are the :class:`~lightning_dp.PrivacyState`'s;
how clipped sums cross processes is the :mod:`~lightning_dp.exchange` object it is built with.

(A little over 400 lines on purpose: the step itself, plus the settable views of the privacy state and the
keyword arguments that keep ``DPOptimizer``'s public API as it was; each function is short.)"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from ._checks import check_choice
from .accounting import Accountant
from .adaptive_clipping import AdaptiveClipping
from .centering import InputCentering
from .clipping import (
    CLIPPINGS, NON_FINITE, check_all_seen, clip_and_sum, common_batch_size, drop_per_sample_attrs, grads_now, parts_of,
    parts_by_unit,
)
from .exchange import GradientExchange, GradientShards, ReduceScatterExchange, exchange_from_arguments
from .grad_sample import CLIPPING_MODES, set_clipping_mode, wide_dtype
from .noise import GaussianNoise
from .privacy_state import PrivacyState
from .wrapped_optimizer import WrappedOptimizer

__all__ = ["DPOptimizer", "GradientShards"]

_PER_SAMPLE = ("grad_sample", "grad_parts")


def _privacy_setting(name: str, doc: str) -> property:
    """A setting of the privacy state, read there and set through :meth:`DPOptimizer.configure`."""
    return property(lambda self: getattr(self.privacy, name), lambda self, value: self.configure(**{name: value}), doc=doc)


class DPOptimizer(WrappedOptimizer):
    """An optimizer whose ``step`` is the DP-SGD update (Abadi et al. 2016, "Deep Learning with DP").

    ``step(closure)`` first runs the closure (forward + backward: Lightning calls ``step`` this way),
    then, for the per-sample gradients ``g_b`` the hooks stored in ``param.grad_sample``:

    1. clip each sample to ``C = max_grad_norm`` over all trainable parameters (flat clipping):
       ``ḡ_b = g_b · min(1, C / ‖g_b‖)``, or each parameter tensor to ``C/√K`` (per-layer clipping);
       a sample whose gradient is not finite gets ``ḡ_b = 0`` (``non_finite="drop"``, the default);
    2. sum over the batch, exchange across processes and add Gaussian noise of std ``σ·C`` once
       (``σ = noise_multiplier``; the :class:`~lightning_dp.exchange.GradientExchange` decides who adds it);
    3. divide by ``expected_batch_size`` (with Poisson sampling the actual batch size is random and
       must not be used: it depends on the data) and write the result to ``param.grad``;
    4. run the wrapped optimizer's step and record the step with the privacy state's accountant.

    The wrapped optimizer keeps its ``param_groups`` and ``state`` (shared, not copied), so learning
    rate schedulers and checkpoints see an ordinary optimizer.

    Args:
        optimizer: the optimizer to wrap.
        privacy: the run's :class:`~lightning_dp.PrivacyState` (σ, C, q, expected batch size, noise source,
            accountant, budgets). Without it one is built from ``noise_multiplier``, ``max_grad_norm``,
            ``expected_batch_size``, ``noise`` (or ``seed``), ``accountant`` and ``sample_rate`` (those
            arguments are only taken without ``privacy``).
        exchange: how clipped sums cross processes (:mod:`lightning_dp.exchange`; default: one process).
            Without it one is built from ``combine`` (a callable summing tensors in place across ranks; one
            with ``adds_noise = True``, a :class:`~lightning_dp.secure_aggregation.SecureAggregator`, adds the
            noise itself), ``noise_shares`` (ranks that each add ``σC/√noise_shares``) or ``shards`` (a
            sharded model, :class:`~lightning_dp.exchange.GradientShards`; excludes the other two).
        clipping_mode: ``"auto"`` (default), ``"ghost"`` or ``"materialize"``: how per-sample norms and
            clipped sums are computed (one backward pass; ghost norms or per-sample gradients per layer, or
            every per-sample gradient materialised). The update is the same; see ``docs/clipping.rst``.
        clipping: ``"flat"`` (default; one norm per sample, clipped to ``C``), ``"per_layer"`` (each of the
            ``K`` parameter tensors to ``C/√K``), ``"automatic"``/``"automatic_per_layer"`` (each sample
            normalised, ``c_b = C/(‖g_b‖ + 0.01)``, Bu et al. 2023). The sensitivity is ``C`` in every case.
        non_finite: ``"drop"`` (default): a sample whose per-sample gradient (or loss) is NaN or inf gets clip
            factor 0 and contributes exactly nothing (the sensitivity is unchanged; a batch with every sample
            dropped gives a noise-only step). ``"propagate"``: the NaN/inf reaches ``param.grad`` (needed under
            a fp16 ``GradScaler``, which must see an overflow to skip the step). See :mod:`lightning_dp.clipping`.
        adaptive_clipping: ``None``, an :class:`~lightning_dp.adaptive_clipping.AdaptiveClipping` or a dict of its
            arguments: after each step ``max_grad_norm`` moves towards a private estimate of a quantile of
            the per-sample norms (Andrew et al. 2021). The accountant still records σ; the gradient gets
            the larger :attr:`gradient_noise_multiplier` so that gradient and count together cost exactly σ.
            Flat or per-layer clipping, not on a sharded model.
        centering: ``None`` or an :class:`~lightning_dp.centering.InputCentering`: the step is taken in the
            coordinates of the centred layers (their biases corrected after the inner step). Not sharded.
        step_guard: optional callable run after the closure; when it returns ``False`` the step is skipped
            (gradients cleared, no noise drawn, nothing accounted), as for a step over a privacy budget of
            the privacy state.

    Attributes:
        per_sample_grad_scale: the default factor applied to per-sample gradients before clipping (see
            :meth:`accumulate_micro_batch`'s ``scale``).
        dropped_samples: samples dropped for a non-finite gradient over the optimizer's life (steps later
            refused or skipped included); kept on the device off the CPU (:attr:`dropped_samples_count`).
        dropped_in_step: samples dropped from the current step (restarted by a step's first micro-batch, so it
            holds the step just taken until the next one's first micro-batch; 0 after :meth:`reset_accumulation`).
    """

    def __init__(
        self, optimizer: Optimizer, *, privacy: Optional[PrivacyState] = None,
        exchange: Optional[GradientExchange] = None, clipping_mode: str = "auto", clipping: str = "flat",
        non_finite: str = "drop", adaptive_clipping: "AdaptiveClipping | Dict[str, float] | None" = None,
        centering: Optional[InputCentering] = None, step_guard: Optional[Callable[[], bool]] = None,
        noise_multiplier: Optional[float] = None, max_grad_norm: Optional[float] = None,
        expected_batch_size: Optional[int] = None, noise: Optional[GaussianNoise] = None,
        accountant: Optional[Accountant] = None, sample_rate: Optional[float] = None, seed: Optional[int] = None,
        combine: Optional[Callable[[List[torch.Tensor]], None]] = None, noise_shares: int = 1,
        shards: Optional[GradientShards] = None,
    ) -> None:
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("`optimizer` is already a DPOptimizer; wrap the original optimizer once.")
        super().__init__(optimizer)
        self.privacy = privacy if privacy is not None else PrivacyState.standalone(
            noise_multiplier, max_grad_norm, expected_batch_size, noise if noise is not None else GaussianNoise(seed),
            accountant, sample_rate)
        self.exchange = exchange if exchange is not None else exchange_from_arguments(combine, noise_shares, shards)
        self._clipping_mode = check_choice("clipping_mode", clipping_mode, CLIPPING_MODES)
        self.clipping = check_choice("clipping", clipping, CLIPPINGS)
        self.non_finite = non_finite
        sharded = isinstance(self.exchange, ReduceScatterExchange)
        if centering is not None and sharded:
            raise ValueError("`centering` corrects whole bias tensors after each step; it does not work with `shards`.")
        if centering is not None:
            self.privacy.centering = centering
        self.step_guard = step_guard
        self.adaptive_clipping = AdaptiveClipping.from_config(adaptive_clipping)
        if self.adaptive_clipping is not None and (sharded or self.clipping.startswith("automatic")):
            raise ValueError(
                f"`adaptive_clipping` works with flat or per-layer clipping and without `shards`, got "
                f"clipping={self.clipping!r}, shards={self.shards!r}: automatic clipping needs no tuned norm."
            )
        self._check_adaptive_clipping()
        self.per_sample_grad_scale: "float | torch.Tensor" = 1.0
        self.samples_in_step = 0
        self._unclipped_in_step: "float | torch.Tensor" = 0.0
        self._dropped_total: "int | torch.Tensor" = 0  # a device tensor off the CPU: see dropped_samples
        self._dropped_step: "int | torch.Tensor" = 0
        self._known_grads: Dict[int, Tuple[Any, int]] = {}  # see clipping.check_all_seen
        self._units_in_step: Optional[torch.Tensor] = None  # user-level: the users of the step so far
        self._summed_divisor = 1.0  # what param.summed_grad is divided by (see add_noise)
        set_clipping_mode(self.params, clipping_mode)

    # --- the privacy state's settings, read where they live ----------------------------------------------
    noise_multiplier = _privacy_setting("noise_multiplier", "σ (the privacy state's); settable (validated).")
    expected_batch_size = _privacy_setting("expected_batch_size", "``q·N``, the update's denominator (the privacy state's).")
    sample_rate = _privacy_setting("sample_rate", "The rate the accountant records (the privacy state's).")

    @property
    def max_grad_norm(self) -> float:
        """The clipping norm C (the privacy state's; adaptive clipping moves it)."""
        return self.privacy.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self.privacy.max_grad_norm = float(value)

    accountant = property(lambda self: self.privacy.accountant, doc="The privacy state's accountant (``None``: not accounted).")
    steps_taken = property(lambda self: self.privacy.steps_taken, doc="Optimizer steps taken (accounted) in this run.")
    centering = property(lambda self: self.privacy.centering, doc="The centred layers (the privacy state's), or ``None``.")
    shards = property(lambda self: self.exchange.shards, doc="The exchange's shards (a sharded model), else ``None``.")
    noise_shares = property(lambda self: self.exchange.noise_shares, doc="How many ranks each add part of the noise.")

    @property
    def noise(self) -> Any:
        """Where the step's noise comes from (the privacy state's step noise); settable."""
        return self.privacy.step_noise

    @noise.setter
    def noise(self, source: Any) -> None:
        if self.privacy.correlated is not None:
            self.privacy.correlated = source
        else:
            self.privacy.noise = source

    def configure(self, *, noise_multiplier: Optional[float] = None, sample_rate: Optional[float] = None,
                  expected_batch_size: Optional[int] = None) -> None:
        """Change σ and the sampling plan of the coming steps (in the privacy state; validated; ``None``
        keeps a setting)."""
        self.privacy.configure(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                               expected_batch_size=expected_batch_size)
        self._check_adaptive_clipping()

    @property
    def clipping_mode(self) -> str:
        """``"auto"``, ``"ghost"`` or ``"materialize"``; may be changed between steps (same update)."""
        return self._clipping_mode

    @clipping_mode.setter
    def clipping_mode(self, mode: str) -> None:
        self._clipping_mode = check_choice("clipping_mode", mode, CLIPPING_MODES)
        set_clipping_mode(self.params, mode)

    @property
    def non_finite(self) -> str:
        """``"drop"`` or ``"propagate"`` (see the class Args); may be changed between steps."""
        return self._non_finite

    @non_finite.setter
    def non_finite(self, value: str) -> None:
        self._non_finite = check_choice("non_finite", value, NON_FINITE)

    dropped_samples = property(lambda self: int(self._dropped_total), lambda self, v: setattr(self, "_dropped_total", int(v)),
                               doc="Samples dropped for a non-finite gradient over the optimizer's life (a host sync).")
    dropped_in_step = property(lambda self: int(self._dropped_step), lambda self, v: setattr(self, "_dropped_step", int(v)),
                               doc="Samples dropped from the current step (see the class Attributes; a host sync).")

    @property
    def dropped_samples_count(self) -> "int | torch.Tensor":
        """:attr:`dropped_samples` as it is kept, without a host sync: an ``int`` on the CPU, a 0-dim
        integer tensor on the gradients' device once a micro-batch was clipped there."""
        return self._dropped_total

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer (its parameters are clipped and noised too)."""
        super().add_param_group(param_group)
        set_clipping_mode(self.params, self.clipping_mode)

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
            f"expected_batch_size={self.expected_batch_size}, clipping_mode={self.clipping_mode!r}, "
            f"clipping={self.clipping!r}, non_finite={self.non_finite!r}, optimizer={self.original_optimizer!r})"
        )

    # --- clip ---------------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and per-sample gradients; clipped sums already accumulated for the coming step
        (earlier micro-batches) are kept: they are consumed by :meth:`step`."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        drop_per_sample_attrs(self.params, _PER_SAMPLE)

    def reset_accumulation(self) -> None:
        """Drop everything gathered for the coming step (per-sample gradients and clipped sums)."""
        drop_per_sample_attrs(self.params, _PER_SAMPLE + ("summed_grad",))
        self.samples_in_step = 0
        self._dropped_step = 0
        self._unclipped_in_step = 0.0
        self._units_in_step = None

    @torch.no_grad()
    def accumulate_micro_batch(
        self, scale: "float | torch.Tensor | None" = None, units: "torch.Tensor | None" = None,
        every_rank: bool = False,
    ) -> torch.Tensor:
        """Clip the per-sample gradients of the last backward pass and add their sum, divided by
        ``expected_batch_size``, to ``param.summed_grad`` (and, on a sharded model, reduce it into shards).

        Each sample is clipped as soon as its gradient is complete, so a logical batch can be processed in
        several backward passes (gradient accumulation, physical micro-batches) with exactly the result of
        one pass. Per-sample gradients are multiplied by ``scale`` first (default
        :attr:`per_sample_grad_scale`) to undo loss scaling done outside the model (Lightning's
        ``1 / accumulate_grad_batches``, a GradScaler's scale as a 0-dim device tensor: never read on the
        host). ``every_rank``: every rank calls this for the same backward pass (a host's backward), so on a
        sharded model a rank whose pass had no samples still takes part in the reductions, with zeros.
        Returns the per-sample norms (before clipping; NaN or inf for a dropped sample).

        With user-level privacy (the privacy state's ``privacy_unit="user"``) ``units`` is required: each
        record's user id (``(B,)`` integers). A user's gradient is the mean of its records' gradients and is
        clipped as one sample (norms, dropped counts and ``samples_in_step`` are then per user); all of a
        user's records must be in the same micro-batch (a user split across micro-batches is refused).
        """
        params = self.params
        with_samples, parts = [], []
        for p in params:
            p_parts = parts_of(p)
            if p_parts is not None:
                with_samples.append(p)
                parts.append(p_parts)
        sharded = isinstance(self.exchange, ReduceScatterExchange)
        if not sharded:  # a sharded model's gradients are the sharding's own (FSDP)
            if with_samples:  # a pass without any per-sample part (an empty batch's zero loss) reads no data
                check_all_seen(params, with_samples, self._known_grads)
            self._known_grads = grads_now(params)
        if not with_samples:
            if sharded and every_rank:
                self._add_to_sums(self.exchange.reduce_in_order(params, [])[1]())
            return torch.zeros(0, device=params[0].device if params else None)
        parts, batch_size = self._by_unit(parts, units, common_batch_size(parts))
        drop_per_sample_attrs(with_samples, _PER_SAMPLE)  # from here on the parts are only in `parts`: freed as used
        if self.samples_in_step == 0:  # the first micro-batch of a step
            self._dropped_step = 0
        on_sum, unsampled = self.exchange.reduce_in_order(params, with_samples) if sharded else (None, None)
        scale = self.per_sample_grad_scale if scale is None else scale
        sums, norms, dropped = clip_and_sum(
            with_samples, parts, self.max_grad_norm, clipping=self.clipping,
            scale=scale if isinstance(scale, torch.Tensor) else float(scale),
            norm_method=self.clipping_mode, num_layers=len(params), release=True,
            sum_scale=1.0 / self._sum_divisor(), non_finite=self.non_finite, on_sum=on_sum,
        )
        if dropped is not None:  # CPU: only when a norm was not finite; other devices: always, no sync
            self._count_dropped(dropped.sum())
        self._add_to_sums(list(zip(with_samples, sums)) + (unsampled() if unsampled is not None else []))
        self.samples_in_step += batch_size
        if self.adaptive_clipping is not None:  # centred count of unclipped samples (a NaN norm counts −½),
            # kept on the norms' device: read once per step, in _adapt_clipping_norm
            self._unclipped_in_step = self._unclipped_in_step + self.adaptive_clipping.centred_count(norms, self.max_grad_norm)
        return norms

    def _by_unit(self, parts: List[Any], units: "torch.Tensor | None", batch_size: int) -> Tuple[List[Any], int]:
        """The parts and batch size as they are (record-level), or over users (user-level: ``units`` required)."""
        if units is None and self.privacy.privacy_unit == "user":
            raise ValueError("User-level privacy: pass each record's user id as `units` (step(units=...)).")
        if units is None:
            return parts, batch_size
        seen = self._units_in_step if self.samples_in_step else None
        parts, batch_size, self._units_in_step = parts_by_unit(parts, units, batch_size, seen)
        return parts, batch_size

    @staticmethod
    def _add_to_sums(received: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        for p, clipped in received:
            clipped = clipped.to(wide_dtype(p.dtype))  # float32 or wider until the noise is in
            previous = getattr(p, "summed_grad", None)
            p.summed_grad = clipped if previous is None else previous.add_(clipped)

    def clip_and_accumulate(self) -> torch.Tensor:
        """Alias of :meth:`accumulate_micro_batch` (kept for symmetry with Opacus's naming)."""
        return self.accumulate_micro_batch()

    def _count_dropped(self, count: torch.Tensor) -> None:
        value: "int | torch.Tensor" = int(count) if count.device.type == "cpu" else count
        self._dropped_total = self._dropped_total + value
        self._dropped_step = self._dropped_step + value
        self.privacy.add_dropped(value)

    def _sum_divisor(self) -> float:
        """The divisor this step's clipped sums are made with: ``expected_batch_size`` (1 while unset) as
        of the step's first micro-batch."""
        if self.samples_in_step == 0:
            self._summed_divisor = float(self.expected_batch_size or 1)
        return self._summed_divisor

    # --- exchange and noise ----------------------------------------------------------------------------------
    @torch.no_grad()
    def add_noise(self) -> None:
        """``param.grad = (Σ clipped + N(0, (σC)²)) / expected_batch_size`` for every parameter.

        ``param.summed_grad`` already holds the clipped sum divided by the batch size (the division is
        folded into the clip factors), so the noise is drawn with std ``σC / expected_batch_size``; the
        exchange adds it (each of its ``noise_shares`` ranks ``1/√noise_shares`` of it) and sums across
        ranks, so the update carries noise of std ``σC`` exactly once.
        """
        if self.expected_batch_size is None:
            raise RuntimeError(
                "DPOptimizer.expected_batch_size is not set: pass expected_batch_size (q·N for Poisson sampling)."
            )
        if self.noise_multiplier is None:
            raise RuntimeError("DPOptimizer.noise_multiplier is not set (it is calibrated when training starts).")
        divisor = float(self.expected_batch_size)
        params, grads, rescale = self.params, [], []
        for p in params:
            summed = getattr(p, "summed_grad", None)
            if summed is None:
                grads.append(self.exchange.zeros(p))  # pure noise, below
                continue
            del p.summed_grad
            grad = summed.contiguous()  # the clipped sum is ours (float32 or wider): noise goes into it
            if self._summed_divisor != divisor:  # expected_batch_size changed since it was summed
                rescale.append(grad)
            grads.append(grad)
        if rescale:
            torch._foreach_mul_(rescale, self._summed_divisor / divisor)
        std = self.gradient_noise_multiplier * self.max_grad_norm / divisor
        self.exchange.noise_and_combine(grads, self.noise, std, sensitivity=self.max_grad_norm / divisor)
        for p, grad in zip(params, grads):
            p.grad = self.exchange.to_grad(p, grad.to(p.dtype))  # cast once to the parameter's dtype
        self._known_grads = grads_now(params)

    def pre_step(self, units: "torch.Tensor | None" = None) -> None:
        """Turn this step's per-sample gradients into the noisy DP gradient in ``param.grad`` (``units``: the
        last micro-batch's user ids, see :meth:`accumulate_micro_batch`)."""
        self.accumulate_micro_batch(units=units)
        if self.samples_in_step == 0:  # no micro-batch in this step: none of its samples was dropped
            self._dropped_step = 0
        self.add_noise()
        if self.adaptive_clipping is not None:
            self._adapt_clipping_norm()
        self.samples_in_step = 0

    # --- step -------------------------------------------------------------------------------------------------
    def record_step(self) -> None:
        """Count one step and record it with the accountant (also for a step that moved no weight)."""
        self.privacy.record_step()

    def step(self, closure: Optional[Callable[[], Any]] = None, units: "torch.Tensor | None" = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (forward + backward) first, then clip, exchange, noise, step and account
        (``units``: with user-level privacy, each record's user id in the last backward pass).

        Running the closure *before* clipping matters: a wrapper that noises the gradients and then lets
        the closure recompute them would train without privacy. A step the privacy state's budget (or
        ``step_guard``) refuses releases nothing and spends nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.privacy.step_allowed() or (self.step_guard is not None and not self.step_guard()):
            self.zero_grad()
            self.reset_accumulation()
            return loss
        self.pre_step(units)
        with self.centering.step() if self.centering is not None else contextlib.nullcontext():
            self.original_optimizer.step()
        self.record_step()
        return loss

    def get_epsilon(self, delta: float) -> float:
        """Privacy spent so far according to the accountant (``inf`` with zero noise)."""
        if self.accountant is None:
            raise RuntimeError("This DPOptimizer has no accountant: pass sample_rate to make_private.")
        return self.privacy.get_epsilon(delta)

    # --- adaptive clipping (Andrew et al. 2021; see lightning_dp.adaptive_clipping.AdaptiveClipping) --------------
    def _check_adaptive_clipping(self) -> None:
        """Refuse, before any step, settings where the count's noise leaves no room (``2σ_b ≤ σ``)."""
        if self.adaptive_clipping is not None and self.noise_multiplier and self.expected_batch_size:
            self.gradient_noise_multiplier  # raises ValueError naming count_noise_multiplier

    @property
    def gradient_noise_multiplier(self) -> Optional[float]:
        """The multiplier of the noise added to the gradient: ``noise_multiplier`` (σ, what the
        accountant records), or with adaptive clipping the larger ``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½)`` that
        leaves room for the noised count at the same total cost."""
        if self.adaptive_clipping is None or self.noise_multiplier is None:
            return self.noise_multiplier
        return self.adaptive_clipping.gradient_noise_multiplier(self.noise_multiplier, float(self.expected_batch_size))

    @torch.no_grad()
    def _adapt_clipping_norm(self) -> None:
        """Release the step's centred count of unclipped samples and move ``max_grad_norm`` towards the target
        quantile; reading the noised count (``float``) here is the step's one host sync."""
        count, self._unclipped_in_step = self._unclipped_in_step, 0.0
        rule, batch = self.adaptive_clipping, float(self.expected_batch_size)
        released = rule.noised_count(
            count, device=self.params[0].device if self.params else None, noise=self.noise,
            noise_multiplier=self.noise_multiplier, noise_shares=self.noise_shares, expected_batch_size=batch,
            combine=self.exchange.combine,
        )
        self.max_grad_norm = rule.next_norm(self.max_grad_norm, float(released), batch)
