"""``num_nodes=2`` for DPDDPStrategy and DPFSDPStrategy: two "nodes" on localhost, one process each, started
through Lightning's cluster environment variables (``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), as a cluster launcher starts them on separate machines. Without noise
each optimizer step equals one process on the union of the two nodes' batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import assert_resume_matches, check_steps, load, run_job
from tests.namespace import NAME  # noqa: F401  (Lightning test: run under both namespaces)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("num_nodes")
    run_job("num_nodes", out_dir, nodes=True)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_nodes", "fsdp_nodes"])
def test_two_nodes_without_noise_equal_one_process_on_the_union_batch(results, name):
    ranks = load(results, name)
    assert [r["global_rank"] for r in ranks] == [0, 1] and [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sample_rate"] == pytest.approx(2 * 8 / 64) and ranks[0]["expected_batch_size"] == 16
    check_steps(ranks)


@pytest.mark.slow
def test_ddp_resume_continues_every_ranks_own_streams(results):
    """Seeded DDP: 2 steps, a checkpoint, 2 more steps give the batches, ε and weights of 4 steps at once
    on both ranks; the two ranks never draw the same examples or noise (each restores its own states)."""
    whole, resumed = load(results, "ddp_uninterrupted"), load(results, "ddp_resumed")
    assert_resume_matches(whole, resumed)
    for (x0, _), (x1, _) in zip(resumed[0]["batches"], resumed[1]["batches"]):
        assert x0.shape != x1.shape or not torch.equal(x0, x1)


@pytest.mark.slow
def test_secure_aggregation_resume_continues_its_seeded_stream(results):
    """Seeded secure aggregation: the resumed run rounds and noises with the stream where the checkpoint
    left it, so 2 + 2 steps give the weights and ε of 4 steps at once (the pair keys are new in every
    fit: masks cancel whatever they are)."""
    assert_resume_matches(load(results, "sa_uninterrupted"), load(results, "sa_resumed"))
