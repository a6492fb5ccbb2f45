"""Exact sensitivity at every precision (issue 28): norms, clip factors, the clipped sum and the noise are
computed in float32 or wider whatever the parameters' dtype, and ``sum + noise`` is cast once to it.

The accountant assumes that one sample moves the clipped sum by at most ``C``. In bf16 a clipped sample's
contribution computed in the parameter dtype came out at ``1.004·C`` (a norm rounded to 8 bits of mantissa
gives a clip factor off by up to 2⁻⁸). The tests read the pre-noise sum (what the noise source is handed)
of a batch of one sample whose gradient norm is ~10⁴·C, so the sum *is* that sample's contribution, and
require its float64 norm to be ``≤ C·(1 + 1e-5)``: float32 rounding (a few units of 2⁻²⁴ per operation)
passes, bf16 (2⁻⁸) or fp16 (2⁻¹¹) rounding of a norm or of a factor does not.
"""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
from torch import nn

from lightning_dp import make_private

C = 1.0
SLACK = 1e-5  # float32 rounding of a norm and a product: ~1e-7 each; bf16's is 4e-3, fp16's 5e-4
DTYPES = (torch.bfloat16, torch.float16)
MODES = ("auto", "ghost", "materialize")
CLIPPINGS = ("flat", "per_layer", "automatic", "automatic_per_layer")

pytestmark = pytest.mark.filterwarnings("ignore:secure_mode=False")


class RecordingNoise:
    """A noise source that records what it is handed (the pre-noise clipped sums) and adds nothing."""

    def __init__(self) -> None:
        self.handed: List[List[torch.Tensor]] = []

    def add_normal_(self, tensors: List[torch.Tensor], std: float) -> None:
        self.handed.append([t.detach().clone() for t in tensors])

    def normal(self, shape, std, device=None, dtype=None):  # pragma: no cover - add_normal_ is used
        return torch.zeros(shape, device=device, dtype=dtype)


class Net(nn.Module):
    """Every part type: a Linear over positions (ghost/materialised norms, bias summed over positions), a
    LayerNorm (a rule: materialised per-sample gradients), a Conv1d (convolution parts) and an Embedding
    (row parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.linear = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens) + x  # (B, T, 8)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(torch.tanh(self.linear(h)))
        return self.head(h).sum(1)


def _contribution(dtype: torch.dtype, mode: str, clipping: str, scale: float, seed: int = 0):
    """(the float64 norm of one sample's pre-noise contribution, the dtypes the noise source saw, the
    gradient dtype) for a batch of one sample whose gradient is about ``scale`` times ``C``."""
    torch.manual_seed(seed)
    model = Net().to(dtype)
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=C,
                       expected_batch_size=1, clipping_mode=mode, clipping=clipping)
    noise = RecordingNoise()
    opt.noise = noise
    tokens = torch.randint(0, 11, (1, 5))
    x = torch.randn(1, 5, 8, dtype=dtype)
    loss = model(tokens, x).float().pow(2).sum() * scale
    loss.backward()
    opt.step()
    (handed,) = noise.handed
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in handed))
    grads = {p.grad.dtype for p in model.parameters()}
    return norm, {t.dtype for t in handed}, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_one_sample_far_outside_the_ball_contributes_at_most_c(dtype, mode, clipping):
    norm, handed, grads = _contribution(dtype, mode, clipping, scale=1e3)
    assert handed == {torch.float32}, "the sum and the noise are float32 for low-precision parameters"
    assert grads == {dtype}, "sum + noise is cast once to the parameters' dtype"
    assert norm <= C * (1 + SLACK), f"one sample moved the sum by {norm / C:.6f}·C"
    assert norm > 0.9 * C  # it was clipped, not lost (automatic clipping: C·‖g‖/(‖g‖+γ) ≈ C)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_worst_of_many_samples_and_seeds_stays_within_float32_rounding(dtype):
    """The rounding is data-dependent: the largest contribution over 24 seeds (flat, the auto mode)."""
    worst = max(_contribution(dtype, "auto", "flat", scale=10.0 ** (1 + seed % 4), seed=seed)[0] for seed in range(24))
    assert worst <= C * (1 + SLACK)


def test_float32_and_float64_parameters_keep_their_dtype():
    for dtype in (torch.float32, torch.float64):
        norm, handed, grads = _contribution(dtype, "auto", "flat", scale=1e3)
        assert handed == {dtype} and grads == {dtype}
        assert norm <= C * (1 + (SLACK if dtype == torch.float32 else 1e-12))


# --- Lightning: every precision setting ------------------------------------------------------------------
def _lightning_precision(name: str):
    """Trainer ``precision=`` value or plugin: "16-mixed" with a GradScaler on the CPU (Lightning makes
    one only on CUDA), so the scaler's loss scale and its overflow checks are exercised here too."""
    if name != "16-mixed+scaler":
        return {"precision": name}
    from tests.namespace import submodule

    mixed = submodule("plugins.precision").MixedPrecision
    return {"plugins": [mixed("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))]}


@pytest.mark.lightning
@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "bf16-mixed", "16-mixed+scaler"])
def test_lightning_precisions_clip_and_noise_in_float32(precision, tmp_path):
    """Every step's pre-noise sum is float32 (parameters in bf16/fp16 or fp32 under autocast), each sample
    of a batch whose gradients are ~10²–10³·C contributes at most C (the sum of B of them has norm ≤ B·C),
    and the weights the step wrote are finite in the parameters' own dtype. (A small C rather than a loud
    loss: fp16 with a loss scale of 1024 would overflow and the scaler would skip the step.)"""
    from tests.lightning_helpers import TinyClassifier, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    handed: List[List[torch.Tensor]] = []
    sizes: List[int] = []

    clip = 1e-3

    class Recorded(TinyClassifier):
        def training_step(self, batch, batch_idx):
            sizes.append(batch[0].shape[0])
            return super().training_step(batch, batch_idx)

    class Swap(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            noise = trainer.strategy.dp_optimizer.noise
            recording = RecordingNoise()
            recording.handed = handed
            trainer.strategy.dp_optimizer.noise = recording if not isinstance(noise, RecordingNoise) else noise

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = Recorded(lr=0.01)
    trainer = pl.Trainer(max_steps=3, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=clip),
                         callbacks=[Swap()], **_lightning_precision(precision), **trainer_kwargs(tmp_path))
    trainer.fit(model, loader)
    assert len(handed) == 3
    expected_batch = 16.0
    for sums, size in zip(handed, sizes):
        assert {t.dtype for t in sums} == {torch.float32}
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in sums)) * expected_batch
        assert 0.5 * clip <= norm <= size * clip * (1 + SLACK)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    want = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    assert {p.dtype for p in model.parameters()} == {want}
