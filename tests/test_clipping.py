"""Fast clipping (book-keeping, ghost norms) gives exactly the update of the plain materialising path,
for every layer family, flat and per-layer, loss reduction mean and sum (float64, noise off)."""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Sequence

import pytest
import torch
from torch import nn

from lightning_dp import DPOptimizer
from lightning_dp.grad_sample import attach_grad_sample_hooks
from lightning_dp.grad_sample.conv import ConvPart
from lightning_dp.grad_sample.embedding import RowsPart
from lightning_dp.grad_sample.linear import LinearPart
from tests.test_grad_sample import Reused, TiedLM, reference_grads, smooth_loss
from tests.test_grad_sample_fallback import Gated
from tests.test_grad_sample_sequence import SeqModel

C = 0.3  # small enough that most samples are clipped


class MeanTokens(nn.Module):
    """Embedding layers → mean over tokens → Linear (the output has the batch first)."""

    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb, self.head = emb, nn.Linear(emb.embedding_dim, 3)

    def forward(self, idx, *rest):
        out = self.emb(idx, *rest)
        return self.head(torch.tanh(out if out.dim() == 2 else out.mean(1)))


def _conv(cls: type, spatial: int, **kwargs) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(cls(4, 6, 3, **kwargs), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


B = 5
CASES: Dict[str, tuple] = {
    "linear2d": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), lambda: (torch.randn(B, 6),)),
    "linear3d": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)),
                 lambda: (torch.randn(B, 4, 6),)),
    "linear_long_sequence": (lambda: nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)),
                             lambda: (torch.randn(B, 40, 3),)),
    "conv1d_stride_dilation": (_conv(nn.Conv1d, 1, stride=2, dilation=2, padding=1), lambda: (torch.randn(B, 4, 11),)),
    "conv2d_groups_reflect": (_conv(nn.Conv2d, 2, groups=2, padding=1, padding_mode="reflect"),
                              lambda: (torch.randn(B, 4, 6, 5),)),
    "conv2d_same_circular": (_conv(nn.Conv2d, 2, padding="same", padding_mode="circular"),
                             lambda: (torch.randn(B, 4, 5, 5),)),
    "conv2d_stride_asym": (_conv(nn.Conv2d, 2, stride=(2, 1), padding=(1, 0)), lambda: (torch.randn(B, 4, 7, 6),)),
    "conv3d_replicate": (_conv(nn.Conv3d, 3, padding=1, padding_mode="replicate"),
                         lambda: (torch.randn(B, 4, 3, 4, 3),)),
    "conv_transpose2d": (_conv(nn.ConvTranspose2d, 2, stride=2, groups=2), lambda: (torch.randn(B, 4, 3, 3),)),
    "embedding_padding_idx": (lambda: MeanTokens(nn.Embedding(7, 4, padding_idx=2)),
                              lambda: (torch.randint(0, 7, (B, 6)),)),
    "embedding_bag": (lambda: MeanTokens(nn.EmbeddingBag(7, 4, mode="mean")), lambda: (torch.randint(0, 7, (B, 3)),)),
    "norms": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(1, 2), nn.LayerNorm(4),
                                    nn.Linear(4, 2)), lambda: (torch.randn(B, 2, 5, 6),)),
    "transformer_mha": (lambda: nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True),
                        lambda: (torch.randn(B, 3, 4),)),
    "gru": (lambda: nn.GRU(3, 4, num_layers=2, batch_first=True), lambda: (torch.randn(B, 5, 3),)),
    "lstm_time_major_embedding": (SeqModel, lambda: (torch.randint(0, 11, (6, B)),)),
    "fallback_custom_layer": (lambda: nn.Sequential(nn.Linear(5, 5), Gated()), lambda: (torch.randn(B, 5),)),
    "tied_embedding_head": (TiedLM, lambda: (torch.randint(0, 9, (B, 3)),)),
    "reused_module": (Reused, lambda: (torch.randn(B, 5),)),
    "frozen_layers": (_frozen, lambda: (torch.randn(B, 5),)),
}


def dp_update(model: nn.Module, inputs: Sequence[torch.Tensor], mode: str, clipping: str, reduction: str):
    """``param.grad`` after one noise-free DP step in ``mode`` (the model itself is not changed)."""
    model = copy.deepcopy(model)
    hooks = attach_grad_sample_hooks(model, loss_reduction=reduction)
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
        expected_batch_size=B, clipping_mode=mode, clipping=clipping,
    )
    opt.zero_grad()
    loss = smooth_loss(model(*inputs))
    (loss / B if reduction == "mean" else loss).backward()
    opt.pre_step()
    hooks.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _build(name: str):
    make_model, make_inputs = CASES[name]
    model = make_model().double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in make_inputs())
    with torch.no_grad():
        model(*inputs)  # materialise lazy layers
    return model, inputs


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_fast_modes_equal_the_materialising_path(name, clipping):
    model, inputs = _build(name)
    for reduction in ("mean", "sum"):
        plain = dp_update(model, inputs, "materialize", clipping, reduction)
        for mode in ("auto", "ghost"):
            fast = dp_update(model, inputs, mode, clipping, reduction)
            assert fast.keys() == plain.keys()
            for n in plain:
                torch.testing.assert_close(fast[n], plain[n], rtol=1e-9, atol=1e-12, msg=f"{mode} {reduction} {n}")


@pytest.mark.parametrize("name", ["linear3d", "conv2d_groups_reflect", "tied_embedding_head", "fallback_custom_layer"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_materialising_path_equals_the_textbook_update(name, clipping):
    """The plain path itself against per-sample gradients by brute force (one backward per sample)."""
    model, inputs = _build(name)
    got = dp_update(model, inputs, "auto", clipping, "mean")
    grads = reference_grads(model, list(inputs), smooth_loss, [0] * len(inputs))
    bound = C if clipping == "flat" else C / math.sqrt(len(grads))
    if clipping == "flat":
        norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
        factors = {n: (bound / norms).clamp(max=1.0) for n in grads}
    else:
        factors = {n: (bound / g.flatten(1).norm(dim=1)).clamp(max=1.0) for n, g in grads.items()}
    for n, g in grads.items():
        torch.testing.assert_close(got[n], torch.einsum("b,b...->...", factors[n], g) / B, rtol=1e-7, atol=1e-10)


def test_fast_path_skips_autograd_weight_gradients():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 2))
    hooks = attach_grad_sample_hooks(model, clipping_mode="auto")
    model(torch.randint(0, 10, (3, 3))).sum().backward()
    for p in (model[0].weight, model[2].weight, model[4].weight):
        assert p.grad is None and len(p.grad_parts) == 1 and not hasattr(p, "grad_sample")
    assert model[2].bias.grad is None and len(model[2].bias.grad_parts) == 1  # a BiasPart: G, no copy
    assert not hasattr(model[2].bias, "grad_sample")
    hooks.remove()
    assert not any(hasattr(p, "grad_parts") for p in model.parameters())


def test_norm_methods_agree_per_layer_family():
    a, g = torch.randn(4, 7, 5, dtype=torch.double), torch.randn(4, 7, 3, dtype=torch.double)
    part = LinearPart(a, g, (3, 5))
    expected = part.materialize().flatten(1).pow(2).sum(1)
    for method in ("auto", "ghost", "materialize"):
        torch.testing.assert_close(part.norm_sq(method), expected)
    conv = nn.Conv2d(3, 4, 3, stride=2, dilation=1).double()
    x = torch.randn(4, 3, 7, 6, dtype=torch.double)
    conv_part = ConvPart(conv, x, torch.randn(4, 4, 4, 2, dtype=torch.double), [1, 0])
    expected = conv_part.materialize().flatten(1).pow(2).sum(1)
    for method in ("ghost", "materialize"):
        torch.testing.assert_close(conv_part.norm_sq(method), expected)
    rows = torch.tensor([1, 1, 4, 0, 2, 2])
    part = RowsPart(torch.tensor([0, 0, 0, 1, 2, 2]), rows, torch.randn(6, 3, dtype=torch.double), 3, (5, 3))
    torch.testing.assert_close(part.norm_sq(), part.materialize().flatten(1).pow(2).sum(1))
    factors = torch.rand(3, dtype=torch.double)
    torch.testing.assert_close(part.clipped_sum(factors), torch.einsum("b,b...->...", factors, part.materialize()))


def test_bad_clipping_arguments_are_named():
    with pytest.raises(ValueError, match="clipping_mode"):
        DPOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                    expected_batch_size=2, clipping_mode="fast")
    with pytest.raises(ValueError, match="clipping"):
        DPOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                    expected_batch_size=2, clipping="per_sample")


@pytest.mark.filterwarnings("ignore:noise_multiplier=0", "ignore::UserWarning")
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_trainer_fast_and_plain_give_the_same_weights(tmp_path, clipping):
    """Real Trainer + DPStrategy, gradient accumulation and physical micro-batches, noise off."""
    from tests.namespace import pl

    from tests.namespace import DPStrategy
    from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs

    class SetMode(pl.Callback):
        def __init__(self, mode: str) -> None:
            self.mode = mode

        def on_train_start(self, trainer, pl_module) -> None:
            trainer.strategy.dp_optimizer.clipping_mode = self.mode
            trainer.strategy.dp_optimizer.clipping = clipping

    def run(mode: str) -> nn.Module:
        torch.manual_seed(0)
        model = TinyClassifier(lr=0.5)
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.1, seed=3, max_physical_batch_size=5)
        kwargs = trainer_kwargs(tmp_path)
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), SetMode(mode)]
        trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, strategy=strategy, **kwargs)
        trainer.fit(model, train_dataloaders=make_loader(n=64, batch_size=8))
        assert trainer.strategy.dp_optimizer.clipping_mode == mode
        return model

    plain, fast = run("materialize"), run("auto")
    for p, q in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("block", [1, 37, 1 << 18])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_norms_by_blocks_of_samples_equal_the_per_sample_gradients(monkeypatch, block, groups):
    """Blockwise im2col (block smaller than, not dividing, and larger than the batch) and the clipped sum
    from kept per-sample gradients give the materialised result, for ghost and materialised norms."""
    from lightning_dp.grad_sample import conv as conv_layer

    monkeypatch.setattr(conv_layer, "_BLOCK_ELEMENTS", block)
    small = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2), groups=groups).double()
    wide = nn.Conv2d(8, 10, 3, stride=2, groups=groups).double()  # per-sample grads larger than x and G
    factors = torch.rand(7, dtype=torch.double)
    for conv, x, padding in ((small, torch.randn(7, 4, 9, 8, dtype=torch.double), [1, 2]),
                             (wide, torch.randn(7, 8, 5, 5, dtype=torch.double), [0, 0])):
        g = torch.randn_like(conv(x))
        for method in ("auto", "ghost", "materialize"):
            part = ConvPart(conv, x, g, padding, scale=3.0)
            per_sample = part.materialize()
            torch.testing.assert_close(per_sample, 3.0 * ConvPart(conv, x, g, padding).materialize())
            torch.testing.assert_close(part.norm_sq(method), per_sample.flatten(1).pow(2).sum(1))
            torch.testing.assert_close(part.clipped_sum(factors), torch.einsum("b,b...->...", factors, per_sample))


class TiedPooledLM(nn.Module):
    """Tied embedding (with padding_idx) and head; the head sees one position per sample (T_head ≠ T_emb)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(1))


@pytest.mark.parametrize("make_model, length", [(TiedLM, 3), (TiedPooledLM, 6)])
def test_tied_embedding_and_head_are_clipped_without_materialising(make_model, length):
    """The tied weight's per-sample norm comes from the embedding part, the head part and their cross
    term; it equals the textbook per-sample gradients (one backward per sample), flat and per-layer."""
    from lightning_dp.clipping import parts_of
    from lightning_dp.grad_sample.embedding import TiedPart

    torch.manual_seed(0)
    model = make_model().double()
    idx = torch.randint(0, 9, (B, length))
    idx[0, :2] = 0  # padding tokens where there is a padding_idx
    grads = reference_grads(model, [idx], smooth_loss, [0])
    hooks = attach_grad_sample_hooks(model, loss_reduction="sum", clipping_mode="auto")
    smooth_loss(model(idx)).backward()
    (part,) = parts_of(model.emb.weight)
    assert isinstance(part, TiedPart)
    expected = grads["emb.weight"].flatten(1).pow(2).sum(1)
    torch.testing.assert_close(part.norm_sq("auto"), expected)
    torch.testing.assert_close(part.norm_sq("ghost"), expected)
    factors = torch.rand(B, dtype=torch.double)
    torch.testing.assert_close(part.clipped_sum(factors), torch.einsum("b,b...->...", factors, grads["emb.weight"]))
    hooks.remove()
    for clipping in ("flat", "per_layer"):
        plain = dp_update(model, (idx,), "materialize", clipping, "mean")
        fast = dp_update(model, (idx,), "auto", clipping, "mean")
        for n in plain:
            torch.testing.assert_close(fast[n], plain[n], rtol=1e-9, atol=1e-12)
