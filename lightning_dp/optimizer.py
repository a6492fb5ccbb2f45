"""DPOptimizer: wraps any ``torch.optim.Optimizer`` so that ``step()`` performs a DP-SGD step."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch
from torch import nn
from torch.optim import Optimizer

from .accounting import Accountant
from .centering import InputCentering
from ._checks import check_choice, check_non_negative, check_positive, check_positive_int, check_rate
from .clipping import CLIPPINGS, NON_FINITE, AdaptiveClipping, check_all_seen, clip_and_sum, grads_now, parts_of
from .grad_sample import CLIPPING_MODES, set_clipping_mode, wide_dtype
from .noise import GaussianNoise
from .noise.adding import add_noise_
from .wrapped_optimizer import WrappedOptimizer


class GradientShards(Protocol):
    """How a sharded host (FSDP2) keeps the DP gradient: each rank holds only its shard of each parameter.

    With ``DPOptimizer(shards=...)`` every clipped sum goes to :meth:`reduce` as soon as it is made, after
    each backward pass, for every trainable parameter in the same order on every rank (a parameter without
    per-sample gradients on this rank contributes zeros); the optimizer keeps the shard it returns, adds
    the noise of std ``σC`` to that shard only (each element of the gradient is noised once, by the rank
    that owns it) and sets ``param.grad = to_grad(param, shard)``.
    """

    def reduce(self, param: nn.Parameter, clipped_sum: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the sum over ranks of ``clipped_sum`` (full size: this rank's samples);
        a collective, called by every rank."""

    def zeros(self, param: nn.Parameter) -> torch.Tensor:
        """A zero tensor shaped like this rank's shard of ``param`` (a step without per-sample gradients)."""

    def to_grad(self, param: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """The value of ``param.grad`` for this rank's noised ``shard`` (FSDP2: a DTensor over it)."""


class DPOptimizer(WrappedOptimizer):
    """An optimizer whose ``step`` is the DP-SGD update (Abadi et al. 2016, "Deep Learning with DP").

    ``step(closure)`` first runs the closure (forward + backward: Lightning calls ``step`` this way),
    then, for the per-sample gradients ``g_b`` the hooks stored in ``param.grad_sample``:

    1. clip each sample to ``C = max_grad_norm`` over all trainable parameters (flat clipping):
       ``ḡ_b = g_b · min(1, C / ‖g_b‖)``, or each parameter tensor to ``C/√K`` (per-layer clipping);
       a sample whose gradient is not finite gets ``ḡ_b = 0`` (``non_finite="drop"``, the default);
    2. sum over the batch and add Gaussian noise of std ``σ·C`` (``σ = noise_multiplier``);
    3. divide by ``expected_batch_size`` (with Poisson sampling the actual batch size is random and
       must not be used: it depends on the data) and write the result to ``param.grad``;
    4. run the wrapped optimizer's step and record the step with the accountant.

    The wrapped optimizer keeps its ``param_groups`` and ``state`` (shared, not copied), so learning
    rate schedulers and checkpoints see an ordinary optimizer.

    Args:
        optimizer: the optimizer to wrap.
        noise_multiplier: σ, the ratio of the noise std to the clipping norm (``0`` disables noise:
            no privacy, for tests and debugging).
        max_grad_norm: the per-sample clipping norm C.
        expected_batch_size: the denominator of the averaged update (``q·N`` under Poisson sampling).
        noise: source of Gaussian noise (default: :class:`~lightning_dp.noise.GaussianNoise` seeded by ``seed``).
        accountant: records each step as ``(noise_multiplier, sample_rate)`` when ``sample_rate`` is set.
        sample_rate: the Poisson sampling rate ``q`` (needed for accounting).
        seed: seed of the default noise source.
        clipping_mode: how per-sample gradients are obtained (the update is the same in every mode):
            ``"auto"`` (default): one backward pass, no per-sample gradient materialised where a layer
            has a factored form (Linear, Conv, Embedding, attention and RNN projections): each sample's
            norm by ghost norm or per-sample gradient, whichever is cheaper for that layer, the clipped
            sum as one GEMM ``(c ⊙ G)ᵀA``, autograd's own weight gradient skipped;
            ``"ghost"``: the same with the ghost norm in every factored layer;
            ``"materialize"``: per-sample gradients ``(B, *shape)`` for every parameter (the plain path).
            See ``docs/clipping.rst``.
        clipping: ``"flat"`` (default): one norm per sample over all parameters, clipped to ``C``;
            ``"per_layer"``: each of the ``K`` trainable parameter tensors clipped to ``C/√K`` on its
            own (total sensitivity still ``C``, noise std still ``σC``); ``"automatic"`` /
            ``"automatic_per_layer"``: each sample normalised, ``c_b = C/(‖g_b‖ + 0.01)`` (Bu et al. 2023;
            sensitivity still ``C``), so ``C`` needs no tuning.
        non_finite: what a sample whose per-sample gradient (or loss) is NaN or inf does to the step:
            ``"drop"`` (default): it gets clip factor 0 and contributes exactly nothing (its rows are
            zeroed in every factor of the clipped sum); the step goes on with the other samples, still
            divided by ``expected_batch_size``, with the same noise and accounting (a dropped sample
            contributes ``0 ≤ C``: the sensitivity is unchanged). Flat clipping drops a sample whose
            total norm is not finite, per-layer clipping one with *any* non-finite per-parameter norm
            (from every parameter). A batch with every sample dropped gives a noise-only step.
            ``"propagate"``: no check, the NaN/inf reaches ``param.grad`` (the behaviour before this
            option; needed under a fp16 ``GradScaler``, which must see an overflow to skip the step and
            lower its scale). May be changed between steps; see :mod:`lightning_dp.clipping`.
        step_guard: optional callable run after the closure; when it returns ``False`` the step is
            skipped (gradients cleared, no noise drawn, nothing accounted). A privacy budget uses it.
        combine: optional callable that combines, in place, the noised clipped sums of several processes
            into the step's gradient (a list of tensors, one per parameter); the host strategy provides it
            (DDP: ``all_reduce`` SUM). ``None``: one process.
        noise_shares: how many processes' noise ``combine`` adds up (each adds std ``σC/√noise_shares``,
            so the combined gradient carries noise of std ``σC`` exactly once). ``1`` for one process.
        shards: for a sharded model (FSDP2), how each rank keeps only its shard of the gradient (see
            :class:`GradientShards`): clipped sums are reduced into shards after every backward pass and
            each rank noises its own shard with std ``σC``. Excludes ``combine`` and ``noise_shares``.
        adaptive_clipping: ``None``, an :class:`~lightning_dp.clipping.AdaptiveClipping` or a dict of its
            arguments: after each step ``max_grad_norm`` moves towards a private estimate of a quantile of
            the per-sample norms (Andrew et al. 2021). The accountant still records ``noise_multiplier``
            (σ); the gradient gets the larger :attr:`gradient_noise_multiplier` so that gradient and count
            together cost exactly σ. Flat or per-layer clipping, without ``shards``.
        centering: ``None`` or an :class:`~lightning_dp.centering.InputCentering`: the step is taken in the
            coordinates of the centred layers (their biases corrected after the inner step). Without ``shards``.

    Attributes:
        per_sample_grad_scale: factor applied to per-sample gradients before clipping, to undo loss
            scaling done outside the model (Lightning divides the loss by ``accumulate_grad_batches``;
            AMP's GradScaler multiplies it by its scale). A number, or a 0-dim tensor on the gradients'
            device (the scaler's scale read without a host sync): multiplied in, never read on the host.
        steps_taken: optimizer steps taken (accounted) so far.
        dropped_samples: samples dropped for a non-finite gradient (``non_finite="drop"``) over the
            optimizer's life: every micro-batch clipped by :meth:`accumulate_micro_batch` adds its
            dropped samples, including those of a step later refused by :attr:`step_guard` or skipped.
            Off the CPU the count is kept on the device (:attr:`dropped_samples_count`: no host sync per
            micro-batch); reading this property is what brings it to the host.
        dropped_in_step: samples dropped from the current step: :meth:`accumulate_micro_batch` adds a
            micro-batch's dropped samples to it, and the first micro-batch of a step starts it again
            from 0, so after :meth:`step` (or :meth:`pre_step`) it holds the count of the step just taken
            until the next step's first micro-batch is clipped (0 for a step without per-sample
            gradients); :meth:`reset_accumulation` sets it to 0. Always 0 with ``"propagate"``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        noise: Optional[GaussianNoise] = None,
        accountant: Optional[Accountant] = None,
        sample_rate: Optional[float] = None,
        seed: Optional[int] = None,
        clipping_mode: str = "auto",
        clipping: str = "flat",
        non_finite: str = "drop",
        step_guard: Optional[Callable[[], bool]] = None,
        combine: Optional[Callable[[List[torch.Tensor]], None]] = None,
        noise_shares: int = 1,
        shards: Optional[GradientShards] = None,
        adaptive_clipping: "AdaptiveClipping | Dict[str, float] | None" = None,
        centering: Optional[InputCentering] = None,
    ) -> None:
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("`optimizer` is already a DPOptimizer; wrap the original optimizer once.")
        super().__init__(optimizer)
        self.noise_multiplier = check_non_negative("noise_multiplier", noise_multiplier)
        self.max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        self._clipping_mode = check_choice("clipping_mode", clipping_mode, CLIPPING_MODES)
        self.clipping = check_choice("clipping", clipping, CLIPPINGS)
        self.non_finite = non_finite
        self.expected_batch_size = expected_batch_size
        if expected_batch_size is not None:
            check_positive("expected_batch_size", expected_batch_size)
        self.noise = noise if noise is not None else GaussianNoise(seed)
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.step_guard = step_guard
        self.combine = combine
        self.noise_shares = check_positive_int("noise_shares", noise_shares)
        if shards is not None and (combine is not None or noise_shares != 1):
            raise ValueError(
                f"`shards` reduces the clipped sums and noises each rank's shard itself; got also combine={combine!r}, "
                f"noise_shares={noise_shares!r}. Pass `shards` alone (sharded model) or `combine` and `noise_shares`."
            )
        self.shards = shards
        if centering is not None and shards is not None:
            raise ValueError("`centering` corrects whole bias tensors after each step; it does not work with `shards`.")
        self.centering = centering
        self._init_adaptive_clipping(adaptive_clipping)
        self.per_sample_grad_scale = 1.0
        self.samples_in_step = 0
        self.steps_taken = 0
        self._dropped_total: "int | torch.Tensor" = 0  # a device tensor off the CPU: see dropped_samples
        self._dropped_step: "int | torch.Tensor" = 0
        self._known_grads: Dict[int, Tuple[Any, int]] = {}  # see clipping.check_all_seen
        self._summed_divisor = 1.0  # what param.summed_grad is divided by (see add_noise)
        set_clipping_mode(self.params, clipping_mode)

    @property
    def clipping_mode(self) -> str:
        """``"auto"``, ``"ghost"`` or ``"materialize"``; may be changed between steps (same update)."""
        return self._clipping_mode

    @clipping_mode.setter
    def clipping_mode(self, mode: str) -> None:
        self._clipping_mode = check_choice("clipping_mode", mode, CLIPPING_MODES)
        set_clipping_mode(self.params, mode)

    def configure(
        self,
        *,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
        expected_batch_size: Optional[int] = None,
    ) -> None:
        """Change the settings of the coming steps (validated; ``None`` keeps a setting): the noise
        multiplier once it is calibrated, the sampling rate and expected batch size when the sampling
        plan changes (e.g. between epochs of a gradient accumulation schedule)."""
        if noise_multiplier is not None:
            self.noise_multiplier = check_non_negative("noise_multiplier", noise_multiplier)
        if sample_rate is not None:
            self.sample_rate = check_rate("sample_rate", sample_rate)
        if expected_batch_size is not None:
            self.expected_batch_size = check_positive_int("expected_batch_size", expected_batch_size)
        self._check_adaptive_clipping()

    @property
    def dropped_samples(self) -> int:
        """Samples dropped for a non-finite gradient over the optimizer's life (see the class Attributes);
        off the CPU reading it waits for the device (read it when needed, not at every step)."""
        return int(self._dropped_total)

    @dropped_samples.setter
    def dropped_samples(self, value: int) -> None:
        self._dropped_total = int(value)

    @property
    def dropped_in_step(self) -> int:
        """Samples dropped from the current step (see the class Attributes); a host sync off the CPU."""
        return int(self._dropped_step)

    @dropped_in_step.setter
    def dropped_in_step(self, value: int) -> None:
        self._dropped_step = int(value)

    @property
    def dropped_samples_count(self) -> "int | torch.Tensor":
        """:attr:`dropped_samples` as it is kept, without a host sync: an ``int`` on the CPU, a 0-dim
        integer tensor on the gradients' device once a micro-batch was clipped there (e.g. for
        ``LightningModule.log``, which reads it only when it writes the logs)."""
        return self._dropped_total

    @property
    def non_finite(self) -> str:
        """``"drop"`` or ``"propagate"``: what a sample with a non-finite gradient does (see the class
        Args); may be changed between steps (it applies to micro-batches clipped afterwards)."""
        return self._non_finite

    @non_finite.setter
    def non_finite(self, value: str) -> None:
        self._non_finite = check_choice("non_finite", value, NON_FINITE)

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

    # --- DP-SGD ---------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and per-sample gradients.

        Clipped sums already accumulated for the coming step (earlier micro-batches, see
        :meth:`accumulate_micro_batch`) are kept: they are consumed by :meth:`step`.
        """
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            for attr in ("grad_sample", "grad_parts"):
                if hasattr(p, attr):
                    delattr(p, attr)

    def reset_accumulation(self) -> None:
        """Drop everything gathered for the coming step (per-sample gradients and clipped sums)."""
        for p in self.params:
            for attr in ("grad_sample", "grad_parts", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        self.samples_in_step = 0
        self._dropped_step = 0
        self._unclipped_in_step = 0.0

    @torch.no_grad()
    def accumulate_micro_batch(self) -> torch.Tensor:
        """Clip the per-sample gradients of the last backward pass and add their sum, divided by
        ``expected_batch_size``, to ``param.summed_grad``.

        Each sample is clipped as soon as its gradient is complete, so a logical batch can be processed
        in several backward passes (gradient accumulation, physical micro-batches) with exactly the
        result of one pass. Per-sample gradients are multiplied by :attr:`per_sample_grad_scale` first
        (to undo loss scaling done outside the model). With ``non_finite="drop"`` a sample whose gradient
        is not finite adds nothing and is counted in :attr:`dropped_samples` and :attr:`dropped_in_step`.
        Returns the per-sample norms (before clipping; NaN or inf for a dropped sample).
        """
        params = self.params
        with_samples, parts = [], []
        for p in params:
            p_parts = parts_of(p)
            if p_parts is not None:
                with_samples.append(p)
                parts.append(p_parts)
        if self.shards is None:  # a sharded model's gradients are the sharding's own (FSDP)
            check_all_seen(params, with_samples, self._known_grads)
            self._known_grads = grads_now(params)
        if not with_samples:
            return torch.zeros(0, device=params[0].device if params else None)
        batch_sizes = {part.batch_size for ps in parts for part in ps}
        if len(batch_sizes) > 1:
            raise RuntimeError(
                f"Per-sample gradients disagree on the batch size ({sorted(batch_sizes)}): a layer saw a "
                "different batch dimension than the others. Put the batch first in every layer's input, or pass "
                "the right batch_first to attach_grad_sample_hooks (time-major models)."
            )
        for p in with_samples:  # from here on the parts are only in `parts`: freed one by one as used
            for attr in ("grad_sample", "grad_parts"):
                if hasattr(p, attr):
                    delattr(p, attr)
        if self.samples_in_step == 0:  # the first micro-batch of a step
            self._dropped_step = 0
        on_sum, unsampled = self._reduce_in_order(params, with_samples) if self.shards is not None else (None, None)
        sums, norms, dropped = clip_and_sum(
            with_samples,
            parts,
            self.max_grad_norm,
            clipping=self.clipping,
            scale=_scale_of(self.per_sample_grad_scale),
            norm_method="materialize" if self.clipping_mode == "materialize" else self.clipping_mode,
            num_layers=len(params),
            release=True,
            sum_scale=1.0 / self._sum_divisor(),
            non_finite=self.non_finite,
            on_sum=on_sum,
        )
        if dropped is not None:  # CPU: only when a norm was not finite; other devices: always, no sync
            count = dropped.sum()
            if count.device.type == "cpu":
                count = int(count)
            self._dropped_total = self._dropped_total + count
            self._dropped_step = self._dropped_step + count
        received = list(zip(with_samples, sums)) + (unsampled() if unsampled is not None else [])
        for p, clipped in received:
            clipped = clipped.to(wide_dtype(p.dtype))  # float32 or wider until the noise is in
            previous = getattr(p, "summed_grad", None)
            p.summed_grad = clipped if previous is None else previous.add_(clipped)
        self.samples_in_step += next(iter(batch_sizes))
        if self.adaptive_clipping is not None:  # centred count of unclipped samples (a NaN norm counts −½),
            # kept on the norms' device: read once per step, in _adapt_clipping_norm
            unclipped = (norms <= self.max_grad_norm).sum(dtype=torch.float64) - 0.5 * norms.numel()
            self._unclipped_in_step = self._unclipped_in_step + unclipped
        return norms

    def clip_and_accumulate(self) -> torch.Tensor:
        """Alias of :meth:`accumulate_micro_batch` (kept for symmetry with Opacus's naming)."""
        return self.accumulate_micro_batch()

    @torch.no_grad()
    def add_noise(self) -> None:
        """``param.grad = (Σ clipped + N(0, (σC)²)) / expected_batch_size`` for every parameter.

        ``param.summed_grad`` already holds the clipped sum divided by the batch size (the division is
        folded into the clip factors), so the noise is drawn with std ``σC / expected_batch_size``.

        In distributed training each of the ``noise_shares`` processes adds noise of std
        ``σC/√noise_shares`` to its own clipped sum and :attr:`combine` (the host strategy's hook, e.g.
        ``all_reduce``) sums the results, so the update carries noise of total std ``σC`` exactly once;
        ``expected_batch_size`` is then global.
        """
        if self.expected_batch_size is None:
            raise RuntimeError(
                "DPOptimizer.expected_batch_size is not set: pass expected_batch_size (q·N for Poisson sampling)."
            )
        if self.noise_multiplier is None:
            raise RuntimeError("DPOptimizer.noise_multiplier is not set (it is calibrated when training starts).")
        # The clipped sums are already divided by the batch size (folded into the clip factors): the
        # noise is drawn with std σC/B and added to them, so no pass divides the gradients.
        divisor = float(self.expected_batch_size)
        std = self.gradient_noise_multiplier * self.max_grad_norm / math.sqrt(self.noise_shares) / divisor
        params, grads, rescale = self.params, [], []
        for p in params:
            summed = getattr(p, "summed_grad", None)
            if summed is None:
                grads.append(self._zero_grad_of(p))  # pure noise, below
                continue
            del p.summed_grad
            grad = summed.contiguous()  # the clipped sum is ours (float32 or wider): noise goes into it
            if self._summed_divisor != divisor:  # expected_batch_size changed since it was summed
                rescale.append(grad)
            grads.append(grad)
        if rescale:
            torch._foreach_mul_(rescale, self._summed_divisor / divisor)
        if getattr(self.combine, "adds_noise", False):
            # The aggregator adds the noise itself (secure aggregation: distributed discrete Gaussian). It gets
            # the total std σC/B and the bound C/B on one example's contribution, and sums across ranks.
            noise_std = self.gradient_noise_multiplier * self.max_grad_norm / divisor
            self.combine(grads, std=noise_std, sensitivity=self.max_grad_norm / divisor)  # type: ignore[call-arg]
        else:
            if std > 0:
                add_noise_(self.noise, grads, std)
            if self.combine is not None:
                self.combine(grads)
        for p, grad in zip(params, grads):
            grad = grad.to(p.dtype)  # sum + noise, cast once to the parameter's dtype: post-processing
            p.grad = grad if self.shards is None else self.shards.to_grad(p, grad)
        self._known_grads = grads_now(params)

    def _zero_grad_of(self, p: nn.Parameter) -> torch.Tensor:
        if self.shards is not None:
            return self.shards.zeros(p).to(wide_dtype(p.dtype))
        return torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype))

    def _reduce_in_order(
        self, params: List[nn.Parameter], with_samples: List[nn.Parameter]
    ) -> Tuple[Callable[[int, torch.Tensor], torch.Tensor], Callable[[], List[Tuple[nn.Parameter, torch.Tensor]]]]:
        """``on_sum`` for :func:`clip_and_sum` with :attr:`shards`, and a function that finishes the pass.

        Every trainable parameter is reduced once per backward pass in ``params`` order, on every rank
        alike (each reduction is a collective): before a parameter's clipped sum, the parameters before it
        that have no per-sample gradient on this rank are reduced with zeros (other ranks may have some);
        the finishing function does the same for the rest and returns those ``(param, shard)`` pairs.
        """
        shards, pending = self.shards, iter(params)
        unsampled: List[Tuple[nn.Parameter, torch.Tensor]] = []

        def reduce_zeros_until(target: Optional[nn.Parameter]) -> None:
            for p in pending:
                if p is target:
                    return
                zeros = torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype))
                unsampled.append((p, shards.reduce(p, zeros)))

        def on_sum(k: int, clipped: torch.Tensor) -> torch.Tensor:
            reduce_zeros_until(with_samples[k])
            return shards.reduce(with_samples[k], clipped.to(wide_dtype(with_samples[k].dtype)))

        def finish() -> List[Tuple[nn.Parameter, torch.Tensor]]:
            reduce_zeros_until(None)
            return unsampled

        return on_sum, finish

    def _sum_divisor(self) -> float:
        """The divisor this step's clipped sums are made with: ``expected_batch_size`` (1 while unset) as
        of the step's first micro-batch."""
        if self.samples_in_step == 0:
            self._summed_divisor = float(self.expected_batch_size or 1)
        return self._summed_divisor

    def pre_step(self) -> None:
        """Turn this step's per-sample gradients into the noisy DP gradient in ``param.grad``."""
        self.accumulate_micro_batch()
        if self.samples_in_step == 0:  # no micro-batch in this step: none of its samples was dropped
            self._dropped_step = 0
        self.add_noise()
        if self.adaptive_clipping is not None:
            self._adapt_clipping_norm()
        self.samples_in_step = 0

    def record_step(self) -> None:
        """Count one step and record it with the accountant (also for a step that moved no weight)."""
        self.steps_taken += 1
        if self.accountant is not None and self.sample_rate is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (forward + backward) first, then clip, noise, step and account.

        Running the closure *before* clipping matters: a wrapper that noises the gradients and then lets
        the closure recompute them would train without privacy.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_guard is not None and not self.step_guard():
            self.zero_grad()  # refused (e.g. privacy budget): nothing is released, nothing is spent
            self.reset_accumulation()
            return loss
        self.pre_step()
        with self.centering.step() if self.centering is not None else contextlib.nullcontext():
            self.original_optimizer.step()
        self.record_step()
        return loss

    # --- adaptive clipping (Andrew et al. 2021; see lightning_dp.clipping.AdaptiveClipping) --------------
    def _init_adaptive_clipping(self, adaptive_clipping: "AdaptiveClipping | Dict[str, float] | None") -> None:
        self.adaptive_clipping = AdaptiveClipping.from_config(adaptive_clipping)
        self._unclipped_in_step = 0.0
        if self.adaptive_clipping is not None and (self.shards is not None or self.clipping.startswith("automatic")):
            raise ValueError(
                f"`adaptive_clipping` works with flat or per-layer clipping and without `shards`, got "
                f"clipping={self.clipping!r}, shards={self.shards!r}: automatic clipping needs no tuned norm."
            )
        self._check_adaptive_clipping()

    def _check_adaptive_clipping(self) -> None:
        """Refuse, before any step, settings where the count's noise leaves no room (``2σ_b ≤ σ``)."""
        if self.adaptive_clipping is not None and self.noise_multiplier and self.expected_batch_size:
            self.gradient_noise_multiplier  # raises ValueError naming count_noise_multiplier

    @property
    def gradient_noise_multiplier(self) -> float:
        """The multiplier of the noise added to the gradient: ``noise_multiplier`` (σ, what the
        accountant records), or with adaptive clipping the larger ``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½)`` that
        leaves room for the noised count at the same total cost."""
        if self.adaptive_clipping is None or self.noise_multiplier is None:
            return self.noise_multiplier
        return self.adaptive_clipping.gradient_noise_multiplier(self.noise_multiplier, float(self.expected_batch_size))

    @torch.no_grad()
    def _adapt_clipping_norm(self) -> None:
        """Release the step's centred count of unclipped samples with noise ``N(0, σ_b²)`` (shared over
        ranks like the gradient noise) and move ``max_grad_norm`` towards the target quantile.

        The count is accumulated on the device over the step's micro-batches; reading the noised count
        here (``float``) is the step's one host sync: the new norm is a Python number, used by the next
        micro-batch's clipping."""
        rule, batch = self.adaptive_clipping, float(self.expected_batch_size)
        device = self.params[0].device if self.params else None
        count = torch.as_tensor(self._unclipped_in_step, dtype=torch.float64, device=device).reshape(1).clone()
        self._unclipped_in_step = 0.0
        if self.noise_multiplier > 0:
            add_noise_(self.noise, [count], rule.count_std(batch) / math.sqrt(self.noise_shares))
        if self.combine is not None:
            self.combine([count])
        self.max_grad_norm = rule.next_norm(self.max_grad_norm, float(count), batch)

    def get_epsilon(self, delta: float) -> float:
        """Privacy spent so far according to the accountant (``inf`` with zero noise)."""
        if self.accountant is None:
            raise RuntimeError("This DPOptimizer has no accountant: pass sample_rate to make_private.")
        return self.accountant.get_epsilon(delta)


def _scale_of(scale: "float | torch.Tensor") -> "float | torch.Tensor":
    """:attr:`DPOptimizer.per_sample_grad_scale` for :func:`~lightning_dp.clipping.clip_and_sum`: a number
    as a ``float``, a tensor as it is (converting it would make the host wait for the device)."""
    return scale if isinstance(scale, torch.Tensor) else float(scale)
