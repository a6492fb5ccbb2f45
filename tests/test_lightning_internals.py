"""Every Lightning internal the adapter uses (all in ``lightning_dp/adapter/lightning_internals.py``) still
exists and means what the adapter takes it to mean, in the namespace under test (``make test`` runs this
module under ``lightning.pytorch`` and ``pytorch_lightning``). A failure says "Lightning changed
<attribute>: update lightning_dp/adapter/lightning_internals.py".

Under DDP, a 2-process run counts the collectives and their sizes: per optimizer step, one all-reduce of
the clipped, noised sums of the trainable parameters and nothing else gradient-sized; no all-reduce during
a backward pass (a raw-gradient bucket)."""
from __future__ import annotations

import importlib
import inspect
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp.adapter import lightning_internals as internals
from lightning_dp.adapter.lightning_internals import changed
from tests.distributed_helpers import run_launching_script
from tests.lightning_helpers import TinyClassifier, make_loader, trainer_kwargs
from tests.namespace import NAME, DPDDPStrategy, DPStrategy, ModelCheckpoint, PrivacyBudgetCallback, pl, submodule

WORKER = Path(__file__).with_name("lightning_internals_ddp_worker.py")


def _require(obj, attribute: str, where: str) -> None:
    assert hasattr(obj, attribute), changed(f"{where}.{attribute} (gone)")


class Probe(pl.Callback):
    """Calls ``read(trainer)`` at the given hooks and keeps ``(hook, batch_idx, value)``."""

    def __init__(self, read, hooks=("on_train_batch_start",)) -> None:
        self.read, self.hooks, self.seen = read, hooks, []

    def on_train_start(self, trainer, pl_module) -> None:
        if "on_train_start" in self.hooks:
            self.seen.append(("on_train_start", None, self.read(trainer)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "on_train_batch_start" in self.hooks:
            self.seen.append(("on_train_batch_start", batch_idx, self.read(trainer)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "on_train_batch_end" in self.hooks:
            _require(trainer, "_results", "Trainer")
            self.seen.append(("on_train_batch_end", batch_idx, self.read(trainer)))


# --- Trainer._results --------------------------------------------------------------------------------
def test_training_step_metrics_names_what_training_step_logged(tmp_path):
    probe = Probe(internals.training_step_metrics, hooks=("on_train_batch_end",))
    trainer = pl.Trainer(max_steps=2, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0),
                         callbacks=[probe], **trainer_kwargs(tmp_path))
    trainer.fit(TinyClassifier(), make_loader())
    assert probe.seen, "no training batch ran"
    for _, _, names in probe.seen:
        assert names == ["train_loss"], changed(
            f"Trainer._results (its metrics' meta.name/fx/logger: read {names!r} for self.log('train_loss'))")
    assert internals.training_step_metrics(object()) == []  # outside a loop


# --- fit_loop.epoch_loop.batch_progress.current.ready --------------------------------------------------
class RecordingSampler(torch.utils.data.Sampler):
    """A sequential sampler that reads ``epoch_micro_batches_done`` when an iteration starts, as the DP
    strategy's Poisson sampler does (``chunks_done``)."""

    def __init__(self, n: int) -> None:
        self.n, self.trainer, self.seen = n, None, []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        self.seen.append(internals.epoch_micro_batches_done(self.trainer))
        return iter(range(self.n))


def test_epoch_micro_batches_done_counts_the_epochs_batches_also_after_a_resume_mid_epoch(tmp_path):
    """4 batches an epoch; the first fit stops (and checkpoints) after 2. When an iteration starts, the
    count is the number of batches the loop will skip: 0 on a fresh epoch, on a resume the batch the
    resumed loop runs first (2; 1 on Lightning 2.4, which re-runs the batch its checkpoint was saved in);
    during a batch it is ``batch_idx + 1``."""
    def fit(max_steps, ckpt_path=None, root=tmp_path):
        probe = Probe(internals.epoch_micro_batches_done)
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
        trainer = pl.Trainer(max_steps=max_steps, callbacks=[probe, checkpoint],
                             **trainer_kwargs(root, enable_checkpointing=True))
        data = make_loader(n=64, batch_size=16).dataset
        sampler = RecordingSampler(len(data))
        sampler.trainer = trainer
        trainer.fit(TinyClassifier(), DataLoader(data, batch_size=16, sampler=sampler), ckpt_path=ckpt_path)
        return sampler.seen, [(b, d) for _, b, d in probe.seen]

    at_iter, batches = fit(2)
    assert at_iter == [0] and batches == [(0, 1), (1, 2)], changed(
        f"fit_loop.epoch_loop.batch_progress.current.ready (fresh epoch: {at_iter}, batches {batches})")
    at_iter, batches = fit(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), root=tmp_path / "resumed")
    first = batches[0][0]
    assert first in (1, 2) and at_iter == [first] and batches == [(first, first + 1), (first + 1, first + 2)], changed(
        f"fit_loop.epoch_loop.batch_progress.current.ready (resumed mid-epoch: {at_iter} when the iteration "
        f"started, batches {batches})")


# --- Trainer._val_check_time_interval ------------------------------------------------------------------
def test_a_time_based_val_check_interval_is_detected(tmp_path):
    kwargs = trainer_kwargs(tmp_path)
    assert not internals.val_check_is_time_based(pl.Trainer(val_check_interval=2, **kwargs))
    assert not internals.val_check_is_time_based(pl.Trainer(val_check_interval=0.5, **kwargs))
    try:
        trainer = pl.Trainer(val_check_interval=timedelta(seconds=30), **kwargs)
    except Exception:  # a release without time-based intervals (2.4: a TypeError) refuses one: nothing to detect
        assert not hasattr(pl.Trainer(**kwargs), "_val_check_time_interval")
        return
    _require(trainer, "_val_check_time_interval", "Trainer")
    assert internals.val_check_is_time_based(trainer), changed("Trainer._val_check_time_interval (None for 30 s)")
    string = pl.Trainer(val_check_interval="00:00:01:00", **kwargs)
    assert internals.val_check_is_time_based(string), changed("Trainer._val_check_time_interval (None for 1 min)")


# --- LightningModule.trainer (public) --------------------------------------------------------------------
def test_attached_trainer_is_the_trainer_or_none(tmp_path):
    module = TinyClassifier()
    assert internals.attached_trainer(module) is None, changed("LightningModule.trainer (detached)")
    assert internals.attached_trainer(None) is None
    trainer = pl.Trainer(max_steps=1, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0),
                         **trainer_kwargs(tmp_path))
    trainer.fit(module, make_loader())
    assert internals.attached_trainer(module) is trainer, changed("LightningModule.trainer (attached)")
    assert trainer.strategy.privacy_report().epsilon > 0


# --- SingleDeviceStrategy._root_device ------------------------------------------------------------------
def test_set_single_device_sets_the_root_device(tmp_path):
    base = submodule("strategies").SingleDeviceStrategy(device="cpu")
    _require(base, "_root_device", "SingleDeviceStrategy")
    assert internals.set_single_device(base, "meta") == torch.device("meta")
    assert base.root_device == torch.device("meta"), changed("SingleDeviceStrategy._root_device (root_device)")
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)  # device from the accelerator
    trainer = pl.Trainer(devices=1, strategy=strategy, **trainer_kwargs(tmp_path))
    assert trainer.strategy.root_device == torch.device("cpu")
    assert strategy.parallel_devices == []  # the user gave none: the connector filled root_device in


# --- ModelParallelStrategy._data_parallel_size ----------------------------------------------------------
def test_set_data_parallel_size_is_what_the_mesh_is_built_from():
    cls = submodule("strategies").ModelParallelStrategy
    strategy = cls()
    _require(strategy, "_data_parallel_size", "ModelParallelStrategy")
    assert strategy._data_parallel_size == "auto", changed("ModelParallelStrategy._data_parallel_size (default)")
    source = inspect.getsource(cls.setup_environment)
    assert 'self._data_parallel_size == "auto"' in source and "_setup_device_mesh(" in source, changed(
        "ModelParallelStrategy._data_parallel_size (setup_environment no longer builds the mesh from it)")
    internals.set_data_parallel_size(strategy, 4)
    assert strategy._data_parallel_size == 4


# --- Callback._generate_state_key (format) --------------------------------------------------------------
def test_the_callbacks_state_key_is_lightnings_format():
    callback = PrivacyBudgetCallback(epsilon_budget=3.0, metric_name="eps")
    _require(callback, "_generate_state_key", "Callback")
    assert callback.state_key == callback._generate_state_key(epsilon_budget=3.0, metric_name="eps"), changed(
        "Callback._generate_state_key (its key format: checkpoints would not find the callback's state)")
    assert callback.state_key == "PrivacyBudgetCallback{'epsilon_budget': 3.0, 'metric_name': 'eps'}"


# --- DistributedSamplerWrapper.dataset._sampler ---------------------------------------------------------
def test_wrapped_sampler_is_the_users_sampler_in_lightnings_ddp_wrapper():
    from lightning_dp.sampling import replaced_sampling

    wrapper = importlib.import_module(f"{NAME}.trainer.connectors.data_connector").DistributedSamplerWrapper
    inner = torch.utils.data.WeightedRandomSampler(torch.ones(20), 20)
    sampler = wrapper(inner, num_replicas=2, rank=0)
    _require(getattr(sampler, "dataset", None), "_sampler", "DistributedSamplerWrapper.dataset")
    assert internals.wrapped_sampler(sampler) is inner, changed("DistributedSamplerWrapper.dataset._sampler")
    plain = torch.utils.data.DistributedSampler(TensorDataset(torch.zeros(20)), num_replicas=2, rank=0)
    assert internals.wrapped_sampler(plain) is None and internals.wrapped_sampler(inner) is None
    loader = DataLoader(TensorDataset(torch.zeros(20)), batch_size=4, sampler=sampler)
    assert replaced_sampling(loader) == "sampler=WeightedRandomSampler"  # registered with the core on import


# --- DDP: the no-communication hook from public API only ------------------------------------------------
def test_dp_ddp_refuses_a_communication_hook_of_its_own():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    for kwargs in (dict(ddp_comm_hook=default_hooks.fp16_compress_hook),
                   dict(ddp_comm_wrapper=default_hooks.fp16_compress_wrapper), dict(ddp_comm_state=object())):
        with pytest.raises(ValueError, match="does not take a DDP communication hook"):
            DPDDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)
    DPDDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, ddp_comm_hook=None)  # the default: fine


def test_lightning_registers_no_hook_of_its_own_and_ddp_refuses_a_second(tmp_path, monkeypatch):
    """The hook comes from the public ``configure_ddp``; Lightning's own registration adds nothing without
    ``ddp_comm_hook`` (or DDP would refuse ours, loudly: checked too)."""
    import torch.distributed as dist

    hooks = []
    register = torch.nn.parallel.DistributedDataParallel.register_comm_hook
    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "register_comm_hook",
                        lambda self, state, hook: (hooks.append(hook.__name__), register(self, state, hook))[1])
    strategy = DPDDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    trainer = pl.Trainer(devices=1, max_steps=1, strategy=strategy, **trainer_kwargs(tmp_path))
    try:
        trainer.fit(TinyClassifier(), make_loader())
        assert hooks == ["_local_gradients_only"], changed(f"DDPStrategy.configure_ddp (comm hooks: {hooks})")
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        ddp.register_comm_hook(None, _no_op)
        with pytest.raises(RuntimeError, match="only be called once"):
            ddp.register_comm_hook(None, _no_op)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _no_op(state: object, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


_no_op.__annotations__ = {  # real types, not strings: DDP checks the hook's signature
    "state": object, "bucket": torch.distributed.GradBucket, "return": torch.futures.Future[torch.Tensor],
}


def _collectives_by_phase(record: dict) -> dict:
    """The collectives started inside the training batches, sorted into the phase they started in:
    ``backward`` (a backward pass), ``step`` (optimizer step) or ``other`` (the rest of a batch)."""
    phases = record["phases"]
    batches = [p for p in phases if p["name"].startswith("batch:")]
    first, last = min(p["start"] for p in batches), max(p["end"] for p in batches)
    out: dict = {"backward": [], "step": [], "other": []}
    for c in record["collectives"]:
        if not first <= c["start"] <= last:
            continue
        inside = [p["name"].split(":")[0] for p in phases if p["start"] <= c["start"] <= p["end"]]
        kind = "backward" if "backward" in inside else "step" if "step" in inside else "other"
        numel = sum(int(torch.Size(s).numel()) for s in c["shapes"]) if c["shapes"] else 0
        out[kind].append((c["name"], numel, [p["name"] for p in phases if p["start"] <= c["start"] <= p["end"]]))
    return out


def check_only_noised_sums_cross_ranks(record: dict) -> None:
    """Per optimizer step exactly one all-reduce, of the trainable parameters' size (the noised clipped
    sums, in one bucket of ``all_reduce_sum_coalesced``); no all-reduce anywhere else in a batch, none in a
    backward pass; the other collectives in a batch are bookkeeping of at most ``#params + 1`` elements:
    Lightning's SIGTERM flag (a 1-element broadcast per batch, 2.6) and DDP's bucket rebuild after the
    first step (a broadcast of the ``#params + 1`` parameter indices, then of 1 bucket count)."""
    trainable = sum(numel for _, numel, _, _ in record["trainable"])
    by_phase = _collectives_by_phase(record)
    assert by_phase["backward"] == [], changed(
        f"DDPStrategy.configure_ddp: collectives during a backward pass (raw gradients?): {by_phase['backward']}")
    reduces = [(name, numel) for name, numel, _ in by_phase["step"] if name == "gloo:all_reduce"]
    assert reduces == [("gloo:all_reduce", trainable)] * record["steps"], (
        f"per step one all-reduce of {trainable} elements expected, got {reduces}")
    assert all(name != "gloo:all_reduce" for name, _, _ in by_phase["other"] + by_phase["step"][len(reduces):])
    small = len(record["trainable"]) + 1
    big = [c for c in by_phase["other"] + by_phase["step"] if c[0] != "gloo:all_reduce" and c[1] > small]
    assert big == [], f"gradient-sized collectives outside the noised sums' all-reduce: {big}"


@pytest.mark.slow
def test_under_ddp_only_the_noised_clipped_sums_are_all_reduced(tmp_path):
    """2 ranks, accumulate_grad_batches=2, 2 steps (4 micro-batches): the bytes all-reduced per step are
    the trainable parameters' (83 float32 = 332 bytes), after the backward passes; none between the two
    backward passes of a window, none during one."""
    run_launching_script(WORKER, "dp", tmp_path)
    records = [torch.load(tmp_path / f"collectives.rank{r}.pt", weights_only=False) for r in (0, 1)]
    for record in records:
        assert record["hook"] == "lightning_dp" and record["steps"] == 2 and record["batches"] == 4
        assert {dtype for _, _, _, dtype in record["trainable"]} == {"torch.float32"}
        check_only_noised_sums_cross_ranks(record)
        bytes_per_step = [4 * numel for name, numel, _ in _collectives_by_phase(record)["step"]
                          if name == "gloo:all_reduce"]
        assert bytes_per_step == [4 * 83] * 2


@pytest.mark.slow
@pytest.mark.skipif(NAME != "lightning.pytorch", reason="checks the check itself: once, under the first namespace")
def test_the_collective_check_catches_raw_gradients_without_the_hook(tmp_path):
    """The fault the check exists for: without the no-communication hook (Lightning's ``configure_ddp``
    alone, as if its hook registration moved), DDP all-reduces each stepping micro-batch's raw gradients
    during backward (an 83-element bucket; ``no_sync`` spares the accumulating one), and the check fails."""
    run_launching_script(WORKER, "no_hook", tmp_path)
    for r in (0, 1):
        record = torch.load(tmp_path / f"collectives.rank{r}.pt", weights_only=False)
        raw = [(name, numel) for name, numel, _ in _collectives_by_phase(record)["backward"]]
        assert raw == [("gloo:all_reduce", 83)] * 2
        with pytest.raises(AssertionError, match="collectives during a backward pass"):
            check_only_noised_sums_cross_ranks(record)
