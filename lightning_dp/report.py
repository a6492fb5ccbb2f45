"""The privacy report: one record of how a model was trained privately.

A :class:`PrivacyReport` is built from the DP strategy's accountant and settings
(``trainer.strategy.privacy_report()``); the strategy stores it in every checkpoint, writes it as
``privacy_report.json`` beside the logs at the end of ``fit``, logs it to the loggers and prints it.
``report.to_markdown()`` is a ready model-card section.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ._checks import check_open_unit

__all__ = ["GROUP_PRIVACY_CONVERSION", "NOT_COVERED", "PrivacyReport", "group_privacy", "unit_description"]

GROUP_PRIVACY_CONVERSION = (
    "group privacy of (ε, δ)-DP along a chain of k neighbouring datasets: (k·ε, δ·Σ_{i<k} e^{i·ε}), at most "
    "(k·ε, k·e^{(k−1)ε}·δ) (Vadhan 2017, 'The Complexity of Differential Privacy', Lemma 2.2)"
)
"""The conversion the report's group privacy uses, named in every report that has one."""


def unit_description(privacy_unit: str, max_records_per_user: Optional[int], num_users: Optional[int]) -> str:
    """What one unit of privacy is: ``"user-level (k records per user at most, N_users users)"`` or record-level."""
    if privacy_unit == "user":
        return f"user-level ({max_records_per_user} records per user at most, {num_users} users)"
    return "record-level (one training example)"


def group_privacy(epsilon: float, delta: float, group_size: int) -> Dict[str, Any]:
    """What record-level ``(ε, δ)`` means for a group of ``k`` records (a person with ``k`` rows), by
    :data:`GROUP_PRIVACY_CONVERSION`: ``(kε, δ·Σ_{i<k} e^{iε})`` (δ capped at 1: then no guarantee)."""
    k = int(group_size)
    if math.isinf(epsilon):
        group_epsilon, group_delta = math.inf, 1.0
    else:
        group_epsilon = k * epsilon
        try:
            group_delta = min(1.0, delta * sum(math.exp(i * epsilon) for i in range(k)))
        except OverflowError:
            group_delta = 1.0
    return {"group_size": k, "epsilon": group_epsilon, "delta": group_delta, "conversion": GROUP_PRIVACY_CONVERSION}

NOT_COVERED = (
    "metrics computed on the private training data and logged from training_step or a callback (loss, "
    "accuracy of private batches): they are computed without noise and are not covered by ε",
    "choices made by looking at training metrics (early stopping on training loss, hyperparameter "
    "search across runs): each run's ε covers that run only",
    "the count of samples dropped for a non-finite gradient: a diagnostic computed on the training data",
)
"""What the guarantee does not cover, said plainly in every report."""


@dataclass
class PrivacyReport:
    """How a model was trained with differential privacy.

    Attributes:
        epsilon: ε spent at ``delta`` (from the accountant's history; ``inf`` without noise).
        delta: δ of the guarantee.
        accountant: the accountant that computed ε.
        noise_multiplier: σ (noise std / clipping norm) of the last step.
        max_grad_norm: per-sample clipping norm C.
        clipping_mode: how per-sample gradients were clipped.
        sampling: ``"poisson"`` or a description of the user's sampler (not covered by the analysis).
        sample_rate: sampling rate q of one optimizer step.
        expected_batch_size: ``q · N``.
        steps: optimizer steps accounted.
        epochs: Lightning epochs run.
        dataset_size: N.
        secure_mode: noise and sampling from a cryptographically secure generator.
        world_size: number of data-parallel processes.
        target_epsilon: the ε the noise was calibrated for, if any.
        dropped_samples: samples whose gradient was not finite (NaN/inf), given clip factor 0: they
            contributed nothing to any step (the steps themselves are accounted as usual).
        secure_aggregation: with secure aggregation across ranks, its mechanism, ``bits``, ``scale``,
            ``min_honest_ranks``, threat model and accounting route; ``None`` otherwise.
        centering: with input centring (:mod:`lightning_dp.centering`), how each centred layer's centre was
            obtained (a private mean is one Gaussian release at rate 1, included in ε; a public centre costs
            nothing); ``None`` otherwise.
        not_covered: what ε does not cover (see :data:`NOT_COVERED`).
        versions: lightning_dp, torch and Lightning (``lightning`` or ``pytorch_lightning``) versions.
        privacy_unit: ``"record"`` (ε protects one training example) or ``"user"`` (ε protects one user with all
            of their records; ``sample_rate``, ``expected_batch_size`` and ``dataset_size`` are then over users).
        max_records_per_user, num_users: ``k`` and ``N_users``, when the run had user ids.
        group_privacy: record-level runs with user ids: what ε means for a person with ``k`` records
            (:func:`group_privacy`: ``group_size``, ``epsilon``, ``delta``, ``conversion``); ``None`` otherwise.
    """

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: Optional[float]
    max_grad_norm: float
    clipping_mode: str
    sampling: str
    sample_rate: Optional[float]
    expected_batch_size: Optional[int]
    steps: int
    epochs: int
    dataset_size: Optional[int]
    secure_mode: bool
    world_size: int = 1
    target_epsilon: Optional[float] = None
    dropped_samples: int = 0
    secure_aggregation: Optional[Dict[str, Any]] = None
    centering: Optional[Dict[str, str]] = None
    not_covered: List[str] = field(default_factory=lambda: list(NOT_COVERED))
    versions: Dict[str, str] = field(default_factory=dict)
    privacy_unit: str = "record"
    max_records_per_user: Optional[int] = None
    num_users: Optional[int] = None
    group_privacy: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (ε = ``inf`` becomes the string ``"inf"`` so JSON stays standard)."""
        data = asdict(self)
        if data["epsilon"] is not None and math.isinf(data["epsilon"]):
            data["epsilon"] = "inf"
        if data["group_privacy"] is not None and math.isinf(data["group_privacy"]["epsilon"]):
            data["group_privacy"]["epsilon"] = "inf"
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PrivacyReport":
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("epsilon") == "inf":
            values["epsilon"] = math.inf
        if (values.get("group_privacy") or {}).get("epsilon") == "inf":
            values["group_privacy"] = {**values["group_privacy"], "epsilon": math.inf}
        return cls(**values)

    def to_json(self, path: Optional[Union[str, Path]] = None) -> str:
        """JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def hparams(self) -> Dict[str, Any]:
        """Flat ``dp/...`` hyperparameters for loggers (TensorBoard compares runs by these)."""
        flat = {k: v for k, v in self.to_dict().items() if k not in ("versions", "not_covered", "secure_aggregation", "centering", "group_privacy")}
        for k in ("group_size", "epsilon", "delta"):
            if self.group_privacy is not None:
                flat[f"group_privacy_{k}"] = self.group_privacy[k]
        for k, v in (self.secure_aggregation or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"secure_aggregation_{k}"] = v
        flat.update({f"version_{k}": v for k, v in self.versions.items()})
        return {f"dp/{k}": ("None" if v is None else v) for k, v in flat.items()}

    def _rows(self) -> list:
        eps = "∞ (no noise: not private)" if math.isinf(self.epsilon) else f"{self.epsilon:.4g}"
        sampling = self.sampling + (f", q = {self.sample_rate:.4g}" if self.sample_rate is not None else "")
        rows = [
            ("Privacy guarantee", f"(ε = {eps}, δ = {self.delta:g})-DP, {self.accountant} accountant"),
            ("Privacy unit", unit_description(self.privacy_unit, self.max_records_per_user, self.num_users)),
            ("Noise multiplier σ", "—" if self.noise_multiplier is None else f"{self.noise_multiplier:.4g}"),
            ("Clipping", f"{self.clipping_mode}, C = {self.max_grad_norm:g}"),
            ("Sampling", sampling),
            ("Expected batch size", str(self.expected_batch_size)),
            ("Steps / epochs", f"{self.steps} / {self.epochs}"),
            ("Dataset size", str(self.dataset_size)),
            ("Secure noise generator", "yes" if self.secure_mode else "no (reproducible, not cryptographically secure)"),
            ("Processes", str(self.world_size)),
            ("Samples dropped (non-finite gradient; not covered by ε)", str(self.dropped_samples)),
        ]
        if self.target_epsilon is not None:
            rows.append(("Target ε (calibration)", f"{self.target_epsilon:g}"))
        if self.group_privacy is not None:
            group = self.group_privacy
            group_eps = "∞" if math.isinf(group["epsilon"]) else f"{group['epsilon']:.4g}"
            rows.append((f"Group privacy (a person with {group['group_size']} records)",
                         f"(ε = {group_eps}, δ = {group['delta']:.3g}) by {group['conversion']}"))
        if self.secure_aggregation:
            agg = self.secure_aggregation
            rows.append(("Aggregation", f"{agg.get('mechanism')}: b = {agg.get('bits')} bits, scale = "
                                        f"{agg.get('scale'):g} per C/B, min_honest_ranks = {agg.get('min_honest_ranks')}"))
            if agg.get("threat_model"):
                rows.append(("Threat model", str(agg["threat_model"])))
            if agg.get("accounting"):
                rows.append(("Accounting", str(agg["accounting"])))
        for layer, how in (self.centering or {}).items():
            rows.append((f"Input centring of {layer}", how))
        rows.append(("Versions", ", ".join(f"{k} {v}" for k, v in self.versions.items())))
        rows.extend(("Not covered by ε", item) for item in self.not_covered)
        return rows

    def to_table(self) -> str:
        """A plain-text table (what the strategy prints at the end of ``fit``)."""
        rows = self._rows()
        width = max(len(name) for name, _ in rows)
        line = "-" * (width + 3 + max(len(value) for _, value in rows))
        body = "\n".join(f"{name.ljust(width)} | {value}" for name, value in rows)
        return f"Privacy report\n{line}\n{body}\n{line}"

    def to_markdown(self) -> str:
        """A model-card section in Markdown."""
        eps = "∞" if math.isinf(self.epsilon) else f"{self.epsilon:.4g}"
        table = "\n".join(f"| {name} | {value} |" for name, value in self._rows())
        return (
            "## Privacy\n\n"
            f"This model was trained with differentially private SGD (lightning-dp): it satisfies "
            f"(ε = {eps}, δ = {self.delta:g})-differential privacy with respect to the addition or removal "
            f"of {self._protected()}, as computed by the accountant below. The guarantee covers the "
            "released weights; it assumes the training data were sampled and noised as recorded here.\n\n"
            "| | |\n|---|---|\n" + table + "\n"
        )

    def _protected(self) -> str:
        if self.privacy_unit == "user":
            return f"one user with all of their records (at most {self.max_records_per_user} used per step)"
        return "one training example"

    def __str__(self) -> str:
        return self.to_table()


def describe_run(
    privacy: Any, config: Any, *, optimizer: Any, world_size: int, epochs: int, versions: Dict[str, str],
    delta: Optional[float] = None, secure_aggregation: Optional[Dict[str, Any]] = None,
    centering: Optional[Dict[str, str]] = None,
) -> PrivacyReport:
    """The report of a run from its :class:`~lightning_dp.PrivacyState` and :class:`~lightning_dp.DPConfig`
    (the one place a report is built: the Trainer and Fabric strategies both call it); ``versions`` adds the
    front door's package and version to lightning-dp's and torch's."""
    import torch

    from .__about__ import __version__

    delta = config.delta if delta is None else check_open_unit("delta", delta)
    epsilon, users = privacy.accountant.get_epsilon(delta), getattr(privacy, "users", None)
    return PrivacyReport(
        epsilon=epsilon,
        delta=delta,
        accountant=privacy.accountant.mechanism,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        clipping_mode=_clipping_description(config, optimizer),
        sampling=_sampling_description(config),
        sample_rate=privacy.sample_rate,
        expected_batch_size=privacy.expected_batch_size,
        steps=privacy.accountant.total_steps - privacy.centring_releases,
        epochs=epochs,
        dataset_size=privacy.dataset_size,
        secure_mode=config.secure_mode,
        world_size=world_size,
        target_epsilon=config.target_epsilon,
        dropped_samples=privacy.dropped_samples,
        secure_aggregation=secure_aggregation,
        centering=centering,
        versions={"lightning_dp": __version__, "torch": str(torch.__version__), **versions},
        privacy_unit=getattr(privacy, "privacy_unit", "record"),
        max_records_per_user=None if users is None else users.max_records_per_user,
        num_users=None if users is None else users.num_users,
        group_privacy=(group_privacy(epsilon, delta, users.max_records_per_user)
                       if users is not None and privacy.privacy_unit == "record" else None),
    )


def _clipping_description(config: Any, optimizer: Any) -> str:
    clipping = (
        f"{getattr(optimizer, 'clipping', config.clipping)} "
        f"({getattr(optimizer, 'clipping_mode', config.clipping_mode)} norms)"
    )
    adaptive = getattr(optimizer, "adaptive_clipping", None)
    if adaptive is not None:  # the norm moved: say from where, to where, and after what
        clipping += (
            f", adaptive (Andrew et al. 2021: target quantile {adaptive.target_quantile}, learning rate "
            f"{adaptive.learning_rate}; norm {config.max_grad_norm:g} at the start, "
            f"{optimizer.max_grad_norm:.4g} now; its noised counts are in ε)"
        )
    return clipping


def _sampling_description(config: Any) -> str:
    if not config.poisson_sampling:
        return "user sampler (not covered by the subsampling analysis)"
    if config.bands > 1:
        return f"cyclic poisson over {config.bands} groups (BandMF correlated noise; q below is bands·q)"
    if getattr(config, "privacy_unit", "record") == "user":
        return "poisson over users (each sampled user's records, up to k; q below is the user rate)"
    return "poisson"
