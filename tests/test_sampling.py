"""Poisson sampling: batch-size law, reachability, empty batches, loader conversion."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_dp import PoissonBatchSampler, poisson_dataloader
from lightning_dp.sampling import is_empty_batch


def test_batch_size_mean_and_variance_match_binomial():
    n, q, batches = 1000, 0.1, 3000
    sampler = PoissonBatchSampler(n, q, batches, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    mean, var = q * n, q * (1 - q) * n
    assert abs(sizes.mean().item() - mean) < 4 * (var / batches) ** 0.5
    # variance of the sample variance of a (near-)normal is 2σ⁴/(n-1)
    assert abs(sizes.var().item() - var) < 4 * var * (2 / (batches - 1)) ** 0.5


def test_every_example_is_reachable_and_batches_have_no_duplicates():
    sampler = PoissonBatchSampler(50, 0.2, 200, generator=torch.Generator().manual_seed(1))
    seen = set()
    for batch in sampler:
        assert len(batch) == len(set(batch))
        seen.update(batch)
    assert seen == set(range(50))


def test_default_number_of_batches_is_one_pass_in_expectation():
    assert len(PoissonBatchSampler(100, 0.25)) == 4


def test_poisson_dataloader_keeps_dataset_and_serves_empty_batches():
    data = TensorDataset(torch.randn(20, 3, 2), torch.arange(20))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    poisson = poisson_dataloader(loader, sample_rate=0.01, generator=torch.Generator().manual_seed(0))
    assert poisson.dataset is data and len(poisson) == len(loader)
    batches = list(poisson)
    empties = [b for b in batches if is_empty_batch(b)]
    assert empties, "with q=0.01 and N=20 most batches are empty"
    x, y = empties[0]
    assert x.shape == (0, 3, 2) and x.dtype == torch.float32 and y.shape == (0,) and y.dtype == torch.int64


def test_poisson_dataloader_default_rate_is_batch_over_dataset_size():
    loader = DataLoader(TensorDataset(torch.randn(40, 2)), batch_size=8)
    assert poisson_dataloader(loader).batch_sampler.sample_rate == pytest.approx(0.2)


def test_dict_batches_collate_empty():
    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"x": torch.ones(3) * i, "y": i}

    poisson = poisson_dataloader(DataLoader(DictData(), batch_size=1), sample_rate=1e-9)
    batch = next(iter(poisson))
    assert batch["x"].shape == (0, 3) and batch["y"].shape == (0,)


def test_iterable_dataset_is_refused_with_the_fix():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(ValueError, match="poisson_sampling=False"):
        poisson_dataloader(DataLoader(Stream(), batch_size=2))


@pytest.mark.parametrize("kwargs,name", [(dict(sample_rate=0.0), "sample_rate"), (dict(sample_rate=1.5), "sample_rate"),
                                         (dict(num_samples=0), "num_samples"), (dict(num_batches=0), "num_batches")])
def test_sampler_bad_arguments(kwargs, name):
    args = dict(num_samples=10, sample_rate=0.5, num_batches=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        PoissonBatchSampler(**args)
