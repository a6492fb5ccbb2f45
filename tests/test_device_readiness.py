"""Device-correct state, tested without a GPU (issue 28).

* The EMA average and the centring centres follow the model when it moves after they were built
  (``make_private``, then ``.to("cuda")``). ``model.to("meta")`` stands in for the move: like a move to
  CUDA it changes every parameter's device; a tensor left behind on the CPU then meets a meta tensor and
  the op raises, as it would on CUDA.
* A seeded noise source restored from a checkpoint rebuilds each generator on the device it was saved
  from, when noise is first drawn there (a CPU-only machine can load a CUDA run's state), and refuses
  another index of the same kind of device, where a freshly seeded generator would replay the noise.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dp import make_private
from lightning_dp.averaging import ExponentialMovingAverage
from lightning_dp.centering import CENTER_ATTRIBUTE
from lightning_dp.noise import GaussianNoise


def test_ema_follows_the_module_to_another_device():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ExponentialMovingAverage(model, decay=0.9)
    model.to("meta")
    ema.update()  # a CPU average lerped towards meta weights would raise here
    assert {t.device.type for t in ema.shadow.values()} == {"meta"}
    assert ema.num_updates == 1


def test_ema_state_loads_onto_the_average_device():
    model = nn.Linear(3, 4)
    ema = ExponentialMovingAverage(model, decay=0.5)
    state = ema.state_dict()
    model.to(torch.float64)  # same device, another dtype: the average keeps its own tensors
    ema.update()
    ema.load_state_dict(state)
    torch.testing.assert_close(ema.shadow["weight"], state["shadow"]["weight"])


def test_centring_centre_follows_the_layer_and_is_moved_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                 expected_batch_size=2, centering={model[0]: torch.ones(3)}, seed=0)
    model.to("meta")  # new meta parameters: the per-sample gradients are made, the optimizer is not stepped
    assert getattr(model[0], CENTER_ATTRIBUTE).device.type == "cpu"
    model(torch.zeros(2, 3, device="meta")).sum().backward()  # the rule reads x − c in the backward
    center = getattr(model[0], CENTER_ATTRIBUTE)
    assert center.device.type == "meta"
    model(torch.zeros(2, 3, device="meta")).sum().backward()
    assert getattr(model[0], CENTER_ATTRIBUTE) is center  # moved once, not copied at every call


def _state_with(generators):
    return {"seed": 5, "calls": 3, "generators": generators}


def test_restored_generator_continues_where_it_was_saved():
    """float64 draws use the CPU generator: a restored source continues the stream exactly (no replay)."""
    noise = GaussianNoise(seed=5)
    first = noise.normal((6,), std=1.0, dtype=torch.float64)
    state = noise.state_dict()
    rest = noise.normal((6,), std=1.0, dtype=torch.float64)
    resumed = GaussianNoise(seed=123)
    resumed.load_state_dict(state)
    again = resumed.normal((6,), std=1.0, dtype=torch.float64)
    assert torch.equal(again, rest) and not torch.equal(again, first)


def test_a_cuda_state_loads_on_a_cpu_only_machine_and_is_kept():
    """Loading does not build CUDA generators; the state survives the next save untouched."""
    cuda_state = torch.arange(8, dtype=torch.uint8)
    noise = GaussianNoise()
    noise.load_state_dict(_state_with({"cuda:0": cuda_state}))
    noise.normal((4,), std=1.0)  # CPU float32: the keystream, no generator
    assert torch.equal(noise.state_dict()["generators"]["cuda:0"], cuda_state)


def test_another_index_of_the_saved_kind_is_refused():
    noise = GaussianNoise()
    noise.load_state_dict(_state_with({"cuda:0": torch.zeros(8, dtype=torch.uint8)}))
    with pytest.raises(RuntimeError, match=r"cuda:1.*replay"):
        noise._generator(torch.device("cuda:1"))


def test_a_device_kind_never_used_gets_its_own_stream():
    """The CPU generator of a run that drew noise only on CUDA was never used: nothing to replay."""
    noise = GaussianNoise()
    noise.load_state_dict(_state_with({"cuda:0": torch.zeros(8, dtype=torch.uint8)}))
    draw = noise.normal((4,), std=1.0, dtype=torch.float64)
    assert torch.isfinite(draw).all()
    assert set(noise.state_dict()["generators"]) == {"cuda:0", "cpu"}
