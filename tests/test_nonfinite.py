"""A sample whose gradient (or loss) is NaN/inf contributes nothing to the DP step (``non_finite="drop"``).

Every update is checked exactly against a float64 reference computed over the finite samples only:
clipped per sample (flat to ``C``, per layer to ``C/√K``), summed and divided by ``expected_batch_size``
(not by the number of kept samples). The gradient checked is the one the wrapped optimizer receives in
its ``step`` (recorded there), not a difference of parameters. float32 model vs float64 reference:
``rtol=1e-4, atol=1e-6``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn

from lightning_dp import DPOptimizer, make_private
from lightning_dp.clipping import clip_and_sum
from lightning_dp.grad_sample.conv import ConvPart
from lightning_dp.grad_sample.embedding import RowsPart
from lightning_dp.grad_sample.linear import BiasPart, LinearPart
from lightning_dp.grad_sample.per_sample_parts import MaterializedPart
from tests.conftest import clipped_mean_reference
from tests.test_grad_sample import TiedLM, reference_grads

TOL = dict(rtol=1e-4, atol=1e-6)  # float32 DP step vs float64 reference
C = 0.4  # small enough that most samples are clipped
B = 16
MODES = ("auto", "ghost", "materialize")
CLIPPINGS = ("flat", "per_layer")

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore:secure_mode=False")


# --- models -----------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


class ConvNet(nn.Module):
    """Conv2d → GroupNorm → Linear → LayerNorm → Linear (factored conv/linear parts, materialised norms)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 5, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.gn(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.ln(self.fc(h))))


class TokenTransformer(nn.Module):
    """Token embedding + projected float features → Transformer layer (attention, LayerNorm) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(3, 6)
        self.block = nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(tokens) + self.proj(features)).mean(1))


def _mlp_inputs(batch: int) -> List[torch.Tensor]:
    return [torch.randn(batch, 6)]


def _conv_inputs(batch: int) -> List[torch.Tensor]:
    return [torch.randn(batch, 2, 5, 5)]


def _token_inputs(batch: int) -> List[torch.Tensor]:
    return [torch.randint(0, 11, (batch, 4)), torch.randn(batch, 4, 3)]


def _tied_inputs(batch: int) -> List[torch.Tensor]:
    return [torch.randint(0, 9, (batch, 3))]


# model, inputs, index of the float input that receives the bad value (None: integer inputs only)
MODELS: Dict[str, tuple] = {
    "mlp": (_mlp, _mlp_inputs, 0),
    "conv_norms": (ConvNet, _conv_inputs, 0),
    "tokens_transformer": (TokenTransformer, _token_inputs, 1),
}


# --- losses and references --------------------------------------------------------------------------
def sample_losses(out: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear loss per sample ``(B,)`` that depends on every output."""
    ramp = torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype)
    return (out.pow(2) * ramp + torch.sin(out)).flatten(1).sum(1)


def log_loss(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sample_losses - log(w_b · sigmoid(mean output))``: ``log 0 = -inf`` (loss ``+inf``, gradient NaN)
    for a sample with ``w_b = 0``, finite for ``w_b = 1``."""
    return sample_losses(out) - torch.log(weight * torch.sigmoid(out.flatten(1).mean(1)))


def reference_update(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    keep: torch.Tensor,
    clipping: str,
    denom: float,
    loss: Callable[[torch.Tensor], torch.Tensor] = sample_losses,
) -> Dict[str, torch.Tensor]:
    """float64 ``Σ_{b kept} clip(g_b) / denom`` from one backward per kept sample (only finite samples)."""
    grads = reference_grads(model, [x[keep] for x in inputs], lambda out: loss(out).sum(), [0] * len(inputs))
    for g in grads.values():
        assert torch.isfinite(g).all()  # the reference never sees the bad samples
    return clipped_mean_reference(grads, C, denom, clipping)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it is given at each ``step`` (what DP-SGD hands it)."""

    def __init__(self, named: Dict[str, nn.Parameter], lr: float = 0.1) -> None:
        super().__init__(list(named.values()), lr=lr)
        self.names = {id(p): n for n, p in named.items()}
        self.received: List[Dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.received.append(
            {self.names[id(p)]: p.grad.detach().clone() for g in self.param_groups for p in g["params"]}
        )
        return super().step(closure)


def _private(
    model: nn.Module, mode: str, clipping: str, noise_multiplier: float = 0.0, **kwargs
) -> tuple:
    inner = RecordingSGD({n: p for n, p in model.named_parameters() if p.requires_grad})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_private(
            model, inner, noise_multiplier=noise_multiplier, max_grad_norm=C, expected_batch_size=B,
            clipping_mode=mode, clipping=clipping, **kwargs,
        )
    return opt, inner


def _assert_matches(received: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> None:
    assert received.keys() == reference.keys()
    for name, expected in reference.items():
        assert torch.isfinite(received[name]).all(), name
        torch.testing.assert_close(received[name].double(), expected, **TOL, msg=name)


def _with_bad(inputs: List[torch.Tensor], where: Optional[int], samples: Sequence[int], value: float) -> None:
    for b in samples:
        inputs[where][b].view(-1)[1] = value  # one feature of the sample


# --- 1. one bad input among 16 ------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_sample_with_non_finite_input_contributes_nothing(name, mode, clipping, bad):
    make_model, make_inputs, where = MODELS[name]
    model = make_model()
    inputs = make_inputs(B)
    _with_bad(inputs, where, [5], bad)
    keep = torch.ones(B, dtype=torch.bool)
    keep[5] = False
    reference = reference_update(model, inputs, keep, clipping, denom=B)
    opt, inner = _private(model, mode, clipping)
    loss = sample_losses(model(*inputs)).mean()
    if math.isnan(bad):
        assert torch.isnan(loss)
    # (an inf input can leave the loss finite, e.g. through a saturated tanh, but not the gradient:
    # the per-sample weight gradient of the first layer is 0 · inf = NaN; the sample is dropped anyway)
    loss.backward()
    opt.step()
    _assert_matches(inner.received[-1], reference)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (opt.dropped_in_step, opt.dropped_samples, opt.steps_taken) == (1, 1, 1)


# --- 2. gradient accumulation: the bad sample in the first of two micro-batches -----------------------
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "tokens_transformer"])
def test_accumulated_micro_batches_drop_only_the_bad_sample(name, mode, clipping):
    make_model, make_inputs, where = MODELS[name]
    model = make_model()
    inputs = make_inputs(B)
    _with_bad(inputs, where, [2], math.nan)
    keep = torch.ones(B, dtype=torch.bool)
    keep[2] = False
    reference = reference_update(model, inputs, keep, clipping, denom=B)
    opt, inner = _private(model, mode, clipping)
    first, second = [x[: B // 2] for x in inputs], [x[B // 2 :] for x in inputs]
    sample_losses(model(*first)).mean().backward()
    opt.accumulate_micro_batch()
    assert (opt.dropped_in_step, opt.dropped_samples) == (1, 1)
    sample_losses(model(*second)).mean().backward()
    opt.step()
    _assert_matches(inner.received[-1], reference)
    assert (opt.dropped_in_step, opt.dropped_samples, opt.samples_in_step) == (1, 1, 0)


# --- 3. every sample bad: a noise-only step, still counted and accounted ------------------------------
def _wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_all_samples_dropped_gives_exact_zeros_without_noise(mode, clipping):
    model = _wide_mlp()
    x = torch.randn(B, 64)
    x[:, 3] = math.nan
    opt, inner = _private(model, mode, clipping, sample_rate=0.01)
    sample_losses(model(x)).mean().backward()
    opt.step()
    for name, grad in inner.received[-1].items():
        assert torch.equal(grad, torch.zeros_like(grad)), name
    assert opt.steps_taken == 1 and opt.accountant.total_steps == 1
    assert opt.accountant.history[-1][:2] == (0.0, 0.01)
    assert (opt.dropped_in_step, opt.dropped_samples) == (B, B)


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_all_samples_dropped_gives_pure_noise_with_std_sigma_c_over_b(mode, clipping):
    sigma = 1.3
    model = _wide_mlp()
    x = torch.randn(B, 64)
    x[:, 0] = math.inf
    opt, inner = _private(model, mode, clipping, noise_multiplier=sigma, sample_rate=0.02, seed=11)
    sample_losses(model(x)).mean().backward()
    opt.step()
    noise = torch.cat([g.flatten() for g in inner.received[-1].values()]).double()
    n = noise.numel()
    assert n == 64 * 128 + 128 + 128 * 64 + 64
    assert torch.isfinite(noise).all()
    std = sigma * C / B
    # the sample std of n i.i.d. normals has relative standard error 1/√(2n) ≈ 0.55 %: 5 of them
    assert noise.std().item() == pytest.approx(std, rel=5 / math.sqrt(2 * n))
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    assert opt.steps_taken == 1 and opt.accountant.total_steps == 1
    assert opt.accountant.history[-1][:2] == (sigma, 0.02)
    assert opt.get_epsilon(1e-5) > 0


# --- 4. non_finite="propagate": the old arithmetic; argument checks -----------------------------------
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_propagate_lets_nan_reach_every_gradient_and_equals_drop_when_finite(mode, clipping):
    model = ConvNet()
    x = torch.randn(B, 2, 5, 5)
    clean = {}
    for non_finite in ("drop", "propagate"):  # finite data: both settings give the same bits
        twin = ConvNet()
        twin.load_state_dict(model.state_dict())
        opt, inner = _private(twin, mode, clipping)
        opt.non_finite = non_finite
        sample_losses(twin(x)).mean().backward()
        opt.step()
        clean[non_finite] = inner.received[-1]
    for name in clean["drop"]:
        assert torch.equal(clean["drop"][name], clean["propagate"][name]), name

    x[7, 0, 2, 2] = math.nan
    opt, inner = _private(model, mode, clipping)
    opt.non_finite = "propagate"
    sample_losses(model(x)).mean().backward()
    opt.step()
    for name, grad in inner.received[-1].items():
        assert not torch.isfinite(grad).any() if clipping == "flat" else not torch.isfinite(grad).all(), name
    assert (opt.dropped_in_step, opt.dropped_samples, opt.steps_taken) == (0, 0, 1)


def test_non_finite_is_a_validated_constructor_argument_and_attribute():
    layer = nn.Linear(3, 2)
    make = lambda **kw: DPOptimizer(  # noqa: E731
        torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=4, **kw,
    )
    assert make().non_finite == "drop"
    assert make(non_finite="propagate").non_finite == "propagate"
    with pytest.raises(ValueError, match="non_finite"):
        make(non_finite="zero")
    opt = make()
    with pytest.raises(ValueError, match="non_finite"):
        opt.non_finite = "skip"
    assert opt.non_finite == "drop"
    opt.non_finite = "propagate"
    assert opt.non_finite == "propagate" and "non_finite='propagate'" in repr(opt)
    with pytest.raises(ValueError, match="non_finite"):
        clip_and_sum([layer.weight], [[MaterializedPart(torch.zeros(2, 2, 3))]], 1.0, non_finite="ignore")


# --- 5. counters across steps -------------------------------------------------------------------------
def test_dropped_counters_across_steps():
    model = _mlp()
    opt, inner = _private(model, "auto", "flat")

    def micro_batch(bad: Sequence[int], size: int = 8) -> None:
        x = torch.randn(size, 6)
        for b in bad:
            x[b, 0] = math.nan if b % 2 else -math.inf
        sample_losses(model(x)).mean().backward()

    micro_batch([1, 4])  # step 1: two bad samples
    opt.step()
    opt.zero_grad()
    assert (opt.dropped_in_step, opt.dropped_samples) == (2, 2)
    micro_batch([])  # step 2: clean; the count of step 1 is kept until this step's first micro-batch
    opt.accumulate_micro_batch()
    assert (opt.dropped_in_step, opt.dropped_samples) == (0, 2)
    opt.step()
    opt.zero_grad()
    assert (opt.dropped_in_step, opt.dropped_samples) == (0, 2)
    micro_batch([0])  # step 3: two micro-batches, one bad sample each
    opt.accumulate_micro_batch()
    assert (opt.dropped_in_step, opt.dropped_samples) == (1, 3)
    micro_batch([7])
    opt.step()
    opt.zero_grad()
    assert (opt.dropped_in_step, opt.dropped_samples) == (2, 4)
    opt.step()  # step 4: no backward at all (an empty Poisson batch): nothing dropped in it
    assert (opt.dropped_in_step, opt.dropped_samples) == (0, 4)
    micro_batch([3, 5, 6])  # accumulated, then the step is refused (reset): total keeps them
    opt.accumulate_micro_batch()
    assert (opt.dropped_in_step, opt.dropped_samples) == (3, 7)
    opt.reset_accumulation()
    assert (opt.dropped_in_step, opt.dropped_samples) == (0, 7)
    opt.non_finite = "propagate"  # not checked, not counted
    micro_batch([2])
    opt.step()
    assert (opt.dropped_in_step, opt.dropped_samples) == (0, 7)
    assert opt.steps_taken == 5 and len(inner.received) == 5


# --- 6. a sample whose loss is inf ------------------------------------------------------------------------
LOSS_MODELS: Dict[str, tuple] = {
    "mlp": (_mlp, _mlp_inputs),
    "tokens_transformer": (TokenTransformer, _token_inputs),
    "tied_embedding_head": (TiedLM, _tied_inputs),  # embedding rows and the tied head's cross term
}


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(LOSS_MODELS))
def test_sample_with_infinite_loss_is_dropped(name, mode, clipping):
    make_model, make_inputs = LOSS_MODELS[name]
    model = make_model()
    inputs = make_inputs(B)
    weight = torch.ones(B)
    weight[9] = 0.0  # log(0): that sample's loss is +inf, its gradient NaN
    keep = weight > 0
    finite_loss = lambda out: log_loss(out, torch.ones(out.shape[0], dtype=out.dtype))  # noqa: E731
    reference = reference_update(model, inputs, keep, clipping, denom=B, loss=finite_loss)
    opt, inner = _private(model, mode, clipping)
    losses = log_loss(model(*inputs), weight)
    assert torch.isinf(losses[9]) and torch.isfinite(losses[keep]).all()
    losses.mean().backward()
    opt.step()
    _assert_matches(inner.received[-1], reference)
    assert (opt.dropped_in_step, opt.dropped_samples) == (1, 1)


# --- the parts: zeroed rows of a dropped sample, NaN in every factor ---------------------------------------
def _parts() -> Dict[str, Callable[[], tuple]]:
    """Each part kind with sample 1's factors poisoned (NaN in activations and output gradients), and a
    clean twin: ``(poisoned part, clean part)``."""
    torch.manual_seed(1)
    a, g = torch.randn(4, 5, 3, dtype=torch.double), torch.randn(4, 5, 7, dtype=torch.double)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x, gc = torch.randn(4, 3, 5, 5, dtype=torch.double), torch.randn(4, 4, 5, 5, dtype=torch.double)
    samples = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    rows = torch.tensor([1, 2, 2, 0, 4, 1, 3])
    values = torch.randn(7, 3, dtype=torch.double)
    dense = torch.randn(4, 2, 3, dtype=torch.double)

    def poison(t: torch.Tensor, rows_of_sample1=slice(1, 2)) -> torch.Tensor:
        t = t.clone()
        t[rows_of_sample1] = math.nan
        return t

    return {
        "linear": lambda: (LinearPart(poison(a), poison(g), (7, 3), scale=2.0), LinearPart(a, g, (7, 3), scale=2.0)),
        "linear_rows": lambda: (LinearPart(poison(a), poison(g), (9, 3), rows=slice(1, 8)),
                                LinearPart(a, g, (9, 3), rows=slice(1, 8))),
        "bias": lambda: (BiasPart(poison(g), (7,)), BiasPart(g, (7,))),
        "conv": lambda: (ConvPart(conv, poison(x), poison(gc), [1, 1]), ConvPart(conv, x, gc, [1, 1])),
        "rows": lambda: (RowsPart(samples, rows, poison(values, slice(2, 4)), 4, (5, 3)),
                         RowsPart(samples, rows, values, 4, (5, 3))),
        "materialized": lambda: (MaterializedPart(poison(dense)), MaterializedPart(dense)),
    }


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("kind", list(_parts()))
def test_keep_samples_zeroes_every_factor_row_of_a_dropped_sample(kind, method):
    bad, clean = _parts()[kind]()
    assert torch.isnan(bad.norm_sq(method)[1]) and torch.isfinite(bad.norm_sq(method)[[0, 2, 3]]).all()
    keep = torch.tensor([True, False, True, True])
    kept = bad.keep_samples(keep)
    factors = torch.tensor([0.3, 0.0, 1.0, 0.7], dtype=torch.double)
    expected = torch.einsum("b,b...->...", factors, clean.materialize())
    torch.testing.assert_close(kept.clipped_sum(factors), expected, rtol=1e-12, atol=1e-12)
    norms = kept.norm_sq(method)
    assert norms[1] == 0
    torch.testing.assert_close(norms[[0, 2, 3]], clean.norm_sq(method)[[0, 2, 3]], rtol=1e-12, atol=1e-12)
    assert torch.isnan(bad.clipped_sum(factors)).any()  # without it, 0 · NaN = NaN
