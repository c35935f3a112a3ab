"""What a search returns: the chosen cell, what each round or trial saw, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fisher_fast.nas.genotype import Genotype


@dataclass(frozen=True)
class Round:
    """One FUSE round (or one random-search trial, a "round" of one candidate).

    ``candidates[k]`` was mixed with weight ``alphas[k]`` (softmax(α), summing to 1; for random
    search, the single candidate's weight 1.0); ``winner`` is the index of the kept candidate;
    ``steps`` the weight steps taken, ``converged`` whether α met the convergence criterion
    before the step cap (always False for random search, which has no α); ``val_accuracy``
    (fraction in [0, 1]) is the mixture's (FUSE) or the candidate's (random search) accuracy on
    the validation split carved from the training data.
    """

    candidates: tuple[Genotype, ...]
    alphas: tuple[float, ...]
    winner: int
    steps: int
    converged: bool
    val_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; genotypes as canonical strings. Inverse: :meth:`from_dict`."""
        return {
            "candidates": [g.to_string() for g in self.candidates],
            "alphas": list(self.alphas),
            "winner": self.winner,
            "steps": self.steps,
            "converged": self.converged,
            "val_accuracy": self.val_accuracy,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Round:
        """The round :meth:`to_dict` wrote (a checkpoint's ``rounds``)."""
        return cls(
            candidates=tuple(Genotype.from_string(s) for s in data["candidates"]),
            alphas=tuple(float(a) for a in data["alphas"]),
            winner=int(data["winner"]),
            steps=int(data["steps"]),
            converged=bool(data["converged"]),
            val_accuracy=float(data["val_accuracy"]),
        )


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search.

    ``genotype`` is the chosen cell; ``alphas`` the mixing weights of the last round (FUSE) or
    the validation accuracies of the trials (random search); ``steps`` the search's cost in
    candidate-steps (one weight step of one candidate network = 1: a FUSE step over ``K`` mixed
    candidates costs ``K``), the budget unit the two searches share; ``seconds`` wall time
    (summed over the sessions of a resumed search).
    """

    genotype: Genotype
    history: tuple[Round, ...] = field(repr=False)
    alphas: tuple[float, ...]
    steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (for reports; no inverse: reports are not read back)."""
        return {
            "genotype": self.genotype.to_string(),
            "alphas": list(self.alphas),
            "steps": self.steps,
            "seconds": self.seconds,
            "rounds": [r.to_dict() for r in self.history],
        }
