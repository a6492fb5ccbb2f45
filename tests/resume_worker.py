"""Run by tests/test_resume_crash.py: DP training processes that may be SIGKILLed mid-epoch and resumed.

Usage::

    python tests/resume_worker.py CONFIG.json          # one run in this process
    python tests/resume_worker.py --plan PLAN.json     # several runs, one forked process each

``--plan``: importing Lightning takes seconds, a run a fraction of one, so this process imports once and
forks a fresh child process per run (nothing computed yet: no thread pools, no state to inherit). A
child that is SIGKILLed dies like any process; the run resuming from its checkpoint is another child,
forked from the same untouched parent, so nothing from the killed process's memory reaches it.
``PLAN.json`` holds ``{"namespace": ..., "parallel": 2, "status": PATH, "jobs": [{"name", "config",
"after"}, ...]}``: a job starts once the job named in its ``after`` (if any) has ended, at most
``parallel`` at a time, in order. Each child's stdout and stderr go to ``config["out"] + ".stderr"``;
``status`` receives ``{name: exit status}`` with ``-N`` for death by signal N (as ``subprocess``).

``CONFIG.json`` holds a dict:

* ``namespace``: ``"pytorch_lightning"`` (default) or ``"lightning.pytorch"``: the Lightning package the
  Trainer, the callbacks and the LightningModule come from.
* ``mode``: ``"crash"`` (train; a callback SIGKILLs this process), ``"resume"`` (``fit(ckpt_path=...)``)
  or ``"full"`` (train uninterrupted).
* ``dir``: checkpoint directory (``ModelCheckpoint(dirpath=dir, save_last=True, ...)``).
* ``out``: where to write the result (JSON). Every training micro-batch is also appended, as one JSON
  line, to ``out + ".log"`` as it runs, so a process that is killed leaves a record of what it did:
  ``{"event": "batch", ...}`` from the LightningModule's ``on_train_batch_start`` (after the callbacks, so
  a batch a callback kills at is not logged; empty Poisson micro-batches are logged too, with ``idx``
  ``[]``: the strategy does not call ``training_step`` for those) and, for every optimizer step,
  ``{"event": "step", "global_step": <before the step>, "samples": <examples the DP optimizer summed
  into it, over all its micro-batches in this process>}`` from ``on_before_optimizer_step``.
* ``max_steps``, ``accumulate`` (``accumulate_grad_batches``), ``n`` (dataset size), ``batch_size``.
* ``kill_step`` and ``kill_at`` (crash mode): ``"batch_start"`` kills in ``on_train_batch_start`` of the
  first batch that starts at ``global_step == kill_step`` (the checkpoint of step ``kill_step`` is then
  written); ``"batch_end"`` kills in ``on_train_batch_end`` once ``global_step == kill_step + 1``, i.e.
  after step ``kill_step + 1`` was taken but before ModelCheckpoint (which Lightning always runs after
  the other callbacks) could write it; ``"inside_window"`` saves ``dir/inside.ckpt`` with
  ``trainer.save_checkpoint`` in ``on_train_batch_end`` once ``global_step == kill_step`` and ``inside``
  (default 1) micro-batches of the next accumulation window were trained, then kills in the next
  ``on_train_batch_start``: a checkpoint inside a window (``batch_progress.current.ready % k == inside``).
* ``every_n_train_steps`` (default 1), ``val_check_interval`` (default None: no validation). With a
  validation interval the checkpoint is written at validation end instead (``every_n_train_steps=None``:
  ModelCheckpoint's default trigger; an explicit 0 would turn every_n_epochs off too and save nothing).
* ``ckpt`` (resume mode): the checkpoint to resume from (default ``dir/last.ckpt``).
* ``sigma``, ``seed``.

The result: ``epsilon`` (at δ = 1e-5), ``global_step``, ``history`` (the accountant's), ``sample_rate``,
``total_steps``, ``weights`` (final state dict as lists), ``warnings`` (messages mentioning resuming) and,
when resuming, ``ckpt_global_step`` / ``ckpt_history`` / ``ckpt_batch_progress`` (what the checkpoint
held) and ``resumed_inside_window`` (the empty micro-batches the DP sampler served to finish a window the
checkpoint was saved inside).
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

DELTA = 1e-5


def make_dataset(n: int, seed: int = 0) -> TensorDataset:
    """``TinyClassifier``'s data plus each example's index as a third tensor (to record who was sampled)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y, torch.arange(n))


def make_module_class(pl, log_path: str):
    """A ``TinyClassifier`` on ``pl.LightningModule`` of the chosen namespace that logs every micro-batch."""

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def on_train_batch_start(self, batch, batch_idx):
            # here, not in training_step: the DP strategy skips training_step for an empty Poisson batch
            loop = self.trainer.fit_loop.epoch_loop
            _log(log_path, {
                "event": "batch", "epoch": self.trainer.current_epoch, "batch_idx": batch_idx,
                "ready": loop.batch_progress.current.ready, "global_step": self.trainer.global_step,
                "idx": batch[2].tolist(),
            })

        def on_before_optimizer_step(self, optimizer):
            # called after the step's last backward, before the DP optimizer noises and steps
            _log(log_path, {
                "event": "step", "global_step": self.trainer.global_step,
                "samples": self.trainer.strategy.dp_optimizer.samples_in_step,
            })

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Tiny


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def strategy_class(namespace: str):
    """``DPStrategy`` for the given Lightning namespace: ``lightning_dp.DPStrategy`` when it is a strategy of
    that namespace, else the namespace's own module (``lightning_dp.pytorch_lightning`` or
    ``lightning_dp.lightning``, where the package provides them)."""
    import lightning_dp

    base = importlib.import_module(f"{namespace}.strategies").Strategy
    top = getattr(lightning_dp, "DPStrategy", None)
    if isinstance(top, type) and issubclass(top, base):
        return top
    module = {"pytorch_lightning": "pytorch_lightning", "lightning.pytorch": "lightning"}[namespace]
    return importlib.import_module(f"lightning_dp.{module}").DPStrategy


def make_killer_class(pl, kill_step: int, kill_at: str, log_path: str, inside: int = 1, ckpt_dir: str = ""):
    class Killer(pl.Callback):
        saved = False

        def _kill(self, trainer, where):
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            _log(log_path, {"event": "kill", "where": where, "global_step": trainer.global_step, "ready": ready})
            os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if kill_at == "batch_start" and trainer.global_step == kill_step:
                self._kill(trainer, "batch_start")
            if kill_at == "inside_window" and self.saved:
                self._kill(trainer, "inside_window")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if kill_at == "batch_end" and trainer.global_step == kill_step + 1:
                self._kill(trainer, "batch_end")
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            if (kill_at == "inside_window" and not self.saved and trainer.global_step == kill_step
                    and ready % trainer.accumulate_grad_batches == inside):
                path = os.path.join(ckpt_dir, "inside.ckpt")
                trainer.save_checkpoint(path)
                self.saved = True
                _log(log_path, {"event": "save", "path": path, "global_step": trainer.global_step, "ready": ready})

    return Killer


def main(config: dict) -> None:
    namespace = config.get("namespace", "pytorch_lightning")
    pl = importlib.import_module(namespace)
    ModelCheckpoint = importlib.import_module(f"{namespace}.callbacks").ModelCheckpoint
    DPStrategy = strategy_class(namespace)

    torch.set_num_threads(1)
    mode = config["mode"]
    out = config["out"]
    log_path = out + ".log"
    torch.manual_seed(0)
    model = make_module_class(pl, log_path)()

    val_check_interval = config.get("val_check_interval")
    checkpoint = ModelCheckpoint(
        dirpath=config["dir"],
        save_last=True,
        every_n_train_steps=config.get("every_n_train_steps", None if val_check_interval else 1),
    )
    callbacks = [checkpoint]
    if mode == "crash":
        callbacks.append(make_killer_class(pl, config["kill_step"], config["kill_at"], log_path,
                                           config.get("inside", 1), config["dir"])())
    strategy = DPStrategy(noise_multiplier=config.get("sigma", 1.0), max_grad_norm=1.0, seed=config.get("seed", 0))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=config["max_steps"],
        accumulate_grad_batches=config.get("accumulate", 1),
        val_check_interval=val_check_interval,
        limit_val_batches=1 if val_check_interval else 0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=config["dir"],
    )
    dataset = make_dataset(config.get("n", 64))
    train = DataLoader(dataset, batch_size=config.get("batch_size", 8), shuffle=True)
    val = DataLoader(dataset, batch_size=config.get("batch_size", 8)) if val_check_interval else None

    result: dict = {}
    ckpt_path = None
    if mode == "resume":
        ckpt_path = config.get("ckpt") or os.path.join(config["dir"], "last.ckpt")
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        result["ckpt_global_step"] = saved["global_step"]
        result["ckpt_history"] = [list(e) for e in saved["lightning_dp"]["accountant"]["history"]]
        result["ckpt_batch_progress"] = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    result.update(
        epsilon=strategy.get_epsilon(DELTA),
        global_step=trainer.global_step,
        current_epoch=trainer.current_epoch,
        history=[list(e) for e in strategy.accountant.history],
        total_steps=strategy.accountant.total_steps,
        sample_rate=strategy.sample_rate,
        noise_multiplier=strategy.noise_multiplier,
        weights={k: v.tolist() for k, v in model.state_dict().items()},
        warnings=[str(w.message) for w in caught if "resum" in str(w.message).lower()],
        resumed_inside_window=getattr(strategy.data.sampler, "resumed_inside_window", None),
    )
    with open(out, "w") as f:
        json.dump(result, f)


def _child(config: dict) -> None:
    """In a forked child: run ``config`` with output to its ``.stderr`` file, then leave without cleanup."""
    code = 1
    try:
        fd = os.open(config["out"] + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        main(config)
        code = 0
    except BaseException:  # noqa: BLE001 - report anything, then exit the child
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_plan(plan: dict) -> None:
    namespace = plan.get("namespace", "pytorch_lightning")
    importlib.import_module(namespace)  # the expensive imports, once, before forking
    importlib.import_module(f"{namespace}.callbacks")
    strategy_class(namespace)
    pending = list(plan["jobs"])
    running: dict = {}  # pid -> name
    status: dict = {}
    while pending or running:
        ready = [job for job in pending if job.get("after") is None or job["after"] in status]
        while ready and len(running) < plan.get("parallel", 2):
            job = ready.pop(0)
            pending.remove(job)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(job["config"])
            running[pid] = job["name"]
        if not running:
            raise RuntimeError(f"jobs wait for jobs that do not exist: {pending}")
        pid, wait_status = os.wait()
        status[running.pop(pid)] = os.waitstatus_to_exitcode(wait_status)
    with open(plan["status"], "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    if sys.argv[1] == "--plan":
        with open(sys.argv[2]) as f:
            run_plan(json.load(f))
    else:
        with open(sys.argv[1]) as f:
            main(json.load(f))
