"""Final training of a searched cell and the one test evaluation (the paper's Tables 1-4:
test accuracy, parameter count, cost)."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from fisher_fast.nas.fuse import FuseConfig
from fisher_fast.nas.genotype import Genotype
from fisher_fast.nas.training import NetworkBuilder, batches, build_seeded, draw_seed, train_steps
from fisher_fast.tasks.source import Part
from fisher_fast.tasks.train import evaluate


class Evaluation(NamedTuple):
    """``test_accuracy`` (fraction in [0, 1]), trainable ``parameters`` of the network, and
    ``seconds`` of wall time for the training and the test evaluation."""

    test_accuracy: float
    parameters: int
    seconds: float


def train_and_evaluate(
    genotype: Genotype,
    train_data: Part,
    test_data: Part,
    *,
    num_classes: int,
    steps: int,
    generator: torch.Generator,
    config: FuseConfig | None = None,
    build: NetworkBuilder | None = None,
) -> Evaluation:
    """Train a fresh network around ``genotype`` for ``steps`` Adam steps on the whole training
    split ``train_data`` (batch size and step size from ``config``), then evaluate it once on
    ``test_data``. The schedule is fixed in advance, so no choice looks at the test split;
    ``generator`` seeds the initialisation and the batches."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    config = config or FuseConfig()
    build = build or config.skeleton.builder(tuple(train_data.x.shape[1:]), num_classes)
    start = time.perf_counter()
    network = build_seeded(build, genotype, draw_seed(generator))
    train_steps(
        network, batches(train_data, config.batch_size, generator), steps, lr=config.weight_lr
    )
    accuracy, _ = evaluate(network, test_data, "cpu")
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return Evaluation(accuracy, parameters, time.perf_counter() - start)
