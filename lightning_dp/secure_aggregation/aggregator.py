"""The secure aggregator: quantise, add a discrete Gaussian share, mask, all-reduce, unmask, dequantise.

One call per optimizer step, on every rank (it is a collective)::

    y_i   = ⌊x_i·s/u + U⌋ + z_i                   (stochastic rounding; z_i ~ N_Z(0, (σs)²/h))
    m_i   = (y_i + Σ_{j>i} mask_ij − Σ_{j<i} mask_ji) mod 2^b
    Σ m_i = Σ y_i mod 2^b                         (int64 all-reduce SUM, int32 if W·2^b <= 2^31; then mod 2^b: exact)
    out   = signed(Σ m_i mod 2^b) · u/s

``x_i`` is rank ``i``'s clipped sum divided by the expected batch size, ``u = C/B`` (one example moves
``x_i`` by at most ``u`` in L2), ``s`` the scale (integers per unit ``u``), ``σ`` the noise multiplier and
``h`` = ``min_honest_ranks``. Only ``m_i``, uniform modulo ``2^b``, leaves a rank. No rank ever holds
another rank's unmasked contribution; the sum reveals ``Σ y_i`` (what DP-SGD releases anyway, with
noise of total std at least ``σs`` from any ``h`` ranks' shares).

On CPU with the native kernels (:func:`~lightning_dp.secure_aggregation.discrete_gaussian.native_kernel`) a
step makes one pass to draw the share, one fused pass per tensor for rounding, the range check and the
mask that writes the message in :attr:`~SecureAggregator.message_dtype` (``encode_``), and one per tensor
to decode the summed messages straight into the tensors (``decode_``); the share and the message live in
work buffers kept from step to step. The arithmetic is the torch path's (float64 product and sum, exact
integer arithmetic modulo ``2^b``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .._checks import check_int, check_non_negative, check_positive
from . import discrete_gaussian as _dg
from .discrete_gaussian import sample_discrete_gaussian, uniform_words
from .masks import PairwiseMasks

__all__ = ["DEFAULT_BITS", "DEFAULT_SCALE", "SecureAggregator"]

DEFAULT_BITS = 48
"""Bits ``b`` of the modular space: sums are exact while every rank's value is below ``2^(b-1)/W``."""
DEFAULT_SCALE = float(2**20)
"""Integers per unit ``C/B``: rounding inflates the sensitivity by ``√d/s`` (0.08% for d = 670 000)."""


class SecureAggregator:
    """The ``combine`` of a :class:`~lightning_dp.DPOptimizer` that sums the ranks' clipped sums by secure
    aggregation and adds the distributed discrete Gaussian noise itself (``adds_noise = True``: the
    optimizer then hands it the noise std instead of adding Gaussian noise).

    Args:
        rank: this rank; world_size: the number of ranks W (``W · 2^bits < 2^63``).
        generator: the source of rounding and noise randomness: a :class:`~lightning_dp.noise.SecureRNG`
            (OS-keyed in secure mode; ``DPDDPStrategy`` keys one from the rank's seed in seeded runs, the
            fast path) or a seeded ``torch.Generator`` (reproducible, not secure, slower).
        min_honest_ranks: ``h``, the ranks whose noise shares alone must give the noise: each rank adds
            variance ``(σs)²/h``, so ε holds while at most ``W − h`` ranks are corrupt. Default ``W − 1``
            (at least 1): every peer, knowing its own share, still sees noise of std at least σC.
        bits: ``b``, bits of the modular space (default :data:`DEFAULT_BITS`). With ``W·2^b <= 2^31``
            (``b <= 30`` at 2 ranks) the messages are int32, half the bytes; every rank's value must then
            stay below ``2^(b−1)/W`` (``2^28`` at ``b = 30``: 256 units ``C/B`` at the default scale).
        scale: ``s``, integers per unit ``C/B`` (default :data:`DEFAULT_SCALE`).
        masks: this rank's :class:`PairwiseMasks` with keys agreed (tests); default: new keys, exchanged
            with ``all_reduce_fn``'s process group by ``torch.distributed.all_gather_object`` in :meth:`setup`.
        all_reduce: the SUM all-reduce of an integer tensor (:attr:`message_dtype`), in place (default
            ``torch.distributed.all_reduce``).
    """

    adds_noise = True
    mechanism = "distributed discrete Gaussian with secure aggregation (pairwise masks)"

    def __init__(
        self,
        rank: int,
        world_size: int,
        generator: Any,
        *,
        min_honest_ranks: Optional[int] = None,
        bits: int = DEFAULT_BITS,
        scale: float = DEFAULT_SCALE,
        masks: Optional[PairwiseMasks] = None,
        all_reduce: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> None:
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        self.bits = check_int("bits", bits, 2)
        if self.world_size * 2**self.bits >= 2**63:
            raise ValueError(
                f"`bits`={bits} is too large for world_size={world_size}: the int64 all-reduce is exact only "
                f"while W·2^bits < 2^63, i.e. bits <= {62 - math.ceil(math.log2(world_size)) if world_size > 1 else 62}."
            )
        self.scale = check_positive("scale", scale)
        default_honest = max(1, self.world_size - 1)
        honest = default_honest if min_honest_ranks is None else check_int("min_honest_ranks", min_honest_ranks, 1)
        if honest > self.world_size:
            raise ValueError(f"`min_honest_ranks` must be at most world_size={world_size}, got {min_honest_ranks}.")
        self.min_honest_ranks = honest
        self.generator = generator
        self.masks = masks if masks is not None else PairwiseMasks(self.rank, self.world_size)
        self._all_reduce = all_reduce
        self.steps = 0
        self.bytes_sent = 0  # the all-reduce's input, per step summed (the payload; the ring moves ~2×)
        self._buffers: Dict[str, torch.Tensor] = {}  # CPU work buffers reused step after step (no key material)

    # ---------------------------------------------------------------------------------------- set-up
    def setup(self, all_gather_object: Optional[Callable[[List[Any], Any], None]] = None) -> None:
        """Exchange public keys (a collective) and derive the pair keys. Nothing to do for one rank."""
        if self.masks.ready or self.world_size == 1:
            if self.world_size == 1:
                self.masks.agree([self.masks.public_key])
            return
        gather = all_gather_object or torch.distributed.all_gather_object
        keys: List[Any] = [None] * self.world_size
        gather(keys, self.masks.public_key)
        self.masks.agree(keys)

    # ------------------------------------------------------------------------------------- the parts
    @property
    def message_dtype(self) -> torch.dtype:
        """What goes to the all-reduce: int32 when ``W·2^b <= 2^31`` (the sum of W values below ``2^b``
        fits: half the bytes of int64), else int64."""
        return torch.int32 if self.world_size << self.bits <= 1 << 31 else torch.int64

    @property
    def modulus(self) -> int:
        """``2^b``."""
        return 1 << self.bits

    def share_variance(self, std: float, sensitivity: float) -> float:
        """Variance (integer units) of this rank's discrete Gaussian share for total noise std ``std``
        (in the units of the tensors) and per-example bound ``sensitivity`` (``u = C/B``)."""
        return (check_non_negative("std", std) / check_positive("sensitivity", sensitivity) * self.scale) ** 2 / self.min_honest_ranks

    def quantize(self, flat: torch.Tensor, sensitivity: float) -> torch.Tensor:
        """Stochastic rounding ``⌊x·s/u + U⌋`` (``U = (w + ½)·2⁻³²`` per coordinate, ``w`` a uniform 32-bit
        word: :func:`rounding_words`) as int64."""
        scaled = flat.to(torch.float64) * (self.scale / sensitivity)
        words = rounding_words(self.generator, flat.numel()).to(device=flat.device, dtype=torch.int64)
        u = words.bitwise_and_(0xFFFFFFFF).to(torch.float64).add_(0.5).mul_(2.0**-32)
        return torch.floor(scaled.add_(u)).to(torch.int64)

    def encode(self, flat: torch.Tensor, std: float, sensitivity: float) -> torch.Tensor:
        """This rank's message for the step: quantised, noised, masked, in ``[0, 2^b)`` (int64). Uses the
        next step's masks (advances :attr:`steps`)."""
        return self._encode([flat.reshape(-1)], flat.numel(), flat.device, std, sensitivity)

    def _wrap_error(self, limit: int) -> RuntimeError:
        return RuntimeError(
            f"Secure aggregation: a quantised value reached 2^(b-1)/W = {limit}, so the modular sum could wrap. "
            f"Lower `scale` (now {self.scale:g}) or raise `bits` (now {self.bits}); see docs/cross_silo.rst."
        )

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A CPU work buffer of ``numel`` elements kept for the next steps (large fresh allocations cost
        page faults every step); its content is whatever the last step left."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() != numel or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype)
        return buffer

    def _encode(self, parts: Sequence[torch.Tensor], numel: int, device: torch.device, std: float,
                sensitivity: float, in_place: bool = False) -> torch.Tensor:
        """The message of the flattened, concatenated ``parts`` (``numel`` coordinates in all): int64, or
        with ``in_place`` (the step's own exchange) :attr:`message_dtype` where the native kernels ran, in a
        work buffer that the next step overwrites."""
        variance = self.share_variance(std, sensitivity)
        limit = (1 << (self.bits - 1)) // self.world_size
        if _native_ready(parts, device):
            # the rounding uniforms first, then the share, as the torch path draws them
            u = rounding_words(self.generator, numel)  # encode_ reads them as uniforms
            values = self._buffer("share", numel, torch.int64) if in_place else torch.empty(numel, dtype=torch.int64)
            _dg.add_discrete_gaussian_(values, variance, self.generator, accumulate=False)  # zeros when variance is 0
            narrow = in_place and self.message_dtype != torch.int64
            message = self._buffer("message", numel, self.message_dtype) if narrow else values
            if self.world_size == 2 and self.bits <= 32:  # one peer: its raw 32-bit keystream, ± in encode_
                other = 1 - self.rank
                mask, mask_kind = self.masks.keystream32(other, self.steps, numel, device), 1 if other > self.rank else 2
            else:
                mask, mask_kind = self.masks.signed_mask(self.steps, numel, self.bits, device), 0  # reduced by encode_
            factor, modulus_mask, threads = self.scale / sensitivity, self.modulus - 1, torch.get_num_threads()
            bad, offset = 0, 0
            u_np, values_np, mask_np, message_np = u.numpy(), values.numpy(), mask.numpy(), message.numpy()
            for part in parts:
                n = part.numel()
                x = part.detach().contiguous()
                bad += _dg._native.encode_(x.numpy(), _KIND[x.dtype], u_np[offset : offset + n],
                                           values_np[offset : offset + n], mask_np[offset : offset + n], mask_kind,
                                           factor, limit, modulus_mask, threads, message_np[offset : offset + n])
                offset += n
            if bad:
                raise self._wrap_error(limit)
            self.steps += 1
            return message
        flat = torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)
        values = self.quantize(flat, sensitivity)
        if variance > 0:
            values.add_(sample_discrete_gaussian(variance, values.numel(), self.generator, values.device))
        if bool((values.abs() >= limit).any()):
            raise self._wrap_error(limit)
        mask = self.masks.mask(self.steps, values.numel(), self.bits, values.device)
        self.steps += 1
        return values.add_(mask).bitwise_and_(self.modulus - 1)

    def decode(self, summed: torch.Tensor, sensitivity: float) -> torch.Tensor:
        """The all-reduced messages back to the float64 sum: ``mod 2^b``, to signed, times ``u/s``."""
        total = summed.bitwise_and(self.modulus - 1)
        total = torch.where(total >= (1 << (self.bits - 1)), total - self.modulus, total)
        return total.to(torch.float64) * (sensitivity / self.scale)

    # ---------------------------------------------------------------------------------------- a step
    @torch.no_grad()
    def __call__(self, tensors: Sequence[torch.Tensor], std: float = 0.0, sensitivity: Optional[float] = None) -> None:
        """Replace, in place, every rank's ``tensors`` by their sum over the ranks plus the distributed
        discrete Gaussian noise of total std ``std`` (at least, from any ``min_honest_ranks`` ranks).

        Args:
            tensors: this rank's clipped sums (divided by the expected batch size), in the same order and
                shapes on every rank.
            std: the total noise std, ``σC/B``.
            sensitivity: how far one example moves the tensors in L2, ``C/B`` (required).
        """
        if sensitivity is None:
            raise ValueError("SecureAggregator needs `sensitivity` (max_grad_norm / expected_batch_size).")
        if not self.masks.ready:
            raise RuntimeError("SecureAggregator is not set up: call setup() on every rank (a collective).")
        tensors = list(tensors)
        if not tensors:
            return
        numel = sum(t.numel() for t in tensors)
        message = self._encode(tensors, numel, tensors[0].device, std, sensitivity, in_place=True)
        if message.dtype != self.message_dtype:  # values < 2^b and W·2^b <= 2^31: the int32 sum is exact
            message = message.to(self.message_dtype)
        if self.world_size > 1:
            (self._all_reduce or _all_reduce_sum)(message)
        self.bytes_sent += message.numel() * message.element_size()
        offset = 0
        if _native_ready(tensors, message.device) and message.is_contiguous():  # reads int32 or int64
            summed, factor, threads = message.numpy(), sensitivity / self.scale, torch.get_num_threads()
            for t in tensors:
                n = t.numel()
                direct = t.is_contiguous()
                target = t.detach() if direct else torch.empty(t.shape, dtype=t.dtype)
                _dg._native.decode_(summed[offset : offset + n], target.view(-1).numpy(), _KIND[t.dtype], self.bits,
                                    factor, threads)
                if not direct:
                    t.copy_(target)
                offset += n
            return
        result = self.decode(message.to(torch.int64), sensitivity)
        for t in tensors:
            n = t.numel()
            t.copy_(result[offset : offset + n].view_as(t))
            offset += n

    def describe(self) -> Dict[str, Any]:
        """The mechanism's parameters for the privacy report (no key material)."""
        return {
            "mechanism": self.mechanism,
            "bits": self.bits,
            "scale": self.scale,
            "world_size": self.world_size,
            "min_honest_ranks": self.min_honest_ranks,
            "threat_model": (
                f"honest-but-curious ranks; ε holds if at most {self.world_size - self.min_honest_ranks} of the "
                f"{self.world_size} ranks are corrupt (each adds noise variance σ²/{self.min_honest_ranks}); no rank "
                "sees another's unmasked contribution; dropouts are not handled"
            ),
        }

    def __repr__(self) -> str:
        return (f"SecureAggregator(rank={self.rank}, world_size={self.world_size}, bits={self.bits}, "
                f"scale={self.scale:g}, min_honest_ranks={self.min_honest_ranks})")


_KIND = {torch.float32: 0, torch.float64: 2}  # dtype -> the native kernels' buffer kind


def rounding_words(generator: Any, count: int) -> torch.Tensor:
    """``count`` uniform 32-bit words (int32, on the CPU) for the stochastic rounding: the halves of
    ``⌈count/2⌉`` generator words, low half first. The rounding uniform ``(w + ½)·2⁻³²`` is unbiased up
    to 2⁻³³ of an integer; the privacy analysis holds for any rounding uniforms (both neighbours share them)."""
    return uniform_words(generator, (count + 1) // 2).view(torch.int32)[:count]


def _native_ready(tensors: Sequence[torch.Tensor], device: torch.device) -> bool:
    """Whether the native kernels can take these tensors: built, on CPU, float32 / float64."""
    return (_dg._native is not None and device.type == "cpu"
            and all(t.device.type == "cpu" and t.dtype in _KIND for t in tensors))


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
