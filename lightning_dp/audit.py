"""Empirical privacy audit with one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

``m`` canary examples are each put into the training set independently with probability ½. After one
ordinary training run, every canary gets a membership score (by default its negated loss: a model
that memorised a canary has a low loss on it). The auditor guesses "included" for the ``k_plus``
highest scores, "excluded" for the ``k_minus`` lowest, and abstains on the rest. If the training is
(ε, δ)-DP, the number of correct guesses cannot be much larger than ``Binomial(r, e^ε / (1 + e^ε))``
(Theorem 3 of the paper); :func:`epsilon_lower_bound` turns the observed count into the largest ε
that this rules out at the chosen confidence.

What the result means: an **empirical lower bound**. If it exceeds the ε the accountant claims, the
implementation is broken (or the claim is wrong) — with the stated confidence. If it is far below the
claim, that is *not* evidence that the training is more private than claimed: a one-run audit with a
loss-based score is weak against DP-SGD's worst case, and the claim is an upper bound for the worst
case, not the typical one.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ._checks import check_int, check_open_unit

__all__ = ["AuditResult", "MislabeledCanaries", "audit_p_value", "epsilon_lower_bound", "run_audit"]


def audit_p_value(num_canaries: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on ``P[correct guesses >= correct]`` under (ε, δ)-DP (Steinke et al. 2023, Thm. 3).

    With ``q = e^ε / (1 + e^ε)``, ``β = P[Binomial(r, q) >= v]`` and
    ``α = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i``, the bound is ``β + 2·m·δ·α``
    (``m`` canaries, ``r`` guesses, ``v`` correct). For δ = 0 it is the binomial tail of ε-DP
    randomized response.
    """
    m = check_int("num_canaries", num_canaries, 1)
    r = check_int("guesses", guesses, 0)
    v = check_int("correct", correct, 0)
    if not v <= r <= m:
        raise ValueError(f"Need 0 <= correct <= guesses <= num_canaries, got {v}, {r}, {m}.")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"Need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    running = 0.0
    for i in range(1, v + 1):
        running += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, running / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(
    num_canaries: int, guesses: int, correct: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """The largest ε that ``correct`` out of ``guesses`` rules out at ``confidence`` (bisection on
    :func:`audit_p_value`, to 1e-6): with probability ``confidence`` the training is not ε'-DP for any
    ε' below the returned value. 0 when nothing can be ruled out."""
    check_open_unit("confidence", confidence)
    significance = 1.0 - confidence
    if audit_p_value(num_canaries, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(num_canaries, guesses, correct, high, delta) < significance:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > 1e-6:
        mid = (low + high) / 2
        if audit_p_value(num_canaries, guesses, correct, mid, delta) < significance:
            low = mid
        else:
            high = mid
    return low


@dataclass
class AuditResult:
    """What :func:`run_audit` found."""

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    confidence: float
    num_canaries: int
    num_included: int
    guesses: int
    correct: int

    @property
    def accuracy(self) -> float:
        """Fraction of correct guesses (0.5 is chance)."""
        return self.correct / self.guesses if self.guesses else float("nan")

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-friendly)."""
        return {**asdict(self), "accuracy": self.accuracy}

    def __str__(self) -> str:
        claim = "∞ (not private)" if math.isinf(self.claimed_epsilon) else f"{self.claimed_epsilon:.3f}"
        return (
            f"audit: empirical ε ≥ {self.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence "
            f"(claimed ε = {claim}, δ = {self.delta:g}); {self.correct}/{self.guesses} guesses correct "
            f"on m = {self.num_canaries} canaries ({self.num_included} included)"
        )


class MislabeledCanaries(Dataset):
    """Default canaries: ``m`` examples taken from the dataset with their label replaced by a different,
    random class — examples a model can only fit by memorising them.

    Args:
        dataset: map-style dataset of ``(input, label)`` pairs with integer labels.
        indices: which examples become canaries (they should be left out of the base training set).
        num_classes: number of classes.
        seed: seed for the wrong labels.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], num_classes: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.items: List[Tuple[Any, torch.Tensor]] = []
        for index in indices:
            x, y = dataset[index]
            label = int(y)
            wrong = rng.choice([c for c in range(num_classes) if c != label])
            self.items.append((x, torch.tensor(wrong, dtype=torch.long)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Any, torch.Tensor]:
        return self.items[index]


def _default_scores(model: torch.nn.Module, canaries: Dataset, batch_size: int = 256) -> torch.Tensor:
    """Negated per-example cross-entropy: high when the model fits the canary's (wrong) label."""
    scores = []
    model.eval()
    with torch.no_grad():
        for x, y in DataLoader(canaries, batch_size=batch_size):
            device = next(model.parameters()).device
            logits = model(x.to(device))
            scores.append(-F.cross_entropy(logits, y.to(device), reduction="none").cpu())
    return torch.cat(scores)


# Long on purpose: the audit's steps in their order (canaries, training, guesses, the bound), in one place.
def run_audit(
    model_fn: Callable[[], Any],
    trainer_fn: Callable[[], Any],
    dataset: Dataset,
    *,
    num_canaries: int = 500,
    num_classes: Optional[int] = None,
    canaries: Optional[Dataset] = None,
    batch_size: int = 64,
    guesses: Optional[int] = None,
    delta: Optional[float] = None,
    confidence: float = 0.95,
    score_fn: Optional[Callable[[torch.nn.Module, Dataset], torch.Tensor]] = None,
    seed: int = 0,
) -> AuditResult:
    """Audit one training run of ``model_fn()`` with ``trainer_fn()`` (DP or not) on ``dataset``.

    Canaries are ``canaries`` if given (then all of ``dataset`` is the base training set), otherwise
    ``num_canaries`` examples of ``dataset`` with wrong labels (:class:`MislabeledCanaries`, needs
    ``num_classes``), removed from the base set. Each canary joins the training set with probability ½.
    After ``trainer.fit``, ``score_fn(model, canaries)`` scores them (default: negated loss); the
    ``guesses // 2`` highest are guessed in, the ``guesses // 2`` lowest out (default: ``m / 5`` guesses).

    The claimed ε is ``trainer.strategy.get_epsilon(delta)`` for a DP strategy, ``inf`` otherwise; δ
    defaults to the strategy's. Returns an :class:`AuditResult`.

    Example::

        result = run_audit(lambda: MyModel(), lambda: pl.Trainer(max_epochs=20, strategy=DPStrategy(...)),
                           train_dataset, num_canaries=500, num_classes=10)
        print(result)
    """
    generator = random.Random(seed)
    if canaries is None:
        if num_classes is None:
            raise ValueError("`num_classes` is needed to build mislabeled canaries (or pass `canaries`).")
        check_int("num_canaries", num_canaries, 2)
        if num_canaries >= len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"`num_canaries` ({num_canaries}) must be smaller than the dataset ({len(dataset)}).")
        order = list(range(len(dataset)))  # type: ignore[arg-type]
        generator.shuffle(order)
        canary_indices, base_indices = order[:num_canaries], order[num_canaries:]
        canaries = MislabeledCanaries(dataset, canary_indices, num_classes, seed=seed)
        base: Dataset = Subset(dataset, base_indices)
    else:
        base = dataset
    m = len(canaries)  # type: ignore[arg-type]
    included = torch.tensor([generator.random() < 0.5 for _ in range(m)])
    train_set = ConcatDataset([base, Subset(canaries, included.nonzero().flatten().tolist())])

    model = model_fn()
    trainer = trainer_fn()
    trainer.fit(model, train_dataloaders=DataLoader(train_set, batch_size=batch_size, shuffle=True))

    strategy = trainer.strategy
    if delta is None:
        delta = getattr(strategy, "delta", 1e-5)
    claimed = strategy.get_epsilon(delta) if hasattr(strategy, "get_epsilon") else math.inf
    scores = (score_fn or _default_scores)(model, canaries)
    k = max(1, (guesses if guesses is not None else m // 5) // 2)
    order = torch.argsort(scores, descending=True)
    top, bottom = order[:k], order[-k:]
    correct = int(included[top].sum().item() + (~included[bottom]).sum().item())
    bound = epsilon_lower_bound(m, 2 * k, correct, delta=delta, confidence=confidence)
    return AuditResult(
        epsilon_lower_bound=bound,
        claimed_epsilon=float(claimed),
        delta=float(delta),
        confidence=confidence,
        num_canaries=m,
        num_included=int(included.sum().item()),
        guesses=2 * k,
        correct=correct,
    )
