"""The result of a task distance matrix: d[a, b] over seeded trials, its summaries (mean,
standard deviation, closest sources) and its JSON form, kept apart from the computation so that
reports and callers need only this type (which labels each Fisher kind uses:
:mod:`fisher_fast.tasks.fisher_kinds`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fisher_fast.tasks.fisher_kinds import LABEL_CONVENTIONS


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
