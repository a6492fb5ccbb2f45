"""Crash and resume: a DP training process SIGKILLed mid-epoch and resumed from ``last.ckpt`` ends with
exactly the ε of an uninterrupted run of the same number of steps.

Each run is its own process (``tests/resume_worker.py``): the crash is a real ``SIGKILL`` (no exception
handling, no ``on_exception`` checkpoint, nothing flushed), so all that survives is what ModelCheckpoint
wrote. Importing Lightning costs seconds and a run a fraction of one, so the module-scoped ``runs``
fixture starts one worker that imports once and forks a fresh process per run; the tests read results.

How Lightning 2.6.6 resumes from a ``last.ckpt`` written in ``on_train_batch_end`` mid-epoch: the
training epoch loop restarts with ``batch_progress.current.ready = completed`` (``completed`` is first
increased by one, ``RESTARTED_ON_TRAIN_BATCH_END``), ``global_step`` is the checkpoint's, and the
training loader — not resumable — is iterated afresh: the epoch is finished with
``num_training_batches - ready`` batches from a new iterator (a "dataloader is not resumable" warning is
emitted), then training continues until ``max_steps``. So the resumed run takes exactly
``max_steps - ckpt_global_step`` optimizer steps, and the accountant (restored from the checkpoint)
records exactly those.

A checkpoint can also lie *inside* an accumulation window (a time-based or callback save between two
micro-batches of one step; the ``inside_window`` case saves one with ``trainer.save_checkpoint`` after the
first micro-batch of a window). Lightning then resumes with ``ready % k != 0``; the DP sampler serves the
rest of that window as empty micro-batches (a noise-only step, accounted like every step: the window's
trained micro-batches died with the process) and every later step is again one whole Poisson draw.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.namespace import NAME
from tests.test_accounting_prv import ABOVE_TOL, BELOW_TOL, _reference_epsilons

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("resume_worker.py")
DELTA = 1e-5
SIGMA = 1.0
# the namespace this test session runs against (``make test`` runs both, see tests/namespace.py)
NAMESPACES = [NAME]

# name: (accumulate_grad_batches, max_steps, kill_step, kill_at). 64 examples, loader batch size 8:
# 8 batches per epoch, q = accumulate · 8 / 64. kill_step is mid-epoch (epoch 1) in every case.
CASES = {
    # 8 steps per epoch; killed as batch 12 starts, last.ckpt holds step 11 (3rd step of epoch 1)
    "steps": (1, 13, 11, "batch_start"),
    # killed in on_train_batch_end after step 12 was taken, before ModelCheckpoint could save it
    # (Lightning runs ModelCheckpoint after all other callbacks): step 12 is lost and taken again
    "lost_step": (1, 13, 11, "batch_end"),
    # 4 steps (8 micro-batches) per epoch; killed at the step boundary after step 6 (2nd step of epoch 1)
    "accumulate2": (2, 9, 6, "batch_start"),
    # saved after the first micro-batch of step 7's window (inside.ckpt: 6 steps, ready = 5), killed as
    # the window's second micro-batch starts, resumed from inside.ckpt: step 7 is noise-only
    "inside_window": (2, 9, 6, "inside_window"),
}
INSIDE = 1  # micro-batches of the cut window trained before the inside_window checkpoint
BOUNDARY = [(ns, case) for ns in NAMESPACES for case in CASES if CASES[case][3] != "inside_window"]
WINDOW = [(ns, case) for ns in NAMESPACES for case in CASES if CASES[case][3] == "inside_window"]


def _ids(keys) -> list:
    return [f"{ns}-{case}" for ns, case in keys]


def _config(namespace, case, mode, root: Path) -> dict:
    accumulate, max_steps, kill_step, kill_at = CASES[case]
    run_dir = root / f"{namespace}-{case}"
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = {}
    if kill_at == "inside_window":  # the crashed run writes ckpt/inside.ckpt (see resume_worker.py)
        extra = {"inside": INSIDE, "ckpt": str(run_dir / "ckpt" / "inside.ckpt")}
    return {
        **extra,
        "namespace": namespace,
        "mode": mode,
        # the crashed and the resumed process share a checkpoint directory, the reference has its own
        "dir": str(run_dir / ("full" if mode == "full" else "ckpt")),
        "out": str(run_dir / f"{mode}.json"),
        "max_steps": max_steps,
        "accumulate": accumulate,
        "kill_step": kill_step,
        "kill_at": kill_at,
        "n": 64,
        "batch_size": 8,
        "sigma": SIGMA,
        "seed": 0,
    }


def _output(config: dict) -> str:
    path = Path(config["out"] + ".stderr")
    return path.read_text()[-3000:] if path.exists() else "(no output)"


def _log(config: dict) -> list:
    path = Path(config["out"] + ".log")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's crashed, resumed and uninterrupted run, each its own process.

    One worker process imports Lightning once and forks a child per run (two at a time): the resume
    of a case starts after its crashed run has died.
    """
    root = tmp_path_factory.mktemp("resume_crash")
    keys = [(ns, case) for ns in NAMESPACES for case in CASES]
    configs = {k: {mode: _config(*k, mode, root) for mode in ("crash", "resume", "full")} for k in keys}
    results = {}
    for namespace in NAMESPACES:
        mine = [k for k in keys if k[0] == namespace]
        jobs = [{"name": _job_name(k, "crash"), "config": configs[k]["crash"]} for k in mine]
        for k in mine:  # each resume as soon as its crash is over, the references in between
            jobs.append({"name": _job_name(k, "full"), "config": configs[k]["full"]})
            jobs.append({"name": _job_name(k, "resume"), "config": configs[k]["resume"],
                         "after": _job_name(k, "crash")})
        plan = root / f"{namespace}-plan.json"
        status_path = root / f"{namespace}-status.json"
        plan.write_text(json.dumps({"namespace": namespace, "parallel": 2, "status": str(status_path),
                                    "jobs": jobs}))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        done = subprocess.run([sys.executable, str(WORKER), "--plan", str(plan)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"the worker failed:\n{done.stderr[-3000:]}")
        status = json.loads(status_path.read_text())
        for k in mine:
            results[k] = {"crash_rc": status[_job_name(k, "crash")], "crash_output": _output(configs[k]["crash"]),
                          "crash_log": _log(configs[k]["crash"])}
            for mode in ("full", "resume"):
                if status[_job_name(k, mode)] != 0:
                    pytest.fail(f"{k} {mode} failed:\n{_output(configs[k][mode])}")
                results[k][mode] = json.loads(Path(configs[k][mode]["out"]).read_text())
                results[k][mode + "_log"] = _log(configs[k][mode])
    return results


def _job_name(key, mode: str) -> str:
    return f"{key[1]}/{mode}"


def _steps(log: list) -> dict:
    """{optimizer step number (1-based): sorted example indices drawn for it} from a run's batch log."""
    steps: dict = {}
    for record in log:
        if record["event"] == "batch":
            steps.setdefault(record["global_step"] + 1, []).extend(record["idx"])
    return {s: sorted(idx) for s, idx in steps.items()}


def _windows(log: list) -> dict:
    """{optimizer step number (1-based): [example indices of each micro-batch, in order]}."""
    windows: dict = {}
    for record in log:
        if record["event"] == "batch":
            windows.setdefault(record["global_step"] + 1, []).append(record["idx"])
    return windows


def _step_samples(log: list) -> dict:
    """{optimizer step number (1-based): examples the DP optimizer summed into that step}."""
    return {r["global_step"] + 1: r["samples"] for r in log if r["event"] == "step"}


def _is_one_draw(window: list) -> bool:
    """Whether a window's micro-batches are ``torch.tensor_split`` of one sorted Poisson draw, in order
    (what ``PoissonBatchSampler`` yields): together strictly increasing (no index twice) and split into
    sizes differing by at most one, the larger ones first."""
    joined = [i for chunk in window for i in chunk]
    k, n = len(window), len(joined)
    sizes = [n // k + (1 if j < n % k else 0) for j in range(k)]
    return all(a < b for a, b in zip(joined, joined[1:])) and [len(c) for c in window] == sizes


def _assert_uninterrupted_epsilon(full: dict, resumed: dict, q: float, max_steps: int) -> None:
    """Same steps, same history, same ε as the uninterrupted run, and that ε is dp-accounting's."""
    assert full["global_step"] == resumed["global_step"] == max_steps
    assert full["history"] == resumed["history"] == [[SIGMA, q, max_steps]]
    assert full["total_steps"] == resumed["total_steps"] == max_steps
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-9, abs=0)

    # ... which is dp-accounting's PLD epsilon of max_steps Poisson-subsampled Gaussian steps
    (reference,) = _reference_epsilons([(SIGMA, q, max_steps)], (DELTA,), interval=1e-4)
    assert reference * (1 - BELOW_TOL) <= resumed["epsilon"] <= reference * (1 + ABOVE_TOL), (
        resumed["epsilon"], reference)


@pytest.mark.parametrize("key", BOUNDARY, ids=_ids(BOUNDARY))
def test_killed_and_resumed_run_spends_exactly_the_uninterrupted_epsilon(runs, key):
    accumulate, max_steps, kill_step, kill_at = CASES[key[1]]
    run = runs[key]
    full, resumed = run["full"], run["resume"]

    # the first process really died of SIGKILL, mid-epoch, where the case says
    assert run["crash_rc"] == -signal.SIGKILL, run["crash_output"]
    kills = [r for r in run["crash_log"] if r["event"] == "kill"]
    assert len(kills) == 1 and kills[0]["where"] == kill_at, run["crash_log"][-3:]
    assert kills[0]["global_step"] == (kill_step if kill_at == "batch_start" else kill_step + 1)
    if kill_at == "batch_end":  # step kill_step + 1 was computed (and lost) before the kill
        assert kill_step + 1 in _steps(run["crash_log"])
    steps_per_epoch = 8 // accumulate
    assert 0 < kill_step % steps_per_epoch, "the crash must be mid-epoch"
    q = accumulate * 8 / 64
    assert full["sample_rate"] == resumed["sample_rate"] == q

    # last.ckpt held kill_step steps, and the accountant's history of exactly those
    assert resumed["ckpt_global_step"] == kill_step
    assert resumed["ckpt_history"] == [[SIGMA, q, kill_step]]
    # ... at a step boundary: the restored epoch loop is not inside an accumulation window
    assert resumed["ckpt_batch_progress"]["current"]["ready"] % accumulate == 0

    # the resumed process took max_steps - kill_step steps, on as many logical batches
    resumed_steps = _steps(run["resume_log"])
    assert sorted(resumed_steps) == list(range(kill_step + 1, max_steps + 1))
    batches = [r for r in run["resume_log"] if r["event"] == "batch"]
    per_step = {s: sum(r["global_step"] + 1 == s for r in batches) for s in resumed_steps}
    assert per_step == {s: accumulate for s in resumed_steps}, "every resumed step: one full accumulation window"
    assert sorted(_step_samples(run["resume_log"])) == sorted(resumed_steps)
    assert resumed["resumed_inside_window"] == 0

    _assert_uninterrupted_epsilon(full, resumed, q, max_steps)


@pytest.mark.parametrize("key", BOUNDARY, ids=_ids(BOUNDARY))
def test_resumed_run_continues_the_sampling_stream(runs, key):
    """Seeded mode: the restored sampler and noise states continue (setup does not re-seed them), so the
    resumed run draws what the uninterrupted run drew and ends with the same weights."""
    _, max_steps, kill_step, _ = CASES[key[1]]
    run = runs[key]
    full_steps, resumed_steps = _steps(run["full_log"]), _steps(run["resume_log"])
    crashed_steps = _steps(run["crash_log"])
    before = [crashed_steps[s] for s in range(1, kill_step + 1)]
    replayed = [s for s in range(kill_step + 1, max_steps + 1) if resumed_steps[s] in before]
    assert not replayed, f"resumed steps {replayed} re-use the example subsets of steps before the crash"
    # with the sampler and the noise both restored, resuming reproduces the uninterrupted run
    for step in range(kill_step + 1, max_steps + 1):
        assert resumed_steps[step] == full_steps[step], step
    assert run["resume"]["weights"] == run["full"]["weights"]


@pytest.mark.parametrize("key", WINDOW, ids=_ids(WINDOW))
def test_resumed_inside_an_accumulation_window_finishes_it_noise_only(runs, key):
    """A checkpoint saved after INSIDE of k micro-batches of step kill_step + 1: the resumed run's first
    step is noise-only (k − INSIDE empty micro-batches, no example), every later step one whole Poisson
    draw, and the run ends with max_steps steps and the uninterrupted run's ε."""
    accumulate, max_steps, kill_step, _ = CASES[key[1]]
    run = runs[key]
    full, resumed = run["full"], run["resume"]
    q = accumulate * 8 / 64
    cut = kill_step + 1  # the step whose window the checkpoint cuts

    # the crashed run saved inside step `cut`'s window (after INSIDE non-empty micro-batches, before the
    # step) and died of SIGKILL as the next micro-batch of that window started
    assert run["crash_rc"] == -signal.SIGKILL, run["crash_output"]
    saves = [r for r in run["crash_log"] if r["event"] == "save"]
    kills = [r for r in run["crash_log"] if r["event"] == "kill"]
    assert len(saves) == 1 and saves[0]["global_step"] == kill_step, run["crash_log"][-3:]
    assert saves[0]["ready"] % accumulate == INSIDE
    assert len(kills) == 1 and kills[0]["where"] == "inside_window" and kills[0]["global_step"] == kill_step
    assert kills[0]["ready"] == saves[0]["ready"] + 1
    crash_windows = _windows(run["crash_log"])
    assert len(crash_windows[cut]) == INSIDE and any(crash_windows[cut]), crash_windows[cut]
    assert cut not in _step_samples(run["crash_log"]), "the cut step was never taken before the kill"
    assert 0 < kill_step % (8 // accumulate), "the crash must be mid-epoch"

    # the checkpoint: kill_step steps accounted, the epoch loop INSIDE micro-batches into a window
    assert resumed["ckpt_global_step"] == kill_step
    assert resumed["ckpt_history"] == [[SIGMA, q, kill_step]]
    assert resumed["ckpt_batch_progress"]["current"]["ready"] % accumulate == INSIDE
    assert full["sample_rate"] == resumed["sample_rate"] == q

    # (1) the resumed run's first step: only the k − INSIDE empty micro-batches, nothing summed, noise only
    windows, samples = _windows(run["resume_log"]), _step_samples(run["resume_log"])
    assert resumed["resumed_inside_window"] == accumulate - INSIDE
    assert windows[cut] == [[]] * (accumulate - INSIDE), windows[cut]
    assert samples[cut] == 0

    # (2) every later step: k micro-batches of ONE Poisson draw, all of whose examples were summed, and
    # the very draw the uninterrupted run made for that step (the restored sampler stream continues)
    full_windows, full_samples = _windows(run["full_log"]), _step_samples(run["full_log"])
    assert all(_is_one_draw(full_windows[s]) for s in range(1, max_steps + 1)), full_windows
    # the check tells windows apart: mixing halves of consecutive draws (the old resume bug) fails it
    assert not all(_is_one_draw(full_windows[s][INSIDE:] + full_windows[s + 1][:INSIDE])
                   for s in range(1, max_steps))
    for step in range(cut + 1, max_steps + 1):
        window = windows[step]
        assert len(window) == accumulate and _is_one_draw(window), (step, window)
        assert samples[step] == sum(len(chunk) for chunk in window), step
        assert window == full_windows[step] and samples[step] == full_samples[step], step

    # (3) max_steps steps in all: the resumed run took exactly steps cut..max_steps, once each
    assert sorted(windows) == sorted(samples) == list(range(cut, max_steps + 1))
    assert sorted(full_samples) == list(range(1, max_steps + 1))
    _assert_uninterrupted_epsilon(full, resumed, q, max_steps)
