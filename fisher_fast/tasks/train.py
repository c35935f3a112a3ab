"""Training ε-approximation probes (paper Definition 2) on a task's training split.

A probe is trained with Adam by default (paper appendix A: Adam, batch size 128, 100 epochs) on
the training split; with ``keep_best`` the weights of the epoch with the best validation accuracy
(ties: lower validation loss) are kept, so the test split is never used for any choice. The
probe is an ε-approximation network when its test accuracy P_N(T, X^(2)) is at least 1 - ε; when
it is not, a clear :class:`EpsilonWarning` says so (its distances are then less trustworthy).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.mixed_precision import MixedPrecision, check_precision, without_default_precision
from fisher_fast.tasks.probes import make_probe
from fisher_fast.tasks.task import Task
from fisher_fast.training import KeepBest, evaluate

OPTIMIZERS: dict[str, Any] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9),
}


class EpsilonWarning(UserWarning):
    """A probe's test accuracy is below 1 - ε: it is not an ε-approximation network."""


@dataclass(frozen=True)
class TrainConfig:
    """How probes are trained. ``lr`` is the optimizer's step size, ``weight_decay`` its L2
    coefficient, ``optimizer`` one of "adam", "adamw", "sgd" (momentum 0.9), ``precision``
    one of "fp32", "bf16", "fp16" (automatic mixed precision of the training steps, see
    :mod:`fisher_fast.mixed_precision`; the probe's FIM is computed in float32 either way)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    keep_best: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(
                f"invalid training settings {self}: epochs, batch_size and lr must be positive, weight_decay >= 0"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (recorded with results and part of cache keys); ``precision``
        only when it is not the default fp32, so that keys written before it existed still
        match. Inverse: ``TrainConfig(**data)``."""
        return without_default_precision(asdict(self))


@dataclass
class Probe:
    """A trained probe and what is known about it. Accuracies are fractions in [0, 1]."""

    model: nn.Module
    arch: str
    task: str
    seed: int
    input_shape: tuple[int, ...]
    head_width: int
    test_accuracy: float
    val_accuracy: float
    best_epoch: int
    epsilon: float
    train_seconds: float = 0.0

    @property
    def reached(self) -> bool:
        """Whether the test accuracy reached 1 - ε (Definition 2)."""
        return self.test_accuracy >= 1.0 - self.epsilon

    def metadata(self) -> dict[str, Any]:
        """Everything except the weights, as plain JSON values."""
        return {
            "arch": self.arch,
            "task": self.task,
            "seed": self.seed,
            "input_shape": list(self.input_shape),
            "head_width": self.head_width,
            "test_accuracy": self.test_accuracy,
            "val_accuracy": self.val_accuracy,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds,
        }


def train_probe(
    task: Task,
    arch: str,
    *,
    epsilon: float = 0.1,
    seed: int = 0,
    config: TrainConfig | None = None,
    head_width: int | None = None,
    device: str | torch.device = "cpu",
) -> Probe:
    """Train probe ``arch`` on ``task``'s training split and test it (Definition 2).

    Args:
        epsilon: the probe should reach test accuracy >= 1 - epsilon; an EpsilonWarning says
            when it does not (the probe is returned either way).
        seed: seeds the initialisation and the batch order (the data splits are the task's).
        config: optimizer and schedule (default :class:`TrainConfig`, the paper's settings).
        head_width: number of output units, at least the task's class count; in a comparison,
            the largest class count of the suite (task label k -> head unit k).
        device: where to train; the returned model stays there, in eval mode.
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    config = config or TrainConfig()
    head_width = head_width or task.num_classes
    if head_width < task.num_classes:
        raise ValueError(
            f"head_width {head_width} is smaller than task {task.name!r}'s {task.num_classes} classes"
        )
    splits = task.splits()
    start = time.perf_counter()
    input_shape = tuple(splits.train.x.shape[1:])
    model = make_probe(arch, input_shape, head_width, seed=seed).to(device)

    def validation_score() -> tuple[float, float]:
        accuracy, loss = evaluate(model, splits.val, device)
        return accuracy, -loss  # ties in accuracy go to the lower loss

    best_epoch = fit(
        model,
        config,
        splits.train.x,
        splits.train.y,
        F.cross_entropy,
        seed=seed,
        device=device,
        score=validation_score if config.keep_best else None,
    )
    model.eval()
    probe = Probe(
        model,
        arch,
        task.name,
        seed,
        input_shape,
        head_width,
        test_accuracy=evaluate(model, splits.test, device)[0],
        val_accuracy=evaluate(model, splits.val, device)[0],
        best_epoch=best_epoch,
        epsilon=epsilon,
        train_seconds=time.perf_counter() - start,
    )
    warn_if_not_reached(probe)
    return probe


@dataclass(frozen=True)
class ProbeRecipe:
    """What decides a probe besides its task and seed: architecture, head width, ε and training
    settings. Every probe of one comparison shares them (Definition 3), so a recipe trains the
    probes of a run and rebuilds them from their saved weights the same way."""

    arch: str
    head_width: int
    epsilon: float
    train: TrainConfig

    def train_probe(self, task: Task, seed: int, device: str | torch.device) -> Probe:
        """:func:`train_probe` of ``task`` with these settings and ``seed``, on ``device``."""
        return train_probe(
            task,
            self.arch,
            epsilon=self.epsilon,
            seed=seed,
            config=self.train,
            head_width=self.head_width,
            device=device,
        )

    def rebuild(
        self,
        task: Task,
        seed: int,
        state: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        device: str | torch.device,
    ) -> Probe:
        """``task``'s probe of trial ``seed`` from its weights ``state`` and its
        :meth:`Probe.metadata` ``meta``, in eval mode on ``device``, without training; a
        RuntimeError when the weights do not fit the architecture."""
        input_shape = tuple(meta["input_shape"])
        model = make_probe(self.arch, input_shape, self.head_width)
        model.load_state_dict(state)
        return Probe(
            model=model.to(device).eval(),
            arch=self.arch,
            task=task.name,
            seed=seed,
            input_shape=input_shape,
            head_width=self.head_width,
            test_accuracy=meta["test_accuracy"],
            val_accuracy=meta["val_accuracy"],
            best_epoch=meta["best_epoch"],
            epsilon=self.epsilon,
            train_seconds=meta["train_seconds"],
        )


def fit(
    model: nn.Module,
    config: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    seed: int,
    device: str | torch.device,
    score: Callable[[], tuple[float, ...]] | None = None,
) -> int:
    """Train ``model`` in place for ``config.epochs`` epochs of minibatches of (x, y) drawn in
    an order seeded by ``seed``, minimising the mean ``loss(model(x_batch), y_batch)`` with the
    configured optimizer. With ``score`` (larger is better, called after every epoch, e.g. on
    the validation split), the weights of the best-scoring epoch are restored at the end.
    Returns that epoch (``config.epochs`` without ``score``). A final batch of one sample is
    skipped (batch norm cannot normalise it)."""
    optimizer = OPTIMIZERS[config.optimizer](
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    x, y = x.to(device), y.to(device)
    amp = MixedPrecision(config.precision, x.device)
    order = torch.Generator().manual_seed(seed)
    best = KeepBest(model, index=config.epochs)
    for epoch in range(1, config.epochs + 1):
        model.train()
        for idx in torch.randperm(len(y), generator=order).split(config.batch_size):
            if len(idx) < 2:
                continue
            idx = idx.to(device)
            optimizer.zero_grad(set_to_none=True)
            with amp.forward():
                value = loss(model(x[idx]), y[idx])
            amp.backward(value)
            amp.step(optimizer)
        if score is not None:
            best.offer(score(), epoch)
    best.restore()
    return best.index


def warn_if_not_reached(probe: Probe) -> None:
    """Issue an EpsilonWarning when the probe is not an ε-approximation network."""
    if not probe.reached:
        warnings.warn(
            f"probe {probe.arch!r} on task {probe.task!r} (seed {probe.seed}) reached test accuracy "
            f"{probe.test_accuracy:.4f} < 1 - ε = {1 - probe.epsilon:.4f}: it is not an ε-approximation network "
            "(Definition 2), so its task distances are less trustworthy. Train longer (epochs), tune the "
            "learning rate, pick a stronger probe, or raise epsilon.",
            EpsilonWarning,
            stacklevel=3,
        )
