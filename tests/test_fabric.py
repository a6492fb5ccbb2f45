"""Lightning Fabric (issue 30): ``lightning_dp.fabric``'s strategies in a user's own loop, against the float64
micro-batch reference (noise 0), one process on the union batch (2-process DDP), dp-accounting's PLD, an
exact save/load resume, the budget stop and the refusals."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning.fabric")
import lightning as L  # noqa: E402

from lightning_dp.fabric import DPStrategy, evaluation_loader  # noqa: E402
from tests.distributed_helpers import reference_update  # noqa: E402
from tests.dp_accounting_reference import poisson_gaussian_epsilon  # noqa: E402
from tests.fsdp_worker import build_net  # noqa: E402
from tests.lightning_helpers import make_loader  # noqa: E402

WORKER = Path(__file__).with_name("fabric_worker.py")
NAMESPACE_INDEPENDENT = True  # Fabric's tests use lightning.fabric whatever the Trainer namespace: run them once


def _fabric(**options) -> L.Fabric:
    precision = options.pop("precision", "32-true")
    return L.Fabric(accelerator="cpu", devices=1, precision=precision, strategy=DPStrategy(**options))


def _train(fabric, steps, accumulate=1, model=None, optimizer=None, loader=None, stop=False, state=None):
    """Set up (unless given) and run ``steps`` optimizer steps; returns model, optimizer, loader, record."""
    if model is None:
        torch.manual_seed(0)
        model = build_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        model, optimizer = fabric.setup(model, optimizer)
        loader = fabric.setup_dataloaders(make_loader(n=64, batch_size=8))
    if state is not None:
        fabric.load(state, {"model": model, "optimizer": optimizer})
    record = {"batches": [], "before": [], "grads": []}
    inner = optimizer.optimizer.original_optimizer
    hook = inner.register_step_pre_hook(
        lambda opt, args, kwargs: record["grads"].append({n: p.grad.detach().clone() for n, p in model.module.named_parameters()}))
    taken = 0
    try:
        while taken < steps:
            for i, (x, y) in enumerate(loader):
                if i % accumulate == 0:
                    record["before"].append({n: p.detach().clone() for n, p in model.module.named_parameters()})
                    record["batches"].append([])
                record["batches"][-1].append((x.clone(), y.clone()))
                fabric.backward(F.cross_entropy(model(x), y))
                if (i + 1) % accumulate == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                    taken += 1
                    if taken == steps or (stop and fabric.strategy.should_stop):
                        return model, optimizer, loader, record
    finally:
        hook.remove()
    return model, optimizer, loader, record


@pytest.mark.parametrize("accumulate", [1, 3])
def test_one_device_gives_the_inner_optimizer_the_float64_reference_gradient(accumulate):
    fabric = _fabric(noise_multiplier=0.0, max_grad_norm=0.05, seed=3, accumulate_grad_batches=accumulate)
    _, _, _, record = _train(fabric, steps=3, accumulate=accumulate)
    strategy = fabric.strategy
    assert strategy.sample_rate == pytest.approx(accumulate * 8 / 64)
    assert strategy.privacy.expected_batch_size == accumulate * 8
    for before, batches, grads in zip(record["before"], record["batches"], record["grads"]):
        assert len(batches) == accumulate, "each step is one Poisson draw served as k micro-batches"
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        expected = reference_update(before, x, y, 0.05, accumulate * 8)
        for name, grad in grads.items():
            torch.testing.assert_close(grad.double(), expected[name], rtol=1e-5, atol=1e-7)


def test_epsilon_equals_dp_accountings_pld():
    fabric = _fabric(noise_multiplier=1.3, max_grad_norm=1.0, seed=0)
    _train(fabric, steps=5)
    expected = poisson_gaussian_epsilon(1.3, 8 / 64, 5, 1e-5)
    assert fabric.strategy.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-3)
    assert fabric.strategy.privacy_report().epsilon == pytest.approx(expected, rel=1e-3)


def test_target_epsilon_is_calibrated_for_max_steps_and_met():
    fabric = _fabric(target_epsilon=2.0, max_grad_norm=1.0, seed=0, max_steps=6)
    _train(fabric, steps=6)
    assert fabric.strategy.get_epsilon(1e-5) == pytest.approx(2.0, rel=0.01)
    assert fabric.strategy.get_epsilon(1e-5) <= 2.0 + 1e-9
    with pytest.raises(ValueError, match="needs `max_steps`"):
        DPStrategy(target_epsilon=2.0)


def test_a_save_load_resume_is_exact(tmp_path):
    straight = _fabric(noise_multiplier=1.0, max_grad_norm=0.5, seed=4)
    model, *_ = _train(straight, steps=6)
    first = _fabric(noise_multiplier=1.0, max_grad_norm=0.5, seed=4)
    model1, optimizer1, _, _ = _train(first, steps=3)
    first.save(tmp_path / "dp.ckpt", {"model": model1, "optimizer": optimizer1})
    resumed = _fabric(noise_multiplier=1.0, max_grad_norm=0.5, seed=4)
    torch.manual_seed(0)
    net = build_net()
    model2, optimizer2 = resumed.setup(net, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9))
    loader2 = resumed.setup_dataloaders(make_loader(n=64, batch_size=8))
    _train(resumed, steps=3, model=model2, optimizer=optimizer2, loader=loader2, state=tmp_path / "dp.ckpt")
    for (name, a), (_, b) in zip(model.module.named_parameters(), model2.module.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed.strategy.accountant.history == straight.strategy.accountant.history
    assert resumed.strategy.get_epsilon(1e-5) == straight.strategy.get_epsilon(1e-5)


def test_the_budget_stop_holds_and_a_step_past_it_is_refused_without_touching_weights():
    fabric = _fabric(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, epsilon_budget=2.0)
    model, optimizer, loader, _ = _train(fabric, steps=1000, stop=True)
    strategy = fabric.strategy
    assert strategy.should_stop and strategy.get_epsilon() <= 2.0
    assert strategy.privacy.epsilon_after_next_step() > 2.0
    x, y = next(iter(loader))
    fabric.backward(F.cross_entropy(model(x), y))
    weights = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    history = list(strategy.accountant.history)
    with pytest.raises(RuntimeError, match="would take ε over the budget 2.0"):
        optimizer.step()
    for n, p in model.module.named_parameters():
        assert torch.equal(p, weights[n])
    assert strategy.accountant.history == history


def test_refusals_name_what_to_do():
    fabric = _fabric(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    model, optimizer, loader, _ = _train(fabric, steps=1)
    with pytest.raises(RuntimeError, match="per-sample clipping"):
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
    with pytest.raises(RuntimeError, match="one model per run"):
        fabric.setup(build_net(), torch.optim.SGD(build_net().parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="one training loader per run"):
        fabric.setup_dataloaders(make_loader())
    assert fabric.setup_dataloaders(evaluation_loader(make_loader())) is not None  # evaluation: as it is
    x, y = next(iter(loader))
    fabric.backward(F.cross_entropy(model(x), y))
    fabric.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="2 fabric.backward call"):
        optimizer.step()

    unsampled = _fabric(noise_multiplier=1.0, seed=0)
    net = build_net()
    model2, optimizer2 = unsampled.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = next(iter(make_loader()))
    unsampled.backward(F.cross_entropy(model2(x), y))
    with pytest.raises(RuntimeError, match="before the training loader was set up"):
        optimizer2.step()  # its rate is unknown: it would go unaccounted
    assert unsampled.strategy.accountant.total_steps == 0

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(6), 0

    other = _fabric(noise_multiplier=1.0, seed=0)
    other.setup(build_net(), torch.optim.SGD(build_net().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="cannot Poisson-sample"):
        other.setup_dataloaders(torch.utils.data.DataLoader(Stream(), batch_size=2))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train_and_account(precision):
    fabric = _fabric(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, precision=precision)
    model, *_ = _train(fabric, steps=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert fabric.strategy.accountant.total_steps == 3


def test_registered_in_fabrics_registry():
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    assert {"dp_sgd", "dp_ddp"} <= set(STRATEGY_REGISTRY.available_strategies())
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy="dp_sgd")
    assert isinstance(fabric.strategy, DPStrategy) and fabric.strategy.noise_multiplier == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_on_the_union_batch(tmp_path, mode):
    env = dict(__import__("os").environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(random.randint(20000, 40000)),
               PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(WORKER), mode, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["sample_rate"] == pytest.approx(2 * 2 * 8 / 64) and ranks[0]["expected_batch_size"] == 32
    for t in range(2):
        batches = [b for r in ranks for b in r["batches"][2 * t: 2 * t + 2]]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        rows = [tuple(v.tolist()) for v in x]
        assert len(rows) == len(set(rows)), "every example is in at most one rank's batch of a step"
        before = ranks[0]["before_steps"][t]
        after = ranks[0]["before_steps"][t + 1] if t + 1 < 2 else ranks[0]["final"]
        update = reference_update(before, x, y, 0.05, 32)
        for name, value in before.items():
            torch.testing.assert_close(after[name].double(), value.double() - 0.5 * update[name], rtol=1e-4, atol=1e-6)
    for name in ranks[0]["final"]:
        torch.testing.assert_close(ranks[0]["final"][name], ranks[1]["final"][name])


@pytest.mark.slow
def test_two_process_fsdp_resumes_exactly_from_a_distributed_checkpoint(tmp_path):
    env = dict(__import__("os").environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(random.randint(20000, 40000)),
               PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(WORKER), "fsdp_resume", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    for r in (0, 1):
        rank = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert len(rank["loaded_history"]) == 1 and rank["loaded_history"][0][2] == 1, "one step before the save"
        assert rank["resumed_history"] == rank["history"]
        for name, value in rank["straight"].items():
            torch.testing.assert_close(rank["resumed"][name], value, rtol=0, atol=0, msg=name)


def test_fabric_loop_with_an_empty_micro_batch_after_a_full_one():
    """An empty micro-batch after a full one (zero loss) with a torch.func-fallback layer: a noise-only part of
    the step (tests/test_empty_micro_batches.py has the Trainer's case)."""
    from tests.test_empty_micro_batches import Scale

    torch.manual_seed(0)
    net = torch.nn.Sequential(Scale(), torch.nn.Linear(6, 3))
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=DPStrategy(
        noise_multiplier=1.0, max_grad_norm=1.0, seed=0, accumulate_grad_batches=2))
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    data = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randint(3, (40,)))
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data, batch_size=1))
    sizes = []
    for i, (x, y) in enumerate(loader):
        sizes.append(x.shape[0])
        loss = F.cross_entropy(model(x), y) if x.shape[0] else sum(p.sum() for p in model.parameters()) * 0.0
        fabric.backward(loss)
        if i % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()
    assert any(sizes[i] and not sizes[i + 1] for i in range(0, len(sizes) - 1, 2)), "the case was drawn"
    assert fabric.strategy.privacy.steps_taken == len(sizes) // 2
