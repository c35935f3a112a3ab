"""Training autoencoder probes on image-to-image tasks, and the fixed-budget fine-tuning of the
transfer affinity.

A probe is trained with the mean-square error (paper appendix A: Adam, batch 64, 20 epochs)
on the task's training pairs, keeping the epoch of lowest validation error. Its performance
P_N(T, X^(2)) of Definition 2 is the coefficient of determination on the test pairs,
R² = 1 - Σ(f - y)² / Σ(y - ȳ)² (1 for a perfect prediction, 0 for predicting the mean target),
clipped at 0, so that it lies in [0, 1] as the definition requires.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.tasks.dense.probe import make_autoencoder
from fisher_fast.tasks.dense.suite import DenseSuite, ImageTask, Pairs
from fisher_fast.tasks.train import EpsilonWarning, fit


@dataclass
class RegressionScore:
    """Mean squared error per output value and R² (clipped at 0) on one split."""

    mse: float
    r2: float


@torch.no_grad()
def evaluate_regression(
    model: nn.Module, pairs: Pairs, device: str | torch.device, batch_size: int = 1024
) -> RegressionScore:
    """:class:`RegressionScore` of ``model`` in eval mode on ``pairs`` (mode restored)."""
    was_training = model.training
    model.eval()
    squared_error = 0.0
    for start in range(0, len(pairs), batch_size):
        x = pairs.x[start : start + batch_size].to(device)
        y = pairs.y[start : start + batch_size].to(device)
        squared_error += float((model(x) - y).double().square().sum())
    model.train(was_training)
    spread = float((pairs.y.double() - pairs.y.double().mean()).square().sum())
    r2 = 1.0 - squared_error / spread if spread > 0 else 0.0
    return RegressionScore(squared_error / pairs.y.numel(), max(0.0, r2))


@dataclass
class DenseProbe:
    """An autoencoder trained on one task with one seed, and its scores."""

    model: nn.Module
    task: str
    seed: int
    test: RegressionScore
    val: RegressionScore
    best_epoch: int
    train_seconds: float

    def metadata(self) -> dict[str, Any]:
        """Everything except the weights, as plain JSON values."""
        return {
            "task": self.task,
            "seed": self.seed,
            "test_mse": self.test.mse,
            "test_r2": self.test.r2,
            "val_mse": self.val.mse,
            "val_r2": self.val.r2,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_metadata(cls, model: nn.Module, meta: dict[str, Any]) -> DenseProbe:
        """The probe of :meth:`metadata` with the weights already loaded into ``model``."""
        return cls(
            model,
            meta["task"],
            meta["seed"],
            RegressionScore(meta["test_mse"], meta["test_r2"]),
            RegressionScore(meta["val_mse"], meta["val_r2"]),
            meta["best_epoch"],
            meta["train_seconds"],
        )


def train_autoencoder(
    suite: DenseSuite, task: ImageTask, seed: int, device: str | torch.device = "cpu"
) -> DenseProbe:
    """Train a fresh probe (initialisation and batch order seeded by ``seed``) on ``task``;
    warn with :class:`EpsilonWarning` when its test R² is below 1 - ε."""
    splits = suite.splits(task)
    start = time.perf_counter()
    model = make_autoencoder(suite.image_shape(), seed=seed).to(device)

    def validation_score() -> tuple[float]:
        return (-evaluate_regression(model, splits.val, device).mse,)

    best_epoch = fit(
        model,
        suite.train,
        splits.train.x,
        splits.train.y,
        F.mse_loss,
        seed=seed,
        device=device,
        score=validation_score if suite.train.keep_best else None,
    )
    model.eval()
    probe = DenseProbe(
        model,
        task.name,
        seed,
        evaluate_regression(model, splits.test, device),
        evaluate_regression(model, splits.val, device),
        best_epoch,
        time.perf_counter() - start,
    )
    if probe.test.r2 < 1 - suite.epsilon:
        warnings.warn(
            f"the autoencoder on task {task.name!r} (seed {seed}) reached test R² {probe.test.r2:.4f} "
            f"< 1 - ε = {1 - suite.epsilon:.4f}: it is not an ε-approximation network (Definition 2), "
            "so its task distances are less trustworthy; train longer (epochs) or raise epsilon",
            EpsilonWarning,
            stacklevel=2,
        )
    return probe


def transfer_mse(
    suite: DenseSuite,
    target: ImageTask,
    seed: int,
    start_from: nn.Module | None,
    device: str | torch.device = "cpu",
) -> float:
    """Test mean squared error on ``target`` after ``suite.transfer_epochs`` epochs of training
    every weight on its training pairs (no model selection: a fixed budget), starting from a
    copy of ``start_from`` (a source task's probe) or, with None, from a fresh initialisation
    seeded by ``seed`` (training from scratch)."""
    model: nn.Module
    if start_from is None:
        model = make_autoencoder(suite.image_shape(), seed=seed).to(device)
    else:
        model = copy.deepcopy(start_from).to(device)
    splits = suite.splits(target)
    budget = replace(suite.train, epochs=suite.transfer_epochs, keep_best=False)
    fit(model, budget, splits.train.x, splits.train.y, F.mse_loss, seed=seed, device=device)
    return evaluate_regression(model, splits.test, device).mse
