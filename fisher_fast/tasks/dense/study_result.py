"""The result of the §4.4 study: every trial's distances, probe scores and transfer errors,
their summaries and JSON form, kept apart from the computation so that the report and the
callers need only this type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fisher_fast.tasks.dense.ranks import rank_agreement
from fisher_fast.tasks.matrix_result import trial_std


@dataclass
class DenseStudyResult:
    """Every trial's distances and transfer results; rows are source tasks, columns targets."""

    tasks: list[str]
    descriptions: list[str]
    fisher: str
    seeds: list[int]
    distance: torch.Tensor
    """(S, K, K) float64 d[a, b] per trial."""
    test_r2: torch.Tensor
    """(S, K) float64 test R² of each probe."""
    transfer: torch.Tensor
    """(S, K, K) float64 test MSE on b after fine-tuning probe a on b."""
    scratch: torch.Tensor
    """(S, K) float64 test MSE on b after training from scratch with the same budget."""
    epsilon: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> torch.Tensor:
        """(S, K, K) transfer gain 1 - transfer / scratch per trial."""
        return 1.0 - self.transfer / self.scratch[:, None, :]

    @property
    def distance_mean(self) -> torch.Tensor:
        """(K, K) mean distance over trials."""
        return self.distance.mean(0)

    @property
    def distance_std(self) -> torch.Tensor:
        """(K, K) sample standard deviation of the distance over trials (0 for one trial)."""
        return trial_std(self.distance)

    @property
    def gain_mean(self) -> torch.Tensor:
        """(K, K) mean transfer gain over trials."""
        return self.gain.mean(0)

    def agreement(self) -> dict[str, Any]:
        """:func:`rank_agreement` of the means over trials."""
        return rank_agreement(self.distance_mean, self.gain_mean)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: means, standard deviations, raw values, scores and the rank agreement."""
        return {
            "tasks": self.tasks,
            "descriptions": self.descriptions,
            "fisher": self.fisher,
            "seeds": self.seeds,
            "rows": "source task",
            "columns": "target task",
            "distance_mean": self.distance_mean.tolist(),
            "distance_std": self.distance_std.tolist(),
            "distance": self.distance.tolist(),
            "transfer_gain_mean": self.gain_mean.tolist(),
            "transfer_gain_std": trial_std(self.gain).tolist(),
            "transfer_test_mse": self.transfer.tolist(),
            "scratch_test_mse": self.scratch.tolist(),
            "test_r2": self.test_r2.tolist(),
            "epsilon": self.epsilon,
            "agreement": self.agreement(),
            "config": self.config,
        }
