"""The result of a task distance matrix: d[a, b] over seeded trials, and what its Fisher kind
means for the labels.

Which labels a FIM uses depends on the Fisher kind, and this matters for the distance:

* ``"exact"`` (default) and ``"mc"``: only the source network's own predictive distribution
  (all head units; exact sums over them, mc draws ``mc_samples`` labels per sample). Task b
  contributes its test *inputs* only, so the meaning of labels never has to agree across tasks.
* ``"empirical"`` (paper eq. 2): task b's test *labels* are fed to the source network a: label
  k is scored on a's head unit k, although k may mean something else in task a (for the digits
  suite, label 0 is "digit 0" in tasks 0, 2, 3 but "digit 6" in task 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

LABEL_CONVENTIONS = {
    "exact": "F[a,b] uses no labels: the expectation over the source network a's own predictive distribution "
    "(all head units) on task b's test inputs",
    "mc": "F[a,b] uses labels drawn from the source network a's own predictive distribution on task b's test inputs",
    "empirical": "F[a,b] scores the source network a on task b's test labels (task label k -> head unit k), "
    "whose meaning can differ between tasks a and b",
}


@dataclass
class DistanceResult:
    """Task distances of every trial: ``values[s, a, b]`` = d[a, b] with seed ``seeds[s]``
    (rows: source task a, columns: target task b, as in the paper's figures)."""

    tasks: list[str]
    arch: str
    fisher: str
    seeds: list[int]
    values: torch.Tensor
    """(S, K, K) float64 distances."""
    test_accuracy: torch.Tensor
    """(S, K) float64 test accuracy of each probe."""
    epsilon: float
    head_width: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        """(K, K) mean over trials."""
        return self.values.mean(0)

    @property
    def std(self) -> torch.Tensor:
        """(K, K) sample standard deviation over trials (n - 1 in the denominator; 0 for one trial)."""
        return trial_std(self.values)

    @property
    def reached(self) -> torch.Tensor:
        """(S, K) bool: whether each probe is an ε-approximation network."""
        return self.test_accuracy >= 1.0 - self.epsilon

    def closest_sources(self) -> list[int]:
        """For each target task b, the other task a with the smallest mean d[a, b] (Algorithm 1,
        line 14)."""
        mean = self.mean.clone()
        mean.fill_diagonal_(math.inf)
        return [int(i) for i in mean.argmin(0)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: means, standard deviations, every raw value and every probe's accuracy."""
        return {
            "tasks": self.tasks,
            "arch": self.arch,
            "fisher": self.fisher,
            "seeds": self.seeds,
            "label_convention": LABEL_CONVENTIONS[self.fisher],
            "rows": "source task",
            "columns": "target task",
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "values": self.values.tolist(),
            "closest_source": {
                t: self.tasks[a] for t, a in zip(self.tasks, self.closest_sources(), strict=True)
            },
            "test_accuracy": self.test_accuracy.tolist(),
            "epsilon": self.epsilon,
            "reached": self.reached.tolist(),
            "head_width": self.head_width,
            "config": self.config,
        }


def trial_std(values: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation over axis 0, the trials (n - 1 in the denominator), and zeros
    for a single trial (where torch's would be NaN)."""
    return values.std(0) if values.shape[0] > 1 else torch.zeros_like(values[0])
