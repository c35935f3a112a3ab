"""Toy data and settings for the search tests: a two-class problem on 1x4x4 images that any
working network learns in a few steps, and a builder that cripples every cell but one."""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.nas import FuseConfig, Genotype, NetworkBuilder, SearchSpace, Skeleton
from fisher_fast.tasks import Part

SHAPE = (1, 4, 4)
"""Input shape (C, H, W) of the toy problem."""

TINY = FuseConfig(
    candidates=1,
    rounds=2,
    max_steps=20,
    check_every=5,
    batch_size=16,
    weight_lr=0.02,
    alpha_lr=0.2,
    skeleton=Skeleton(channels=2, stages=1),
)
"""Two networks of a few dozen weights per round, at most 20 steps: milliseconds per step."""

TWO_CELLS = SearchSpace(3, ["identity", "conv_3x3"], structure=[(0, 2)])
"""A space of exactly two cells (node 2 = identity or conv_3x3 of the input)."""

THREE_OPS = SearchSpace(3, ["identity", "avg_pool_3x3", "conv_3x3"])
"""A space of a few dozen distinct 3-node cells."""


def toy_part(n: int, seed: int) -> Part:
    """``n`` images ``(n, 1, 4, 4)``: class 1 has mean brightness +1, class 0 has -1 (noise 0.5),
    balanced labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (2.0 * y - 1.0).view(n, 1, 1, 1) + 0.5 * torch.randn(n, *SHAPE, generator=g)
    return Part(x, y)


class Silenced(nn.Module):
    """A network whose logits are always zero: it can learn nothing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 0.0


def only_good(good: Genotype) -> NetworkBuilder:
    """The skeleton's network for ``good``, a silenced one for every other cell: ``good`` is
    clearly the better candidate."""
    build = TINY.skeleton.builder(SHAPE, 2)

    def make(genotype: Genotype) -> nn.Module:
        net = build(genotype)
        return net if genotype == good else Silenced(net)

    return make
