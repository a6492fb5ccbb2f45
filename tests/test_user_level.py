"""User-level privacy (issue 31): a user's gradient is the mean of their records' gradients, clipped as one unit.

Checked against a float64 reference with noise 0 and every user sampled (q = 1): per-record gradients one at a
time, averaged per user, clipped per user (flat, per layer or automatic), summed and divided by the number of
users; through ``make_private`` and the Trainer strategy, in every clipping mode, with users holding more
records than ``k`` (capped) and fewer, with accumulation and physical micro-batches; ε against dp-accounting's
PLD at the user rate; the refusals; the report."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import make_private
from tests.namespace import NAME, pl
from lightning_dp.clipping import AUTOMATIC_STABILITY
from lightning_dp.user_sampling import UserPlan, user_chunks, user_poisson_dataloader
from tests.conftest import microbatch_grads
from tests.dp_accounting_reference import poisson_gaussian_epsilon

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("auto", "ghost", "materialize")
CLIPPINGS = ("flat", "per_layer", "automatic")
# u0..u5 hold 1, 2, 3, 5, 1, 4 records (k = 3 caps u3 and u5), in shuffled dataset order
NORM = 2.0  # users' mean-gradient norms are 1.2 to 6.5 here: some users are clipped, some are not
USER_IDS = ["u3", "u1", "u5", "u3", "u2", "u5", "u0", "u3", "u2", "u5", "u3", "u4", "u5", "u1", "u2", "u3"]


class Net(nn.Module):
    """Embedding, Conv1d (a factored part without its own grouping), LayerNorm (materialised parts) and
    Linear over positions and over one position: every kind of part."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.norm = nn.LayerNorm(3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)  # (B, 4, 3)
        h = torch.tanh(self.mix(self.norm(h)))
        return self.head(h.flatten(1))


def dataset(n: int = len(USER_IDS), seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (n, 5), generator=g)
    return TensorDataset(tokens, torch.randint(0, 3, (n,), generator=g))


def user_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, units: torch.Tensor, max_grad_norm: float,
                   denominator: float, clipping: str = "flat") -> dict:
    """float64: each user's mean record gradient, clipped per user, summed, divided by ``denominator``."""
    grads = microbatch_grads(model, x, lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"))
    users = units.unique()
    per_user = {n: torch.stack([g[units == u].mean(0) for u in users]) for n, g in grads.items()}
    flat = torch.cat([g.flatten(1) for g in per_user.values()], 1).norm(dim=1)
    bound = max_grad_norm / math.sqrt(len(per_user))
    out = {}
    for name, g in per_user.items():
        if clipping == "flat":
            factors = torch.clamp(max_grad_norm / flat, max=1.0)
        elif clipping == "per_layer":
            factors = torch.clamp(bound / g.flatten(1).norm(dim=1), max=1.0)
        else:
            factors = max_grad_norm / (flat + AUTOMATIC_STABILITY)
        out[name] = torch.einsum("u,u...->...", factors, g) / denominator
    return out


def _moved(before: dict, model: nn.Module, lr: float) -> dict:
    return {n: (before[n] - p.detach()).double() / lr for n, p in model.named_parameters()}


# --- the core: grouping parts by user -------------------------------------------------------------------------
def test_user_plan_caps_each_user_at_k_and_keeps_users_together():
    plan = UserPlan(USER_IDS, max_records_per_user=3)
    assert (plan.num_users, plan.num_records, plan.largest_user) == (6, 16, 5)
    records, units = plan.records_of(torch.arange(6), torch.Generator().manual_seed(1))
    # users numbered by first appearance: u3 (5 records), u1, u5 (4), u2, u0, u4; u3 and u5 capped at k = 3
    assert torch.bincount(units).tolist() == [3, 2, 3, 3, 1, 1]
    assert [plan.record_user[r].item() for r in records] == units.tolist()  # each record is its user's
    assert len(set(records)) == len(records)
    assert units.tolist() == sorted(units.tolist())  # each user's records together
    draws = {tuple(plan.records_of(torch.tensor([0]), torch.Generator().manual_seed(s))[0]) for s in range(20)}
    assert len(draws) > 3  # the capped user's k records are drawn anew each time


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_make_private_step_is_the_per_user_clipped_mean(mode, clipping):
    torch.manual_seed(0)
    model, data = Net(), dataset()
    plan_ids, k, lr, norm = USER_IDS, 3, 0.5, NORM if clipping != "automatic" else 1.0
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=norm,
                       expected_batch_size=6, privacy_unit="user", user_ids=plan_ids, max_records_per_user=k,
                       clipping_mode=mode, clipping=clipping)
    assert opt.sample_rate == 1.0 and opt.privacy.users.num_users == 6
    loader = user_poisson_dataloader(DataLoader(data, batch_size=6), opt.privacy.users, num_batches=1,
                                     generator=torch.Generator().manual_seed(3))
    (x, y), units = next(iter(loader))
    assert sorted(torch.bincount(units).tolist()) == [1, 1, 2, 3, 3, 3]  # capped at k = 3, every user in
    reference = user_reference(model, x, y, units, norm, 6, clipping)
    before = copy.deepcopy(model.state_dict())
    F.cross_entropy(model(x), y).backward()
    opt.step(units=units)
    for name, moved in _moved(before, model, lr).items():
        torch.testing.assert_close(moved, reference[name], rtol=1e-4, atol=1e-6)


def test_micro_batches_split_at_user_boundaries_give_the_same_step():
    torch.manual_seed(0)
    model, data = Net(), dataset()
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=NORM,
                       expected_batch_size=6, privacy_unit="user", user_ids=USER_IDS, max_records_per_user=3)
    loader = user_poisson_dataloader(DataLoader(data, batch_size=3), opt.privacy.users, micro_batches=2,
                                     num_batches=1, generator=torch.Generator().manual_seed(3))
    batches = list(loader)
    assert len(batches) == 2
    x = torch.cat([b[0][0] for b in batches])
    y = torch.cat([b[0][1] for b in batches])
    units = torch.cat([b[1] for b in batches])
    reference = user_reference(model, x, y, units, NORM, 6)
    before = copy.deepcopy(model.state_dict())
    for (bx, by), bunits in batches:  # accumulation: two micro-batches, one step
        for (cx, cy), cunits in user_chunks((bx, by), bunits, 4):  # physical chunks of at most 4 records
            assert cunits.numel() <= 4
            F.cross_entropy(model(cx), cy).backward()
            opt.accumulate_micro_batch(units=cunits, scale=1.0)
            opt.zero_grad()
    opt.step()
    for name, moved in _moved(before, model, 1.0).items():
        torch.testing.assert_close(moved, reference[name], rtol=1e-4, atol=1e-6)


def test_a_user_split_across_micro_batches_of_a_step_is_refused():
    model = Net()
    x, y = dataset(4)[:]
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                       expected_batch_size=2, privacy_unit="user", user_ids=[0, 0, 1, 1])
    F.cross_entropy(model(x[:3]), y[:3]).backward()
    opt.accumulate_micro_batch(units=torch.tensor([0, 0, 1]))
    opt.zero_grad()
    F.cross_entropy(model(x[3:]), y[3:]).backward()
    with pytest.raises(RuntimeError, match=r"user\(s\) \[1\] are split across micro-batches"):
        opt.accumulate_micro_batch(units=torch.tensor([1]))


def test_user_level_steps_need_units():
    model = Net()
    x, y = dataset(4)[:]
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=2, privacy_unit="user", user_ids=[0, 0, 1, 1])
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="pass each record's user id as `units`"):
        opt.step()
    with pytest.raises(ValueError, match="one integer user id per record"):
        opt.step(units=torch.tensor([0, 1]))


def test_epsilon_is_the_pld_of_the_user_rate():
    model = Net()
    data = dataset()
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=1.0,
                       expected_batch_size=2, privacy_unit="user", user_ids=USER_IDS, max_records_per_user=3, seed=0)
    q = 2 / 6  # users, not records (16)
    assert opt.sample_rate == pytest.approx(q) and opt.expected_batch_size == 2
    loader = user_poisson_dataloader(DataLoader(data, batch_size=2), opt.privacy.users, num_batches=5,
                                     generator=torch.Generator().manual_seed(0))
    for (x, y), units in loader:
        if units.numel():
            F.cross_entropy(model(x), y).backward()
        opt.step(units=units)
        opt.zero_grad()
    assert opt.steps_taken == 5
    assert opt.get_epsilon(1e-5) == pytest.approx(poisson_gaussian_epsilon(1.3, q, 5, 1e-5), rel=1e-2)


@pytest.mark.parametrize("arguments, message", [
    (dict(privacy_unit="user"), "needs `user_ids`"),
    (dict(privacy_unit="user", user_ids=[0, None, 1, 1]), r"`user_ids`\[1\] is None"),
    (dict(privacy_unit="user", user_ids=[0, 0, 1, 1], max_records_per_user=0), "max_records_per_user"),
    (dict(privacy_unit="people", user_ids=[0, 0, 1, 1]), "privacy_unit"),
    (dict(privacy_unit="user", user_ids=[0, 0, 1, 1], bands=2, num_steps=4), "bands=1"),
])
def test_refusals(arguments, message):
    model = Net()
    with pytest.raises(ValueError, match=message):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=2, **arguments)


def test_user_ids_of_another_length_than_the_dataset_are_refused():
    plan = UserPlan([0, 0, 1])
    with pytest.raises(ValueError, match="holds 3 ids but the training dataset has 16"):
        user_poisson_dataloader(DataLoader(dataset(), batch_size=2), plan)


def test_a_user_longer_than_a_physical_batch_is_refused():
    with pytest.raises(ValueError, match="smaller than the 3 records of one sampled user"):
        user_chunks(torch.zeros(4), torch.tensor([0, 1, 1, 1]), 2)


# --- the Trainer strategy ---------------------------------------------------------------------------------------
class UserModule(pl.LightningModule):
    """``Net`` in a LightningModule; each record carries its dataset index, so the test knows its user."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.net, self.lr = Net(), lr
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        tokens, y, index = batch
        self.seen.append((tokens.clone(), y.clone(), index.clone()))
        return F.cross_entropy(self.net(tokens), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def indexed_loader(batch_size: int) -> DataLoader:
    tokens, y = dataset()[:]
    return DataLoader(TensorDataset(tokens, y, torch.arange(len(y))), batch_size=batch_size)


def fit_user_level(tmp_path, batch_size: int = 6, strategy_kwargs=None, **trainer_overrides):
    from tests.lightning_helpers import trainer_kwargs
    from tests.namespace import DPStrategy

    torch.manual_seed(0)
    module = UserModule()
    initial = copy.deepcopy(module.net)
    options = dict(noise_multiplier=0.0, max_grad_norm=NORM, seed=5, privacy_unit="user", user_ids=USER_IDS,
                   max_records_per_user=3)
    strategy = DPStrategy(**{**options, **(strategy_kwargs or {})})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, **trainer_overrides), strategy=strategy)
    trainer.fit(module, train_dataloaders=indexed_loader(batch_size))
    return trainer, module, initial


def check_trainer_step(module, initial, clipping: str = "flat", norm: float = None):
    norm = NORM if norm is None else norm
    tokens = torch.cat([s[0] for s in module.seen])
    y = torch.cat([s[1] for s in module.seen])
    index = torch.cat([s[2] for s in module.seen])
    units = UserPlan(USER_IDS).record_user[index]
    assert sorted(torch.bincount(units).tolist()) == [1, 1, 2, 3, 3, 3]  # q = 1: every user, capped at k = 3
    reference = user_reference(initial, tokens, y, units, norm, 6, clipping)
    for name, p in module.net.named_parameters():
        moved = (dict(initial.named_parameters())[name].detach() - p.detach()).double() / module.lr
        torch.testing.assert_close(moved, reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode, clipping", [("auto", "flat"), ("ghost", "per_layer"), ("materialize", "automatic"),
                                            ("ghost", "automatic"), ("materialize", "flat"), ("auto", "per_layer")])
def test_trainer_strategy_step_is_the_per_user_clipped_mean(tmp_path, mode, clipping):
    norm = 1.0 if clipping == "automatic" else NORM
    trainer, module, initial = fit_user_level(
        tmp_path, strategy_kwargs=dict(clipping_mode=mode, clipping=clipping, max_grad_norm=norm))
    strategy = trainer.strategy
    assert (strategy.sample_rate, strategy.expected_batch_size, strategy.dataset_size) == (1.0, 6, 6)
    check_trainer_step(module, initial, clipping, norm)


def test_trainer_accumulation_and_physical_batches_split_at_user_boundaries(tmp_path):
    # batch_size 3 users per micro-batch, 2 micro-batches per step: q = 2·3/6 = 1; chunks of at most 4 records
    trainer, module, initial = fit_user_level(tmp_path, batch_size=3, accumulate_grad_batches=2,
                                              strategy_kwargs=dict(max_physical_batch_size=4))
    assert trainer.strategy.sample_rate == 1.0 and trainer.strategy.privacy.steps_taken == 1
    assert len(module.seen) >= 3 and all(len(s[1]) <= 4 for s in module.seen)
    for tokens, y, index in module.seen:  # no user in two chunks
        users = set(UserPlan(USER_IDS).record_user[index].tolist())
        others = {u for t2, y2, i2 in module.seen if i2 is not index for u in UserPlan(USER_IDS).record_user[i2].tolist()}
        assert not users & others
    check_trainer_step(module, initial)


def test_trainer_report_and_epsilon_are_per_user(tmp_path):
    from tests.lightning_helpers import trainer_kwargs
    from tests.namespace import DPStrategy

    strategy = DPStrategy(noise_multiplier=1.1, max_grad_norm=1.0, seed=5, privacy_unit="user", user_ids=USER_IDS,
                          max_records_per_user=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4), strategy=strategy)
    trainer.fit(UserModule(), train_dataloaders=indexed_loader(2))
    q = 2 / 6
    assert strategy.sample_rate == pytest.approx(q) and strategy.privacy.steps_taken == 4
    assert strategy.get_epsilon(1e-5) == pytest.approx(poisson_gaussian_epsilon(1.1, q, 4, 1e-5), rel=1e-2)
    report = strategy.privacy_report()
    assert "user-level (3 records per user at most, 6 users)" in report.to_table()
    assert "one user with all of their records" in report.to_markdown()
    assert report.group_privacy is None and report.to_dict()["privacy_unit"] == "user"
    state = strategy.privacy.state_dict()
    assert state["privacy_unit"] == "user" and state["users"]["num_users"] == 6


def test_record_level_report_names_group_privacy_for_k_records(tmp_path):
    from tests.lightning_helpers import trainer_kwargs
    from tests.namespace import DPStrategy

    strategy = DPStrategy(noise_multiplier=1.1, max_grad_norm=1.0, seed=5, user_ids=USER_IDS)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3), strategy=strategy)
    trainer.fit(UserModule(), train_dataloaders=indexed_loader(4))
    report = strategy.privacy_report()
    eps, k = report.epsilon, 5  # the largest user holds 5 records
    assert report.privacy_unit == "record" and report.group_privacy["group_size"] == k
    assert report.group_privacy["epsilon"] == pytest.approx(k * eps)
    assert report.group_privacy["delta"] == pytest.approx(min(1.0, 1e-5 * sum(math.exp(i * eps) for i in range(k))))
    table = report.to_table()
    assert "record-level (one training example)" in table and "Group privacy (a person with 5 records)" in table
    assert "Vadhan 2017" in table


def test_trainer_refusals(tmp_path):
    from tests.lightning_helpers import trainer_kwargs
    from tests.namespace import DPStrategy

    with pytest.raises(ValueError, match="needs `user_ids`"):
        DPStrategy(noise_multiplier=1.0, privacy_unit="user")
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        DPStrategy(noise_multiplier=1.0, privacy_unit="user", user_ids=[0], poisson_sampling=False)
    with pytest.raises(ValueError, match="smaller than `max_records_per_user`"):
        DPStrategy(noise_multiplier=1.0, privacy_unit="user", user_ids=[0], max_records_per_user=3,
                   max_physical_batch_size=2)
    strategy = DPStrategy(noise_multiplier=1.0, privacy_unit="user", user_ids=USER_IDS[:-1])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1), strategy=strategy)
    with pytest.raises(Exception, match="holds 15 ids but the training dataset has 16"):
        trainer.fit(UserModule(), train_dataloaders=indexed_loader(2))


# --- two processes (DDP) --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode, clipping", [
    ("auto", "flat"),
    # clipping modes do not depend on the Lightning namespace: the second one runs under the first namespace only
    pytest.param("materialize", "per_layer", marks=pytest.mark.skipif(
        NAME != "lightning.pytorch", reason="namespace-independent")),
])
def test_ddp_samples_users_once_and_keeps_each_users_records_on_one_rank(tmp_path, mode, clipping):
    from pathlib import Path

    from tests.distributed_helpers import run_launching_script

    run_launching_script(Path(__file__).with_name("user_level_ddp_worker.py"), mode, clipping, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [(r["sample_rate"], r["expected_batch_size"], r["steps"]) for r in ranks] == [(1.0, 6, 1)] * 2
    record_user = UserPlan(USER_IDS).record_user
    users_of = [set(record_user[torch.cat([s[2] for s in r["seen"]])].tolist()) for r in ranks]
    assert users_of[0] == {0, 2, 4} and users_of[1] == {1, 3, 5}  # rank r decides for users r, r + W, …
    index = torch.cat([s[2] for r in ranks for s in r["seen"]])
    tokens = torch.cat([s[0] for r in ranks for s in r["seen"]])
    y = torch.cat([s[1] for r in ranks for s in r["seen"]])
    net = Net()
    net.load_state_dict(ranks[0]["initial"])
    norm = 1.0 if clipping == "automatic" else NORM
    reference = user_reference(net, tokens, y, record_user[index], norm, 6, clipping)
    for r in ranks:
        for name, value in ranks[0]["initial"].items():
            moved = (value - r["final"][name]).double() / 0.5
            torch.testing.assert_close(moved, reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode, clipping", [("auto", "flat"), ("materialize", "per_layer"), ("ghost", "automatic")])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_fabric_step_is_the_per_user_clipped_mean(mode, clipping, accumulate):
    """Fabric's DPStrategy with privacy_unit="user": every user sampled (q = 1), k = 3, one step of
    ``accumulate`` micro-batches (users never split) equals the float64 per-user reference."""
    L = pytest.importorskip("lightning")
    from lightning_dp.fabric import DPStrategy as FabricDPStrategy

    norm = 1.0 if clipping == "automatic" else NORM
    torch.manual_seed(0)
    net = Net()
    initial = copy.deepcopy(net)
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=FabricDPStrategy(
        noise_multiplier=0.0, max_grad_norm=norm, seed=5, privacy_unit="user", user_ids=USER_IDS,
        max_records_per_user=3, clipping_mode=mode, clipping=clipping, accumulate_grad_batches=accumulate))
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.5))
    loader = fabric.setup_dataloaders(indexed_loader(batch_size=6 // accumulate))
    assert fabric.strategy.sample_rate == 1.0 and fabric.strategy.privacy.expected_batch_size == 6
    seen = []
    for i, (tokens, y, index) in enumerate(loader):
        seen.append((tokens, y, index))
        fabric.backward(F.cross_entropy(model(tokens), y))
        if i + 1 == accumulate:
            optimizer.step()
            break
    tokens, y, index = (torch.cat([s[j] for s in seen]) for j in range(3))
    units = UserPlan(USER_IDS).record_user[index]
    assert sorted(torch.bincount(units).tolist()) == [1, 1, 2, 3, 3, 3]
    reference = user_reference(initial, tokens, y, units, norm, 6, clipping)
    for name, p in net.named_parameters():
        moved = (dict(initial.named_parameters())[name].detach() - p.detach()).double() / 0.5
        torch.testing.assert_close(moved, reference[name], rtol=1e-4, atol=1e-6)
    assert "user-level" in fabric.strategy.privacy_report().to_table()
