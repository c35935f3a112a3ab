"""The skeleton of the paper's Figure 1b: stem, stacked cells, pooling and a classifier."""

from __future__ import annotations

import torch
from torch import nn

from fisher_fast.nas.cell import Cell
from fisher_fast.nas.genotype import Genotype
from fisher_fast.tasks.probes.small import image_channels


class Network(nn.Module):
    """A classifier for images ``(N, C, H, W)`` built around one cell genotype.

    Layout: stem (conv 3x3 to ``channels`` + BatchNorm) -> ``stages`` stages of
    ``cells_per_stage`` normal cells, with a reduction cell between consecutive stages that
    halves H and W and doubles the channels -> global average pooling -> linear head with
    ``num_classes`` logits. Normal and reduction cells share the genotype (the paper searches
    one cell); reductions use the stride-2 operations. With the defaults (16 channels, 3 stages
    of one cell) an 8x8 digit becomes 2x2 with 64 channels before pooling; the global pooling
    makes every input size of at least 1x1 work.
    """

    def __init__(
        self,
        genotype: Genotype,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: int = 16,
        cells_per_stage: int = 1,
        stages: int = 3,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("channels", channels),
            ("cells_per_stage", cells_per_stage),
            ("stages", stages),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.genotype = genotype
        self.stem = nn.Sequential(
            nn.Conv2d(
                image_channels(tuple(input_shape), "nas network"),
                channels,
                3,
                padding=1,
                bias=False,
            ),
            nn.BatchNorm2d(channels),
        )
        cells: list[nn.Module] = []
        width = channels
        for stage in range(stages):
            if stage > 0:
                cells.append(Cell(genotype, width, 2 * width, reduction=True))
                width *= 2
            cells.extend(
                Cell(genotype, width, width, reduction=False) for _ in range(cells_per_stage)
            )
        self.cells = nn.Sequential(*cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images -> ``(N, num_classes)`` logits."""
        return self.classifier(self.pool(self.cells(self.stem(x))).flatten(1))

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters (what the paper's tables report)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
