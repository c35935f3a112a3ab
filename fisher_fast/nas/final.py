"""Final training of a searched cell and the one test evaluation (the paper's Tables 1-4:
test accuracy, parameter count, cost)."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from fisher_fast.devices import resolve_device
from fisher_fast.nas.fuse import FuseConfig
from fisher_fast.nas.genotype import Genotype
from fisher_fast.nas.training import NetworkBuilder, batches, build_seeded, draw_seed, train_steps
from fisher_fast.part import Part
from fisher_fast.training import KeepBest, evaluate


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
    val_data: Part | None = None,
    check_every: int = 50,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Train a fresh network around ``genotype`` for ``steps`` Adam steps on the whole training
    split ``train_data`` (batch size and step size from ``config``), then evaluate it once on
    ``test_data``. ``generator`` seeds the initialisation and the batches.

    With ``val_data`` (a split disjoint from both), the network is scored on it every
    ``check_every`` steps and at the end, and the best state (validation accuracy, then lower
    loss; the earlier on ties) is the one tested: Adam on a small training set can spike late,
    after the training loss is near zero. Without it, the last state is tested. Either way the
    schedule is fixed in advance and no choice looks at the test split. ``device``: where the
    network trains and is tested (initialisation and batches are drawn on the CPU).
    """
    device = resolve_device(device, "train_and_evaluate(device=...)")
    if steps < 1 or check_every < 1:
        raise ValueError(f"steps and check_every must be at least 1, got {steps}, {check_every}")
    config = config or FuseConfig()
    build = build or config.skeleton.builder(tuple(train_data.x.shape[1:]), num_classes)
    start = time.perf_counter()
    network = build_seeded(build, genotype, draw_seed(generator), device)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.weight_lr)
    data = batches(train_data.to(device), config.batch_size, generator)
    best = KeepBest(network)
    for done in range(0, steps, check_every):
        trained = min(done + check_every, steps)
        train_steps(network, data, trained - done, optimizer, config.precision)
        if val_data is not None:
            accuracy, loss = evaluate(network, val_data, device)
            best.offer((accuracy, -loss), trained)
    best.restore()
    accuracy, _ = evaluate(network, test_data, device)
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return Evaluation(accuracy, parameters, time.perf_counter() - start)
