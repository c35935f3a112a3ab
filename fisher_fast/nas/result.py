"""What a search returns: the chosen cell, what each round or trial saw, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from fisher_fast.nas.genotype import Genotype


@dataclass(frozen=True)
class Round:
    """One FUSE round (or one random-search trial, a "round" of one candidate).

    ``candidates[k]`` was mixed with weight ``alphas[k]`` (softmax(α), summing to 1; for random
    search, the single candidate's weight 1.0); ``winner`` is the index of the kept candidate;
    ``steps`` the weight steps taken, ``converged`` whether α met the convergence criterion
    before the step cap (always False for random search, which has no α); ``val_accuracy`` (fraction in [0, 1]) is the mixture's (FUSE) or the
    candidate's (random search) accuracy on the validation split carved from the training data.
    """

    candidates: tuple[Genotype, ...]
    alphas: tuple[float, ...]
    winner: int
    steps: int
    converged: bool
    val_accuracy: float


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search.

    ``genotype`` is the chosen cell; ``alphas`` the mixing weights of the last round (FUSE) or
    the validation accuracies of the trials (random search); ``steps`` the search's cost in
    candidate-steps (one weight step of one candidate network = 1: a FUSE step over ``K`` mixed
    candidates costs ``K``), the budget unit the two searches share; ``seconds`` wall time.
    """

    genotype: Genotype
    history: tuple[Round, ...] = field(repr=False)
    alphas: tuple[float, ...]
    steps: int
    seconds: float
