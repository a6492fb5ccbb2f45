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


# --- a user's own sampler is replaced, with a warning naming it (issue 28) ------------------------------------
def _loader(**kwargs) -> DataLoader:
    data = TensorDataset(torch.randn(20, 2), torch.arange(20))
    return DataLoader(data, **kwargs)


class _PairBatches(torch.utils.data.Sampler):
    def __iter__(self):
        return iter([[i, i + 1] for i in range(0, 20, 2)])

    def __len__(self):
        return 10


@pytest.mark.parametrize("kwargs, named", [
    (dict(batch_size=4, sampler=torch.utils.data.WeightedRandomSampler(torch.ones(20), 20)), "sampler=WeightedRandomSampler"),
    (dict(batch_size=4, sampler=torch.utils.data.SubsetRandomSampler(range(10))), "sampler=SubsetRandomSampler"),
    (dict(batch_sampler=_PairBatches()), "batch_sampler=_PairBatches"),
])
def test_a_users_own_sampler_is_replaced_with_a_warning_that_names_it(kwargs, named):
    with pytest.warns(UserWarning, match=rf"{named} is replaced by Poisson sampling.*weight each example's loss"):
        loader = poisson_dataloader(_loader(**kwargs), generator=torch.Generator().manual_seed(0))
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)


@pytest.mark.parametrize("kwargs", [dict(batch_size=4), dict(batch_size=4, shuffle=True),
                                    dict(batch_size=4, sampler=torch.utils.data.DistributedSampler(
                                        TensorDataset(torch.zeros(20)), num_replicas=2, rank=0))])
def test_the_default_samplers_are_replaced_silently(kwargs, recwarn):
    poisson_dataloader(_loader(**kwargs), generator=torch.Generator().manual_seed(0))
    assert not [w for w in recwarn if "replaced by Poisson sampling" in str(w.message)]


def test_lightnings_distributed_wrapper_names_the_users_sampler():
    wrapper = pytest.importorskip("lightning.fabric.utilities.distributed").DistributedSamplerWrapper
    from lightning_dp.sampling import replaced_sampling

    sampler = wrapper(torch.utils.data.WeightedRandomSampler(torch.ones(20), 20), num_replicas=2, rank=0)
    assert replaced_sampling(_loader(batch_size=4, sampler=sampler)) == "sampler=WeightedRandomSampler"


@pytest.mark.lightning
def test_lightning_fit_warns_about_a_weighted_sampler(tmp_path):
    from tests.lightning_helpers import TinyClassifier, trainer_kwargs
    from tests.namespace import DPStrategy, pl

    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    loader = DataLoader(data, batch_size=8, sampler=torch.utils.data.WeightedRandomSampler(torch.ones(32), 32))
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0),
                         **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="sampler=WeightedRandomSampler is replaced by Poisson sampling"):
        trainer.fit(TinyClassifier(), loader)
