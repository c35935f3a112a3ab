"""Pieces shared by the searches and the final training: the skeleton's settings, seeded
candidate networks, the validation split carved from the training data, and seeded batches.

Everything random is drawn from one ``torch.Generator`` passed in by the caller, so a search
run twice with generators seeded alike gives the same result (on CPU). That generator lives on
the CPU whatever the device: networks are initialised and batches drawn on the CPU, then moved,
so the device changes only the arithmetic, not the random choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fisher_fast.mixed_precision import MixedPrecision
from fisher_fast.nas.genotype import Genotype
from fisher_fast.nas.network import Network
from fisher_fast.nas.parallel import data_parallel, shard_loss, sync_buffers
from fisher_fast.part import Part, stratified_split

NetworkBuilder = Callable[[Genotype], nn.Module]
"""Turns a genotype into a fresh classifier ``(N, C, H, W) -> (N, num_classes)`` logits."""


@dataclass(frozen=True)
class Skeleton:
    """Widths of the :class:`~fisher_fast.nas.network.Network` built around each cell: stem
    ``channels`` and ``stages`` (each after the first halves H, W and doubles the channels).
    Small defaults so that a digits (8x8) search runs in seconds on one CPU core."""

    channels: int = 8
    stages: int = 2
    cells_per_stage: int = 1

    def builder(self, input_shape: tuple[int, ...], num_classes: int) -> NetworkBuilder:
        """A :data:`NetworkBuilder` for inputs ``input_shape`` ``(C, H, W)`` and ``num_classes``."""

        def build(genotype: Genotype) -> nn.Module:
            return Network(
                genotype,
                input_shape,
                num_classes,
                channels=self.channels,
                cells_per_stage=self.cells_per_stage,
                stages=self.stages,
            )

        return build


def draw_seed(generator: torch.Generator) -> int:
    """A fresh 62-bit seed from ``generator`` (for one candidate's initialisation)."""
    return int(torch.randint(2**62, (1,), generator=generator).item())


def build_seeded(
    build: NetworkBuilder, genotype: Genotype, seed: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """``build(genotype)`` with its initialisation drawn from ``seed`` (on the CPU), then moved
    to ``device``; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(genotype).to(device)


def carve_validation(train: Part, fraction: float, generator: torch.Generator) -> tuple[Part, Part]:
    """Split the training split into (weights part, validation part), holding out ``fraction``
    of each class for the validation part (the searches' α and model choices use it; the test
    split is never involved)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must lie in (0, 1), got {fraction}")
    held, kept = stratified_split(train.y, fraction, generator)
    if len(kept) < 2 or len(held) < 2:
        raise ValueError(
            f"{len(train)} training samples are too few to carve a validation split of "
            f"{fraction:.0%} with at least two samples on each side"
        )
    return Part(train.x[kept], train.y[kept]), Part(train.x[held], train.y[held])


def batches(part: Part, batch_size: int, generator: torch.Generator) -> Iterator[Part]:
    """Endless mini-batches of ``part``: seeded reshuffles, each sample once per pass; batches
    of a single sample are skipped (batch norm cannot normalise one sample)."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (batch norm), got {batch_size}")
    if len(part) < 2:
        raise ValueError(f"need at least two samples to draw batches, got {len(part)}")
    while True:
        for idx in torch.randperm(len(part), generator=generator).split(batch_size):
            if len(idx) >= 2:
                yield Part(part.x[idx], part.y[idx])


def train_steps(
    model: nn.Module,
    data: Iterator[Part],
    steps: int,
    optimizer: torch.optim.Optimizer,
    precision: str = "fp32",
) -> None:
    """``steps`` steps of ``optimizer`` on the cross-entropy of batches from ``data``, in
    train mode, at ``precision`` (:mod:`fisher_fast.mixed_precision`); data-parallel in a
    process group (:mod:`~fisher_fast.nas.parallel`)."""
    parallel = data_parallel(model)
    amp = MixedPrecision(precision, next(model.parameters()).device)
    model.train()
    for _, batch in zip(range(steps), data, strict=False):
        optimizer.zero_grad(set_to_none=True)
        with amp.forward():
            loss = shard_loss(parallel, batch)
        amp.backward(loss)
        amp.step(optimizer)
    sync_buffers(model)
