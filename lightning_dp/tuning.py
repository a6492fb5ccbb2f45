"""An accounted hyperparameter search: the best of a random number of private trials, with one ε for all.

Choosing hyperparameters by training several private models on the same data and keeping the best is a
mechanism of its own: each run's ε covers that run only. Papernot and Steinke (ICLR 2022, "Hyperparameter
Tuning with Renyi Differential Privacy") show that if the number of trials ``K`` is random (Poisson or
truncated negative binomial) and only the best trial is released, the whole search costs little more than
one trial. :class:`PrivateHyperparameterSearch` runs that search:

1. ``K`` is drawn once (seeded, or from the OS's secure generator), with ``K`` candidates drawn uniformly
   from ``candidates`` and ``K`` seeds; all are written to ``state_path`` before the first trial.
2. Trial ``i`` is ``train_fn(candidate, noise_multiplier, seed) -> (score, privacy_report[, output])``: a
   whole DP training run (e.g. a ``Trainer`` with ``DPStrategy(noise_multiplier=...)``) and a private
   validation score (e.g. :class:`~lightning_dp.metrics.PrivateAccuracy` with the same σ). Its privacy
   report is checked against the plan (``steps`` at ``sample_rate``, Poisson sampling, σ at least the
   search's) and kept; the state file is rewritten after every trial.
3. The best trial's candidate, score and output are returned with a :class:`SearchReport`: the
   distribution, its mean, the candidates, σ and the total ε of the search
   (:func:`~lightning_dp.accounting.repeat_and_select.search_epsilon`).

**Secret:** ``K``, the list of trials and the state file. The guarantee is for releasing the best trial
only; revealing ``K`` or the other trials' scores or models voids it.

**Resuming.** Run the same search with the same ``state_path``: trials already recorded are not run again
(their privacy is not spent again) and the search continues with the stored ``K``, candidates and seeds.
``K`` must not be drawn again on resume: the analysis is for one draw of ``K`` from the distribution; a
resumed search that drew a fresh ``K'`` would run ``j + K'`` trials, a number no longer distributed as
analysed (and a search that is resumed until it likes its results would choose its own ``K``). A trial
interrupted before it was recorded released nothing and is run again with its stored seed.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ._checks import check_choice, check_int, check_open_unit, check_positive, check_rate
from .accounting.rdp import RDPAccountant
from .accounting.repeat_and_select import (
    PoissonTrials,
    TruncatedNegativeBinomialTrials,
    search_epsilon,
    search_noise_multiplier,
    trial_history,
)
from .report import PrivacyReport

__all__ = [
    "PoissonTrials",
    "PrivateHyperparameterSearch",
    "SearchReport",
    "SearchResult",
    "TrialRecord",
    "TruncatedNegativeBinomialTrials",
    "search_epsilon",
    "search_noise_multiplier",
]

Distribution = Union[PoissonTrials, TruncatedNegativeBinomialTrials]
TrainFn = Callable[[Any, float, int], Tuple[Any, ...]]
_FORMAT = 1
_REL = 1e-9  # float slack when comparing a trial's report with the plan

NOT_COVERED = (
    "the number of trials K, the other trials' scores, models and reports, and the state file: the guarantee "
    "is for releasing the best trial only; keep them secret",
    "metrics logged during a trial from private data without a private metric",
)


@dataclass
class TrialRecord:
    """One trial: its candidate, seed, private score and privacy report (secret: it reveals ``K``)."""

    index: int
    candidate_index: int
    candidate: Any
    seed: int
    score: float
    report: Dict[str, Any]
    output: Any = None


@dataclass
class SearchReport:
    """What a search may publish: how it was run and its total ε (RDP, Papernot-Steinke)."""

    distribution: Dict[str, Any]
    candidates: List[Any]
    noise_multiplier: float
    validation_noise_multiplier: float
    validation_releases: int
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    trial_epsilon: float
    target_epsilon: Optional[float]
    secure_mode: bool
    extra_releases: List[Tuple[float, float, int]] = field(default_factory=list)
    accounting: str = ("RDP of one trial (training + validation releases), Papernot & Steinke 2022 "
                       "(Thm 6 for Poisson, Thm 2 for the truncated negative binomial), converted at delta")
    not_covered: List[str] = field(default_factory=lambda: list(NOT_COVERED))

    def to_dict(self) -> Dict[str, Any]:
        """Plain types (JSON-able)."""
        return asdict(self)

    def to_table(self) -> str:
        """A plain-text table."""
        dist = self.distribution
        params = ", ".join(f"{k} = {v:.6g}" for k, v in dist.items() if k not in ("name", "mean"))
        rows = [
            ("Search guarantee", f"(ε = {self.epsilon:.4g}, δ = {self.delta:g})-DP for the best trial"),
            ("Number of trials", f"{dist['name']} ({params}), mean {dist['mean']:.4g}"),
            ("Candidates", ", ".join(json.dumps(c) for c in self.candidates)),
            ("One trial", f"{self.steps} steps at q = {self.sample_rate:.4g}, σ = {self.noise_multiplier:.4g}; "
                          f"{self.validation_releases} validation release(s) at σ = "
                          f"{self.validation_noise_multiplier:.4g}; ε = {self.trial_epsilon:.4g} alone"),
        ]
        if self.extra_releases:
            rows.append(("Other releases per trial", "; ".join(f"{n} at σ = {s:.4g}, q = {q:g}"
                                                               for s, q, n in self.extra_releases)))
        if self.target_epsilon is not None:
            rows.append(("Target ε (calibration)", f"{self.target_epsilon:g}"))
        rows.append(("Accounting", self.accounting))
        rows.extend(("Not covered by ε", item) for item in self.not_covered)
        width = max(len(name) for name, _ in rows)
        return "Search report\n" + "\n".join(f"{name.ljust(width)} | {value}" for name, value in rows)


@dataclass
class SearchResult:
    """The best trial's ``candidate``, ``score`` and ``output`` (``None`` when ``K = 0``), the public
    ``report`` and the secret ``trials``."""

    candidate: Any
    score: Optional[float]
    output: Any
    report: SearchReport
    trials: List[TrialRecord]


class PrivateHyperparameterSearch:
    """The best of ``K ~ distribution`` private trials, accounted as one mechanism (see the module docstring).

    Args:
        train_fn: ``train_fn(candidate, noise_multiplier, seed)`` returns ``(score, privacy_report)`` or
            ``(score, privacy_report, output)``: a private validation score (a number or 0-d tensor), the trial's
            :class:`~lightning_dp.PrivacyReport` (or its ``to_dict()``) and anything to keep for the best trial
            (a checkpoint path; kept in the state file when JSON-able).
        candidates: the hyperparameter settings (JSON-able), each trial's drawn uniformly.
        distribution: :class:`PoissonTrials` or :class:`TruncatedNegativeBinomialTrials`.
        sample_rate, steps: one trial's DP-SGD plan (every candidate's).
        delta: δ of the search's guarantee.
        noise_multiplier: σ of every trial; or pass ``target_epsilon`` for the whole search instead.
        validation_releases: private metric releases per trial (default 1).
        validation_noise_multiplier: their σ (default: the trials' σ).
        extra_releases: ``(noise_multiplier, sample_rate, count)`` releases every trial makes besides its DP-SGD
            steps and validation scores, at a σ of their own: e.g. ``[(12.0, 1.0, 1)]`` for a
            :class:`~lightning_dp.centering.PrivateMean` centre (the recipe's centring). Accounted in every trial.
        mode: ``"max"`` (default) or ``"min"``: which score is best.
        state_path: a JSON file keeping the search's state (secret); resume by running again with it.
        secure_mode: draw ``K``, candidates and seeds from the OS (default) or, with ``False``, from ``seed``.

    Example (a stand-in for a training run; in practice ``train_fn`` fits a ``Trainer`` with
    ``DPStrategy(noise_multiplier=noise_multiplier, seed=seed)`` and returns a private validation score and
    ``strategy.privacy_report()``):

        >>> from lightning_dp.report import PrivacyReport
        >>> def train_fn(candidate, noise_multiplier, seed):
        ...     report = PrivacyReport(epsilon=1.0, delta=1e-5, accountant="prv", noise_multiplier=noise_multiplier,
        ...                            max_grad_norm=1.0, clipping_mode="flat", sampling="poisson", sample_rate=0.01,
        ...                            expected_batch_size=10, steps=100, epochs=1, dataset_size=1000,
        ...                            secure_mode=False)
        ...     return -abs(candidate["lr"] - 0.3), report
        >>> search = PrivateHyperparameterSearch(
        ...     train_fn, [{"lr": 0.1}, {"lr": 0.3}], distribution=PoissonTrials(mean=3.0), sample_rate=0.01,
        ...     steps=100, delta=1e-5, target_epsilon=8.0, secure_mode=False, seed=0)
        >>> result = search.run()
        >>> result.candidate, round(result.report.epsilon, 2), round(result.report.noise_multiplier, 3)
        ({'lr': 0.3}, 8.0, 0.835)
    """

    def __init__(
        self,
        train_fn: TrainFn,
        candidates: Sequence[Any],
        *,
        distribution: Distribution,
        sample_rate: float,
        steps: int,
        delta: float,
        noise_multiplier: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        validation_releases: int = 1,
        validation_noise_multiplier: Optional[float] = None,
        extra_releases: Sequence[Tuple[float, float, int]] = (),
        mode: str = "max",
        state_path: Optional[Union[str, Path]] = None,
        secure_mode: bool = True,
        seed: Optional[int] = None,
    ) -> None:
        if not callable(train_fn):
            raise ValueError(f"`train_fn` must be callable, got {train_fn!r}.")
        self.train_fn = train_fn
        self.candidates = _check_candidates(candidates)
        if not isinstance(distribution, (PoissonTrials, TruncatedNegativeBinomialTrials)):
            raise ValueError("`distribution` must be PoissonTrials(...) or TruncatedNegativeBinomialTrials(...), "
                             f"got {distribution!r}.")
        self.distribution = distribution
        self.sample_rate = check_rate("sample_rate", sample_rate)
        self.steps = check_int("steps", steps, 1)
        self.delta = check_open_unit("delta", delta)
        self.validation_releases = check_int("validation_releases", validation_releases, 0)
        self.extra_releases = [tuple(entry) for entry in extra_releases]
        self.mode = check_choice("mode", mode, ("max", "min"))
        self.state_path = None if state_path is None else Path(state_path)
        if not secure_mode and seed is None:
            raise ValueError("`seed` is required with secure_mode=False (a reproducible search).")
        self.secure_mode, self.seed = bool(secure_mode), seed
        self.noise_multiplier = self._noise_multiplier(noise_multiplier, target_epsilon, validation_noise_multiplier)
        self.target_epsilon = target_epsilon
        self.validation_noise_multiplier = (self.noise_multiplier if validation_noise_multiplier is None
                                            else check_positive("validation_noise_multiplier",
                                                                validation_noise_multiplier))
        self.report = self._report()

    def _noise_multiplier(self, sigma: Optional[float], target: Optional[float], sigma_val: Optional[float]) -> float:
        if (sigma is None) == (target is None):
            raise ValueError("pass exactly one of `noise_multiplier` and `target_epsilon`, got "
                             f"noise_multiplier={sigma!r}, target_epsilon={target!r}.")
        if sigma is not None:
            return check_positive("noise_multiplier", sigma)
        return search_noise_multiplier(check_positive("target_epsilon", target), self.delta, self.distribution,
                                       self.sample_rate, self.steps, self.validation_releases, sigma_val,
                                       extra_releases=self.extra_releases)

    def trial_history(self) -> List[Tuple[float, float, int]]:
        """One trial's accountant history: the DP-SGD steps and the validation releases."""
        return trial_history(self.noise_multiplier, self.sample_rate, self.steps, self.validation_releases,
                             self.validation_noise_multiplier, self.extra_releases)

    def _report(self) -> SearchReport:
        history = self.trial_history()
        one = RDPAccountant()
        one.load_state_dict({"mechanism": "rdp", "history": history})
        return SearchReport(
            distribution=self.distribution.to_dict(), candidates=list(self.candidates),
            noise_multiplier=self.noise_multiplier, validation_noise_multiplier=self.validation_noise_multiplier,
            validation_releases=self.validation_releases, sample_rate=self.sample_rate, steps=self.steps,
            epsilon=search_epsilon(history, self.distribution, self.delta), delta=self.delta,
            trial_epsilon=one.get_epsilon(self.delta), target_epsilon=self.target_epsilon,
            extra_releases=[tuple(entry) for entry in self.extra_releases],
            secure_mode=self.secure_mode,
        )

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        """Run (or resume) the search and return the best trial with the search's report."""
        state = self._start()
        for index in range(len(state["trials"]), state["num_trials"]):
            state["trials"].append(self._run_trial(state, index))
            self._save(state)
        return self._result(state)

    def _config(self) -> Dict[str, Any]:
        """What a stored state must match to be resumed by this search."""
        report = self.report.to_dict()
        keys = ("distribution", "candidates", "noise_multiplier", "validation_noise_multiplier",
                "validation_releases", "sample_rate", "steps", "delta", "extra_releases")
        return {**{k: report[k] for k in keys}, "mode": self.mode}

    def _start(self) -> Dict[str, Any]:
        if self.state_path is not None and self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            config = self._config()
            stored = state.get("config") if isinstance(state, dict) else None
            if state.get("format") != _FORMAT or stored != json.loads(json.dumps(config)):
                different = sorted(k for k in config if (stored or {}).get(k) != json.loads(json.dumps(config[k])))
                raise ValueError(f"`state_path` {str(self.state_path)!r} holds a different search (differs in "
                                 f"{different}); resume with the same settings or use a new state_path.")
            state["trials"] = [TrialRecord(**t) for t in state["trials"]]
            return state
        state = self._draw()
        self._save(state)
        return state

    def _draw(self) -> Dict[str, Any]:
        """``K``, its candidates and seeds, drawn once for the whole search."""
        rng = random.SystemRandom() if self.secure_mode else random.Random(self.seed)
        k = self.distribution.sample(rng)
        picks = [rng.randrange(len(self.candidates)) for _ in range(k)]
        seeds = [rng.randrange(2**31) for _ in range(k)]
        return {"format": _FORMAT, "config": self._config(), "num_trials": k, "candidate_indices": picks,
                "seeds": seeds, "trials": []}

    def _run_trial(self, state: Dict[str, Any], index: int) -> TrialRecord:
        pick, seed = state["candidate_indices"][index], state["seeds"][index]
        candidate = self.candidates[pick]
        result = self.train_fn(candidate, self.noise_multiplier, seed)
        if not isinstance(result, tuple) or len(result) not in (2, 3):
            raise ValueError(f"`train_fn` must return (score, privacy_report) or (score, privacy_report, output), "
                             f"got {result!r}.")
        score, report = _score(result[0]), self._check_report(index, result[1])
        output = result[2] if len(result) == 3 else None
        return TrialRecord(index, pick, candidate, seed, score, report, output)

    def _check_report(self, index: int, report: Any) -> Dict[str, Any]:
        """The trial's report as a dict, refused where the trial spent more than the plan accounts for."""
        data = report.to_dict() if isinstance(report, PrivacyReport) else report
        if not isinstance(data, dict) or not {"steps", "noise_multiplier", "sample_rate", "sampling"} <= set(data):
            raise ValueError(f"`train_fn` must return a PrivacyReport (strategy.privacy_report()) as its second "
                             f"element, got {report!r}.")
        problems = []
        if data["steps"] > self.steps:
            problems.append(f"steps={data['steps']} > steps={self.steps}")
        if data["noise_multiplier"] is None or data["noise_multiplier"] < self.noise_multiplier * (1 - _REL):
            problems.append(f"noise_multiplier={data['noise_multiplier']} < noise_multiplier={self.noise_multiplier}")
        if data["sample_rate"] is None or data["sample_rate"] > self.sample_rate * (1 + _REL):
            problems.append(f"sample_rate={data['sample_rate']} > sample_rate={self.sample_rate}")
        if data["sampling"] != "poisson" or data.get("secure_aggregation"):
            problems.append(f"sampling={data['sampling']!r} (the plan is plain Poisson sampling, Gaussian noise)")
        if data.get("privacy_unit", "record") != "record":
            problems.append(f"privacy_unit={data['privacy_unit']!r} (the search and its private metrics are "
                            "record-level)")
        if problems:
            raise ValueError(f"trial {index + 1} spent more privacy than the search accounts for: "
                             f"{'; '.join(problems)}. Train each trial with the noise_multiplier passed to train_fn, "
                             "Poisson sampling and at most `steps` steps at `sample_rate`.")
        return data

    def _save(self, state: Dict[str, Any]) -> None:
        """Write the state atomically (a crash mid-write leaves the previous state)."""
        if self.state_path is None:
            return
        data = {**state, "trials": [_jsonable_record(t) for t in state["trials"]]}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.state_path)

    def _result(self, state: Dict[str, Any]) -> SearchResult:
        trials: List[TrialRecord] = state["trials"]
        if not trials:
            return SearchResult(None, None, None, self.report, trials)
        sign = 1.0 if self.mode == "max" else -1.0
        best = max(trials, key=lambda t: -math.inf if math.isnan(t.score) else sign * t.score)
        return SearchResult(best.candidate, best.score, best.output, self.report, trials)


def _check_candidates(candidates: Sequence[Any]) -> List[Any]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or len(candidates) == 0:
        raise ValueError(f"`candidates` must be a non-empty list of hyperparameter settings, got {candidates!r}.")
    try:
        return json.loads(json.dumps(list(candidates)))
    except (TypeError, ValueError):
        raise ValueError("`candidates` must be JSON-able (dicts, lists, numbers, strings) so that the search "
                         f"can be resumed, got {candidates!r}.") from None


def _score(value: Any) -> float:
    """A number from a float, int or one-element tensor (NaN is the worst score)."""
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise ValueError(f"`train_fn` must return a number as its score, got {value!r}.") from None


def _jsonable_record(record: TrialRecord) -> Dict[str, Any]:
    data = asdict(record)
    try:
        json.dumps(data["output"])
    except (TypeError, ValueError):
        data["output"] = None  # not JSON-able: not kept across a resume
    return data
