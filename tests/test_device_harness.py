"""Device harness (issue 28): DP steps with the model on a device other than the CPU, without a GPU.

The ``meta`` device stands in for the accelerator. A meta tensor has a shape and a dtype but no data, so

* every **host sync** raises: ``bool(t)``, ``t.item()``, ``float(t)``, ``int(t)``, ``t.tolist()``, ``t.cpu()``,
  and the ops whose output size depends on the data (``nonzero``, ``unique``, boolean indexing); code that
  makes the host wait for the device at every step fails here as it would stall a GPU;
* a tensor **created on the wrong device** is caught by :class:`CpuTensorGuard`, a dispatch mode that refuses
  any op whose output is on the CPU while the steps run (a CPU tensor meeting a meta tensor in an op raises
  too, except a 0-dim one, which PyTorch lets through: the guard catches that case).

The model is built on meta *before* ``make_private`` and the optimizer (``model.to("meta")`` afterwards
would replace the Parameter objects, and the optimizer would hold the old ones). What is covered: every
layer rule (factored and materialised, each clipping mode), the torch.func fallback for a custom layer,
flat/per-layer/automatic clipping, non-finite handling both ways, gradient accumulation, a GradScaler's
tensor scale, adaptive clipping (one documented sync per step), BandMF, centring, EMA, seeded noise and
secure noise (ChaCha20 through torch on a non-CPU device).

Seeded noise: ``torch.Generator`` has no meta kind; meta kernels accept (and ignore) any generator, so the
fixture below hands out a CPU generator where the noise source asks for one *for the meta device*, and
records that it was asked: the noise is drawn on the gradients' device, not on the CPU and copied.
"""
from __future__ import annotations

import traceback
import warnings
from types import SimpleNamespace
from typing import Any, Callable, List

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_dp import make_private
from lightning_dp.adapter.callback import _dropped_value
from lightning_dp.adapter.steps import per_sample_scale
from lightning_dp.averaging import ExponentialMovingAverage
from lightning_dp.grad_sample import clipping_modes as fast
from lightning_dp.noise.gaussian import GaussianNoise

META = torch.device("meta")
B = 4
MODES = ("auto", "ghost", "materialize")


class CpuTensorGuard(TorchDispatchMode):
    """Raise on any op that outputs a CPU tensor (while the DP steps run, everything lives on the device)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves(out)):
            raise AssertionError(f"{func} made a tensor on the CPU during a step on another device")
        return out


@pytest.fixture(autouse=True)
def meta_generators(monkeypatch: pytest.MonkeyPatch) -> List[torch.device]:
    """Seeded noise on meta: a CPU generator stands in for the device's (see the module docstring)."""
    asked: List[torch.device] = []
    original = GaussianNoise._generator

    def generator(self: GaussianNoise, device: torch.device) -> torch.Generator:
        if device.type != "meta":
            return original(self, device)
        asked.append(device)
        return self._generators.setdefault(str(device), torch.Generator().manual_seed(0))

    monkeypatch.setattr(GaussianNoise, "_generator", generator)
    warnings.filterwarnings("ignore", message="secure_mode=False")
    return asked


# --- models ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Recurrent(nn.Module):
    def __init__(self, kind: type) -> None:
        super().__init__()
        self.rnn = kind(3, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class Custom(nn.Module):
    """No rule: the torch.func fallback computes its per-sample gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(x * self.weight))


class Tied(nn.Module):
    """An embedding tied to its output head (TiedPart in the fast modes)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(idx))


def _hf_conv1d() -> nn.Module:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    return nn.Sequential(conv1d(4, 3), nn.Tanh(), conv1d(2, 4))


def _floats(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, device=META)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 10, (B, 5), device=META)


LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), _floats(B, 3)),
    "linear_sequence": (lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)), _floats(B, 5, 3)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), _floats(B, 2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), _floats(B, 2, 5, 5)),
    "conv2d_groups_reflect": (lambda: nn.Conv2d(2, 4, 3, groups=2, padding=1, padding_mode="reflect"),
                              _floats(B, 2, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), _floats(B, 2, 3, 3, 3)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 2)), _tokens),
    "tied_embedding": (Tied, _tokens),
    "layer_norm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), _floats(B, 5, 3)),
    "group_norm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4)), _floats(B, 2, 3, 3)),
    "rnn": (lambda: Recurrent(nn.RNN), _floats(B, 5, 3)),
    "lstm": (lambda: Recurrent(nn.LSTM), _floats(B, 5, 3)),
    "gru": (lambda: Recurrent(nn.GRU), _floats(B, 5, 3)),
    "multihead_attention": (Attention, _floats(B, 5, 4)),
    "prelu": (lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(4)), _floats(B, 3)),
    "hf_conv1d": (_hf_conv1d, _floats(B, 5, 3)),
    "custom_fallback": (Custom, _floats(B, 3)),
}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


# --- the harness -----------------------------------------------------------------------------------------
def dp_steps(
    build: Callable[[], nn.Module],
    make_input: Callable[[], torch.Tensor],
    steps: int = 2,
    micro_batches: int = 1,
    ema: bool = False,
    scale: Any = None,
    non_finite: str = "drop",
    **private: Any,
) -> Any:
    """``steps`` DP steps of ``micro_batches`` backward passes each, the model on meta from the start;
    everything the steps touch is checked to stay on meta. Returns the DP optimizer."""
    torch.manual_seed(0)
    with META:
        model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum: state on the device
    settings = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)
    if not private.get("secure_mode"):
        settings["seed"] = 0
    dp = make_private(model, optimizer, **{**settings, **private})
    dp.non_finite = non_finite
    average = ExponentialMovingAverage(model, decay=0.9) if ema else None
    with CpuTensorGuard():
        for _ in range(steps):
            for micro in range(micro_batches):
                if scale is not None:
                    dp.per_sample_grad_scale = scale
                output = model(make_input())
                output.float().pow(2).mean().backward()
                if micro < micro_batches - 1:
                    dp.accumulate_micro_batch()
            dp.step()
            dp.zero_grad()
            if average is not None:
                average.update()
    for name, p in model.named_parameters():
        assert p.device == META, name
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert value.device == META
    if average is not None:
        assert {t.device.type for t in average.shadow.values()} == {"meta"}
    assert dp.steps_taken == steps
    return dp


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_rule_steps_on_the_device_without_host_sync(layer: str, mode: str) -> None:
    build, make_input = LAYERS[layer]
    dp = dp_steps(build, make_input, clipping_mode=mode)
    # off the CPU the dropped-sample count stays on the device; reading it is the (one) sync
    assert isinstance(dp.dropped_samples_count, torch.Tensor) and dp.dropped_samples_count.device == META


@pytest.mark.parametrize("mode", ("auto", "materialize"))
@pytest.mark.parametrize("clipping", ("flat", "per_layer", "automatic", "automatic_per_layer"))
def test_every_clipping_without_host_sync(clipping: str, mode: str) -> None:
    dp_steps(_mlp, _floats(B, 3), clipping=clipping, clipping_mode=mode)


@pytest.mark.parametrize("mode", ("auto", "materialize"))
@pytest.mark.parametrize(
    "feature",
    ["accumulation", "propagate", "grad_scaler", "bandmf", "centering", "ema", "secure", "seeded"],
)
def test_every_feature_without_host_sync(feature: str, mode: str, meta_generators: List[torch.device]) -> None:
    options: dict = {"clipping_mode": mode}
    if feature == "accumulation":
        options["micro_batches"] = 3
    elif feature == "propagate":
        options["non_finite"] = "propagate"
    elif feature == "grad_scaler":  # a GradScaler's scale as the 0-dim device tensor steps.py hands on
        options["scale"] = 1.0 / torch.full((), 2.0**16, device=META, dtype=torch.float64)
        options["micro_batches"] = 2
    elif feature == "bandmf":
        options.update(bands=2, num_steps=10)
    elif feature == "centering":
        options["centering"] = {"0": torch.full((3,), 0.5)}  # a CPU centre: moved to the layer's device once
    elif feature == "ema":
        options["ema"] = True
    elif feature == "secure":
        options["secure_mode"] = True  # ChaCha20 in torch on a non-CPU device
    dp = dp_steps(_mlp, _floats(B, 3), steps=3 if feature == "bandmf" else 2, **options)
    if feature == "seeded":
        assert meta_generators and all(d.type == "meta" for d in meta_generators)  # drawn on the device
    if feature == "propagate":
        assert dp.dropped_samples == 0  # nothing counted: an int, no device tensor to read
    if feature == "secure":
        assert not meta_generators  # the secure source never touches the seeded generators


def test_adaptive_clipping_syncs_once_per_step_only_where_the_norm_is_updated() -> None:
    """The centred count of unclipped samples is accumulated on the device over the micro-batches; the new
    clipping norm is a Python number, so the step reads the noised count once (documented), nowhere else."""
    torch.manual_seed(0)
    with META:
        model = _mlp()
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=B, seed=0,
                      adaptive_clipping={"count_noise_multiplier": 2.0})
    with CpuTensorGuard():
        for _ in range(3):  # micro-batches: no sync
            model(torch.randn(B, 3, device=META)).pow(2).mean().backward()
            dp.accumulate_micro_batch()
        assert isinstance(dp._unclipped_in_step, torch.Tensor) and dp._unclipped_in_step.device == META
        model(torch.randn(B, 3, device=META)).pow(2).mean().backward()
        with pytest.raises(RuntimeError, match="meta") as raised:
            dp.step()
    frames = [f.name for f in traceback.extract_tb(raised.value.__traceback__) if "lightning_dp" in f.filename]
    assert frames[-1] == "_adapt_clipping_norm"  # the step's one sync, after the noise was added


def test_dropped_counts_stay_on_the_device_until_read() -> None:
    dp = dp_steps(_mlp, _floats(B, 3), steps=2)
    count = dp.dropped_samples_count
    assert isinstance(count, torch.Tensor) and count.device == META and not count.dtype.is_floating_point
    with pytest.raises(RuntimeError, match="meta"):
        dp.dropped_samples  # reading the number is a host sync: only when asked (report, user)
    strategy = SimpleNamespace(dropped_samples_count=count)
    logged = _dropped_value(strategy)  # what PrivacyBudgetCallback hands to pl_module.log: no sync
    assert logged.device == META and logged.dtype.is_floating_point


def test_lightning_backward_reads_the_grad_scaler_scale_without_sync() -> None:
    """The strategies' per-sample scale divides by the GradScaler's scale tensor, never calls ``get_scale()``."""
    scaler = SimpleNamespace(
        _get_scale_async=lambda: torch.full((), 1024.0, device=META),
        get_scale=lambda: pytest.fail("get_scale() makes the host wait for the device"),
        is_enabled=lambda: True,
    )
    accumulated = [per_sample_scale(2, scaler)]
    (scale,) = accumulated
    assert isinstance(scale, torch.Tensor) and scale.device == META and scale.dtype == torch.float64


def test_autocast_is_not_asked_about_a_device_it_does_not_know() -> None:
    assert fast.autocast_dtype("meta") is None  # torch.is_autocast_enabled("meta") would raise
    assert fast._skip_weight_grads(torch.zeros(1, device=META))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.autocast_dtype("cpu") == torch.bfloat16
        assert fast._skip_weight_grads(torch.zeros(1))  # bf16: no GradScaler, the fast path stays on
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fast._skip_weight_grads(torch.zeros(1))  # fp16: a GradScaler reads the raw gradients


# --- the harness detects what it is meant to detect -------------------------------------------------------
@pytest.mark.parametrize(
    "sync",
    [
        lambda t: bool(t.sum()),
        lambda t: t.sum().item(),
        lambda t: float(t.sum()),
        lambda t: int(t.sum()),
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: torch.nonzero(t),
        lambda t: torch.unique(t),
        lambda t: t[t > 0],
    ],
    ids=["bool", "item", "float", "int", "tolist", "cpu", "nonzero", "unique", "boolean_index"],
)
def test_a_host_sync_on_the_device_raises(sync: Callable[[torch.Tensor], Any]) -> None:
    with pytest.raises((RuntimeError, NotImplementedError)):
        sync(torch.ones(3, device=META))


def test_a_tensor_made_on_the_cpu_during_a_step_is_caught() -> None:
    with CpuTensorGuard(), pytest.raises(AssertionError, match="on the CPU"):
        torch.ones(3, device=META) * torch.tensor(2.0)  # a 0-dim CPU tensor meets a meta one without error


def test_a_sync_inserted_into_the_clipping_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness sees a per-step sync: put back the old finite check (``bool(isfinite(norms).all())``)."""
    from lightning_dp import clipping

    def old_check(total: torch.Tensor, norms: torch.Tensor) -> Any:
        if bool(torch.isfinite(total).all()):
            return None
        return torch.isfinite(norms)

    monkeypatch.setattr(clipping, "_kept", old_check)
    with pytest.raises(RuntimeError, match="meta"):
        dp_steps(_mlp, _floats(B, 3))


# --- the device path computes what the CPU path computes (values, on the CPU) -----------------------------
def _always_masked(total: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``clipping._kept`` as it runs off the CPU: the mask every time, no question asked of the device."""
    finite = torch.isfinite(norms)
    return finite if finite.dim() == 1 else finite.all(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clipping", ("flat", "per_layer", "automatic"))
@pytest.mark.parametrize("non_finite_sample", (False, True))
def test_the_sync_free_path_gives_the_cpu_path_step(
    mode: str, clipping: str, non_finite_sample: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off the CPU every micro-batch is masked and zeroed, and the GradScaler's scale is a tensor; on the
    CPU the same code with those choices forced gives the same step (exactly the zeroed rows and the same
    products), with and without a NaN sample."""
    from lightning_dp import clipping as clipping_module

    def step(sync_free: bool) -> List[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                          max_grad_norm=0.5, expected_batch_size=B, seed=0, clipping=clipping, clipping_mode=mode)
        x = torch.randn(B, 3)
        if non_finite_sample:
            x[1, 0] = float("nan")
        dp.per_sample_grad_scale = torch.tensor(0.5, dtype=torch.float64) if sync_free else 0.5
        with monkeypatch.context() as patch:
            if sync_free:
                patch.setattr(clipping_module, "_kept", _always_masked)
            model(x).pow(2).mean().backward()
            dp.step()
        assert dp.dropped_samples == int(non_finite_sample)
        return [p.detach().clone() for p in model.parameters()]

    warnings.filterwarnings("ignore", message="noise_multiplier=0")
    for got, expected in zip(step(sync_free=True), step(sync_free=False)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
