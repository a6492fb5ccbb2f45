"""DPFSDPStrategy with 2 CPU processes (gloo): every step equals one process on the union batch (noise 0),
total noise std σC/B, each rank holds a shard, raw gradients never leave a rank, resume keeps ε.

One 2-process job (``tests/fsdp_worker.py fsdp``) runs every fit once per module; the tests read its files.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_dp import compute_epsilon
from tests.distributed_helpers import assert_resume_matches, check_steps, load, real_rows, reference_update, run_job
from tests.namespace import NAME  # noqa: F401  (Lightning test: run under both namespaces)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_job("fsdp", out_dir)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", ["auto", "materialize", "user_sharded", "secure_per_layer"])
def test_without_noise_every_step_equals_one_process_on_the_union_batch(results, name):
    ranks = load(results, name)
    assert ranks[0]["sample_rate"] == pytest.approx(2 * 8 / 64) and ranks[0]["expected_batch_size"] == 16
    check_steps(ranks, clipping="per_layer" if "per_layer" in name else "flat")


@pytest.mark.slow
def test_validation_runs_on_the_sharded_model(results):
    ranks = load(results, "materialize")
    assert all(len(r["val_losses"]) == 2 for r in ranks)


@pytest.mark.slow
def test_accumulation_and_physical_batches(results):
    """k = 2 micro-batches of 6 examples per rank, chunks of at most 2: ranks run the same number of passes
    (padding where one rank has fewer chunks) and the step is still one Poisson draw at rate 2·2·6/64."""
    ranks = load(results, "accumulate_physical")
    assert ranks[0]["accumulate"] == 2 and ranks[0]["sample_rate"] == pytest.approx(24 / 64)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]), "same number of forward passes on every rank"
    assert all(x.shape[0] <= 2 for r in ranks for x, _ in r["batches"])
    check_steps(ranks)


@pytest.mark.slow
def test_empty_batches_run_a_zero_weighted_padding_example(results):
    ranks = load(results, "empty_batches")
    padded = [(r["global_rank"], t) for r in ranks for t, (x, _) in enumerate(r["batches"]) if not x.abs().sum()]
    assert padded, "the seed gives at least one empty Poisson batch"
    check_steps(ranks, records_per_step=1)


@pytest.mark.slow
def test_fsdp_mixed_precision_policy_bf16(results):
    """Parameters all-gathered in bf16 (FSDP2's MixedPrecisionPolicy): the update is the fp32 one up to
    bf16 rounding."""
    ranks = load(results, "bf16")
    x, y = real_rows(ranks[0]["batches"] + ranks[1]["batches"])
    update = reference_update(ranks[0]["initial"], x, y, 0.05, 16)
    actual = {k: (ranks[0]["initial"][k] - ranks[0]["final"][k]).double() / 0.5 for k in update}
    error = torch.cat([(actual[k] - update[k]).flatten() for k in update]).norm()
    assert error / torch.cat([u.flatten() for u in update.values()]).norm() < 0.03
    assert [r["raw_reduces"] for r in ranks] == [0, 0]


@pytest.mark.slow
def test_target_epsilon_budget_callback_and_bf16_autocast(results):
    """σ calibrated for ε = 2 over 6 steps (ε 1.06, 1.32, 1.52, 1.70, ... after 1, 2, 3, 4 steps); a budget of
    ε = 1.6 stops after 3; autocast's raw weight gradients are dropped too (no FSDP2 reduction)."""
    ranks = load(results, "budget_bf16_mixed")
    for r in ranks:
        assert r["raw_reduces"] == 0 and r["steps"] == 3 and 1.5 < r["epsilon"] <= 1.6
        assert all(torch.isfinite(v).all() for v in r["final"].values())
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"] and ranks[0]["noise_multiplier"] == ranks[1]["noise_multiplier"]
    assert ranks[0]["steps"] == ranks[1]["steps"]


@pytest.mark.slow
def test_noise_std_is_sigma_c_over_b_and_every_rank_holds_a_shard(results):
    ranks = load(results, "noise")
    r0 = ranks[0]
    noise = torch.cat([(r0["initial"][k] - r0["final"][k]).flatten() for k in r0["initial"]])
    noise = noise.double() * r0["expected_batch_size"]  # lr = 1, first momentum step = gradient = noise / B
    assert noise.numel() > 8000
    assert noise.std().item() == pytest.approx(1.5 * 0.05, rel=0.03)
    weight = (r0["initial"]["1.lin1.weight"] - r0["final"]["1.lin1.weight"]).flatten()
    own = 601 * 601  # rank 0 noised rows 0-601, rank 1 rows 602-1202: independent draws, not one stream
    assert abs(torch.corrcoef(torch.stack([weight[:own], weight[602 * 601 : 602 * 601 + own]]))[0, 1]) < 0.02
    for k in r0["final"]:
        torch.testing.assert_close(r0["final"][k], ranks[1]["final"][k])
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"] == pytest.approx(compute_epsilon(1.5, 0.25, 1, 1e-5))
    for r in ranks:
        assert r["raw_reduces"] == 0
        shard = r["shards"]["1.lin1.weight"]  # (1203, 601): 602 rows on rank 0, 601 on rank 1
        assert shard["local"] == (602 if r["global_rank"] == 0 else 601) * 601 and shard["full"] == 1203 * 601
        assert shard["grad_local"] == shard["local"] and shard["buffer_local"] == shard["local"]
        assert sum(s["local"] for s in r["shards"].values()) < 0.51 * sum(s["full"] for s in r["shards"].values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["distributed", "full"])
def test_resume_from_a_checkpoint_keeps_epsilon_and_continues_every_rank_stream(results, kind):
    """2 steps, a checkpoint (a sharded directory, or one full file), 2 more steps: the same ε, sampling,
    noise and weights as 4 steps at once (seeded run: each rank's own generator states are restored)."""
    whole = load(results, "uninterrupted")
    first = load(results, f"first_{kind}")
    resumed = load(results, f"resumed_{kind}")
    assert first[0]["epsilon"] < whole[0]["epsilon"]
    assert_resume_matches(whole, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["leaf_sharded", "leaf_policy"])
def test_single_layers_given_to_fully_shard_are_exact(results, name):
    """Opacus's FSDP2 wrapper shards every layer that has parameters: single Linear and LayerNorm layers
    sharded on their own (FSDP2 gives each a generated class, FSDPLinear) keep their per-sample rules, and
    every step equals one process on the union batch, as for blocks."""
    check_steps(load(results, name))


def test_registry_name_and_arguments():
    from tests.namespace import DPFSDPStrategy, pl

    trainer = pl.Trainer(strategy="dp_fsdp", accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy) is DPFSDPStrategy and trainer.strategy.noise_multiplier == 1.0
    for bad in ({"tensor_parallel_size": 2}, {"data_parallel_size": 1}):
        with pytest.raises(ValueError, match="data-parallel rank"):
            DPFSDPStrategy(noise_multiplier=1.0, **bad)
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        DPFSDPStrategy(noise_multiplier=1.0, auto_wrap_policy={"Block"})


class _FirstRows:
    """A one-process stand-in for FSDP2's shards: this "rank" keeps the first half of every parameter's rows
    (at least one); records every reduction, in order."""

    def __init__(self) -> None:
        self.reduced: list = []

    @staticmethod
    def rows(p) -> int:
        return max(1, (p.shape[0] + 1) // 2)

    def reduce(self, p, clipped_sum):
        self.reduced.append((p, clipped_sum.clone()))
        return clipped_sum[: self.rows(p)].clone()

    def zeros(self, p):
        return torch.zeros((self.rows(p), *p.shape[1:]))

    def to_grad(self, p, shard):
        grad = torch.full(p.shape, float("nan"))
        grad[: self.rows(p)] = shard
        return grad


def test_dp_optimizer_with_shards_reduces_every_parameter_in_order_and_noises_its_shard_only():
    """Every trainable parameter is reduced after each backward pass in the optimizer's order (one without
    per-sample gradients, here an unused layer, with zeros), the shard keeps the clipped sum's rows, and the
    noise goes to the shard only."""
    from torch import nn

    from lightning_dp import DPOptimizer
    from lightning_dp.grad_sample import attach_grad_sample_hooks

    torch.manual_seed(0)
    first, unused, last = nn.Linear(4, 5), nn.Linear(2, 2), nn.Linear(5, 3)
    model = nn.ModuleDict({"first": first, "unused": unused, "last": last})
    params = [first.weight, first.bias, unused.weight, unused.bias, last.weight, last.bias]
    plain = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=4)
    hooks = attach_grad_sample_hooks(model)
    x = torch.randn(6, 4)

    def backward() -> None:
        model["last"](torch.tanh(model["first"](x))).pow(2).sum().backward()

    backward()
    plain.accumulate_micro_batch()
    plain.add_noise()
    expected = [p.grad.clone() for p in params]
    plain.zero_grad()
    shards = _FirstRows()
    sharded = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.1,
                          expected_batch_size=4, shards=shards)
    backward()
    sharded.accumulate_micro_batch()
    assert [p for p, _ in shards.reduced] == params
    for p, full in shards.reduced[2:4]:
        assert not full.any(), "a parameter without per-sample gradients is reduced with zeros"
    sharded.add_noise()
    for p, grad in zip(params, expected):
        rows = _FirstRows.rows(p)
        torch.testing.assert_close(p.grad[:rows], grad[:rows])
        assert p.grad[rows:].isnan().all(), "to_grad receives the shard only"
    sharded.noise_multiplier = 1.0
    sharded.add_noise()  # no clipped sums: noise of std σC/B on the shards only
    assert all(p.grad[: _FirstRows.rows(p)].std() > 0 for p in params if p.numel() > 2)
    hooks.remove()
    with pytest.raises(ValueError, match="shards"):
        DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=4,
                    shards=shards, noise_shares=2)
